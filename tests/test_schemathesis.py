"""Schemathesis against the gateway's own OpenAPI schema, with the keys of two tenants: no 5xx, answers
as documented (status, media type, body, headers), invalid input refused, keys enforced, every
request charged to its own tenant only, and every Files, Batches and stored Responses operation
(multipart uploads included) aimed at the tenant's own objects or probing the other tenant's, which
it must not find."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from redis import Redis
from schemathesis import GenerationMode

from shared.tenants import Tenant
from tests.conftest import System, create_tenant

pytestmark = pytest.mark.e2e

OTHER = "schema-" + uuid.uuid4().hex[:6]  # a fresh tenant: the session's Redis is shared
COMPLETIONS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
"""Operations (POST) that run a job: aimed at the served model, kept cheap, charged when served."""
LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
TOKENS = ("/tokenize", "/detokenize")
CHEAP_TOKENS = 4
CHEAP_N = 2
CHEAP_PROMPTS = 3

FUZZ = int(os.environ.get("SWITCHYARD_FUZZ_EXAMPLES", "0"))
"""Unset (the suite, CI): the same 25 cases per operation and mode every run, so a verdict never
depends on luck. ``make fuzz`` sets it: that many fresh random cases each, a search for new failures
(which then join ``found_before``)."""

# A small budget per operation and mode keeps the file well under two minutes; the engine is slow
# on CPU, so a deadline would only measure it.
BUDGET = settings(
    max_examples=FUZZ or 25,
    derandomize=not FUZZ,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def keys(system: System) -> dict[str, str]:
    other = asyncio.run(create_tenant(system.redis_url, system.names, Tenant(name=OTHER)))
    return {"main": system.api_key, OTHER: other}


@pytest.fixture(scope="module")
def objects(system: System, keys: dict[str, str]) -> dict[str, dict[str, str]]:
    """A file, a batch and a stored response of each tenant: cases aim at their own, or probe the
    other's."""
    out = {}
    for tenant, key in keys.items():
        headers = {"authorization": f"Bearer {key}"}
        upload = httpx.post(
            f"{system.base_url}/v1/files",
            headers=headers,
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", valid_file(system.model))},
        )
        assert upload.status_code == 200, upload.text
        body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"}
        batch = httpx.post(
            f"{system.base_url}/v1/batches", headers=headers, json={**body, "completion_window": "24h"}
        )
        assert batch.status_code == 200, batch.text
        body = {"model": system.model, "input": "hi", "max_output_tokens": CHEAP_TOKENS}
        response = httpx.post(f"{system.base_url}/v1/responses", headers=headers, json=body, timeout=60)
        assert response.status_code == 200, response.text
        out[tenant] = {
            "file_id": upload.json()["id"],
            "batch_id": batch.json()["id"],
            "response_id": response.json()["id"],
        }
    return out


def valid_file(model: str) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": CHEAP_TOKENS}
    return json.dumps(
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    ).encode()


@pytest.fixture(params=["main", "other"])
def tenant(request: pytest.FixtureRequest) -> str:
    return "main" if request.param == "main" else OTHER


@pytest.fixture(scope="module")
def api_schema(system: System) -> Any:
    return schemathesis.openapi.from_url(f"{system.base_url}/openapi.json")


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def sync_redis(system: System) -> Iterator[Redis]:
    r = Redis.from_url(system.redis_url)
    yield r
    r.close()


def aim_at_objects(case: Any, own: dict[str, str], other: dict[str, str]) -> bool:
    """Point a case's file, batch or response id at the tenant's own object (two in four), the other tenant's
    (one in four), or leave the generated one; picked by a hash of the generated id, so a failing
    case replays the same. Returns whether the case names the other tenant's object."""
    probing = False
    targets = [(case.path_parameters or {}, name) for name in ("file_id", "batch_id", "response_id")]
    if isinstance(case.body, dict) and case.operation.path == "/v1/batches":
        targets.append((case.body, "input_file_id"))
    for holder, name in targets:
        if name not in holder:
            continue
        pick = zlib.crc32(str(holder[name]).encode()) % 4
        kind = "file_id" if name == "input_file_id" else name
        if pick < 2:
            holder[name] = own[kind]
        elif pick == 2:
            holder[name] = other[kind]
            probing = True
    if isinstance(case.body, dict) and case.operation.path == "/v1/files" and _aimed(case.body.get("file")):
        case.body["file"] = valid_file(own["model"])  # mostly a file the checks accept
    return probing


