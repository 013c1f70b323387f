"""Host-header allow-list (against DNS rebinding) and which proxies' X-Forwarded-For counts.

A browser page on an attacker's domain can resolve that domain to 127.0.0.1 and then talk to a
keyless local server: its requests carry the attacker's Host header. Bound to loopback, the
server therefore answers only loopback Host names (`ember serve` sets that default).
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from ember.server.errors import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_LOOPBACK_BINDS = frozenset({"127.0.0.1", "localhost", "::1"})


def default_allowed_hosts(bind_host: str) -> tuple[str, ...] | None:
    """Loopback names when bound to loopback; None (any Host) otherwise."""
    return LOOPBACK_HOSTS if bind_host in _LOOPBACK_BINDS else None


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1' (lower case)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AllowedHostsMiddleware:
    """400 for requests whose Host header names a host not in `allowed` ('*' allows any)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            raw = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
            name = host_name(raw.decode("latin-1"))
            if name not in self.allowed:
                await APIError(400, f"Host {name!r} is not allowed (--allowed-hosts)",
                               code="host_not_allowed").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_proxies(proxies: tuple[str, ...]) -> None:
    """ValueError naming the entry that is not an address or network."""
    for entry in proxies:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ValueError(f"--trusted-proxies: {entry!r} is not an IP address or network")\
                from exc
