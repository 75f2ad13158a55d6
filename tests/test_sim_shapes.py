"""The simulated engine's shapes on the demo model's real tokenizer and chat template: structured
output, tool calls, reasoning and log probabilities, as the deltas a worker would publish."""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from shared.messages import Sampling, StructuredOutput
from shared.settings import WorkerSettings
from worker.engine import Delta
from worker.main import sim_shaping
from worker.sim_engine import SimEngine
from worker.sim_schema import compact
from worker.sim_shapes import Shaping, structural_text
from worker.sim_timing import PRESETS
from worker.sim_tokens import Detokenizer, load_tokenizer

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit", "réaumur"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {}}},
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = re.compile(r"<tool_call>\n(.*)\n</tool_call>", re.DOTALL)


@pytest.fixture(scope="module")
def hf(demo_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(demo_model_dir))


@pytest.fixture(scope="module")
def prompts(hf: Any) -> dict[str, list[int]]:
    def render(**kwargs: Any) -> list[int]:
        text = hf.apply_chat_template(USER, add_generation_prompt=True, tokenize=False, **kwargs)
        return list(hf.encode(text, add_special_tokens=False))

    plain = render()
    return {
        "plain": plain,
        "tools": render(tools=TOOLS),
        "thinking off": render(enable_thinking=False),
        "thinking open": plain + hf.encode("<think>\n", add_special_tokens=False),
    }


@asynccontextmanager
async def sim(model: Path, **shaping: Any) -> AsyncIterator[SimEngine]:
    engine = await SimEngine.start(str(model), PRESETS["cpu-demo"], speed=1000.0, shaping=Shaping(**shaping))
    try:
        yield engine
    finally:
        engine.shutdown()


async def run(
    engine: SimEngine, prompt: list[int], reasoning_ended: bool | None = None, **sampling: Any
) -> list[Delta]:
    out: list[Delta] = []
    params = Sampling(**{"max_tokens": 200, **sampling})
    async for deltas in engine.generate("r", prompt, params, reasoning_ended=reasoning_ended):
        out.extend(deltas)
    return out


