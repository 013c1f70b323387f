"""schemathesis against /openapi.json of the in-process app (tiny engine): generated requests
never get a 5xx, and every response matches the documented schema (all checks). A short run
(a few hundred cases); benchmarks/reliability_fuzz.py runs thousands against `ember serve`."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from test_server import _engine  # noqa: E402

from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from ember.engine.async_engine import AsyncEngine  # noqa: E402
from ember.server.app import create_app  # noqa: E402


class _StartedOnce:
    """The app with its engine started once: schemathesis runs the ASGI lifespan around every
    call, which would stop the engine after the first one."""

    def __init__(self) -> None:
        engine = _engine()
        self.app = create_app(engine.config, engine=AsyncEngine(engine))
        self.app.state.ember.attach(self.app.state.ember.engine)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.app(scope, receive, send)


schema = schemathesis.openapi.from_asgi("/openapi.json", _StartedOnce())


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_openapi_conformance(case):
    # NOTE: positive_data_acceptance is left out: limits that depend on the tokenized prompt
    # (prompt + max_tokens within the context, min_tokens <= max_tokens) are 400s that no
    # static schema can state. Every other check runs (5xx, status codes, response schemas,
    # content types, negative data rejection).
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
