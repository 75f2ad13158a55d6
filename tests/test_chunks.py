"""Chunk assembly and response shapes (pure)."""

from api.assembly import FullAssembler, Meta, StreamAssembler
from api.chat.assembly import CHAT as CHAT_FAMILY
from api.completions.assembly import TEXT as TEXT_FAMILY
from shared.messages import Final, Tokens, Usage

CHAT = Meta(id="chatcmpl-1", created=1, model="m", family=CHAT_FAMILY)
TEXT = Meta(id="cmpl-1", created=1, model="m", family=TEXT_FAMILY)


def tok(seq: int, text: str, index: int = 0, finish: str | None = None) -> Tokens:
    return Tokens(seq=seq, index=index, text=text, token_ids=(seq,), finish_reason=finish)  # type: ignore[arg-type]


def test_first_chat_chunk_carries_the_role_and_later_ones_do_not() -> None:
    asm = StreamAssembler(CHAT, include_usage=False)
    first = asm.tokens(tok(1, "He"))
    second = asm.tokens(tok(2, "llo"))
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert second[0]["choices"][0]["delta"] == {"content": "llo"}
    assert first[0]["object"] == "chat.completion.chunk"


def test_usage_chunk_only_when_asked_and_has_no_choices() -> None:
    final = Final(seq=3, finish_reasons=("length",), usage=Usage(prompt_tokens=5, completion_tokens=2))
    with_usage = StreamAssembler(CHAT, include_usage=True)
    with_usage.tokens(tok(1, "a", finish="length"))
    out = with_usage.final(final)
    assert out == [
        {**out[0], "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    ]
    without = StreamAssembler(CHAT, include_usage=False)
    without.tokens(tok(1, "a", finish="length"))
    assert without.final(final) == []


def test_choice_that_produced_nothing_still_opens_and_finishes() -> None:
    asm = StreamAssembler(CHAT, include_usage=False)
    asm.tokens(tok(1, "x", index=0, finish="stop"))
    out = asm.final(
        Final(seq=2, finish_reasons=("stop", "stop"), usage=Usage(prompt_tokens=1, completion_tokens=1))
    )
    assert [c["choices"][0]["index"] for c in out] == [1]
    assert out[0]["choices"][0]["finish_reason"] == "stop"


def test_empty_middle_delta_is_skipped() -> None:
    asm = StreamAssembler(TEXT, include_usage=False)
    asm.tokens(tok(1, "a"))
    assert asm.tokens(tok(2, "")) == []
    assert asm.tokens(tok(3, "", finish="stop"))[0]["choices"][0]["finish_reason"] == "stop"


def test_full_response_joins_text_per_choice() -> None:
    asm = FullAssembler(CHAT)
    for seq, (text, index) in enumerate([("Hel", 0), ("Yo", 1), ("lo", 0)], start=1):
        asm.tokens(tok(seq, text, index=index))
    body = asm.response(
        Final(seq=4, finish_reasons=("length", "stop"), usage=Usage(prompt_tokens=3, completion_tokens=3))
    )
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello", "Yo"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert body["usage"]["total_tokens"] == 6
    assert body["object"] == "chat.completion"


def test_text_completion_shape() -> None:
    asm = FullAssembler(TEXT)
    asm.tokens(tok(1, "abc"))
    body = asm.response(
        Final(seq=2, finish_reasons=("length",), usage=Usage(prompt_tokens=1, completion_tokens=1))
    )
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "abc"
    assert "system_fingerprint" not in body


def test_the_events_of_a_stream_are_its_chunks_as_sse_byte_for_byte() -> None:
    """The template path for plain text and the dict path give the same bytes."""
    import json

    from api.sse import encode

    replies = [
        tok(1, "He"),
        tok(2, 'l"lo\\n é'),
        tok(3, "", index=1),
        tok(4, "x", index=1),
        tok(5, "!", finish="stop"),
    ]
    final = Final(seq=6, finish_reasons=("stop", "length"), usage=Usage(prompt_tokens=5, completion_tokens=5))
    for meta in (CHAT, TEXT):
        fast, slow = StreamAssembler(meta, include_usage=True), StreamAssembler(meta, include_usage=True)
        for reply in replies:
            assert fast.events(reply) == [encode(c) for c in slow.tokens(reply)], (meta.kind, reply)
        assert fast.events(final) == [encode(c) for c in slow.final(final)]
    event = StreamAssembler(CHAT, include_usage=False).events(tok(1, "hi"))[0]
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert json.loads(event[6:])["choices"][0]["delta"]["content"] == "hi"
