"""vLLM's own benchmark client (``vllm bench serve``), run from Python, as a user would compare.

    python -m loadtest vllmbench --base-url http://127.0.0.1:8000 --model switchyard-demo \\
        --tokenizer ~/.cache/switchyard/demo-model --concurrency 64 --num-prompts 400 --json out.json

Random dataset, ``--input-len`` prompt and exactly ``--output-len`` output tokens (``ignore_eos``),
streamed through ``/v1/completions`` (vLLM's default ``openai`` backend). The ``vllm`` command line
itself cannot run on hosts without AVX-512 (it loads a kernel library for another platform first and
dies with SIGILL), so the CPU platform is chosen before vLLM's benchmark module is imported. The key
of ``--api-key`` travels as vLLM's client expects it, in ``OPENAI_API_KEY``. Prints and writes the
figures vLLM's client reports (output tokens/s, TTFT, TPOT and ITL percentiles, failures).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

FIGURES = (
    "completed",
    "failed",
    "duration",
    "output_throughput",
    "request_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_e2el_ms",
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms.current_platform = CpuPlatform()  # before the benchmark imports kernels
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if args.api_key:
        os.environ["OPENAI_API_KEY"] = args.api_key
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench = parser.parse_args(
        [
            *("--base-url", args.base_url, "--model", args.model, "--tokenizer", str(args.tokenizer)),
            *("--dataset-name", "random", "--random-input-len", str(args.input_len)),
            *("--random-output-len", str(args.output_len), "--ignore-eos"),
            *("--max-concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts)),
            *("--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el"),
        ]
    )
    result: dict[str, Any] = main(bench)
    return {k: result.get(k) for k in FIGURES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest vllmbench", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--base-url", required=True, help="server root, without /v1")
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=400)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args)
    text = json.dumps(figures, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0 if figures.get("failed") == 0 else 1
