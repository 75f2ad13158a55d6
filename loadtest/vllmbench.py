"""vLLM's own benchmark client (``vllm bench serve``), run from Python, as a user would compare.

    python -m loadtest vllmbench --base-url http://127.0.0.1:8000 --model switchyard-demo \\
        --tokenizer ~/.cache/switchyard/demo-model --concurrency 64 --num-prompts 400 --json out.json

Random dataset, ``--input-len`` prompt and exactly ``--output-len`` output tokens (``ignore_eos``),
streamed through ``/v1/completions`` (vLLM's default ``openai`` backend), or with ``--chat`` through
``/v1/chat/completions`` (its ``openai-chat`` backend: the prompt as one user message, TTFT to the first
chunk with a choice). ``--extra-body JSON`` adds fields to every request (tools and ``tool_choice``,
a ``response_format``, ``temperature``); ``--no-ignore-eos`` lets an answer end where its grammar
does (at most ``--output-len`` tokens). The ``vllm`` command line
itself cannot run on hosts without AVX-512 (it loads a kernel library for another platform first and
dies with SIGILL), so the CPU platform is chosen before vLLM's benchmark module is imported. The key
of ``--api-key`` travels as vLLM's client expects it, in ``OPENAI_API_KEY``. Prints and writes the
figures vLLM's client reports (output tokens/s, TTFT, TPOT and ITL percentiles, failures);
``--requests PATH`` keeps one record per request too, compressed (``PATH.gz``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from loadtest.report import json_text, write_raw

FIGURES = (
    "completed",
    "failed",
    "duration",
    "output_throughput",
    "request_throughput",
    "total_input_tokens",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p95_ttft_ms",
    "p99_ttft_ms",
    "total_output_tokens",
    "mean_tpot_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "median_e2el_ms",
)
PER_REQUEST = {
    "start_times": "start",
    "input_lens": "prompt_tokens",
    "output_lens": "output_tokens",
    "ttfts": "ttft",
    "latencies": "latency",
    "errors": "error",
    "generated_texts": "text",
}
"""vLLM's client's per-request lists (``--save-detailed``) -> the field of each kept record."""


def records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per request from the client's lists; the time between chunks summed up by its
    count and mean (the whole list would be most of the file)."""
    lists = {field: result.get(key) or [] for key, field in PER_REQUEST.items()}
    itls = result.get("itls") or []
    out = []
    for i in range(max(map(len, lists.values()), default=0)):
        record = {field: values[i] if i < len(values) else None for field, values in lists.items()}
        gaps = itls[i] if i < len(itls) else []
        record["chunks"] = len(gaps) + 1 if record["ttft"] else 0
        record["itl_mean"] = sum(gaps) / len(gaps) if gaps else None
        out.append(record)
    return out


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms.current_platform = CpuPlatform()  # before the benchmark imports kernels
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if args.api_key:
        os.environ["OPENAI_API_KEY"] = args.api_key
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    flags = [
        *("--base-url", args.base_url, "--model", args.model, "--tokenizer", str(args.tokenizer)),
        *("--dataset-name", "random", "--random-input-len", str(args.input_len)),
        *("--random-output-len", str(args.output_len)),
        *("--max-concurrency", str(args.concurrency), "--num-prompts", str(args.num_prompts)),
        *("--seed", str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el"),
        *("--metric-percentiles", "50,95,99", "--num-warmups", str(args.num_warmups)),
    ]
    flags += ["--save-detailed"] if args.requests else []
    flags += ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions"] if args.chat else []
    extra = json.loads(args.extra_body or "{}")
    if args.no_ignore_eos:  # the client sets ignore_eos for its random dataset whatever it is told
        extra["ignore_eos"] = False
    else:
        flags.append("--ignore-eos")
    flags += ["--extra-body", json.dumps(extra)] if extra else []
    bench = parser.parse_args(flags)
    result: dict[str, Any] = main(bench)
    return {k: result.get(k) for k in FIGURES}, records(result) if args.requests else []


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
    p.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests sent first")
    p.add_argument("--api-key")
    p.add_argument("--chat", action="store_true", help="through /v1/chat/completions")
    p.add_argument("--extra-body", help="JSON object of fields added to every request")
    p.add_argument("--no-ignore-eos", action="store_true", help="answers may end before --output-len")
    p.add_argument("--json", type=Path)
    p.add_argument("--requests", type=Path, help="keep one record per request here, compressed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures, kept = run(args)
    text = json.dumps(figures, indent=1)
    if args.json:
        args.json.write_text(text)
    if args.requests:
        write_raw(args.requests, json_text({"figures": figures, "requests": kept}))
    print(text)
    return 0 if figures.get("failed") == 0 else 1
