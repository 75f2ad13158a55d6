"""The simulated engine's step-time model and continuous batching, as plain functions (no clock)."""

from __future__ import annotations

from typing import get_args

import pytest

from shared.messages import Sampling
from shared.settings import SimPreset
from worker.engine import Delta
from worker.sim_batch import NEVER, Batch, Choice, plan_choice
from worker.sim_shapes import Script
from worker.sim_timing import PRESETS, Preset, StepWork, step_seconds

IDS = tuple(range(100, 110))
TEXTS = tuple("abcdefghij")
EOS = 2
UNIT = Preset("unit", "round numbers", weights_s=1.0, token_s=0.1, kv_token_s=0.001, kv_tokens=10_000)


def choice(
    owner: object,
    prompt: int = 4,
    index: int = 0,
    key: str = "k",
    eos: int | None = None,
    script: Script | None = None,
    **sampling: object,
) -> Choice[object]:
    params = Sampling(**{"max_tokens": 8, "ignore_eos": True, **sampling})  # type: ignore[arg-type]
    return plan_choice(owner, index, key, prompt, params, 4096, IDS, TEXTS, eos, lambda t: f"<{t}>", script)


def flat(steps: list[list[tuple[object, Delta]]]) -> list[tuple[object, Delta]]:
    return [pair for step in steps for pair in step]


def run(batch: Batch[object], steps: int = 10_000) -> list[list[tuple[object, Delta]]]:
    """Every step's output until the batch is empty."""
    out = []
    for _ in range(steps):
        if not batch:
            return out
        batch.schedule()
        out.append(batch.advance())
    raise AssertionError("the batch never emptied")


@pytest.mark.parametrize(
    ("work", "seconds"),
    [
        (StepWork(prefill_tokens=0, decoding=0, kv_tokens=0), 0.0),
        (StepWork(prefill_tokens=0, decoding=1, kv_tokens=10), 1.0 + 0.1 + 0.01),
        (StepWork(prefill_tokens=0, decoding=8, kv_tokens=80), 1.0 + 0.8 + 0.08),
        (StepWork(prefill_tokens=100, decoding=0, kv_tokens=0), 1.0 + 10.0),
        (StepWork(prefill_tokens=100, decoding=8, kv_tokens=80), 1.0 + 10.8 + 0.08),
    ],
)
def test_step_time_is_weights_plus_tokens_plus_kv_reads(work: StepWork, seconds: float) -> None:
    assert step_seconds(UNIT, work) == pytest.approx(seconds)


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=list(PRESETS))
def test_every_preset_slows_down_as_the_batch_grows(preset: Preset) -> None:
    times = [step_seconds(preset, StepWork(0, b, b * 1000)) for b in (1, 8, 64, 256)]
    assert times == sorted(times) and times[0] < times[-1]
    assert step_seconds(preset, StepWork(1024, 0, 0)) > step_seconds(preset, StepWork(0, 1, 1024))


def test_presets_are_the_ones_settings_accept() -> None:
    assert set(PRESETS) == set(get_args(SimPreset))


def test_gpu_presets_keep_their_published_order() -> None:
    # Faster hardware: a cheaper step at every size, and a bigger KV cache.
    l4, a100, h100 = PRESETS["l4"], PRESETS["a100"], PRESETS["h100"]
    for work in (StepWork(0, 1, 1000), StepWork(2048, 0, 0), StepWork(0, 256, 256_000)):
        assert step_seconds(l4, work) > step_seconds(a100, work) > step_seconds(h100, work)
    assert l4.kv_tokens < a100.kv_tokens < h100.kv_tokens


def test_capacity_bounds_the_running_sequences() -> None:
    batch: Batch[object] = Batch(capacity=4, token_budget=2048, kv_capacity=10_000)
    owners = [object() for _ in range(10)]
    batch.add([choice(o) for o in owners])
    work = batch.schedule()
    assert (len(batch.running), len(batch.waiting)) == (4, 6)
    assert work == StepWork(prefill_tokens=16, decoding=0, kv_tokens=0)
    batch.advance()
    work = batch.schedule()
    assert work.decoding == 4 and work.prefill_tokens == 0 and len(batch.running) == 4
    assert work.kv_tokens == 4 * (4 + 1)


def test_each_running_sequence_gets_one_token_per_step() -> None:
    batch: Batch[object] = Batch(capacity=8, token_budget=2048, kv_capacity=10_000)
    a, b = object(), object()
    batch.add([choice(a, max_tokens=3), choice(b, max_tokens=5)])
    steps = run(batch)
    assert [sorted(id(o) for o, _ in step) for step in steps] == [sorted([id(a), id(b)])] * 3 + [[id(b)]] * 2
    assert [d.finish_reason for o, d in flat(steps) if o is a] == [None, None, "length"]
    assert all(len(d.token_ids) == 1 and d.text == TEXTS[IDS.index(d.token_ids[0])] for _, d in flat(steps))


