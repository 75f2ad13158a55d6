"""Wire schemas: round trips and refusal of what this release cannot read."""

import json

import pytest

from shared.messages import (
    EMBED_VERSION,
    JOB_VERSIONS,
    PROMPT_LOGPROBS_VERSION,
    Embed,
    Failure,
    Final,
    FinishReason,
    Job,
    Sampling,
    Started,
    Tokens,
    Usage,
    WireError,
    decode_job,
    decode_reply,
    encode,
    encode_tokens,
)
from shared.names import Names


def test_every_reply_type_round_trips() -> None:
    replies = [
        Started(seq=0, worker="w1", attempt=1),
        Tokens(seq=1, index=0, text="héllo", token_ids=(1, 2), finish_reason=None),
        Final(seq=2, finish_reasons=("stop",), usage=Usage(prompt_tokens=3, completion_tokens=2)),
        Failure(seq=3, status=400, code="invalid_request", message="bad"),
    ]
    for reply in replies:
        assert decode_reply(encode(reply)) == reply


@pytest.mark.parametrize(
    "text",
    ["", "plain words", 'quote " backslash \\ slash /', "\n\r\t\b\f\x00\x01\x1f\x7f", "héllo \u2028 😀 中文"],
)
@pytest.mark.parametrize("finish", [None, "stop", "length"])
def test_token_messages_built_by_hand_decode_as_the_models(text: str, finish: FinishReason | None) -> None:
    ids = (0, 7, 128_000)
    built = encode_tokens(12, 1, text, list(ids), finish)
    model = Tokens(seq=12, index=1, text=text, token_ids=ids, finish_reason=finish)
    assert decode_reply(built) == model
    # the same JSON but for the fields left at null, which it leaves out
    full = json.loads(encode(model))
    assert json.loads(built) == {k: v for k, v in full.items() if v is not None}
    assert len(built) < len(encode(model).encode())


def test_token_text_that_is_not_unicode_fails_as_the_model_does() -> None:
    with pytest.raises(ValueError):
        encode(Tokens(seq=0, index=0, text="\ud800", token_ids=()))
    with pytest.raises(ValueError):  # UnicodeEncodeError is a ValueError
        encode_tokens(0, 0, "\ud800", (), None)


def test_job_round_trips_and_rejects_other_versions() -> None:
    job = Job(
        id="req_1",
        tenant="t",
        model="m",
        prompt_token_ids=(1, 2, 3),
        sampling=Sampling(max_tokens=4, stop=("x",), n=2),
        created_at=1.5,
    )
    assert decode_job(encode(job)) == job
    with pytest.raises(WireError):
        decode_job(encode(job).replace('"v":1', '"v":99'))


def test_each_kind_of_job_has_its_version_and_the_versions_are_one_ordered_set() -> None:
    assert tuple(range(1, len(JOB_VERSIONS) + 1)) == JOB_VERSIONS
    assert Sampling(max_tokens=4).version == 1
    assert Sampling(max_tokens=4, logprobs=2).version == 2
    assert Sampling(max_tokens=4, logprobs=2, prompt_logprobs=2).version == PROMPT_LOGPROBS_VERSION
    assert PROMPT_LOGPROBS_VERSION < EMBED_VERSION == JOB_VERSIONS[-1]
    job = Job(
        v=EMBED_VERSION,
        id="req_1",
        tenant="t",
        model="m",
        prompt_token_ids=(1, 2, 3),
        sampling=Sampling(max_tokens=0),
        created_at=1.5,
        embed=Embed(lengths=(2, 1)),
    )
    assert decode_job(encode(job)) == job
    # An embedding job marked with an older version would reach a release that generates instead.
    with pytest.raises(WireError):
        decode_job(encode(job.model_copy(update={"v": PROMPT_LOGPROBS_VERSION})))


def test_garbage_is_a_wire_error_not_a_crash() -> None:
    with pytest.raises(WireError):
        decode_reply(b"not json")
    with pytest.raises(WireError):
        decode_reply(b'{"type": "nope", "seq": 1}')


def test_names_share_the_prefix_and_are_distinct() -> None:
    names = Names("p")
    built = {
        names.jobs_stream("m", "t"),
        names.streams_index("m"),
        names.reply_channel("r"),
        names.cancel_channel(),
        names.cancelled("r"),
        names.workers(),
        names.worker("w"),
        names.models(),
        names.dead_letter("m"),
        names.hub_channel(),
        names.progress("r"),
    }
    assert len(built) == 11
    assert all(n.startswith("p:") for n in built)
