"""Prefix-affinity routing (pure functions, no Ray) and the `ember[ray]` import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ember.distributed.routing import affinity_key, preferred_replica, rank_replicas

CHAT = "/v1/chat/completions"


def _chat(*messages: tuple[str, str], model: str = "m") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": r, "content": c}
                                                    for r, c in messages]}).encode()


def test_later_turns_of_a_conversation_keep_the_key() -> None:
    first = affinity_key(CHAT, _chat(("system", "Be brief."), ("user", "Owls?")))
    later = affinity_key(CHAT, _chat(("system", "Be brief."), ("user", "Owls?"),
                                     ("assistant", "Birds."), ("user", "Eyes?")))
    other = affinity_key(CHAT, _chat(("system", "Be brief."), ("user", "Cats?")))
    assert first is not None and first == later
    assert other != first
    assert affinity_key(CHAT, _chat(("user", "Owls?"), model="other")) != \
        affinity_key(CHAT, _chat(("user", "Owls?")))


def test_key_hashes_only_the_first_prefix_chars() -> None:
    body = lambda p: json.dumps({"model": "m", "prompt": p}).encode()  # noqa: E731
    shared = "x" * 300
    assert affinity_key("/v1/completions", body(shared + "a"), prefix_chars=100) == \
        affinity_key("/v1/completions", body(shared + "b"), prefix_chars=100)
    assert affinity_key("/v1/completions", body(shared + "a"), prefix_chars=400) != \
        affinity_key("/v1/completions", body(shared + "b"), prefix_chars=400)
    assert affinity_key("/v1/completions", body([1, 2, 3])) is not None


@pytest.mark.parametrize("path,body", [("/v1/models", b""), (CHAT, b"{not json"),
                                       (CHAT, b"[1, 2]"), (CHAT, b'{"messages": []}')])
def test_requests_without_a_prompt_have_no_key(path: str, body: bytes) -> None:
    assert affinity_key(path, body) is None


def test_rank_prefers_the_keys_replica_within_the_load_bound() -> None:
    loads: dict[str, int | None] = {"a": 0, "b": 0, "c": 0}
    preferred = preferred_replica("k", list(loads))
    ranks = rank_replicas("k", loads, load_bound=2)
    assert ranks[0] == [preferred] and preferred not in ranks[1]
    loads[preferred] = 2  # at the bound: still preferred
    assert rank_replicas("k", loads, load_bound=2)[0] == [preferred]
    loads[preferred] = 3  # beyond it: the least loaded others
    ranks = rank_replicas("k", loads, load_bound=2)
    assert len(ranks) == 1 and preferred not in ranks[0]


def test_rank_without_key_is_least_loaded_first() -> None:
    assert rank_replicas(None, {"a": 5, "b": 1, "c": None}, load_bound=4) == [["c", "b"]]
    assert rank_replicas(None, {}, load_bound=4) == []


def test_rendezvous_keys_move_only_when_their_replica_leaves() -> None:
    replicas = [f"r{i}" for i in range(5)]
    keys = [f"key{i}" for i in range(200)]
    before = {k: preferred_replica(k, replicas) for k in keys}
    assert len(set(before.values())) == 5  # spread over all replicas
    after = {k: preferred_replica(k, replicas[:-1]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r4")


def test_importing_ember_does_not_import_ray() -> None:
    code = ("import sys, ember, ember.cli, ember.distributed, ember.distributed.routing, "
            "ember.cli.serve_ray; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from ember.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(["serve", "--ray", "--num-replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ember[ray]'" in err and len(err.strip().splitlines()) == 1