def steer(case: Any, model: str) -> None:
    """Aim a valid case mostly at the served model and keep it cheap, without making it invalid.

    Generated names are almost never a served model (a 404 before the engine), so three in four
    cases get the real one, picked by a hash of the generated name so that a failing case replays
    the same. Generation is then bounded: without a cap, a valid body asks for up to the whole
    context (1024 tokens) times n choices, for each of up to 1,024 prompts.
    """
    if case.operation.path == "/v1/models/{model_id}":
        if _aimed(case.path_parameters.get("model_id")):
            case.path_parameters["model_id"] = model
        return
    body = case.body
    if case.operation.method.upper() != "POST" or case.operation.path not in COMPLETIONS + TOKENS:
        return
    if not isinstance(body, dict):
        return
    if _aimed(body.get("model")):
        body["model"] = model
    if case.operation.path in TOKENS:
        return
    for field in (*LIMITS, "min_tokens"):
        if isinstance(body.get(field), int):
            body[field] = min(body[field], CHEAP_TOKENS)
    if all(body.get(field) is None for field in LIMITS):
        body["max_output_tokens" if case.operation.path == "/v1/responses" else "max_tokens"] = CHEAP_TOKENS
    for field in ("n", "best_of"):
        if isinstance(body.get(field), int):
            body[field] = min(body[field], CHEAP_N)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        body["prompt"] = prompt[:CHEAP_PROMPTS]  # each prompt is a job of its own


def _aimed(generated: object) -> bool:
    return zlib.crc32(str(generated).encode()) % 4 != 0


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_gateway_answers_as_its_schema_says(
    api_schema: Any,
    mode: GenerationMode,
    system: System,
    tenant: str,
    keys: dict[str, str],
    http: requests.Session,
    sync_redis: Redis,
    objects: dict[str, dict[str, str]],
) -> None:
    # schemathesis' pytest integration (schema.parametrize with a fixture-loaded schema) breaks on
    # pytest 9.2, so the operations' strategies run under plain hypothesis instead.
    other = next(t for t in keys if t != tenant)
    own_window, other_window = system.names.rate(tenant, "req"), system.names.rate(other, "req")

    own, theirs = {**objects[tenant], "model": system.model}, objects[other]

    def send(case: Any) -> None:
        probing = False
        if mode.is_positive:
            steer(case, system.model)
            probing = aim_at_objects(case, own, theirs)
        before = seen_by_owner(system, keys[other], theirs) if probing else []
        response = case.call_and_validate(
            base_url=system.base_url,
            session=http,
            # Capitalised: schemathesis strips credentials case-sensitively from its auth probes.
            headers={"Authorization": f"Bearer {keys[tenant]}"},
            # Whether a well-formed request is served also depends on the model (its chat template,
            # vocabulary and context length) and on rules between fields (best_of = n, stream_options
            # only with stream), which no JSON schema states: a 400 for such data is no violation.
            # What matters of those 400s is checked below: they come before anything is enqueued.
            excluded_checks=[schemathesis.checks.positive_data_acceptance],
        )
        request_id = response.headers["x-request-id"][0]
        charged = sync_redis.zscore(own_window, request_id) is not None
        assert sync_redis.zscore(other_window, request_id) is None, "charged to the other tenant"
        runs = case.operation.method.upper() == "POST" and case.operation.path in COMPLETIONS
        # The same request sent again under its Idempotency-Key (a generated key repeats, and
        # hypothesis replays a case while it shrinks one) gets the first one's answer, uncharged.
        repeatable = any(name.lower() == "idempotency-key" for name in case.headers or {})
        if runs and response.status_code == 200 and not repeatable:
            assert charged, "served without being admitted for its own tenant"
        if 400 <= response.status_code < 500:
            assert not charged, (
                f"refused after it was admitted and enqueued: {response.status_code} {response.text}"
            )
        if probing:
            assert response.status_code in (400, 404), "the other tenant's object was found"
            assert seen_by_owner(system, keys[other], theirs) == before, "the other tenant's object changed"

    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {f"POST {path}" for path in COMPLETIONS + TOKENS} <= labels
    assert {
        "GET /v1/responses/{response_id}",
        "DELETE /v1/responses/{response_id}",
        "POST /v1/responses/{response_id}/cancel",
    } <= labels
    for operation in operations:
        if not mode.is_positive and not operation.body and not list(operation.iter_parameters()):
            continue  # nothing to make invalid (security schemes are tested by the auth checks)
        test = given(case=operation.as_strategy(generation_mode=mode))(send)
        examples = found_before(operation, system.model, own)
        if mode.is_positive:
            examples += served_examples(operation, system.model, own)
        for case in examples:
            test = example(case=case)(test)
        BUDGET(test)()


