"""Switchyard against vLLM's own OpenAI server, answer by answer: the same bodies sent to both, the
shapes of the answers compared, and what the model said.

    python -m loadtest parity                                  # start the servers, every body
    python -m loadtest parity --pairs hermes                   # one pairing only
    python -m loadtest parity --switchyard-url http://127.0.0.1:8000/v1 --vllm-url http://127.0.0.1:8100/v1

Each pairing runs ``switchyard up`` (embedded Redis, a gateway, one worker) and vLLM's server
(``python -m vllm.entrypoints.openai.api_server``) on the same model with the same engine settings
(:class:`runner.EngineSettings`: dtype float32, context length, eager mode, KV cache), one server
at a time, and sends every body of :mod:`loadtest.paritycases` to each, one body at a time, with
plain HTTP (streams read event by event), except the agent loop's, which goes through the
official SDK. The pairings (:data:`PAIRS`) differ in how each server treats tool calls:

- ``hermes``: vLLM with ``--enable-auto-tool-choice --tool-call-parser hermes``, Switchyard with the
  same parser;
- ``default``: both with no tool parser (vLLM's default configuration); only bodies with tools;
- ``same-engine``: vLLM as in ``hermes``, plus the tool-call path and structured-output settings
  Switchyard's workers use (vLLM's JSON tool-call path, xgrammar without free whitespace), so that
  the two engines decode under the same grammar and the text can be compared too.

Writes ``parity.md`` (the report) to ``--out``, and compressed beside it ``parity.json.gz`` (every
difference and its explanation), ``answers.json.gz`` (every answer, to judge again with
``--rejudge``) and each server's log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from control.processes import free_port
from loadtest import proctree, runner
from loadtest.paritycases import CASES, Case
from loadtest.parityreport import PairResult, judge, summary_markdown
from loadtest.parityshape import Answer
from loadtest.report import json_text, read_json, results_dir, write_raw
from loadtest.runner import EngineSettings, Target

KEY = "sy-0123456789ab-paritychecksparitychecksparitychecks12"
"""The API key of both servers (Switchyard's development tenant; vLLM's ``--api-key``)."""
TIMEOUT_S = 300.0
"""How long one answer may take (the host may be shared with much else)."""
HERMES = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
SWITCHYARD_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
"""The structured-output settings Switchyard's workers give their engine (``worker/main.py``)."""


@dataclass(frozen=True)
class Pair:
    """How each server of a pairing is configured."""

    name: str
    about: str
    vllm_flags: tuple[str, ...] = ()
    vllm_env: dict[str, str] = field(default_factory=dict)
    switchyard_env: dict[str, str] = field(default_factory=dict)
    tools_only: bool = False
    """Only the bodies whose answers depend on the tool-call configuration."""


PAIRS = {
    "hermes": Pair(
        "hermes",
        "vLLM `--enable-auto-tool-choice --tool-call-parser hermes`; Switchyard with the hermes parser. "
        "Tool calls and JSON decode under different grammars here (vLLM's structural tag leaves a "
        "call's arguments free, and its JSON may hold any whitespace), so their text differs, and so "
        "does the agent loop's second turn, which starts from different first answers",
        HERMES,
        switchyard_env={"SWITCHYARD_TOOL_CALL_PARSER": "hermes"},
    ),
    "default": Pair(
        "default",
        "Both without a tool-call parser (vLLM's default configuration); only the bodies with tools",
        tools_only=True,
    ),
    "same-engine": Pair(
        "same-engine",
        "vLLM with hermes and Switchyard's engine settings for grammars: JSON tool-call path "
        "(`VLLM_ENFORCE_STRICT_TOOL_CALLING=0`), `--structured-outputs-config` xgrammar without free "
        "whitespace; Switchyard with the hermes parser (the same server as in `hermes`). Both engines "
        "decode under the same grammars, so the text of every answer can be compared",
        (*HERMES, "--structured-outputs-config", json.dumps(SWITCHYARD_OUTPUTS)),
        {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"},
        {"SWITCHYARD_TOOL_CALL_PARSER": "hermes"},
    ),
}


# --- sending -------------------------------------------------------------------------------------


def read_stream(lines: Iterator[str]) -> tuple[list[Any], bool]:
    """The data of each Server-Sent Event (parsed JSON; an event named ``error`` as
    ``{"error": ...}`` if its data is not already so) and whether ``[DONE]`` ended the stream."""
    events: list[Any] = []
    name, data = "", []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif not line and data:
            text = "\n".join(data)
            if text == "[DONE]":
                return events, True
            event = json.loads(text)
            if name == "error" and not (isinstance(event, dict) and "error" in event):
                event = {"error": event}
            events.append(event)
            name, data = "", []
    return events, False


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"not_json": text[:500]}


