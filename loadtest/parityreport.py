"""The parity study's verdicts and report: every difference between the two servers' answers is
explained (:data:`KNOWN`) as intended, as vLLM's defect or as Switchyard's, or shown as unexplained.

Pure: the answers come in, the Markdown and JSON go out. The end-to-end parity test holds the same
bodies to the same explanations, so a new difference fails it until someone explains it here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.paritycases import Case
from loadtest.parityshape import Answer, Difference, Output, compare, held, output, same_text
from loadtest.report import markdown_table

VERDICTS = ("intended", "vLLM", "Switchyard", "unexplained")
"""How a difference is judged, mildest first: a choice Switchyard made, a defect of vLLM's server, a
defect of Switchyard's, or not yet explained."""


@dataclass(frozen=True)
class Known:
    """An explained difference: the differences it covers (regular expressions over their part and
    path, the kind, the bodies, the pairings) and why they differ."""

    verdict: str
    why: str
    path: str = ".*"
    part: str = ".*"
    kind: str | None = None
    vllm: tuple[str, ...] | None = None
    """The types (or status, finish reason) vLLM's answer has there."""
    cases: tuple[str, ...] | None = None
    pairs: tuple[str, ...] | None = None

    def covers(self, diff: Difference, case: str, pair: str) -> bool:
        return (
            re.fullmatch(self.path, diff.path) is not None
            and re.fullmatch(self.part, diff.part) is not None
            and (self.kind is None or self.kind == diff.kind)
            and (self.vllm is None or self.vllm == diff.vllm)
            and (self.cases is None or case in self.cases)
            and (self.pairs is None or pair in self.pairs)
        )


EXTENSIONS = (
    r"(choices\[\]\.)?(stop_reason|token_ids|routed_experts)|prompt_logprobs|prompt_token_ids|prompt_text"
    r"|kv_transfer_params|ec_transfer_params|metrics|service_tier"
    r"|choices\[\]\.message\.(annotations|audio|function_call|reasoning)|usage\.\w+_tokens_details"
)
GRAMMAR_TOOLS = ("tool_required", "tool_required_stream", "tool_named", "tool_named_stream", "sdk_round_trip")
JSON_SCHEMA = ("json_schema", "json_schema_stream")
FIRST = "first chunk|any chunk"