def test_a_long_prompt_is_prefilled_in_chunks_before_its_first_token() -> None:
    batch: Batch[object] = Batch(capacity=8, token_budget=100, kv_capacity=10_000)
    short, long = object(), object()
    batch.add([choice(short, prompt=10, max_tokens=50)])
    batch.schedule()
    batch.advance()
    batch.add([choice(long, prompt=250, max_tokens=1)])
    works, first = [], None
    for step in range(1, 10):
        works.append(batch.schedule())
        if any(o is long for o, _ in batch.advance()):
            first = step
            break
    # The decoding sequence takes one token of each step's budget, the prompt the other 99.
    assert first == 3
    assert [w.prefill_tokens for w in works] == [99, 99, 52]
    assert all(w.decoding == 1 for w in works)


def test_a_sequence_waits_for_room_in_the_kv_cache() -> None:
    batch: Batch[object] = Batch(capacity=8, token_budget=2048, kv_capacity=100)
    first, second = object(), object()
    batch.add([choice(first, prompt=60, max_tokens=3), choice(second, prompt=60, max_tokens=3)])
    batch.schedule()
    assert [c.owner for c in batch.running] == [first] and len(batch.waiting) == 1
    steps = run(batch)
    assert [o for o, d in flat(steps) if d.finish_reason] == [first, second]


def test_the_newest_sequence_is_preempted_when_the_cache_overflows() -> None:
    batch: Batch[object] = Batch(capacity=8, token_budget=2048, kv_capacity=22)
    old, new = object(), object()
    batch.add([choice(old, prompt=10, max_tokens=6), choice(new, prompt=10, max_tokens=6)])
    batch.schedule()
    batch.advance()  # both hold 11 tokens; their next decodes would need 24
    batch.schedule()
    assert [c.owner for c in batch.running] == [old] and batch.waiting[0].owner is new
    assert batch.waiting[0].todo == 11  # its prompt and its token are computed again
    steps = run(batch)
    owners = [o for step in steps for o, _ in step]
    assert owners == [old] * 5 + [new] * 5  # the rest of new's tokens come once old is done


def test_drop_frees_the_slots_at_once() -> None:
    batch: Batch[object] = Batch(capacity=2, token_budget=2048, kv_capacity=10_000)
    gone, stays, waits = object(), object(), object()
    batch.add([choice(gone, index=0), choice(gone, index=1), choice(stays), choice(waits)])
    batch.schedule()
    assert {c.owner for c in batch.running} == {gone}
    batch.drop(gone)
    assert batch.running == [] and batch.advance() == []
    batch.schedule()
    assert [c.owner for c in batch.running] == [stays, waits]


def test_n_choices_are_sequences_of_their_own() -> None:
    batch: Batch[object] = Batch(capacity=8, token_budget=2048, kv_capacity=10_000)
    owner = object()
    batch.add([choice(owner, index=i, max_tokens=4) for i in range(3)])
    batch.schedule()
    assert len(batch.running) == 3
    deltas = [d for step in run(batch) for _, d in step]
    for i in range(3):
        mine = [d for d in deltas if d.index == i]
        assert len(mine) == 4 and mine[-1].finish_reason == "length"
    paths = {tuple(t for d in deltas if d.index == i for t in d.token_ids) for i in range(3)}
    assert len(paths) == 3  # different tokens for each choice


def generated(c: Choice[object]) -> list[Delta]:
    batch: Batch[object] = Batch(capacity=1, token_budget=4096, kv_capacity=100_000)
    batch.add([c])
    return [d for step in run(batch) for _, d in step]


def test_ignore_eos_generates_exactly_max_tokens() -> None:
    for key in map(str, range(50)):
        deltas = generated(choice(object(), key=key, eos=EOS, max_tokens=300))
        assert len(deltas) == 300 and deltas[-1].finish_reason == "length"
        assert EOS not in [t for d in deltas for t in d.token_ids]


def test_without_ignore_eos_a_choice_ends_with_eos_reproducibly() -> None:
    lengths = []
    for key in map(str, range(50)):
        deltas = generated(choice(object(), key=key, eos=EOS, max_tokens=4000, ignore_eos=False))
        again = generated(choice(object(), key=key, eos=EOS, max_tokens=4000, ignore_eos=False))
        assert deltas == again
        last = deltas[-1]
        assert last == Delta(0, "", (EOS,), "stop")  # EOS is in the ids, its text is not
        lengths.append(len(deltas))
    assert len(set(lengths)) > 10 and 50 < sum(lengths) / len(lengths) < 1000


