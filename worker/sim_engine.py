"""The simulated engine: an :class:`~worker.engine.Engine` with no model and realistic timing.

A test and benchmark tool for capacity and scale work (``switchyard worker --engine sim``), never
the default. It batches requests the way vLLM's scheduler does (:mod:`worker.sim_batch`), takes as
long per step as its preset says a GPU class would (:mod:`worker.sim_timing`, with the sources of
the figures), and emits real token ids of the model's tokenizer with the text they decode to
(:mod:`worker.sim_tokens`), so the rest of the path (Redis, gateway, detokenized text, usage) does
its real work.

What it honours as vLLM would report it: ``max_tokens`` and the end of the context ("length"),
``n`` (each choice a sequence of its own), ``min_tokens``, ``ignore_eos`` and ``stop_token_ids``
("stop", the ending token in the ids, its text only with ``include_stop_str_in_output``). Without
``ignore_eos`` a choice ends with EOS at a pseudo-random length reproducible from the request's
seed, or its id. The shapes of agent traffic are honoured too (:mod:`worker.sim_shapes`):
structured output, tool calls, reasoning and log probabilities. It ignores the rest of the
sampling: stop strings never match (the text is random words), temperature, penalties and logit
bias change nothing, prefix caching is not modelled.

The step loop is one task in the worker's event loop that sleeps the modelled time of each step
(divided by ``speed``); it never imports vLLM, so a worker starts in about a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from shared.messages import Sampling
from worker.engine import Delta, EngineRejected, EngineStats
from worker.sim_batch import Batch, plan_choice
from worker.sim_shapes import Shaper, Shaping
from worker.sim_timing import Preset, step_seconds
from worker.sim_tokens import Tokenizer, TokenPool, build_pool, load_tokenizer

log = logging.getLogger(__name__)

SIM_MAX_MODEL_LEN = 4096
"""Context length of the simulated engine when none is configured (the presets hold ~8B models
whose real context is longer, but whose KV cache holds few sequences that long)."""
MAX_LAG = 0.02
"""Seconds the step clock may fall behind (a busy event loop) and still catch up by running the
next steps sooner; beyond that the lost time is forgotten rather than repaid in a burst."""


class EngineStopped(RuntimeError):
    """The simulated engine was shut down while the request ran."""


@dataclass(slots=True, eq=False)
class _Request:
    """One request's deltas on their way from the step loop to its :meth:`SimEngine.generate`."""

    choices: int
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    deltas: list[Delta] = field(default_factory=list)
    stopped: bool = False


