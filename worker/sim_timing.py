"""Pure: how long one step of the simulated engine takes, and the presets that say so for real hardware.

One engine step runs the model once over every scheduled token: the prompt tokens being prefilled
and one token for each sequence that decodes. Its time is modelled as

    step = weights_s + (prefill_tokens + decoding) * token_s + kv_tokens * kv_token_s

``weights_s`` is reading the weights once (decoding a ~8B model is bound by memory bandwidth, so a
step costs this much however small the batch); ``token_s`` is the arithmetic of one token (2 FLOPs
per parameter), the same for a prompt token and a decoded one; ``kv_token_s`` is reading one cached
token's keys and values, which every decoding step does for every token its sequences hold. So a
step's decode cost grows with the batch size and with the context held, and a step that admits a
prompt pays for each of its tokens. The model adds the terms where a GPU overlaps some of them
(a prefill chunk's arithmetic with the weight reads of the same step), so it errs on the slow side
when long prompts and decodes share steps; see the A100 check below.

Sources and derivation (Llama-3.1-8B in bf16: 8.03e9 parameters, 16.06 GB of weights, 131,072 bytes
of KV cache per token = 32 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes):

- Spec sheets: memory bandwidth and dense BF16 tensor throughput. H100 SXM 3.35 TB/s, 989 TFLOPS
  (https://www.nvidia.com/en-us/data-center/h100/, 1,979 TFLOPS "with sparsity", halved); A100 40GB
  1,555 GB/s, 312 TFLOPS (https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
  nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf); L4 300 GB/s, 121 TFLOPS
  (https://www.nvidia.com/en-us/data-center/l4/, 242 TFLOPS with sparsity, halved). Reading the
  weights once therefore takes at least 4.79 ms (H100), 10.33 ms (A100) and 53.5 ms (L4).
- A100 ``weights_s`` = 13.3 ms, measured: "vLLM throughput-latency sweep on NVIDIA A100"
  (https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on), Llama-3.1-8B-Instruct BF16 on one
  A100 40GB, vLLM 0.23, 1024 prompt / 128 output tokens with ``--ignore-eos``: one request at a time
  decodes "about 75 tokens/sec, roughly 77% of the GPU's memory-bandwidth ceiling" (1 / 75 tok/s).
- H100 ``weights_s`` = 6.48 ms, measured: InferenceBench "Recipe: concurrency sweep"
  (https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/), Llama-3.1-8B-Instruct fp16 on one
  H100-80GB-HBM3, vLLM 0.21.0: TPOT p50 6.48 ms at concurrency 1 (74% of the bandwidth ceiling).
  Its concurrency-64 row (TPOT 46.9 ms with lower throughput than at 16) is not used: a step model
  cannot explain throughput falling with load, which points at a limit outside the engine.
- L4 ``weights_s`` = 70.9 ms, derived: no published vLLM figure for an 8B model on an L4 was found,
  so its 53.5 ms ceiling is divided by the efficiency the two measurements above share (75.5%).
- ``token_s`` = 16.06 GFLOP / (dense BF16 peak x 0.6): 27.1 us (H100), 85.8 us (A100), 221 us (L4).
  The 60% utilisation of prefill is an assumption, not a measurement: it gives a 1024-token prompt
  alone about 34 ms (H100), 101 ms (A100) and 297 ms (L4) to its first token.
- ``kv_token_s`` = 131,072 bytes / (bandwidth x the efficiency above): 53 ns (H100), 109 ns (A100),
  579 ns (L4) per cached token per step.
- ``kv_tokens``: 90% of the GPU's memory (vLLM's default ``gpu_memory_utilization``) less the
  weights and about 2 GB of activations and CUDA graphs (an assumption), at 131,072 bytes a token:
  411,000 (H100 80GB), 137,000 (A100 40GB), 27,000 (L4 24GB).
- ``max_batched_tokens`` = 2048 for every preset: the tokens one step may schedule
  (``max_num_batched_tokens``) that a worker's ``AsyncLLM`` gets in vLLM 0.32; its larger defaults
  (8192 on an H100) apply only to vLLM's own server and ``LLM`` class (``EngineArgs.get_batch_defaults``
  in ``vllm/engine/arg_utils.py``).
- Check against the A100 source, which reports a 6.6x throughput gain from concurrency 1 to 8 "with
  almost no latency cost": this model, run through the scheduler of :mod:`worker.sim_batch` on the
  same workload, gives 5.6x and a 44% longer time per output token at 8, because its 1024-token
  prefills do not overlap the decodes of their step.
- ``cpu-demo``: the offline demo model (float32, 2 layers) in vLLM 0.32 on this project's 2-core
  host, fitted to vLLM's own server in ``loadtest/results/2026-11-27-compare-uni/summary.md``
  (64-token prompts, 128 output tokens): TPOT 2.53 ms at 4 streams and 12.94 ms at 64, with each
  stream's prefill spread over its 128 steps, give ``weights_s`` 1.84 ms and ``token_s`` 116 us. Its
  KV cache (2,048 bytes a token) is the worker's 1 GiB for the demo model; reading it is free here.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import SimPreset


@dataclass(frozen=True, slots=True)
class Preset:
    """A GPU class (or the demo CPU) serving one model, as the step-time model needs it."""

    name: str
    description: str
    weights_s: float
    """Seconds of every step, whatever its batch: reading the weights once."""
    token_s: float
    """Seconds per token the step computes (prompt tokens prefilled, and one per decoding sequence)."""
    kv_token_s: float
    """Seconds per cached token of the decoding sequences (attention reads their KV cache)."""
    kv_tokens: int
    """Tokens the KV cache holds; a sequence waits when its prompt does not fit."""
    max_batched_tokens: int = 2048
    """Tokens one step may schedule; a longer prompt is prefilled in chunks over several steps."""


PRESETS: dict[SimPreset, Preset] = {
    "l4": Preset(
        "l4",
        "NVIDIA L4 24GB, Llama-3.1-8B bf16 (derived from the spec sheet)",
        weights_s=70.9e-3,
        token_s=221e-6,
        kv_token_s=579e-9,
        kv_tokens=27_000,
    ),
    "a100": Preset(
        "a100",
        "NVIDIA A100 40GB, Llama-3.1-8B bf16",
        weights_s=13.3e-3,
        token_s=85.8e-6,
        kv_token_s=109e-9,
        kv_tokens=137_000,
    ),
    "h100": Preset(
        "h100",
        "NVIDIA H100 80GB SXM, Llama-3.1-8B bf16",
        weights_s=6.48e-3,
        token_s=27.1e-6,
        kv_token_s=53e-9,
        kv_tokens=411_000,
    ),
    "cpu-demo": Preset(
        "cpu-demo",
        "the offline demo model on vLLM's CPU backend, 2 cores",
        weights_s=1.84e-3,
        token_s=116e-6,
        kv_token_s=0.0,
        kv_tokens=2**30 // 2048,
    ),
}


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one engine step computes."""

    prefill_tokens: int
    """Prompt tokens prefilled in this step (chunks of admitted or preempted sequences)."""
    decoding: int
    """Sequences that each decode one token."""
    kv_tokens: int
    """Tokens the decoding sequences hold in the KV cache."""


def step_seconds(preset: Preset, work: StepWork) -> float:
    """The modelled duration of one engine step (0 for a step with nothing to compute)."""
    if work.prefill_tokens == 0 and work.decoding == 0:
        return 0.0
    return (
        preset.weights_s
        + (work.prefill_tokens + work.decoding) * preset.token_s
        + work.kv_tokens * preset.kv_token_s
    )
