"""Pure: the lines of a batch's input file, checked as the endpoint would check them, and the lines
of its output and error files, in OpenAI's formats.

An input line is ``{"custom_id", "method": "POST", "url", "body"}``; its body is validated by the
same request models as ``POST /v1/chat/completions`` or ``/v1/completions``, so a line the endpoint
would refuse is refused at upload, naming its line. What depends on the deployment at the time the
batch runs (whether the model exists, the context length) is checked when it runs.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.chat.protocol import ChatCompletionRequest
from api.completions.protocol import CompletionRequest
from shared.batches import BATCH_ENDPOINTS, Endpoint, LineError

CHUNK = 1 << 20
"""Bytes skipped at a time past the bound of a line too long."""
MAX_REPORTED = 10
"""Errors an upload's answer lists; the rest are counted."""

Body = ChatCompletionRequest | CompletionRequest


class _InputLine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One valid input line: where it is, what it asks for."""

    number: int
    custom_id: str
    url: Endpoint
    body: Body

    @property
    def model(self) -> str:
        return self.body.model


class LineRefused(ValueError):
    def __init__(self, error: LineError) -> None:
        super().__init__(error.message)
        self.error = error


def _refuse(number: int, code: str, message: str, param: str | None = None) -> LineRefused:
    return LineRefused(LineError(code=code, message=f"line {number}: {message}", line=number, param=param))


def _first_problem(exc: ValidationError, prefix: str) -> tuple[str, str]:
    """The parameter and message of a validation error's first problem."""
    first = exc.errors()[0]
    param = ".".join([prefix, *(str(p) for p in first["loc"])]).strip(".")
    if first["type"] == "extra_forbidden":
        return param, f"unrecognized argument '{param}'"
    if first["type"] == "missing":
        return param, f"missing '{param}'"
    return param, f"invalid '{param}': {first['msg']}"


def parse_line(number: int, raw: bytes | str, max_n: int) -> BatchLine:
    """One line of an input file, checked; raises :class:`LineRefused` naming the line."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(number, "invalid_json", f"not valid JSON ({exc})") from exc
    except RecursionError as exc:  # the parser recurses once per level of nesting
        raise _refuse(number, "invalid_json", "not valid JSON: nested too deeply") from exc
    if not isinstance(data, dict):
        raise _refuse(number, "invalid_json", "not a JSON object")
    try:
        line = _InputLine.model_validate(data)
    except ValidationError as exc:
        param, message = _first_problem(exc, "")
        raise _refuse(number, "invalid_request", message, param) from exc
    if line.url not in BATCH_ENDPOINTS:
        allowed = " or ".join(BATCH_ENDPOINTS)
        raise _refuse(number, "invalid_url", f"url must be {allowed}, not '{line.url}'", "url")
    model: type[Body] = ChatCompletionRequest if line.url == "/v1/chat/completions" else CompletionRequest
    try:
        body = model.model_validate(line.body)
    except ValidationError as exc:
        param, message = _first_problem(exc, "body")
        raise _refuse(number, "invalid_body", message, param) from exc
    if body.stream:
        raise _refuse(number, "invalid_body", "stream is not supported in a batch", "body.stream")
    if body.n > max_n:
        raise _refuse(number, "invalid_body", f"n must be at most {max_n}", "body.n")
    return BatchLine(number, line.custom_id, line.url, body)  # type: ignore[arg-type]


def bounded_lines(source: IO[bytes], limit: int) -> Iterator[bytes]:
    """The lines of a file, each cut to at most ``limit + 1`` bytes: a line longer than ``limit``
    shows as one that is too long without ever being held whole (a file may be one 200 MB line)."""
    while line := source.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := source.readline(CHUNK)) and not rest.endswith(b"\n"):
                pass
        yield line


def numbered(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line) for every line that is not blank."""
    for number, raw in enumerate(lines, 1):
        if raw.strip():
            yield number, raw


