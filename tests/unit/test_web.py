"""The web pages, /stats and their authentication, in-process on a tiny random Llama (no model
download, no browser: the browser tests are tests/e2e/test_web_ui.py)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import LLMEngine
from ember.server.app import create_app
from ember.server.routes.web import basic_to_bearer
from ember.web import STATIC_DIR
from tiny_llama import tiny_loaded

KEY = "sk-web"


def _client(**server: object) -> TestClient:
    config = EngineConfig(model=ModelConfig(model="tiny"), cache=CacheConfig(num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=4),
                          server=ServerConfig(**server))  # type: ignore[arg-type]
    engine = LLMEngine(config, tiny_loaded())
    return TestClient(create_app(config, engine=AsyncEngine(engine)))


def _metric(text: str, name: str) -> float:
    """Sum of the samples of `name` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_pages_and_assets_are_packaged_and_local():
    for name in ("playground.html", "dashboard.html", "style.css", "common.js",
                 "playground.js", "dashboard.js"):
        assert (STATIC_DIR / name).is_file(), name
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"ember.web" = ["static/*"]' in pyproject
    for path in STATIC_DIR.iterdir():
        # no CDN or other network source: every URL the pages load is this server's
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", path.read_text(encoding="utf-8"),
                             re.IGNORECASE), path.name


def test_pages_stats_and_static_served():
    with _client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/static/playground.js">' in page.text
        dash = client.get("/dashboard")
        assert dash.status_code == 200 and "/static/dashboard.js" in dash.text
        js = client.get("/static/playground.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert client.get("/static/missing.js").status_code == 404
        assert client.get("/static/../app.py").status_code == 404

        before = client.get("/stats").json()
        assert before["ready"] is True and before["model"] == "tiny"
        assert before["generation_tokens"] == 0 and before["ttft"]["count"] == 0
        resp = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5,
                                                     "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        stats = client.get("/stats").json()
        metrics = client.get("/metrics").text
    # one source of truth: /stats shows exactly what /metrics shows
    assert stats["generation_tokens"] == 5
    for key, name in (("generation_tokens", "ember:generation_tokens_total"),
                      ("prompt_tokens", "ember:prompt_tokens_total"),
                      ("running", "ember:num_requests_running"),
                      ("kv_cache_usage", "ember:kv_cache_usage_perc"),
                      ("aborted", "ember:num_aborted_requests_total"),
                      ("preemptions", "ember:num_preemptions_total")):
        assert stats[key] == _metric(metrics, name), key
    assert stats["ttft"]["count"] == _metric(metrics, "ember:time_to_first_token_seconds_count") == 1
    assert stats["itl"]["count"] == 4
    assert stats["itl"]["buckets"][-1] <= stats["itl"]["count"]
    assert stats["itl"]["bounds"] == sorted(stats["itl"]["bounds"])
    assert stats["finished"]["length"] == 1
    assert stats["errors"] == 0 and stats["engine_restarts"] == 0
    assert stats["features"] == {"json_schema": True, "speculative": False,
                                 "speculative_method": None, "num_speculative_tokens": 0}
    assert stats["metrics"]["ember:generation_tokens_total"] == 5
    # the auth bridge passes the router's scope updates out to the metrics middleware
    assert 'route="/v1/completions",status="200"' in metrics


def test_api_key_protects_stats_not_pages():
    with _client(api_keys=(KEY,)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/static/common.js").status_code == 200
        resp = client.get("/stats")
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
        assert client.get("/stats", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/v1/models", headers=_basic("", KEY)).status_code == 200
        assert client.get("/v1/models", headers=_basic("", "wrong")).status_code == 401


def test_auth_all_endpoints_protects_pages_with_a_basic_login():
    with _client(api_keys=(KEY,), auth_all_endpoints=True) as client:
        for path in ("/", "/dashboard", "/static/playground.js"):
            resp = client.get(path)
            assert resp.status_code == 401, path
            # a browser shows its login dialog for a Basic challenge (never for Bearer)
            assert resp.headers["www-authenticate"].startswith("Basic realm=")
            assert client.get(path, headers=_basic("me", KEY)).status_code == 200, path
            assert client.get(path, headers=_basic(KEY, "")).status_code == 200, path
            assert client.get(path, headers=_basic("me", "nope")).status_code == 401, path
        assert client.get("/stats").headers["www-authenticate"] == "Bearer"
        assert client.get("/stats", headers=_basic("me", KEY)).status_code == 200
        assert client.get("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("header, expected", [
    (f"Basic {base64.b64encode(b'u:k1').decode()}", "Bearer k1"),
    (f"basic {base64.b64encode(b'k2:').decode()}", "Bearer k2"),
    (f"Basic {base64.b64encode(b':').decode()}", None),
    ("Basic !!!notbase64", None),
    ("Bearer k1", None),
])
def test_basic_to_bearer(header, expected):
    assert basic_to_bearer(header) == expected
