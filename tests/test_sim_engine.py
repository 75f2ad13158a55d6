"""The simulated engine on the demo model's real tokenizer: text, streaming, aborts, stats, settings."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from control.cli import WORKER_FIELDS, _settings, build_parser
from shared.messages import Sampling
from shared.settings import WorkerSettings
from worker.engine import Delta, EngineRejected
from worker.sim_engine import SIM_MAX_MODEL_LEN, EngineStopped, SimEngine
from worker.sim_timing import PRESETS, StepWork, step_seconds
from worker.sim_tokens import FastTokenizer, UnsuitableTokenizer, build_pool, load_tokenizer

FAST = 1000.0
"""Speed for tests that are not about time: a cpu-demo step takes microseconds."""


@pytest.fixture(scope="module")
def hf_tokenizer(demo_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(demo_model_dir))


@pytest_asyncio.fixture
async def engine(demo_model_dir: Path) -> AsyncIterator[SimEngine]:
    sim = await SimEngine.start(str(demo_model_dir), PRESETS["cpu-demo"], capacity=4, speed=FAST)
    yield sim
    sim.shutdown()


async def collect(engine: SimEngine, request_id: str, prompt: list[int], **sampling: Any) -> list[Delta]:
    out: list[Delta] = []
    async for deltas in engine.generate(request_id, prompt, Sampling(**{"max_tokens": 16, **sampling})):
        out.extend(deltas)
    return out


def test_the_pool_holds_plain_tokens_of_the_vocabulary(demo_model_dir: Path, hf_tokenizer: Any) -> None:
    pool = build_pool(load_tokenizer(str(demo_model_dir)))
    assert len(pool.ids) > 100 and pool.vocab_size == len(hf_tokenizer)
    assert not set(pool.ids) & set(hf_tokenizer.all_special_ids)
    assert pool.eos_token_id == hf_tokenizer.eos_token_id
    assert all(hf_tokenizer.decode([i]) == text for i, text in zip(pool.ids, pool.texts, strict=True))


def test_the_fast_loader_agrees_with_transformers(demo_model_dir: Path, hf_tokenizer: Any) -> None:
    fast = load_tokenizer(str(demo_model_dir))
    assert isinstance(fast, FastTokenizer)
    assert len(fast) == len(hf_tokenizer)
    # transformers lists only the named special tokens; every special added token is excluded here.
    assert set(hf_tokenizer.all_special_ids) <= set(fast.all_special_ids)
    ids = list(range(0, len(hf_tokenizer), 7))
    assert fast.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_whose_tokens_change_with_their_neighbours_keeps_only_stable_ones() -> None:
    # SentencePiece style: "▁cat" decodes to "cat" at the start and " cat" after a word, so it is
    # left out; pieces without the marker read the same everywhere.
    vocab = {"<unk>": 0, "</s>": 1, "▁the": 2, "▁cat": 3, "ing": 4, "er": 5, "s": 6, "x": 7}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="</s>", unk_token="<unk>")
    pool = build_pool(tok)
    assert set(pool.ids) == {4, 5, 6, 7} and pool.eos_token_id == 1
    with pytest.raises(UnsuitableTokenizer):
        build_pool(
            PreTrainedTokenizerFast(tokenizer_object=RustTokenizer(models.WordLevel({"<unk>": 0}, "<unk>")))
        )


async def test_text_is_exactly_what_the_tokens_decode_to(engine: SimEngine, hf_tokenizer: Any) -> None:
    for seed in range(5):
        deltas = await collect(engine, f"r{seed}", [5, 6, 7], max_tokens=200, seed=seed, n=2, ignore_eos=True)
        for index in (0, 1):
            mine = [d for d in deltas if d.index == index]
            ids = [t for d in mine for t in d.token_ids]
            assert len(ids) == 200 and mine[-1].finish_reason == "length"
            assert "".join(d.text for d in mine) == hf_tokenizer.decode(ids, skip_special_tokens=True)


async def test_without_ignore_eos_the_end_is_eos_and_reproducible(
    engine: SimEngine, hf_tokenizer: Any
) -> None:
    sampling = {"max_tokens": 2000, "ignore_eos": False, "seed": 7}
    first = await collect(engine, "a", [5], **sampling)
    again = await collect(engine, "b", [5], **sampling)
    assert first == again and first[-1].finish_reason == "stop"
    assert first[-1].token_ids == (hf_tokenizer.eos_token_id,) and first[-1].text == ""
    ids = [t for d in first for t in d.token_ids]
    assert "".join(d.text for d in first) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    by_id = await collect(engine, "a", [5], max_tokens=2000, ignore_eos=False)
    assert by_id == await collect(engine, "a", [5], max_tokens=2000, ignore_eos=False)


async def test_closing_the_stream_frees_the_slot_at_once(demo_model_dir: Path) -> None:
    sim = await SimEngine.start(str(demo_model_dir), PRESETS["cpu-demo"], capacity=1, speed=1.0)
    try:
        long = sim.generate("long", [5, 6], Sampling(max_tokens=100_000, ignore_eos=True))
        await anext(long)
        queued = asyncio.create_task(collect(sim, "next", [5], max_tokens=3))
        await asyncio.sleep(0.05)
        assert (sim.stats().running, sim.stats().waiting) == (1, 1)
        await long.aclose()
        assert (sim.stats().running, sim.stats().waiting) == (0, 1)
        assert len(await asyncio.wait_for(queued, 5)) == 3
    finally:
        sim.shutdown()


async def test_cancelling_the_consumer_aborts_the_request(engine: SimEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate("c", [5], Sampling(max_tokens=10_000_000, n=3, ignore_eos=True)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    assert engine.stats().running == 3
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (engine.stats().running, engine.stats().waiting) == (0, 0)


async def test_stats_count_sequences_and_kv_cache(demo_model_dir: Path) -> None:
    sim = await SimEngine.start(str(demo_model_dir), PRESETS["cpu-demo"], capacity=2, speed=10.0)
    try:
        stream = sim.generate("s", list(range(5, 105)), Sampling(max_tokens=1000, n=3, ignore_eos=True))
        await anext(stream)
        stats = sim.stats()
        assert (stats.running, stats.waiting) == (2, 1)
        assert stats.kv_cache_usage == pytest.approx(2 * 101 / PRESETS["cpu-demo"].kv_tokens, rel=0.1)
        await stream.aclose()
        assert sim.stats().kv_cache_usage == 0.0
    finally:
        sim.shutdown()


async def test_steps_take_at_least_the_modelled_time(demo_model_dir: Path) -> None:
    preset = PRESETS["cpu-demo"]
    sim = await SimEngine.start(str(demo_model_dir), preset, speed=2.0)
    try:
        started = time.monotonic()
        await collect(sim, "t", [5] * 64, max_tokens=40)
        elapsed = time.monotonic() - started
    finally:
        sim.shutdown()
    modelled = step_seconds(preset, StepWork(64, 0, 0)) + 39 * step_seconds(preset, StepWork(0, 1, 100))
    assert elapsed >= modelled / 2 * 0.95  # a lower bound only: the host may be slower, never faster


async def test_shutdown_ends_running_requests_with_an_error(demo_model_dir: Path) -> None:
    sim = await SimEngine.start(str(demo_model_dir), PRESETS["cpu-demo"], speed=1.0)
    stream = sim.generate("x", [5], Sampling(max_tokens=100_000, ignore_eos=True))
    await anext(stream)
    sim.shutdown()
    with pytest.raises(EngineStopped):
        async for _ in stream:
            pass
    with pytest.raises(EngineStopped):  # and later requests are refused rather than left waiting
        await collect(sim, "y", [5])


async def test_invalid_requests_are_rejected(engine: SimEngine) -> None:
    for prompt in ([], [5] * SIM_MAX_MODEL_LEN, [10**9]):
        with pytest.raises(EngineRejected):
            await collect(engine, "bad", prompt)
    assert engine.max_model_len == SIM_MAX_MODEL_LEN and engine.kind == "sim"


def test_settings_and_flags_choose_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().engine == "vllm"
    args = build_parser().parse_args(["worker", "--engine", "sim", "--sim-preset", "l4", "--sim-speed", "5"])
    settings = _settings(WorkerSettings, args, WORKER_FIELDS)
    assert (settings.engine, settings.sim_preset, settings.sim_speed) == ("sim", "l4", 5.0)
    monkeypatch.setenv("SWITCHYARD_SIM_SPEED", "20")
    assert WorkerSettings(engine="sim").sim_speed == 20.0
    assert settings.environment()["SWITCHYARD_ENGINE"] == "sim"  # what `up` hands its workers
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--sim-preset", "tpu"])