@dataclass
class Scan:
    """What checking a whole input file found."""

    lines: list[BatchLine]
    errors: list[LineError]
    count: int = 0
    """Requests in the file (lines that are not blank), valid or not."""

    def summary(self) -> str:
        shown = "; ".join(e.message for e in self.errors[:MAX_REPORTED])
        more = len(self.errors) - MAX_REPORTED
        return shown + (f"; and {more} more" if more > 0 else "")


def scan(
    lines: Iterable[bytes], max_n: int, max_lines: int, keep: bool = False, max_line_bytes: int | None = None
) -> Scan:
    """Check every line of an input file: each must parse, be no larger than ``max_line_bytes`` (the
    body a request may have over HTTP), and custom_ids must be unique. With ``keep`` the valid lines
    are returned too; without, only counted."""
    result = Scan(lines=[], errors=[])
    seen: set[str] = set()
    for number, raw in numbered(lines):
        result.count += 1
        if result.count > max_lines:
            result.errors.append(
                LineError(
                    code="too_many_lines",
                    message=f"line {number}: a batch takes at most {max_lines} requests",
                    line=number,
                )
            )
            break
        if max_line_bytes is not None and len(raw.rstrip(b"\r\n")) > max_line_bytes:
            message = f"line {number}: a request may be at most {max_line_bytes} bytes"
            result.errors.append(LineError(code="line_too_long", message=message, line=number))
            continue
        try:
            line = parse_line(number, raw, max_n)
        except LineRefused as exc:
            result.errors.append(exc.error)
            continue
        if line.custom_id in seen:
            result.errors.append(
                LineError(
                    code="duplicate_custom_id",
                    message=f"line {number}: custom_id '{line.custom_id}' appears more than once",
                    line=number,
                    param="custom_id",
                )
            )
            continue
        seen.add(line.custom_id)
        if keep:
            result.lines.append(line)
    if not result.count:
        result.errors.append(LineError(code="empty_file", message="the file has no requests"))
    return result


def check_line(
    line: BatchLine, endpoint: str, known_models: set[str], model: str | None, seen: set[str]
) -> LineError | None:
    """What the batch itself refuses in a line: a custom_id an earlier line has (``seen``), a line
    for another endpoint, a model that does not exist, or a model other than the batch's (``model``,
    the first valid line's; one batch serves one model)."""
    number = line.number
    if line.custom_id in seen:
        message = f"line {number}: custom_id '{line.custom_id}' appears more than once"
        return LineError(code="duplicate_custom_id", message=message, line=number, param="custom_id")
    if line.url != endpoint:
        message = f"line {number}: url '{line.url}' is not the batch's endpoint '{endpoint}'"
        return LineError(code="mismatched_endpoint", message=message, line=number, param="url")
    if line.model not in known_models:
        message = f"line {number}: the model '{line.model}' does not exist"
        return LineError(code="model_not_found", message=message, line=number, param="body.model")
    if model is not None and line.model != model:
        message = f"line {number}: model '{line.model}' differs from line 1's '{model}'"
        return LineError(code="mismatched_model", message=message, line=number, param="body.model")
    return None


def check_batch(lines: list[BatchLine], endpoint: str, known_models: set[str]) -> list[LineError]:
    """:func:`check_line` for each of a file's parsed lines."""
    errors, seen, model = [], set[str](), None
    for line in lines:
        error = check_line(line, endpoint, known_models, model, seen)
        if error is not None:
            errors.append(error)
            continue
        seen.add(line.custom_id)
        model = model or line.model
    return errors


# -- output ----------------------------------------------------------------------------------------


def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def response_line(custom_id: str, request_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """A line that got an answer: a completion (output file) or an error envelope (error file)."""
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {"id": new_line_id(), "custom_id": custom_id, "response": response, "error": None}


def unanswered_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line that never got an answer (the batch expired or was cancelled first)."""
    error = {"code": code, "message": message}
    return {"id": new_line_id(), "custom_id": custom_id, "response": None, "error": error}


def encode_line(line: dict[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":"))


def is_output(line: str) -> bool:
    """Whether a stored result line belongs in the output file (a 2xx answer), not the error file."""
    response = json.loads(line).get("response") or {}
    return 200 <= int(response.get("status_code", 0)) < 300