def text_of(deltas: list[Delta], index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


def ids_of(deltas: list[Delta], index: int = 0) -> list[int]:
    return [t for d in deltas if d.index == index for t in d.token_ids]


def schema(value: Any) -> StructuredOutput:
    return StructuredOutput(json_schema=json.dumps(value))


async def test_a_json_schema_answer_is_a_valid_document_then_eos(
    demo_model_dir: Path, hf: Any, prompts: dict[str, list[int]]
) -> None:
    async with sim(demo_model_dir) as engine:
        documents = set()
        for seed in range(6):
            deltas = await run(engine, prompts["plain"], seed=seed, n=2, structured_output=schema(WEATHER))
            for index in (0, 1):
                text, ids = text_of(deltas, index), ids_of(deltas, index)
                jsonschema.validate(json.loads(text), WEATHER)
                assert text == hf.decode(ids, skip_special_tokens=True) == compact(json.loads(text))
                last = [d for d in deltas if d.index == index][-1]
                assert (last.token_ids, last.text, last.finish_reason) == ((hf.eos_token_id,), "", "stop")
                documents.add(text)
        assert len(documents) > 6
        cut = await run(engine, prompts["plain"], max_tokens=3, structured_output=schema(WEATHER))
        assert len(cut) == 3 and cut[-1].finish_reason == "length"


async def test_choices_regexes_and_json_objects(demo_model_dir: Path, prompts: dict[str, list[int]]) -> None:
    async with sim(demo_model_dir) as engine:
        for seed in range(5):
            choice = StructuredOutput(choice=("yes", "no", "Zürich"))
            assert (
                text_of(await run(engine, prompts["plain"], seed=seed, structured_output=choice))
                in choice.choice
            )
            regex = StructuredOutput(regex=r"[0-9]{3}-[ab]")
            assert re.fullmatch(
                regex.regex, text_of(await run(engine, [5], seed=seed, structured_output=regex))
            )
            anything = StructuredOutput(json_object=True)
            assert isinstance(
                json.loads(text_of(await run(engine, [5], seed=seed, structured_output=anything))), dict
            )


async def test_what_is_not_followed_is_answered_with_words(demo_model_dir: Path) -> None:
    async with sim(demo_model_dir) as engine:
        for unfollowed in (StructuredOutput(grammar="root ::= 'a'"), StructuredOutput(regex="(?=a)a")):
            deltas = await run(engine, [5], max_tokens=20, ignore_eos=True, structured_output=unfollowed)
            assert len(deltas) == 20 and deltas[-1].finish_reason == "length"
            assert text_of(deltas).replace(" ", "").isalpha()


def test_structural_tags_give_their_tags_and_schemas() -> None:
    legacy = {
        "type": "structural_tag",
        "structures": [{"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"}],
        "triggers": ["<function="],
    }
    text = structural_text(json.dumps(legacy), random.Random(0), ["word"])
    assert text is not None and text.startswith("<function=get_weather>{") and text.endswith("}</function>")
    jsonschema.validate(
        json.loads(text.removeprefix("<function=get_weather>").removesuffix("</function>")), WEATHER
    )
    tag = {"type": "tag", "begin": "<a>", "content": {"type": "const_string", "value": "x"}, "end": ["</a>"]}
    tree = {
        "type": "structural_tag",
        "format": {
            "type": "sequence",
            "elements": [{"type": "triggered_tags", "triggers": ["<a"], "tags": [tag]}],
        },
    }
    assert structural_text(json.dumps(tree), random.Random(0), ["word"]) == "<a>x</a>"
    assert (
        structural_text(json.dumps({"format": {"type": "grammar", "grammar": "x"}}), random.Random(0), [])
        is None
    )


async def test_auto_tool_calls_on_prompts_that_list_tools(
    demo_model_dir: Path, hf: Any, prompts: dict[str, list[int]]
) -> None:
    names = set()
    async with sim(demo_model_dir, hermes_tools=True) as engine:
        for seed in range(8):
            deltas = await run(engine, prompts["tools"], seed=seed, skip_special_tokens=False)
            match = CALL.fullmatch(text_of(deltas))
            assert match is not None, text_of(deltas)
            call = json.loads(match.group(1))
            names.add(call["name"])
            jsonschema.validate(
                call["arguments"], WEATHER if call["name"] == "get_weather" else {"type": "object"}
            )
            assert deltas[-1].finish_reason == "stop" and deltas[-1].token_ids == (hf.eos_token_id,)
            assert text_of(deltas) == hf.decode(
                ids_of(deltas)[:-1], skip_special_tokens=False
            )  # EOS: no text
        assert names == {"get_weather", "get_time"}
        assert "<tool_call>" not in text_of(await run(engine, prompts["plain"], max_tokens=50))
    async with sim(demo_model_dir, hermes_tools=True, tool_calls=0.5) as engine:
        called = [CALL.fullmatch(text_of(await run(engine, prompts["tools"], seed=s))) for s in range(40)]
        assert 5 < sum(c is not None for c in called) < 35
    for shaping in ({"hermes_tools": False}, {"hermes_tools": True, "tool_calls": 0.0}):
        async with sim(demo_model_dir, **shaping) as engine:
            assert "<tool_call>" not in text_of(await run(engine, prompts["tools"], max_tokens=50))


async def test_reasoning_comes_first_unless_the_prompt_ended_it(
    demo_model_dir: Path, hf: Any, prompts: dict[str, list[int]]
) -> None:
    start, end = hf.convert_tokens_to_ids(["<think>", "</think>"])
    async with sim(demo_model_dir, reasoning=True, reasoning_tokens=10) as engine:
        ids = ids_of(await run(engine, prompts["plain"], max_tokens=40, ignore_eos=True))
        assert len(ids) == 40 and ids[0] == start and ids[11] == end and {start, end}.isdisjoint(ids[1:11])
        ids = ids_of(await run(engine, prompts["plain"], max_tokens=8, ignore_eos=True))
        assert ids[0] == start and ids[5] == end  # at most half of max_tokens
        ids = ids_of(await run(engine, prompts["thinking open"], max_tokens=40, ignore_eos=True))
        assert ids[10] == end and start not in ids
        for prompt, ended in ((prompts["thinking off"], None), (prompts["plain"], True)):
            ids = ids_of(await run(engine, prompt, reasoning_ended=ended, max_tokens=40, ignore_eos=True))
            assert not {start, end} & set(ids)
        deltas = await run(engine, prompts["plain"], structured_output=schema(WEATHER))
        reasoning, _, answer = text_of(deltas).partition("</think>")
        assert reasoning.startswith("<think>") and deltas[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(answer), WEATHER)
    async with sim(demo_model_dir, reasoning=True, reasoning_tokens=0) as engine:
        assert start not in ids_of(await run(engine, prompts["plain"], max_tokens=40))


async def test_log_probabilities_on_every_token(
    demo_model_dir: Path, hf: Any, prompts: dict[str, list[int]]
) -> None:
    async with sim(demo_model_dir, reasoning=True, reasoning_tokens=5) as engine:
        for k, so in ((3, schema(WEATHER)), (0, None), (20, None)):
            deltas = await run(engine, prompts["plain"], max_tokens=60, logprobs=k, structured_output=so)
            for delta in deltas:
                lp = delta.logprobs
                assert lp is not None and len(lp.sampled) == len(lp.texts) == len(lp.top) == 1
                (token,), (sampled,), (text,), (top,) = delta.token_ids, lp.sampled, lp.texts, lp.top
                assert sampled <= 0 and top[0] == (token, sampled, text) and len(top) == k + 1
                if token != hf.eos_token_id:
                    assert text == hf.decode([token])
                others = [p for _, p, _ in top[1:]]
                assert others == sorted(others, reverse=True) and all(p <= 0 for p in others)
                assert len({i for i, _, _ in top}) == k + 1
                assert all(t == hf.decode([i]) for i, _, t in top[1:])
        assert all(d.logprobs is None for d in await run(engine, prompts["plain"], max_tokens=20))


def test_token_texts_are_what_an_incremental_detokenizer_streams(demo_model_dir: Path) -> None:
    demo = load_tokenizer(str(demo_model_dir))
    split = demo.encode("é", add_special_tokens=False)
    assert len(split) == 2  # a byte-level BPE splits it: its first byte alone decodes to nothing yet
    texts, alone = Detokenizer(demo).texts([*split, *demo.encode(" ok", add_special_tokens=False)], [5])
    assert texts[:2] == ["", "é"] and "".join(texts) == "é ok" and alone[0] == "\ufffd"
    # SentencePiece style: "▁cat" reads "cat" alone and " cat" after a word.
    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "s": 3}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    piece = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>")
    texts, alone = Detokenizer(piece).texts([2, 3, 1], [1])
    assert texts == [" cat", "s", " the"] and alone == ["cat", "s", "the"]


def test_the_worker_settings_choose_the_shapes() -> None:
    demo = sim_shaping(WorkerSettings(engine="sim", sim_reasoning_tokens=7))
    assert demo == Shaping(reasoning=False, reasoning_tokens=7, hermes_tools=True, tool_calls=1.0)
    thinking = sim_shaping(WorkerSettings(model="x", reasoning_parser="deepseek_r1", sim_tool_calls=0.25))
    assert thinking.reasoning and not thinking.hermes_tools and thinking.tool_calls == 0.25
    assert not sim_shaping(
        WorkerSettings(tool_call_parser="hermes", enable_auto_tool_choice=False)
    ).hermes_tools
    assert not sim_shaping(WorkerSettings(tool_call_parser="llama3_json")).hermes_tools
