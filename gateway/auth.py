"""API keys → tenants, with a short per-process cache so a key costs Redis one read per second."""

from __future__ import annotations

import time

from fastapi import Request

from api.errors import AuthenticationFailed
from serving.shared_reads import SharedReads
from shared.tenants import Tenant, TenantStore, digest

CACHE_SECONDS = 1.0
"""How long a gateway trusts a key check: a revoked key stops working within this time."""

ANONYMOUS = Tenant(name="default", id="default")  # the same tenant in every gateway process


class Authenticator:
    def __init__(self, store: TenantStore, required: bool) -> None:
        self._store = store
        self._required = required
        self._cache: dict[str, tuple[float, Tenant | None]] = {}
        self._reads: SharedReads[str, Tenant | None] = SharedReads()

    async def tenant(self, request: Request) -> Tenant:
        if not self._required:
            return ANONYMOUS
        key = bearer_token(request.headers.get("authorization"))
        if key is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        fingerprint = digest(key)
        cached = self._cache.get(fingerprint)
        if cached is not None and cached[0] > time.monotonic():
            tenant = cached[1]
        else:  # the requests with this key that arrive meanwhile wait for this one lookup
            tenant = await self._reads.get(fingerprint, lambda: self._lookup(key, fingerprint))
        if tenant is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return tenant

    async def _lookup(self, key: str, fingerprint: str) -> Tenant | None:
        now = time.monotonic()
        tenant = await self._store.authenticate(key)
        if len(self._cache) > 10_000:  # bounded: a flood of random keys cannot grow it forever
            self._cache.clear()
        self._cache[fingerprint] = (now + CACHE_SECONDS, tenant)
        return tenant


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
