"""Limits and security: API keys, per-key rate limits, admission control, body size.

- `ApiKeyAuth` + `AuthMiddleware`: Bearer keys on the API endpoints (401 otherwise).
- `RateLimiter`: per-key token buckets for requests/min and tokens/min (429 + Retry-After).
  A request reserves prompt tokens + max new tokens up front; when it finishes, the unused part
  of the reservation is given back, so the token limit counts what was really used.
- `AdmissionControl`: at most `max_queued_requests` sequences wait beyond the running ones.
- `BodySizeLimitMiddleware`: bodies above the limit get 413 before the app reads them.

The middlewares are plain ASGI (not BaseHTTPMiddleware) so streaming and client-disconnect
detection pass through untouched.
"""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.server.errors import APIError, too_many_requests

logger = logging.getLogger(__name__)

PRINCIPAL_KEY = "ember.principal"
"""scope['state'] entry naming who sends the request (API key or client address)."""
_MAX_IDLE_BUCKETS = 10_000


def read_api_key_file(path: str) -> list[str]:
    """Keys from a file: one per line; blank lines and '#' comments are skipped."""
    with open(path, encoding="utf-8") as fh:
        lines = (line.split("#", 1)[0].strip() for line in fh)
        return [line for line in lines if line]


class ApiKeyAuth:
    """Checks `Authorization: Bearer <key>` against the configured keys (constant time)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str:
        """The matching key, or raise a 401 APIError."""
        if not authorization:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        candidate = token.strip().encode()
        if scheme.lower() != "bearer" or not candidate:
            raise APIError(401, "the Authorization header must be 'Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        matched = False
        for key in self._keys:  # NOTE: compare with every key, so timing reveals nothing
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise APIError(401, "incorrect API key provided",
                           headers={"WWW-Authenticate": "Bearer"})
        return candidate.decode()


@dataclass
class TokenBucket:
    """Holds up to `capacity` units, refilled at `rate` units per second."""

    capacity: float
    rate: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` is available (inf if it never fits); call after refill."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)


@dataclass
class Reservation:
    """Tokens reserved by one admitted request; `settle` gives back what was not used."""

    limiter: RateLimiter | None
    principal: str
    reserved_tokens: int
    settled: bool = field(default=False)

    def settle(self, used_tokens: int) -> None:
        if self.settled:
            return
        self.settled = True
        if self.limiter is not None and used_tokens < self.reserved_tokens:
            self.limiter.refund(self.principal, self.reserved_tokens - used_tokens)


class RateLimiter:
    """Per-principal requests/minute and tokens/minute limits (token buckets).

    Thread-safe; buckets of principals that are full again are pruned when there are many.
    """

    def __init__(self, rpm: int | None, tpm: int | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm = rpm, tpm
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _bucket(self, table: dict[str, TokenBucket], key: str, per_minute: int,
                now: float) -> TokenBucket:
        bucket = table.get(key)
        if bucket is None:
            if len(table) >= _MAX_IDLE_BUCKETS:
                self._prune(table, now)
            bucket = table[key] = TokenBucket(per_minute, per_minute / 60.0, per_minute, now)
        bucket.refill(now)
        return bucket

    @staticmethod
    def _prune(table: dict[str, TokenBucket], now: float) -> None:
        for key in [k for k, b in table.items()
                    if b.level + (now - b.updated) * b.rate >= b.capacity]:
            del table[key]

    def acquire(self, principal: str, tokens: int, units: int = 1) -> Reservation:
        """Take `units` requests (sequences: n x prompts) and `tokens` tokens, or raise a 429
        APIError with Retry-After."""
        if not self.enabled:
            return Reservation(None, principal, 0)
        with self._lock:
            now = self._clock()
            req_bucket = tok_bucket = None
            wait = 0.0
            if self.rpm is not None:
                req_bucket = self._bucket(self._requests, principal, self.rpm, now)
                if units > req_bucket.capacity:
                    raise too_many_requests(
                        f"this request runs {units} sequences (n x prompts) but the limit is "
                        f"{self.rpm} per minute; lower n", 60, type="requests",
                        code="rate_limit_exceeded")
                wait = req_bucket.wait_time(units)
            if self.tpm is not None:
                tok_bucket = self._bucket(self._tokens, principal, self.tpm, now)
                if tokens > tok_bucket.capacity:
                    raise too_many_requests(
                        f"this request needs up to {tokens} tokens (prompt + max_tokens x n) "
                        f"but the limit is {self.tpm} tokens per minute; lower max_tokens",
                        60, type="tokens", code="rate_limit_exceeded")
                tok_wait = tok_bucket.wait_time(tokens)
                if tok_wait > wait:
                    wait = tok_wait
            if wait > 0:
                kind = ("requests" if req_bucket is not None and req_bucket.level < units
                        else "tokens")
                limit = f"{self.rpm} requests" if kind == "requests" else f"{self.tpm} tokens"
                raise too_many_requests(
                    f"rate limit reached: {limit} per minute; retry in {math.ceil(wait)} s",
                    wait, type=kind)
            if req_bucket is not None:
                req_bucket.level -= units
            if tok_bucket is not None:
                tok_bucket.level -= tokens
        return Reservation(self if self.tpm is not None else None, principal, tokens)

    def refund(self, principal: str, tokens: int) -> None:
        with self._lock:
            bucket = self._tokens.get(principal)
            if bucket is not None:
                bucket.refill(self._clock())
                bucket.level = min(bucket.capacity, bucket.level + tokens)


@dataclass(frozen=True)
class AdmissionControl:
    """Refuse work once more than `max_queued` sequences would wait for a running slot."""

    max_num_seqs: int
    max_queued: int

    def check(self, in_flight_seqs: int, new_seqs: int) -> None:
        waiting_after = in_flight_seqs + new_seqs - self.max_num_seqs
        if waiting_after > self.max_queued:
            raise too_many_requests(
                f"the server is busy: {in_flight_seqs} sequences in flight and at most "
                f"{self.max_queued} may wait beyond the {self.max_num_seqs} running; retry later",
                1, type="server_busy", code="queue_full")


class AuthMiddleware:
    """Requires a valid key on protected paths; records the principal for rate limiting."""

    def __init__(self, app: ASGIApp, auth: ApiKeyAuth,
                 protected_prefixes: tuple[str, ...] | None) -> None:
        """`protected_prefixes`: paths that need a key; None protects every path."""
        self.app = app
        self.auth = auth
        self.protected_prefixes = protected_prefixes

    def _protected(self, path: str) -> bool:
        return self.protected_prefixes is None or path.startswith(self.protected_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        client = scope.get("client")
        state[PRINCIPAL_KEY] = f"addr:{client[0]}" if client else "addr:unknown"
        if self.auth.enabled and self._protected(scope["path"]) \
                and scope.get("method") != "OPTIONS":
            header = _header(scope, b"authorization")
            try:
                key = self.auth.check(header)
            except APIError as exc:
                await exc.response()(scope, receive, send)
                return
            state[PRINCIPAL_KEY] = f"key:{key}"
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for bodies over `max_bytes` (by Content-Length, or counted while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 path_limits: Mapping[str, int] | None = None) -> None:
        """`path_limits`: exact paths with their own limit (file uploads)."""
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await APIError(400, "invalid Content-Length header").response()(
                    scope, receive, send)
                return
            if int(length) > max_bytes:
                await self._too_large(scope, receive, send, max_bytes)
                return
            await self.app(scope, receive, send)
            return
        # No length (chunked): read the whole body here, bounded, then replay it.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await self._too_large(scope, receive, send, max_bytes)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send,
                         max_bytes: int) -> None:
        await APIError(413, f"request body larger than {max_bytes} bytes").response()(
            scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
