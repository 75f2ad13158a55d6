"""What the Locust users send: request bodies, API keys, the served model, calibrated prompt length.

Shared by ``locustfile.py`` (inside Locust) and ``sweep.py`` (which resolves the model and the prompt
length once per target and hands them to every level, so all levels and both targets send the same
prompts). Plain ``httpx`` here, no Locust import: the sweep must not be monkey-patched by gevent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from loadtest.bench import make_prompt

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
CALIBRATION_PROBES = 4
CALIBRATION_ROUNDS = 6


@dataclass(frozen=True)
class Workload:
    """One Locust run's request shape, identical for every user."""

    model: str
    prompt_words: int
    output_tokens: int
    stream_weight: int = 1
    nonstream_weight: int = 0
    api_keys: tuple[str, ...] = ()
    seed: int = 0

    def body(self, key: str, stream: bool) -> str:
        """A chat request generating exactly ``output_tokens`` tokens; ``key`` picks a distinct prompt."""
        doc: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": "user", "content": make_prompt(self.seed, key, self.prompt_words)}],
            "max_tokens": self.output_tokens,
            "ignore_eos": True,  # vLLM's extension: no early stop, so every request costs the same
            "temperature": 1.0,
            "stream": stream,
        }
        if stream:
            doc["stream_options"] = {"include_usage": True}
        return json.dumps(doc, separators=(",", ":"))


def parse_keys(text: str) -> tuple[str, ...]:
    """``"k1, k2,,k3"`` -> ``("k1", "k2", "k3")``."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def base_url(url: str) -> str:
    """The server's root: ``http://h:p/v1/`` and ``http://h:p`` both give ``http://h:p``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def discover_model(client: httpx.Client) -> str:
    """The first model ``GET /v1/models`` lists."""
    resp = client.get(MODELS_PATH)
    resp.raise_for_status()
    models = [m["id"] for m in resp.json().get("data", [])]
    if not models:
        raise RuntimeError(f"{client.base_url}{MODELS_PATH} lists no model")
    return str(models[0])


def prompt_tokens(client: httpx.Client, workload: Workload, key: str) -> int:
    """How many tokens the server counts in the prompt for ``key`` (one max_tokens=1 request)."""
    doc = json.loads(workload.body(key, stream=False)) | {"max_tokens": 1}
    resp = client.post(CHAT_PATH, json=doc)
    if resp.status_code != 200:
        raise RuntimeError(f"calibration request failed: HTTP {resp.status_code}: {resp.text[:200]}")
    return int(resp.json()["usage"]["prompt_tokens"])


def calibrate_words(client: httpx.Client, workload: Workload, target_tokens: int) -> tuple[int, float]:
    """Words per prompt whose server-counted length is closest to ``target_tokens``; (words, tokens)."""
    words = max(1, round(target_tokens * 0.75))
    tried: dict[int, float] = {}
    while words not in tried and len(tried) < CALIBRATION_ROUNDS:  # fixed point, oscillation, or enough
        probe = Workload(workload.model, words, 1, seed=workload.seed)
        counts = [prompt_tokens(client, probe, f"calibrate{i}") for i in range(CALIBRATION_PROBES)]
        tried[words] = sum(counts) / len(counts)
        words = max(1, round(words * target_tokens / tried[words]))
    best = min(tried, key=lambda w: abs(tried[w] - target_tokens))
    return best, tried[best]


def make_client(url: str, api_keys: Sequence[str]) -> httpx.Client:
    """A short-lived client for discovery and calibration (first key, no env proxies)."""
    key = api_keys[0] if api_keys else None
    return httpx.Client(base_url=base_url(url), headers=auth_headers(key), timeout=60.0, trust_env=False)