def seen_by_owner(system: System, key: str, theirs: dict[str, str]) -> list[tuple[int, str]]:
    """The other tenant's file, batch and stored response as it sees them."""
    headers = {"authorization": f"Bearer {key}"}
    return [
        (resp.status_code, resp.text)
        for resp in (
            httpx.get(f"{system.base_url}/v1/files/{theirs['file_id']}", headers=headers),
            httpx.get(f"{system.base_url}/v1/batches/{theirs['batch_id']}", headers=headers),
            httpx.get(f"{system.base_url}/v1/responses/{theirs['response_id']}", headers=headers),
        )
    ]


def found_before(operation: Any, model: str, own: dict[str, str]) -> list[Any]:
    """Cases that once broke the gateway, replayed in every run of either mode."""
    upload = {"file": valid_file(model), "purpose": "batch"}
    deep = b'{"custom_id": "a", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    form = "multipart/form-data"
    if operation.path == "/v1/files" and operation.method.upper() == "POST":
        return [
            operation.Case(body={**upload, "file": deep}, media_type=form),  # RecursionError: 500
            operation.Case(  # "²" passes str.isdigit() and failed int(): 500
                body={**upload, "expires_after[anchor]": "created_at", "expires_after[seconds]": "²"},
                media_type=form,
            ),
        ]
    if operation.path.startswith("/v1/batches/{batch_id}"):
        # An own batch's neighbouring Redis key read as a batch: 500.
        return [operation.Case(path_parameters={"batch_id": own["batch_id"] + ":jobs"})]
    if operation.path != "/v1/chat/completions":
        return []
    messages = [{"role": "user", "content": "hi"}]
    # The engine refused it after admission: 502 instead of a 400 naming top_k.
    top_k = {"top_k": 100325800847805464576, "ignore_eos": True, "min_tokens": 1, "max_tokens": 2}
    return [operation.Case(body={"model": model, "messages": messages, **top_k})]


def served_examples(operation: Any, model: str, own: dict[str, str]) -> list[Any]:
    """Requests that are always served, so every success shape is checked in every run (random
    valid bodies often fail on the demo model's chat template before reaching the engine); a
    stored response's operations name the tenant's own."""
    if operation.path == "/v1/models/{model_id}":
        return [operation.Case(path_parameters={"model_id": model})]
    messages = [{"role": "user", "content": "hi"}]
    if operation.path in TOKENS:
        bodies: list[dict[str, Any]] = {
            "/tokenize": [{"prompt": "hi", "return_token_strs": True}, {"messages": messages}],
            "/detokenize": [{"tokens": [5, 6, 7]}],
        }[operation.path]
        return [operation.Case(body={"model": model, **body}) for body in bodies]
    if operation.path.startswith("/v1/responses/{response_id}"):
        return [operation.Case(path_parameters={"response_id": own["response_id"]})]
    if operation.path == "/v1/responses" and operation.method.upper() == "POST":
        body = {"model": model, "input": "hi", "max_output_tokens": CHEAP_TOKENS}
        return [
            operation.Case(body=body),
            operation.Case(body={**body, "stream": True}),
            operation.Case(body={**body, "background": True}),
        ]
    prompt: dict[str, Any] = {
        "/v1/chat/completions": {"messages": messages},
        "/v1/completions": {"prompt": "hi"},
    }.get(operation.path, {})
    if not prompt:
        return []
    body = {"model": model, "max_tokens": CHEAP_TOKENS, **prompt}
    cases = [operation.Case(body=body), operation.Case(body={**body, "stream": True})]
    if operation.path == "/v1/completions":  # several prompts, echoed and scored
        scored = {**body, "prompt": ["hi", "there"], "echo": True, "logprobs": 1}
        cases += [
            operation.Case(body=scored),
            operation.Case(body={**scored, "max_tokens": 0, "stream": True}),
        ]
    return cases


def test_both_tenants_see_the_same_models_and_their_own_limits(
    system: System, keys: dict[str, str], sync_redis: Redis
) -> None:
    seen = []
    for key in keys.values():
        resp = httpx.get(f"{system.base_url}/v1/models", headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 200
        seen.append(resp.json()["data"])
    assert seen[0] == seen[1] and [m["id"] for m in seen[0]] == [system.model]
    body = {"model": system.model, "prompt": "hi", "max_tokens": 1}
    resp = httpx.post(
        f"{system.base_url}/v1/completions", json=body, headers={"authorization": f"Bearer {keys[OTHER]}"}
    )
    assert resp.status_code == 200, resp.text
    request_id = resp.headers["x-request-id"]
    assert sync_redis.zscore(system.names.rate(OTHER, "req"), request_id) is not None
    assert sync_redis.zscore(system.names.rate("main", "req"), request_id) is None
