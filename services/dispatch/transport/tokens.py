"""Stream tokens: a short-lived pass to one conversation's event stream, for browsers.

A browser's ``EventSource`` cannot send an ``authorization`` header, so a page
that must not hold an API key gets a stream token instead: its back end (or the
page, with a key it holds) calls ``CreateStreamToken`` with the API key, and the
page opens ``GET /v1/conversations/{id}/events?stream_token=<token>``. The
token opens that one conversation's events (``Subscribe``, and the
``GetConversation`` the HTTP bridge asks first) until it expires, for the
tenant of the key that minted it, and nothing else.

A token is ``dst1.<payload>.<mac>``: the payload is base64url JSON (tenant,
conversation, the minting key's id, expiry in Unix seconds), the mac its
HMAC-SHA256 under the transport's secret (``[transport] stream_token_secret``;
every transport replica must share it). It is checked when a stream opens; a
stream opened in time runs on, and a reconnect after expiry needs a new token.
Revoking the key does not revoke tokens it minted: they lapse within their TTL
(at most ``MAX_TTL``). Tokens are never logged (see ``http.RedactingAccessLogger``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

from dispatch.shared.errors import InvalidArgument, PermissionDenied, Unauthenticated
from dispatch.transport.auth import Caller

PREFIX = "dst1."
DEFAULT_TTL = 300
MAX_TTL = 3600
SECRET_BYTES = 32


def is_stream_token(credential: str) -> bool:
    return credential.startswith(PREFIX)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Mints and checks stream tokens under one secret."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time):
        if len(secret) < 16:
            raise ValueError("a stream token secret must be at least 16 bytes")
        self._secret = secret
        self._clock = clock

    @classmethod
    def from_config(cls, secret: str) -> StreamTokens:
        """Tokens under the configured ``secret``; empty: a random one of this process only
        (a token then opens streams on this transport alone, and not after a restart)."""
        return cls(secret.encode() if secret else secrets.token_bytes(SECRET_BYTES))

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def mint(self, caller: Caller, conversation_id: str, ttl_seconds: int) -> tuple[str, datetime]:
        """A token for ``caller``'s ``conversation_id`` that opens streams for ``ttl_seconds``
        (0: ``DEFAULT_TTL``), and when it stops doing so."""
        if ttl_seconds < 0 or ttl_seconds > MAX_TTL:
            raise InvalidArgument(
                f"ttl_seconds must be from 1 to {MAX_TTL} (0: {DEFAULT_TTL}), got {ttl_seconds}"
            )
        # Whole seconds, rounded up: a token lasts at least its TTL.
        expires = math.ceil(self._clock() + (ttl_seconds or DEFAULT_TTL))
        claims = {"t": caller.tenant_id, "c": conversation_id, "k": caller.key_id, "e": expires}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{self._mac(payload)}", datetime.fromtimestamp(expires, UTC)

    def check(self, token: str, conversation_id: str) -> Caller:
        """The caller ``token`` stands for, if it is genuine, unexpired and for
        ``conversation_id``; else ``Unauthenticated`` (or ``PermissionDenied`` for a genuine
        token of another conversation). What is wrong is said, never the token."""
        body = token.removeprefix(PREFIX)
        payload, _, mac = body.partition(".")
        if not payload or not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            raise Unauthenticated(
                "invalid stream token (it was not minted by this deployment, or was altered); "
                "mint one with CreateStreamToken"
            )
        try:
            claims = json.loads(_unb64(payload))
            tenant, conversation, key_id, expires = claims["t"], claims["c"], claims["k"], int(claims["e"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthenticated("invalid stream token: mint one with CreateStreamToken") from None
        if self._clock() >= expires:
            when = datetime.fromtimestamp(expires, UTC).isoformat()
            raise Unauthenticated(
                f"the stream token expired at {when}: mint a new one with CreateStreamToken"
            )
        if conversation != conversation_id:
            raise PermissionDenied(
                "this stream token opens another conversation's events; mint one for this conversation"
            )
        return Caller(str(tenant), str(key_id))
