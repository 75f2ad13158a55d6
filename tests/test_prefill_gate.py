"""When a job's prompt enters the engine (worker.prefill_gate): the rule as a table, the gate on a loop."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from worker import prefill_gate
from worker.prefill_gate import HANDOFF_STEPS, Entry, PrefillGate, allowed, may_enter


@pytest.mark.parametrize(
    ("ending", "limit", "expected"),
    [
        (0.0, 1, 1),
        (12 / 64, 1, 1),  # 12 jobs of 64 tokens: one ends every 5 steps, one prompt at a time
        (0.5, 1, 1),  # one ends every other step: a prompt in flight lets one in every 2 steps
        (0.6, 1, 2),
        (64.0, 1, 128),  # 64 one-token jobs: as many prompts as it takes to keep up
        (12 / 64, 3, 3),  # never below the limit
    ],
)
def test_allowed_keeps_up_with_the_jobs_that_end(ending: float, limit: int, expected: int) -> None:
    assert allowed(ending, limit) == expected


def test_a_slower_handoff_lets_more_prompts_in_flight() -> None:
    # A CPU host: steps of 5 ms, 60 ms from a prompt entering to its first token (x2 margin: 24).
    assert allowed(12 / 64, 1, handoff=24.0) == 5


@pytest.mark.parametrize(
    ("prefilling", "holding", "ending", "limit", "enters"),
    [
        ({}, {"a": 1}, {}, 1, True),  # nothing in prefill
        ({"a": 1}, {"a": 2}, {}, 1, True),  # alone on the worker: never held
        ({"a": 1}, {"a": 2, "b": 1}, {"a": 0.1}, 1, False),  # b shares it: a's second prompt waits
        ({"a": 1}, {"a": 2, "b": 1}, {"a": 0.1}, 2, True),  # the limit is per tenant
        ({"a": 1}, {"a": 1, "b": 1}, {"a": 0.1}, 1, True),  # an equal share: not the flood
        ({"a": 1}, {"a": 2, "b": 5, "c": 1}, {"a": 0.1}, 1, True),  # below an equal share
        ({"a": 1}, {"a": 5, "b": 5, "c": 1}, {"a": 0.1}, 1, False),  # above it, beside b
        ({"a": 1}, {"a": 64, "b": 1}, {"a": 64.0}, 1, True),  # short jobs: as many as they need
        ({"a": 1, "b": 1}, {"a": 2, "b": 1}, {}, 0, True),  # 0: off
        ({"b": 1}, {"a": 1, "b": 1}, {}, 1, True),  # others' prompts in prefill do not hold a back
        ({"a": 1}, {"a": 2, "b": 0}, {}, 1, True),  # a tenant with no job left is not sharing
    ],
)
def test_may_enter(
    prefilling: dict[str, int], holding: dict[str, int], ending: dict[str, float], limit: int, enters: bool
) -> None:
    assert may_enter("a", Counter(prefilling), Counter(holding), ending, limit) is enters


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_tenant_alone_is_never_held() -> None:
    gate = PrefillGate(1)
    entered = []

    async def job(i: int) -> None:
        async with gate.job("a", 64):
            entered.append(i)
            await asyncio.sleep(0.05)

    await asyncio.gather(*(job(i) for i in range(5)))
    assert sorted(entered) == [0, 1, 2, 3, 4]
    assert gate.waiting == 0


async def test_a_flood_enters_one_prompt_at_a_time_while_another_tenant_is_served() -> None:
    gate = PrefillGate(1)
    first_token = {name: asyncio.Event() for name in ("a1", "a2", "a3", "b1")}
    entered: list[str] = []
    release = asyncio.Event()

    async def job(tenant: str, name: str) -> None:
        async with gate.job(tenant, 64) as entry:
            entered.append(name)
            await first_token[name].wait()
            entry.prefilled()
            await release.wait()

    tasks = [asyncio.create_task(job("b", "b1"))]
    await settle()
    tasks += [asyncio.create_task(job("a", n)) for n in ("a1", "a2", "a3")]
    await settle()
    assert entered == ["b1", "a1"]  # b's and one of a's; a's others wait
    assert gate.waiting == 2

    first_token["a1"].set()
    await settle()
    assert entered == ["b1", "a1", "a2"]  # a's next prompt enters once the previous one is through

    first_token["a2"].set()
    await settle()
    assert entered == ["b1", "a1", "a2", "a3"]
    release.set()
    first_token["a3"].set()
    first_token["b1"].set()
    await asyncio.gather(*tasks)
    assert gate.waiting == 0


async def test_waiting_jobs_enter_when_the_other_tenant_leaves() -> None:
    gate = PrefillGate(1)
    b_done = asyncio.Event()
    entered: list[str] = []

    async def b() -> None:
        async with gate.job("b", 64):
            await b_done.wait()

    a_done = asyncio.Event()

    async def a(name: str) -> None:
        async with gate.job("a", 64):  # never reports a first token: only b's leaving lets a2 in
            entered.append(name)
            await a_done.wait()

    tb = asyncio.create_task(b())
    await settle()
    ta = [asyncio.create_task(a("a1")), asyncio.create_task(a("a2"))]
    await settle()
    assert entered == ["a1"]
    b_done.set()
    await tb
    await settle()
    assert entered == ["a1", "a2"]  # a1 still has no first token: a is alone now
    a_done.set()
    await asyncio.gather(*ta)


async def test_a_job_cancelled_or_failing_gives_its_place_back() -> None:
    gate = PrefillGate(1)
    hold_b = asyncio.Event()

    async def b() -> None:
        async with gate.job("b", 64):
            await hold_b.wait()

    async def failing() -> None:
        async with gate.job("a", 64):
            raise RuntimeError("engine refused it")

    async def waits() -> None:
        async with gate.job("a", 64):
            await asyncio.sleep(10)

    tb = asyncio.create_task(b())
    await settle()
    first = asyncio.create_task(waits())  # in prefill, never reports a token
    await settle()
    second = asyncio.create_task(waits())  # waits at the gate
    await settle()
    assert gate.waiting == 1
    second.cancel()
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert gate.waiting == 0
    with pytest.raises(RuntimeError):
        await failing()  # enters at once: the cancelled ones left nothing behind
    async with asyncio.timeout(1):
        async with gate.job("a", 64):
            pass
    assert (gate._prefilling, gate._holding, gate._lines) == ({"b": 1}, {"b": 1}, {})
    hold_b.set()
    await tb
    assert (gate._prefilling, gate._holding, dict(gate._ending)) == ({}, {}, {})


async def test_a_tenant_of_short_jobs_keeps_as_many_prompts_in_flight_as_it_needs() -> None:
    gate = PrefillGate(1)
    hold = asyncio.Event()
    entered = 0

    async def b() -> None:
        async with gate.job("b", 64):
            await hold.wait()

    async def one_token_job() -> None:
        nonlocal entered
        async with gate.job("a", 1):
            entered += 1
            await hold.wait()

    tasks = [asyncio.create_task(b())]
    await settle()
    tasks += [asyncio.create_task(one_token_job()) for _ in range(8)]
    await settle()
    assert entered == 8 and gate.waiting == 0  # 8 jobs of one token end 8 a step: none waits
    hold.set()
    await asyncio.gather(*tasks)


async def test_a_tenant_is_paced_by_how_long_its_jobs_turned_out() -> None:
    gate = PrefillGate(1)
    for _ in range(30):  # jobs asking for 512 tokens that end after 1 (a classifier's "yes")
        async with gate.job("a", 512) as entry:
            entry.prefilled()
            entry.finished(1.0)
    hold = asyncio.Event()
    entered = 0

    async def job(tenant: str) -> None:
        nonlocal entered
        async with gate.job(tenant, 512):
            entered += tenant == "a"
            await hold.wait()

    tasks = [asyncio.create_task(job("b"))]
    await settle()
    tasks += [asyncio.create_task(job("a")) for _ in range(6)]
    await settle()
    assert entered == 6  # learned: its jobs end in about a token, so none is held
    hold.set()
    await asyncio.gather(*tasks)


async def test_the_gate_learns_how_many_steps_a_prompt_takes_to_its_first_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(prefill_gate.time, "monotonic", lambda: now[0])
    gate = PrefillGate(1)
    assert gate.handoff == HANDOFF_STEPS  # nothing seen yet
    async with gate.job("a", 64) as entry:
        now[0] += 0.060  # the prompt's way to its first token
        entry.prefilled()
        now[0] += 0.020  # four more tokens, 5 ms each
        entry.finished(5.0)
    # 60 ms / 5 ms = 12 steps, x2: far more than the two steps a GPU's handoff takes
    assert gate.handoff == pytest.approx(24.0)


async def test_jobs_of_a_tenant_enter_in_the_order_they_came() -> None:
    gate = PrefillGate(1)
    hold = asyncio.Event()
    entered: list[str] = []
    entries: dict[str, Entry] = {}

    async def job(tenant: str, name: str) -> None:
        async with gate.job(tenant, 64) as entry:
            entered.append(name)
            entries[name] = entry
            await hold.wait()

    tasks = [asyncio.create_task(job("b", "b1"))]
    await settle()
    tasks += [asyncio.create_task(job("a", f"a{i}")) for i in (1, 2, 3)]
    await settle()
    entries["a1"].prefilled()
    tasks.append(asyncio.create_task(job("a", "a4")))  # came last: must not overtake a2 or a3
    await settle()
    assert entered == ["b1", "a1", "a2"]
    entries["a2"].prefilled()
    await settle()
    assert entered == ["b1", "a1", "a2", "a3"]
    hold.set()
    await asyncio.gather(*tasks)
    assert entered[-1] == "a4"


async def test_a_gate_that_is_off_holds_nobody_and_keeps_no_count() -> None:
    gate = PrefillGate(0)
    hold = asyncio.Event()
    entered = 0

    async def job(tenant: str) -> None:
        nonlocal entered
        async with gate.job(tenant, 64) as entry:
            entered += 1
            await hold.wait()
            entry.prefilled()
            entry.finished(64.0)

    tasks = [asyncio.create_task(job("b"))] + [asyncio.create_task(job("a")) for _ in range(6)]
    await settle()
    assert entered == 7 and gate.waiting == 0
    assert (gate._prefilling, gate._holding, gate._lines) == ({}, {}, {})
    hold.set()
    await asyncio.gather(*tasks)
    assert gate.handoff == HANDOFF_STEPS  # nothing learned