KNOWN: tuple[Known, ...] = (
    Known(
        "intended",
        "vLLM's own extension fields, and OpenAI fields that neither server fills, are sent as null by "
        "vLLM and left out by Switchyard; the SDK reads a missing field and a null one alike (None).",
        path=EXTENSIONS,
        kind="only vLLM",
        vllm=("null",),
    ),
    Known(
        "intended",
        "`system_fingerprint`: vLLM names its build and configuration (`vllm-0.32.0-<hash>`), in whole "
        "answers and in a stream's usage chunk only; Switchyard sends null in every answer and chunk "
        "(a fleet's workers need not share one configuration). The field is optional in OpenAI's API.",
        path="system_fingerprint",
    ),
    Known(
        "intended",
        "The error envelope: Switchyard answers as OpenAI does (`type` `invalid_request_error`, `code` "
        "null, `param` naming the field at fault); vLLM puts the HTTP status in `code`, its exception's "
        "class in `type` and no `param`.",
        path=r"error\.(code|param)",
        part="body|error event",
    ),
    Known(
        "intended",
        'A stream\'s first chunk: vLLM sends the role alone (`content: ""`, `logprobs: null`) before any '
        "token; Switchyard's first chunk carries the role with the first tokens it relays (their text, "
        "tool-call delta or logprobs), as it gathers a stream's tokens for up to 40 ms before sending.",
        path=r"choices\[\]\.(delta\.tool_calls|logprobs(\.content)?)",
        part=FIRST,
    ),
    Known(
        "intended",
        "A stream's last chunk: Switchyard sends the finish reason with the last tokens it gathered (their "
        "text or tool-call delta, `content: null` beside a call); vLLM sends it in a chunk of its own "
        "whose delta is empty, or on its hermes path `content: null` with the call's last argument delta.",
        path=r"choices\[\]\.delta\.(content|tool_calls)",
        part="finish chunk",
    ),
    Known(
        "intended",
        "Nulls inside tool-call deltas: Switchyard writes `content: null` beside the calls (as vLLM does on "
        "its hermes path, and OpenAI does) and leaves a call's null `name` out after its first delta; on "
        "its JSON tool-call path vLLM leaves `content` out and writes `name: null`. A client reads a null "
        "and a missing field alike.",
        path=r"choices\[\]\.delta\.(content|tool_calls\[\]\.function\.name)",
        part="any chunk",
        cases=GRAMMAR_TOOLS,
    ),
    Known(
        "intended",
        "Tools without a tool-call parser: vLLM refuses every request with tools whose `tool_choice` is "
        "not `none` (required and named: `requires --tool-call-parser`; auto, the default when tools are "
        "given, a tool result's turn included: `requires --enable-auto-tool-choice`). Switchyard holds "
        "required and named choices to the tools' schemas on any model, and answers auto in text.",
        part="status",
        vllm=("400",),
        pairs=("default",),
    ),
    Known(
        "intended",
        "An assistant message that calls tools: Switchyard's `content` is null, as OpenAI's is; vLLM's "
        "is an empty string.",
        path=r"choices\[\]\.message\.content",
        kind="types differ",
        vllm=("string",),
        cases=GRAMMAR_TOOLS,
        pairs=("same-engine",),
    ),
    Known(
        "vLLM",
        "Tool calls under `--tool-call-parser hermes`: vLLM holds `required` and named choices to its "
        "structural tag, whose arguments are free JSON unless a tool says `strict`, so the random-weights "
        "model writes a number where an object belongs and runs to `max_tokens` (`length`); the whole "
        "answer then has the raw `<tool_call>` markup as content and no `tool_calls`, the stream a cut "
        "call. Switchyard decodes these choices against the tools' schemas and returns valid calls.",
        path=r"|choices\[\]\.(message\.(content|tool_calls)|delta\.tool_calls)",
        part="finish_reason|body|finish chunk|first chunk",
        cases=GRAMMAR_TOOLS,
        pairs=("hermes",),
    ),
    Known(
        "vLLM",
        "JSON output: vLLM's default grammar lets any whitespace through, and the random-weights model "
        "fills `max_tokens` with it (`length`, the JSON unfinished); Switchyard's workers run xgrammar "
        "without free whitespace (`disable_any_whitespace`), and the answer ends (`stop`).",
        part="finish_reason",
        vllm=("length",),
        cases=JSON_SCHEMA,
        pairs=("hermes", "default"),
    ),
    Known(
        "vLLM",
        "A schema that cannot compile, streamed: vLLM starts a 200 stream and only then checks the "
        "grammar, so the client gets an `error` event (carrying `code: 400`) in place of an HTTP 400; "
        "Switchyard checks the schema with the engine's own compiler before anything is enqueued and "
        "answers 400.",
        part="status",
        vllm=("200",),
        cases=("bad_schema_stream",),
    ),
)


def explain(diff: Difference, case: str, pair: str) -> Known | None:
    return next((k for k in KNOWN if k.covers(diff, case, pair)), None)


def differences(vllm: Answer, switchyard: Answer) -> list[Difference]:
    """What differs: the status; then, with the same status, whether a stream ended with ``[DONE]``,
    the finish reason, and the shapes."""
    if vllm.status != switchyard.status:
        return [Difference("status", "", (str(vllm.status),), (str(switchyard.status),))]
    found = []
    if vllm.streamed and vllm.done != switchyard.done:
        found.append(Difference("[DONE]", "", (str(vllm.done),), (str(switchyard.done),)))
    theirs, ours = output(vllm).finish_reason, output(switchyard).finish_reason
    if theirs != ours:
        found.append(Difference("finish_reason", "", (str(theirs),), (str(ours),)))
    return found + compare(vllm, switchyard)


