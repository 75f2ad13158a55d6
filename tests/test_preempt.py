"""Making room for a tenant below its fair share: the pure policy (worker.preempt) by tables, then a
full worker's reader against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter

import pytest
from redis.asyncio import Redis

from shared.messages import Job, Sampling, StreamRecord, StructuredOutput, encode
from shared.names import GROUP, JOB_FIELD, Names
from worker.channel import Claim
from worker.inflight import Inflight
from worker.preempt import resumable, shares, victim, wanted
from worker.reader import Reader
from worker.streams import JobStreams

BATCH, INTERACTIVE = 1, 4


def test_fair_shares_split_the_slots_by_weight() -> None:
    assert shares(["a", "b"], 16, {}) == {"a": 8, "b": 8}
    assert shares(["a", "b"], 16, {"a": BATCH, "b": INTERACTIVE}) == {"a": 3.2, "b": 12.8}
    assert shares([], 16, {}) == {}


@pytest.mark.parametrize(
    ("held", "preemptible", "weights", "expected"),
    [
        # a flood holds every slot: the idle tenant wants one, the flood none
        ({"a": 16}, {"a": 16}, {}, ["b", "c"]),
        # b took its half: only a third tenant wants a slot
        ({"a": 8, "b": 8}, {"a": 8, "b": 8}, {}, ["c"]),
        # b below its half still wants; c would share three ways and wants too
        ({"a": 9, "b": 7}, {"a": 9, "b": 7}, {}, ["b", "c"]),
        # three ways at 6/5/5 of 16: one more would put anyone over 5.33
        ({"a": 6, "b": 5, "c": 5}, {"a": 6, "b": 5, "c": 5}, {}, []),
        # the flood's jobs cannot resume (a grammar, several choices): nobody can take their slots
        ({"a": 16}, {}, {}, []),
        # a batch tenant does not take an interactive one's slots; an interactive one takes a batch's
        ({"a": 16}, {"a": 16}, {"a": INTERACTIVE, "b": BATCH, "c": INTERACTIVE}, ["c"]),
        ({"a": 16}, {"a": 16}, {"a": BATCH, "b": INTERACTIVE, "c": BATCH}, ["b", "c"]),
    ],
)
def test_which_streams_a_full_worker_waits_for(
    held: dict[str, int], preemptible: dict[str, int], weights: dict[str, int], expected: list[str]
) -> None:
    assert wanted(["a", "b", "c"], Counter(held), Counter(preemptible), 16, weights) == expected


@pytest.mark.parametrize(
    ("held", "preemptible", "expected"),
    [
        ({"a": 16, "b": 1}, {"a": 16}, "a"),  # b's new job counted: the flood gives one up
        ({"a": 9, "c": 7, "b": 1}, {"a": 9, "c": 7}, "a"),  # the one furthest above its share
        ({"a": 9, "c": 7, "b": 1}, {"c": 7}, "c"),  # only jobs that can resume are stopped
        ({"a": 9, "b": 8}, {"a": 9}, "a"),  # 8 : 8 after the move
        ({"a": 8, "b": 9}, {"a": 8}, None),  # a would fall below its share of 8
    ],
)
def test_whose_job_makes_room(
    held: dict[str, int], preemptible: dict[str, int], expected: str | None
) -> None:
    assert victim("b", Counter(held), Counter(preemptible), 16, {}) == expected


def test_only_single_choice_jobs_without_a_grammar_resume() -> None:
    job = _job("a", 0)
    assert resumable(job)
    assert not resumable(job.model_copy(update={"sampling": Sampling(max_tokens=8, n=2)}))
    held = Sampling(max_tokens=8, structured_output=StructuredOutput(regex="[a-z]+"))
    assert not resumable(job.model_copy(update={"sampling": held}))


def test_the_newest_job_gives_way_and_a_job_taken_up_again_last() -> None:
    inflight = Inflight(4)
    loop = asyncio.new_event_loop()
    try:
        tasks = []
        for n, back in enumerate([False, False, True]):
            task = loop.create_future()
            tasks.append(task)
            inflight.add(Claim("s", f"{n}-0", _job("a", n), 1, handed_back=back), task)  # type: ignore[arg-type]
        assert inflight.preempt("s") == "a-1"  # the newest not handed back before
        assert inflight.preempt("s") == "a-0"
        assert inflight.preempt("s") == "a-2"  # then the one taken up again
        assert inflight.preempt("s") is None
        assert inflight.running() == Counter()
        assert inflight.stop_reason("a-1") == "preempted"
        inflight.remove("a-1")  # its task ended: parked, to resume from its progress
        assert [(c.job.id, c.handed_back) for c in inflight.parked()] == [("a-1", True)]
        assert sorted(inflight.entries()["s"]) == ["0-0", "1-0", "2-0"]
        assert len(inflight) == 2 and inflight.room.is_set()
        assert inflight.stop_entry("s", "1-0", "lost") == "a-1"  # taken over: forgotten
        assert not inflight.parked()
        inflight.remove("a-0", ended=True)  # preempted as it ended: nothing to resume
        assert not inflight.parked() and len(inflight) == 1
    finally:
        loop.close()


def _job(tenant: str, n: int, max_tokens: int = 8) -> Job:
    return Job(
        id=f"{tenant}-{n}",
        tenant=tenant,
        model="m",
        prompt_token_ids=(1, 2),
        sampling=Sampling(max_tokens=max_tokens),
        created_at=time.time(),
    )


async def _stream_with_jobs(redis: Redis, names: Names, tenant: str, count: int, priority: str) -> str:
    stream = names.jobs_stream("m", tenant)
    for n in range(count):
        await redis.xadd(stream, {JOB_FIELD: encode(_job(tenant, n))})
    record = StreamRecord(tenant=tenant, priority=priority)  # type: ignore[arg-type]
    await redis.hset(names.streams_index("m"), stream, encode(record))  # type: ignore[misc]
    await redis.xgroup_create(stream, GROUP, id="0")
    return stream


@pytest.mark.parametrize(
    ("preempt", "priority", "taken"),
    [(True, "interactive", True), (False, "interactive", False), (True, "batch", False)],
)
async def test_a_full_worker_makes_room_for_a_tenant_back_from_a_quiet_spell(
    redis: Redis, preempt: bool, priority: str, taken: bool
) -> None:
    """A flood holds every slot; a job of another tenant arrives: with preemption it starts at once
    and the flood's newest job is stopped and parked, and resumes, before any new job of the flood,
    once a slot is free; without preemption, or for a batch tenant, the job waits for a slot."""
    names = Names("preempt-" + uuid.uuid4().hex[:8])
    flood = await _stream_with_jobs(redis, names, "a", 10, "interactive")
    inflight = Inflight(4)
    started: list[str] = []
    stopped: list[str] = []

    async def hold(job_id: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append(job_id)
            inflight.remove(job_id)
            raise

    async def take(stream: str, entry_id: str, fields: dict[bytes, bytes] | None, attempt: int) -> None:
        job = Job.model_validate_json((fields or {})[JOB_FIELD.encode()])
        inflight.add(Claim(stream, entry_id, job, attempt), asyncio.create_task(hold(job.id)))
        started.append(job.id)

    kwargs = redis.connection_pool.connection_kwargs
    url = f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
    resumed: list[Claim] = []

    def resume(claim: Claim) -> None:
        resumed.append(claim)
        inflight.add(claim, asyncio.create_task(hold(claim.job.id)))

    streams = JobStreams(redis, names, "m")
    reader = Reader(redis, url, "w", streams, inflight, 0.0, take, preempt=preempt, resume=resume)
    stopping = asyncio.Event()
    run = asyncio.create_task(reader.run(stopping))
    try:
        for _ in range(100):
            if len(started) == 4:
                break
            await asyncio.sleep(0.02)
        assert started == ["a-0", "a-1", "a-2", "a-3"]
        await asyncio.sleep(0.3)  # full, and a is alone: nothing more is read
        assert len(started) == 4 and not stopped
        await _stream_with_jobs(redis, names, "b", 1, priority)
        for _ in range(100):
            if "b-0" in started:
                break
            await asyncio.sleep(0.02)
        if taken:
            assert "b-0" in started
            await asyncio.sleep(0.05)
            assert stopped == ["a-3"]  # the flood's newest gave way
            assert inflight.held() == Counter({flood: 3, names.jobs_stream("m", "b"): 1})
            assert [c.job.id for c in inflight.parked()] == ["a-3"]
            assert len(inflight.entries()[flood]) == 4  # the parked job's claim is kept fresh too
            inflight.stop("a-0", "client")  # a slot of the flood's frees up: the parked job goes first
            for _ in range(100):
                if resumed:
                    break
                await asyncio.sleep(0.02)
            assert [(c.job.id, c.handed_back) for c in resumed] == [("a-3", True)]  # from its progress
            assert started == ["a-0", "a-1", "a-2", "a-3", "b-0"] and not inflight.parked()
        else:
            assert started == ["a-0", "a-1", "a-2", "a-3"] and not stopped
    finally:
        stopping.set()
        run.cancel()  # a full worker that does not preempt waits for room, as its consumer stops it
        with contextlib.suppress(asyncio.CancelledError):
            await run
        for task in inflight.tasks():
            task.cancel()
