"""Records of the Batch API as Redis holds them, shared by gateways (which take files and batches)
and the background role (which runs batches and expires them): files, batches, and the moves a
batch's status may make.

A batch is one Redis hash (``Names.batch``): its request as JSON under ``request``, then flat fields
that change while it runs (``status``, ``<status>_at`` timestamps, counts, result files), so that
counts can be incremented and the status moved atomically, each by one command or script.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
Endpoint = Literal["/v1/chat/completions", "/v1/completions"]
FilePurpose = Literal["batch", "batch_output"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]

MOVES: dict[str, frozenset[str]] = {
    "validating": frozenset({"in_progress", "failed", "cancelling", "expired"}),
    "in_progress": frozenset({"finalizing", "cancelling", "expired"}),
    "finalizing": frozenset({"completed"}),
    "cancelling": frozenset({"cancelled"}),
}
"""The status moves OpenAI's batches make; the other statuses are final."""

FINAL = frozenset({"failed", "completed", "expired", "cancelled"})
COUNTS = ("total", "completed", "failed", "prompt_tokens", "completion_tokens")
"""Integer fields of a batch's hash (the last four are incremented as lines finish)."""


BATCH_ID = re.compile(r"batch_[0-9a-f]{24}")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
"""The ids this system gives: anything else names no object (and never a neighbouring Redis key,
such as a batch's ``:jobs`` hash)."""


def is_batch_id(value: str) -> bool:
    return BATCH_ID.fullmatch(value) is not None


def is_file_id(value: str) -> bool:
    return FILE_ID.fullmatch(value) is not None


def owned_by(name: str, tenant_id: str | None, record_tenant: str, record_tenant_id: str | None) -> bool:
    """Whether a record belongs to the tenant ``name`` with id ``tenant_id``: same name, and the
    same tenant of that name (a name removed and given again owns nothing of the old tenant's)."""
    return record_tenant == name and record_tenant_id in (None, tenant_id)


def sources(target: str) -> tuple[str, ...]:
    """The statuses a batch may move to ``target`` from."""
    return tuple(sorted(s for s, targets in MOVES.items() if target in targets))


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FileRecord(_Record):
    """An uploaded (``batch``) or produced (``batch_output``) file; its bytes are in the file store."""

    v: int = 1
    id: str
    tenant: str
    tenant_id: str | None = None
    """Which tenant of that name (see ``Tenant.id``); unset in records older than tenant ids."""
    filename: str
    purpose: FilePurpose
    bytes: int
    lines: int
    created_at: int
    expires_at: int | None = None


class LineError(_Record):
    """What is wrong with one line of a batch's input (OpenAI's ``errors.data`` item)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchRequest(_Record):
    """What a batch was created with; never changes (hash field ``request``)."""

    v: int = 1
    id: str
    tenant: str
    tenant_id: str | None = None
    """Which tenant of that name (see ``Tenant.id``); unset in records older than tenant ids."""
    endpoint: Endpoint
    input_file_id: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    created_at: int
    expires_at: int
    output_ttl: int | None = None
    """Seconds the output and error files are kept (``output_expires_after``); unset: the file TTL."""


def owner_key(request: BatchRequest) -> str:
    """Whose turn a batch waits for: its tenant's id (a batch made before tenants had ids: its
    tenant's name, marked so it is no id)."""
    return request.tenant_id or f"name={request.tenant}"


class BatchState(_Record):
    """A batch as its hash holds it now."""

    request: BatchRequest
    status: BatchStatus
    times: dict[str, int] = Field(default_factory=dict)
    """``<status>_at`` -> when the batch moved there (Unix seconds)."""
    total: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: tuple[LineError, ...] = ()

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> BatchState:
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        errors = json.loads(fields["errors"]) if fields.get("errors") else []
        return cls(
            request=BatchRequest.model_validate_json(fields["request"]),
            status=fields["status"],  # type: ignore[arg-type]
            times={k: int(v) for k, v in fields.items() if k.endswith("_at")},
            model=fields.get("model") or None,
            output_file_id=fields.get("output_file_id") or None,
            error_file_id=fields.get("error_file_id") or None,
            errors=tuple(LineError.model_validate(e) for e in errors),
            **{name: int(fields.get(name, 0)) for name in COUNTS},
        )


def new_batch_hash(request: BatchRequest) -> dict[str, str | int]:
    """The fields a new batch's hash starts with."""
    return {
        "request": request.model_dump_json(),
        "status": "validating",
        **dict.fromkeys(COUNTS, 0),
    }