@dataclass
class CaseResult:
    """One body's two answers, judged."""

    name: str
    about: str
    vllm: Answer
    switchyard: Answer
    differences: list[Difference]
    explanations: list[Known | None]
    vllm_output: Output
    switchyard_output: Output
    same_text: bool | None
    """Both answered 200 and said the same; None when either did not answer 200."""
    vllm_breaks: str | None
    switchyard_breaks: str | None
    """Why the answer breaks what the body asked it to hold to ("" if it holds, None if nothing)."""

    @property
    def verdict(self) -> str:
        if not self.differences:
            return "identical"
        worst = VERDICTS[max(VERDICTS.index(k.verdict if k else "unexplained") for k in self.explanations)]
        return "match (intended differences)" if worst == "intended" else f"mismatch ({worst})"


@dataclass
class PairResult:
    """Every body's answers from one pairing of the servers."""

    pair: str
    about: str
    commands: dict[str, str]
    cases: dict[str, CaseResult] = field(default_factory=dict)

    def explained(self) -> bool:
        return all(k is not None for c in self.cases.values() for k in c.explanations)

    def answers(self) -> dict[str, Any]:
        """What was sent and answered, to keep (and judge again: ``parity --rejudge``)."""
        return {
            "pair": self.pair,
            "about": self.about,
            "commands": self.commands,
            "answers": {
                n: {"vllm": asdict(c.vllm), "switchyard": asdict(c.switchyard)} for n, c in self.cases.items()
            },
        }

    def summary(self) -> dict[str, Any]:
        """The pairing's verdicts as JSON: every difference with its explanation, answers left out."""
        return {
            "pair": self.pair,
            "about": self.about,
            "commands": self.commands,
            "cases": {
                name: {
                    "verdict": c.verdict,
                    "status": [c.vllm.status, c.switchyard.status],
                    "finish_reason": [c.vllm_output.finish_reason, c.switchyard_output.finish_reason],
                    "same_text": c.same_text,
                    "breaks": {"vllm": c.vllm_breaks, "switchyard": c.switchyard_breaks},
                    "differences": [
                        asdict(d)
                        | {
                            "kind": d.kind,
                            "verdict": k.verdict if k else "unexplained",
                            "why": k.why if k else None,
                        }
                        for d, k in zip(c.differences, c.explanations, strict=True)
                    ],
                }
                for name, c in self.cases.items()
            },
        }


def judge_case(case: Case, pair: str, vllm: Answer, switchyard: Answer) -> CaseResult:
    found = differences(vllm, switchyard)
    theirs, ours = output(vllm), output(switchyard)
    both = vllm.status == switchyard.status == 200
    return CaseResult(
        case.name,
        case.about,
        vllm,
        switchyard,
        found,
        [explain(d, case.name, pair) for d in found],
        theirs,
        ours,
        same_text(theirs, ours) if both else None,
        held(case.holds, theirs),
        held(case.holds, ours),
    )


def judge(
    pair: str,
    about: str,
    cases: Sequence[Case],
    vllm: dict[str, Answer],
    switchyard: dict[str, Answer],
    commands: dict[str, str],
) -> PairResult:
    result = PairResult(pair, about, commands)
    for case in cases:
        result.cases[case.name] = judge_case(case, pair, vllm[case.name], switchyard[case.name])
    return result


# --- the report ----------------------------------------------------------------------------------


def _holds(breaks: str | None) -> str:
    return "-" if breaks is None else "yes" if breaks == "" else "**no**"


def _both(vllm: Any, switchyard: Any) -> str:
    """One value if the servers agree, ``vLLM / Switchyard`` if not, ``-`` if neither has one."""
    if vllm is None and switchyard is None:
        return "-"
    return str(vllm) if vllm == switchyard else f"{vllm} / {switchyard}"


def _pair_table(result: PairResult) -> str:
    rows = [["body", "status", "finish reason", "shape", "same text", "prompt tokens", "holds to schema"]]
    for name, c in result.cases.items():
        theirs, ours = c.vllm_output, c.switchyard_output
        rows.append(
            [
                f"`{name}`",
                _both(c.vllm.status, c.switchyard.status),
                _both(theirs.finish_reason, ours.finish_reason),
                c.verdict,
                "-" if c.same_text is None else "yes" if c.same_text else "no",
                _both(theirs.prompt_tokens, ours.prompt_tokens),
                f"{_holds(c.vllm_breaks)} / {_holds(c.switchyard_breaks)}",
            ]
        )
    return markdown_table(rows, "lllllll")