@pytest.mark.parametrize("min_tokens", [0, 1, 5, 300])
def test_min_tokens_hold_the_end_back(min_tokens: int) -> None:
    for key in map(str, range(30)):
        c = choice(object(), key=key, eos=EOS, max_tokens=4000, ignore_eos=False, min_tokens=min_tokens)
        assert c.end_at >= min_tokens + 1
        assert len(generated(c)) >= min_tokens + 1


def test_max_tokens_wins_over_a_later_end() -> None:
    ends = [choice(object(), key=str(k), eos=EOS, ignore_eos=False, max_tokens=5) for k in range(200)]
    runs = [(c.end_at, generated(c)) for c in ends]
    assert {deltas[-1].finish_reason for _, deltas in runs} == {"length", "stop"}
    assert all(len(deltas) == min(5, end_at) for end_at, deltas in runs)


def test_stop_token_ids_end_a_choice_even_with_ignore_eos() -> None:
    for key in map(str, range(20)):
        c = choice(object(), key=key, eos=EOS, max_tokens=4000, stop_token_ids=(7, 8))
        last = generated(c)[-1]
        assert last.finish_reason == "stop" and last.token_ids[0] in (7, 8) and last.text == ""
    c = choice(object(), eos=EOS, max_tokens=4000, stop_token_ids=(7,), include_stop_str_in_output=True)
    assert generated(c)[-1] == Delta(0, "<7>", (7,), "stop")


def test_no_end_without_eos_or_stop_ids() -> None:
    assert choice(object(), eos=None, ignore_eos=False).end_at == NEVER
    assert choice(object(), eos=EOS, ignore_eos=True).end_at == NEVER


def test_the_context_limits_generation() -> None:
    params = Sampling(max_tokens=100, ignore_eos=True)
    c = plan_choice(object(), 0, "k", 4090, params, 4096, IDS, TEXTS, None)
    deltas = generated(c)
    assert len(deltas) == 6 and deltas[-1].finish_reason == "length"


DOCUMENT = Script(ids=(200, 201, 202), texts=("{", "", "é}"), alone=("{", "?", "?}"), final=True)
THOUGHT = Script(
    ids=(300, 101, 301), texts=("<think>", "b", "</think>"), alone=("<think>", "b", "</think>"), final=False
)


def test_a_final_script_is_said_then_eos() -> None:
    for key in map(str, range(20)):
        deltas = generated(
            choice(object(), key=key, eos=EOS, max_tokens=100, ignore_eos=False, script=DOCUMENT)
        )
        assert [(d.token_ids, d.text, d.finish_reason) for d in deltas] == [
            ((200,), "{", None),
            ((201,), "", None),
            ((202,), "é}", None),
            ((EOS,), "", "stop"),
        ]
    # No EOS in the vocabulary: the script's last token ends it; max_tokens still cuts it short.
    assert generated(choice(object(), script=DOCUMENT))[-1] == Delta(0, "é}", (202,), "stop")
    cut = generated(choice(object(), eos=EOS, max_tokens=2, script=DOCUMENT))
    assert [d.finish_reason for d in cut] == [None, "length"]


def test_words_follow_a_script_that_is_not_final() -> None:
    ends = []
    for key in map(str, range(30)):
        deltas = generated(
            choice(object(), key=key, eos=EOS, max_tokens=4000, ignore_eos=False, script=THOUGHT)
        )
        assert [d.text for d in deltas[:3]] == ["<think>", "b", "</think>"]
        assert all(d.token_ids[0] in IDS for d in deltas[3:-1]) and deltas[-1].token_ids == (EOS,)
        ends.append(len(deltas))
    assert min(ends) >= 4 and len(set(ends)) > 10
    exact = generated(choice(object(), eos=EOS, max_tokens=10, script=THOUGHT))
    assert len(exact) == 10 and exact[-1].finish_reason == "length"


def test_log_probabilities_ride_on_every_token_when_asked() -> None:
    deltas = generated(
        choice(object(), eos=EOS, max_tokens=50, ignore_eos=False, logprobs=2, script=DOCUMENT)
    )
    for d in deltas:
        assert d.logprobs is not None
        ((token, sampled, text), *others) = d.logprobs.top[0]
        assert (token, sampled, text) == (d.token_ids[0], d.logprobs.sampled[0], d.logprobs.texts[0])
        assert len(others) == 2
    assert [d.logprobs.texts[0] for d in deltas[:3]] == ["{", "?", "?}"]  # type: ignore[union-attr]
    assert all(d.logprobs is None for d in generated(choice(object(), max_tokens=5)))
    again = generated(choice(object(), eos=EOS, max_tokens=50, ignore_eos=False, logprobs=2, script=DOCUMENT))
    assert again == deltas  # reproducible from the key