def send(client: httpx.Client, base_url: str, body: dict[str, Any]) -> Answer:
    """POST ``body`` to ``/chat/completions``: the whole answer, or the stream's events."""
    url = f"{base_url}/chat/completions"
    if not body.get("stream"):
        resp = client.post(url, json=body)
        return Answer(resp.status_code, body=_json(resp.text))
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            return Answer(resp.status_code, body=_json(resp.read().decode(errors="replace")))
        events, done = read_stream(resp.iter_lines())
    return Answer(200, events=events, done=done)


def round_trip(base_url: str, key: str, body: dict[str, Any], then: dict[str, Any]) -> Answer:
    """The agent loop through the official SDK: ``body``, then the SDK's own assistant message and a
    tool result (a user turn if no tool was called) in a second request; its answer."""
    import openai

    sent: list[Any] = []  # the requests as the SDK sent them
    http = openai.DefaultHttpxClient(
        trust_env=False, timeout=TIMEOUT_S, event_hooks={"request": [sent.append]}
    )
    sdk = openai.OpenAI(base_url=base_url, api_key=key, http_client=http, max_retries=0)
    try:
        first = sdk.chat.completions.create(**body)
        message = first.choices[0].message
        calls = message.tool_calls or []
        follow = (
            then["follow_up"] | {"tool_call_id": calls[0].id}
            if calls
            else {"role": "user", "content": "Go on."}
        )
        second = dict(body, messages=[*body["messages"], message, follow], max_tokens=then["max_tokens"])
        second.pop("tool_choice", None)
        resp = sdk.chat.completions.with_raw_response.create(**second)
        answer = Answer(resp.status_code, body=_json(resp.text))
    except openai.APIStatusError as exc:
        answer = Answer(exc.status_code, body=_json(exc.response.text))
    except openai.APITimeoutError as exc:
        raise TimeoutError(str(exc)) from exc
    finally:
        http.close()
    answer.sent = json.loads(sent[-1].content) if sent else None
    return answer


def ask(base_url: str, key: str, model: str, cases: Sequence[Case]) -> dict[str, Answer]:
    """Every case's answer from one server, one request at a time; one that does not come in time
    is recorded as status 0 (nothing here is timed: on a host this busy, say so and run again)."""
    answers = {}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(trust_env=False, timeout=TIMEOUT_S, headers=headers) as client:
        for case in cases:
            body = {"model": model, **case.body}
            try:
                if case.round_trip is not None:
                    answers[case.name] = round_trip(base_url, key, body, case.round_trip)
                else:
                    answers[case.name] = send(client, base_url, body)
            except (httpx.TimeoutException, TimeoutError) as exc:
                answers[case.name] = Answer(
                    0, body={"error": {"message": f"no answer in {TIMEOUT_S:.0f} s: {exc!r}"}}
                )
    return answers


# --- the servers ---------------------------------------------------------------------------------


def vllm_target(pair: Pair, engine: EngineSettings, model_dir: Path, model: str) -> Target:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY]
    return Target(
        f"vllm-{pair.name}",
        [*argv, *engine.vllm_args(), *pair.vllm_flags],
        engine.env() | pair.vllm_env,
        port,
    )


def switchyard_target(pair: Pair, engine: EngineSettings, model_dir: Path, model: str) -> Target:
    target = runner.switchyard_target(runner.DEFAULT_SWITCHYARD_CMD, engine, model_dir, model, KEY)
    # Only the pairing's settings reach it, not this shell's SWITCHYARD_* (nor its dev-key file).
    return replace(
        target, name=f"switchyard-{pair.name}", env=target.env | pair.switchyard_env, isolated=True
    )


@contextlib.contextmanager
def serving(target: Target, model: str, out: Path, timeout: float) -> Iterator[None]:
    """Start ``target``, wait until it lists the model, and stop it after the block."""
    print(f"starting {target.name}: {shlex.join(target.argv)}", flush=True)
    log = out / f"{target.name}.log"
    with runner.running(target, log) as proc:
        begun = time.monotonic()
        runner.wait_ready(proc, target, model, KEY, timeout, log)
        print(f"{target.name} ready after {time.monotonic() - begun:.0f} s", flush=True)
        yield


def cases_of(pair: Pair, only: Sequence[str]) -> list[Case]:
    return [c for c in CASES if (not pair.tools_only or c.tools) and (not only or c.name in only)]