def _explanations(results: Sequence[PairResult]) -> list[str]:
    """Each explanation once, with the differences it covers; then the unexplained ones."""
    covered: dict[int, list[str]] = {}
    unexplained: list[str] = []
    for result in results:
        for name, c in result.cases.items():
            for diff, known in zip(c.differences, c.explanations, strict=True):
                line = f"`{result.pair}` `{name}`: {diff}"
                if known is None:
                    unexplained.append(line)
                else:
                    covered.setdefault(KNOWN.index(known), []).append(line)
    lines = []
    for index in sorted(covered, key=lambda i: (VERDICTS.index(KNOWN[i].verdict), i)):
        known, seen = KNOWN[index], covered[index]
        lines += [f"- **{known.verdict}**: {known.why}", *(f"  - {s}" for s in seen[:6])]
        lines += [f"  - and {len(seen) - 6} more"] if len(seen) > 6 else []
    if unexplained:
        lines += ["", "**Unexplained:**", *(f"- {u}" for u in unexplained)]
    return lines


def _breaks(results: Sequence[PairResult]) -> list[str]:
    lines = []
    for result in results:
        for name, c in result.cases.items():
            for server, why in (("vLLM", c.vllm_breaks), ("Switchyard", c.switchyard_breaks)):
                if why:
                    lines.append(f"- `{result.pair}` `{name}`, {server}: {why}")
    return lines or ["- none"]


def _errors(results: Sequence[PairResult]) -> list[str]:
    """What each server said when one of them refused a body."""
    lines = []
    for result in results:
        for name, c in result.cases.items():
            if c.vllm_output.error is not None or c.switchyard_output.error is not None:
                lines.append(f"- `{result.pair}` `{name}` ({c.vllm.status} / {c.switchyard.status}):")
                lines += [
                    f"  - {server}: {json.dumps(out.error)[:300] if out.error is not None else 'no error'}"
                    for server, out in (("vLLM", c.vllm_output), ("Switchyard", c.switchyard_output))
                ]
    return lines or ["- none"]


def _text_rate(result: PairResult) -> str:
    both = [c for c in result.cases.values() if c.same_text is not None]
    same = sum(1 for c in both if c.same_text)
    return f"{same} of {len(both)} bodies answered by both said the same"


def summary_markdown(results: Sequence[PairResult], host: dict[str, Any]) -> str:
    lines = [
        f"# Switchyard against vLLM's own server, answer by answer ({host['date']})",
        "",
        f"Host: {host['cores']} cores, load average {host['load_average_at_start']:.1f} at the start and "
        f"{host['load_average_at_end']:.1f} at the end, {host['steal_pct']:.1f}% of the CPU time stolen "
        f"by the hypervisor; {host['wall_s']:.0f} s in all. Status, finish reason, shape and text are "
        'compared as `vLLM / Switchyard` where they differ; "holds to schema" is whether each '
        "answer matched the tools' or the response format's schema (`-`: nothing to hold to).",
        "",
    ]
    for result in results:
        lines += [f"## Pairing `{result.pair}`", "", result.about + ".", ""]
        lines += [f"- `{name}`: `{command}`" for name, command in result.commands.items()]
        lines += ["", _pair_table(result), "", f"Text: {_text_rate(result)}.", ""]
    lines += ["## Differences, explained", "", *_explanations(results), ""]
    lines += ["## Answers that break their schema", "", *_breaks(results), ""]
    lines += [
        "An answer cut at `max_tokens` (`length`) is unfinished JSON on any server: a `json_object` "
        "format bounds no string, and random weights fill it until the limit.",
        "",
    ]
    lines += ["## Error messages", "", *_errors(results), ""]
    return "\n".join(lines)
