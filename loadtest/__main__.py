"""``python -m loadtest STUDY [args...]``: run one study; ``python -m loadtest --help`` lists them.

Each study keeps its own options (``python -m loadtest STUDY --help``). Only the chosen study's
module is imported, so listing them costs nothing and a study's dependencies load when it runs.
"""

from __future__ import annotations

import importlib
import sys

from control.processes import terminate_as_interrupt

STUDIES = {
    "agentbench": "tool calls and JSON schemas at 64 streams beside plain chat, Switchyard and vLLM's server",
    "affinity": "prefix affinity on multi-turn conversations, two vLLM workers, with and without it",
    "autoscale": "a burst sent while a model has no worker: workers come, the burst completes, they go",
    "batchbench": "a Batch API batch beside interactive traffic, and what it costs that traffic",
    "bench": "the closed-loop streaming client against one OpenAI-compatible server",
    "compare": "Switchyard against vLLM's own server: same model, same engine settings (make bench)",
    "defaults": "`vllm serve` as shipped against `switchyard up` as shipped, with vLLM's client",
    "fairness": "how much one tenant flooding the system slows another tenant's first token",
    "floor": "the gateway's stack (FastAPI, uvicorn, sse-starlette) alone: its CPU per request and event",
    "parity": "Switchyard's answers against vLLM's own server's, body by body: shapes, finish reasons, text",
    "pathcost": "CPU time per 1,000 output tokens of each part of the serving path",
    "scale": "output tokens/s and balance of 1 to 16 simulated workers behind one gateway",
    "sweep": "Locust at a sweep of concurrency levels against one or two running servers",
    "tails": "where the first token's time goes at one concurrency: client, gateway, queue, engine",
    "vllmbench": "vLLM's own benchmark client (vllm bench serve) against one server",
}
"""Study name -> what it measures; each is the module ``loadtest.<name>`` with ``main(argv)``."""


def usage() -> str:
    width = max(map(len, STUDIES))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in STUDIES.items()]
    return "\n".join(
        [
            "usage: python -m loadtest STUDY [args...]",
            "       python -m loadtest STUDY --help     (the study's options)",
            "",
            "studies:",
            *lines,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    study, rest = args[0], args[1:]
    if study not in STUDIES:
        print(f"python -m loadtest: no study {study!r}\n\n{usage()}", file=sys.stderr)
        return 2
    terminate_as_interrupt()  # a study stopped with SIGTERM stops the fleet it started, too
    module = importlib.import_module(f"loadtest.{study}")
    code: int = module.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