def run_pairs(args: argparse.Namespace, model_dir: Path) -> list[PairResult]:
    """Each pairing in turn, one server at a time (two engines would share the host's two cores);
    Switchyard started once for the pairings that configure it alike."""
    engine = EngineSettings(max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib)
    results = []
    switchyard_answers: dict[str, dict[str, Answer]] = {}  # by its environment
    switchyard_commands: dict[str, str] = {}
    for name in args.pairs:
        pair = PAIRS[name]
        cases = cases_of(pair, args.cases)
        vllm = vllm_target(pair, engine, model_dir, args.model_name)
        with serving(vllm, args.model_name, args.out, args.ready_timeout):
            theirs = ask(vllm.base_url, KEY, args.model_name, cases)
        settings = json.dumps(pair.switchyard_env, sort_keys=True)
        if settings not in switchyard_answers:
            ours = switchyard_target(pair, engine, model_dir, args.model_name)
            wanted = [c for c in CASES if not args.cases or c.name in args.cases]
            with serving(ours, args.model_name, args.out, args.ready_timeout):
                switchyard_answers[settings] = ask(ours.base_url, KEY, args.model_name, wanted)
            switchyard_commands[settings] = shlex.join(ours.argv)
        commands = {vllm.name: shlex.join(vllm.argv), "switchyard": switchyard_commands[settings]}
        results.append(judge(pair.name, pair.about, cases, theirs, switchyard_answers[settings], commands))
    return results


def run_given(args: argparse.Namespace) -> list[PairResult]:
    """The bodies sent to two running servers (``--switchyard-url``, ``--vllm-url``)."""
    pair = PAIRS[args.pairs[0]]
    cases = cases_of(pair, args.cases)
    theirs = ask(args.vllm_url, args.key, args.model_name, cases)
    ours = ask(args.switchyard_url, args.key, args.model_name, cases)
    commands = {"vllm": args.vllm_url, "switchyard": args.switchyard_url}
    return [judge(pair.name, pair.about, cases, theirs, ours, commands)]


def rejudge(doc: dict[str, Any]) -> PairResult:
    """A pairing's kept answers (``answers.json``) judged again, by today's explanations."""
    by_name = {c.name: c for c in CASES}
    cases = [by_name[name] for name in doc["answers"] if name in by_name]
    theirs = {c.name: Answer(**doc["answers"][c.name]["vllm"]) for c in cases}
    ours = {c.name: Answer(**doc["answers"][c.name]["switchyard"]) for c in cases}
    return judge(doc["pair"], doc["about"], cases, theirs, ours, doc["commands"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest parity", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--pairs", type=lambda s: s.split(","), default=list(PAIRS), help=f"of {', '.join(PAIRS)}")
    p.add_argument("--cases", type=lambda s: s.split(","), default=[], help="only these bodies (names)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--model-name", default="switchyard-demo")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--switchyard-url", help="a running Switchyard (with --vllm-url: start nothing)")
    p.add_argument("--vllm-url", help="a running vLLM server, configured as the first of --pairs")
    p.add_argument("--key", default=KEY, help="API key for running servers")
    p.add_argument("--rejudge", type=Path, help="judge the answers a run kept in this directory again")
    p.add_argument("--out", type=Path, default=results_dir("parity"))
    args = p.parse_args(argv)
    unknown = [name for name in args.pairs if name not in PAIRS]
    if unknown:
        p.error(f"no pairing {unknown}; there are {list(PAIRS)}")
    if bool(args.switchyard_url) != bool(args.vllm_url):
        p.error("--switchyard-url and --vllm-url go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, _ = runner.resolve_model(args.model_dir, args.model_name)
    begun, load, steal = time.monotonic(), os.getloadavg()[0], proctree.machine_steal()
    if args.rejudge:
        results = [rejudge(doc) for doc in read_json(args.rejudge / "answers.json")]
    elif args.switchyard_url:
        results = run_given(args)
    else:
        results = run_pairs(args, model_dir)
    wall = time.monotonic() - begun
    host = {
        "cores": os.cpu_count(),
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg()[0],
        "steal_pct": 100 * (proctree.machine_steal() - steal) / (wall * (os.cpu_count() or 1)),
        "wall_s": wall,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
    }
    text = summary_markdown(results, host)
    (args.out / "parity.md").write_text(text)
    write_raw(args.out / "parity.json", json_text({"host": host, "pairs": [r.summary() for r in results]}))
    write_raw(args.out / "answers.json", json_text([r.answers() for r in results]))
    print(text)
    return 0 if all(r.explained() for r in results) else 1