class SimEngine:
    """:class:`~worker.engine.Engine` with a modelled clock instead of a model."""

    kind = "sim"

    def __init__(
        self,
        pool: TokenPool,
        preset: Preset,
        *,
        model_name: str,
        tokenizer_source: str,
        max_model_len: int,
        capacity: int,
        speed: float = 1.0,
        tokenizer: Tokenizer | None = None,
        shaping: Shaping | None = None,
    ) -> None:
        self.model_name = model_name
        self.tokenizer_source = tokenizer_source
        self.max_model_len = max_model_len
        self.preset = preset
        self._pool = pool
        self._speed = speed
        self._tokenizer = tokenizer
        self._shaper = (
            Shaper(tokenizer, shaping, pool.texts) if tokenizer is not None and shaping is not None else None
        )
        self._stop_texts: dict[int, str] = {}
        self._batch: Batch[_Request] = Batch(capacity, preset.max_batched_tokens, preset.kv_tokens)
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        tokenizer_path: str,
        preset: Preset,
        *,
        served_name: str | None = None,
        max_model_len: int | None = None,
        capacity: int = 256,
        speed: float = 1.0,
        shaping: Shaping | None = None,
    ) -> SimEngine:
        """Load the tokenizer (off the event loop), build the token pool and start the step loop.
        ``shaping``: what the worker says of its model's answers (default: no reasoning, no tool parser).

        Raises OSError when the tokenizer cannot be loaded, UnsuitableTokenizer when it cannot be used.
        """
        tokenizer = await asyncio.to_thread(load_tokenizer, tokenizer_path)
        pool = await asyncio.to_thread(build_pool, tokenizer)
        engine = cls(
            pool,
            preset,
            model_name=served_name or tokenizer_path,
            tokenizer_source=tokenizer_path,
            max_model_len=max_model_len or SIM_MAX_MODEL_LEN,
            capacity=capacity,
            speed=speed,
            tokenizer=tokenizer,
            shaping=shaping or Shaping(),
        )
        engine.run_in_background()
        log.info(
            "simulated engine: %s, %.3gx speed, %d plain tokens of %d",
            preset.description,
            speed,
            len(pool.ids),
            pool.vocab_size,
        )
        return engine

    def run_in_background(self) -> None:
        """Start the step loop as a task of the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sim-engine")

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: Sampling,
        reasoning_ended: bool | None = None,
        *,
        cache_salt: str | None = None,  # no prefix cache here: nothing to keep apart
    ) -> AsyncGenerator[list[Delta]]:
        """Stream the request's deltas, one list per step (or several steps' worth when the consumer
        was slower). Closing the generator or cancelling its consumer drops the request at once."""
        self._check(prompt_token_ids, sampling)
        if self._task is None or self._task.done():
            raise EngineStopped("the simulated engine is not running")
        request = _Request(choices=sampling.n)
        key = str(sampling.seed) if sampling.seed is not None else request_id
        ids, texts = self._pool.ids, self._pool.texts
        if sampling.stop_token_ids:
            ids, texts = self._pool.without(sampling.stop_token_ids)
        scripts = (
            self._shaper.scripts(key, prompt_token_ids, sampling, reasoning_ended, (ids, texts))
            if self._shaper is not None
            else [None] * sampling.n
        )
        choices = [
            plan_choice(
                request,
                index,
                key,
                len(prompt_token_ids),
                sampling,
                self.max_model_len,
                ids,
                texts,
                self._pool.eos_token_id,
                self._stop_text,
                scripts[index],
            )
            for index in range(sampling.n)
        ]
        self._batch.add(choices)
        self._work.set()
        try:
            while request.choices:
                await request.ready.wait()
                request.ready.clear()
                if request.stopped:
                    raise EngineStopped("the simulated engine stopped")
                deltas, request.deltas = request.deltas, []
                request.choices -= sum(d.finish_reason is not None for d in deltas)
                yield deltas
        finally:
            if request.choices:
                self._batch.drop(request)

    def _check(self, prompt_token_ids: Sequence[int], sampling: Sampling) -> None:
        """Refuse what vLLM would refuse before scheduling (the gateway checks these first)."""
        if not prompt_token_ids:
            raise EngineRejected("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise EngineRejected(
                f"the prompt ({len(prompt_token_ids)} tokens) leaves no room in the context "
                f"({self.max_model_len} tokens)"
            )
        if not (min(prompt_token_ids) >= 0 and max(prompt_token_ids) < self._pool.vocab_size):
            raise EngineRejected(
                f"a prompt token id is outside the vocabulary (0-{self._pool.vocab_size - 1})"
            )
        if sampling.n < 1 or sampling.max_tokens < 1:
            raise EngineRejected("n and max_tokens must be at least 1")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        try:
            while True:
                if not self._batch:
                    self._work.clear()
                    await self._work.wait()
                    deadline = loop.time()
                work = self._batch.schedule()
                deadline = (
                    max(deadline, loop.time() - MAX_LAG) + step_seconds(self.preset, work) / self._speed
                )
                # One sleep per step for the whole batch; sleep(0) when late still lets others run.
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                for request, delta in self._batch.advance():
                    request.deltas.append(delta)
                    request.ready.set()
        except Exception:
            log.exception("the simulated engine's step loop failed")
            raise
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        """The loop ended (shutdown, or a bug): no request may wait for a step that never comes."""
        owners = {c.owner for c in (*self._batch.running, *self._batch.waiting)}
        for owner in owners:
            owner.stopped = True
            owner.ready.set()
        self._batch = Batch(self._batch.capacity, self._batch.token_budget, self._batch.kv_capacity)

    def _stop_text(self, token: int) -> str:
        """A stop token's text, for ``include_stop_str_in_output`` (decoded once per token id)."""
        if token not in self._stop_texts:
            tok = self._tokenizer
            self._stop_texts[token] = tok.decode([token], skip_special_tokens=True) if tok else ""
        return self._stop_texts[token]

    def stats(self) -> EngineStats:
        """Running and waiting sequences (each of n choices counts) and KV cache usage."""
        batch = self._batch
        return EngineStats(
            running=len(batch.running),
            waiting=len(batch.waiting),
            kv_cache_usage=min(1.0, batch.kv_held / batch.kv_capacity) if batch.running else 0.0,
        )

    def shutdown(self) -> None:
        """Stop the step loop; requests still running end with :class:`EngineStopped`. Idempotent."""
        if self._task is not None:
            self._task.cancel()
