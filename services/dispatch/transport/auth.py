"""API keys: ``authorization: Bearer <key>`` in, the key's tenant (and the key's id) out.

The store keeps only each key's SHA-256 and answers ``Authenticate``. A tenant
found here is cached for a few seconds so a subscription storm does not become
a store storm; a revoked key therefore stops working within ``CACHE_SECONDS``.
Keys never reach a log or an error message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import NamedTuple

import grpc

from dispatch.shared.errors import Unauthenticated, Unavailable
from dispatch.v1 import store_pb2, store_pb2_grpc

CACHE_SECONDS = 5.0
CACHE_ENTRIES = 10_000

MISSING = (
    "missing API key: send the header `authorization: Bearer <key>` "
    "(`dispatchd keys create` makes one; `dispatchd up` writes one to its data directory)"
)
INVALID = "invalid or revoked API key"
# How the store says a key is no good (as opposed to the store failing).
_REFUSED = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT})


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The key of an ``authorization: Bearer <key>`` header, or ""."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, key = text.strip().partition(" ")
        if scheme.lower() == "bearer":
            return key.strip()
    return ""


class Caller(NamedTuple):
    """Who makes a call: the key's tenant, and the key's id (what an approval records as
    ``decided_by``; never the key itself)."""

    tenant_id: str
    key_id: str


class Authenticator:
    """Maps API keys to tenants through the store."""

    def __init__(
        self,
        store: store_pb2_grpc.ConversationStoreAsyncStub,
        rpc_timeout: float,
        cache_seconds: float = CACHE_SECONDS,
    ):
        self.store = store
        self.rpc_timeout = rpc_timeout
        self.cache_seconds = cache_seconds
        # sha256(key) -> (caller, good until); the key itself is not kept.
        self._cache: dict[str, tuple[Caller, float]] = {}

    async def tenant(self, key: str) -> str:
        """The tenant of ``key``; ``Unauthenticated`` if it is missing, unknown or revoked."""
        return (await self.caller(key)).tenant_id

    async def caller(self, key: str) -> Caller:
        """The tenant and id of ``key``; ``Unauthenticated`` if it is missing, unknown or revoked."""
        if not key:
            raise Unauthenticated(MISSING)
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            resp = await self.store.Authenticate(
                store_pb2.AuthenticateRequest(secret=key), timeout=self.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSED:
                raise Unauthenticated(INVALID) from None
            raise Unavailable(f"could not check the API key: the store answered {exc.code().name}") from None
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        caller = Caller(str(resp.tenant_id), str(resp.key_id))
        self._cache[digest] = (caller, now + self.cache_seconds)
        return caller
