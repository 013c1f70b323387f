"""Prefix-affinity routing for Ember replicas: pure functions, no Ray.

A request's *affinity key* hashes the start of its prompt: for chat, the messages up to and
including the first user message (so every later turn of a conversation has the same key);
for completions, the first characters of the prompt (or the first token ids). Requests with
the same key go to the same replica, where their prefix already sits in the KV cache
(Ember's prefix caching), unless that replica is more than `load_bound` requests busier than
the least-loaded one; then the least-loaded replicas win.

The replica a key prefers is chosen by rendezvous hashing (highest hash of key + replica id):
stable while replicas come and go, and only the keys of a removed replica move.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

AFFINITY_PATHS = ("/v1/chat/completions", "/v1/completions")


def _content_text(content: Any) -> str:
    """A message's content as text (OpenAI content parts: their text fields)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prompt_prefix(path: str, body: Mapping[str, Any]) -> str:
    """The text whose first characters decide a request's replica ('' when none)."""
    model = str(body.get("model", ""))
    if path == "/v1/chat/completions":
        parts = []
        for message in body.get("messages") or []:
            if not isinstance(message, dict):
                break
            parts.append(f"{message.get('role')}\x1f{_content_text(message.get('content'))}\x1e")
            if message.get("role") == "user":
                break  # NOTE: later turns of the same conversation keep this key
        return model + "\x1d" + "".join(parts) if parts else ""
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of prompts: the first one decides
        if isinstance(prompt, str) and prompt:
            return model + "\x1d" + prompt
        if isinstance(prompt, list) and prompt:
            return model + "\x1d" + " ".join(str(t) for t in prompt)
    return ""


def affinity_key(path: str, body: bytes, prefix_chars: int = 256) -> str | None:
    """Hash of the first `prefix_chars` characters of the prompt prefix; None when the
    request has no prompt (other routes, unparsable bodies: those go to the least loaded)."""
    if path not in AFFINITY_PATHS or not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    prefix = prompt_prefix(path, data)
    if not prefix:
        return None
    return hashlib.blake2b(prefix[:prefix_chars].encode(), digest_size=8).hexdigest()


def preferred_replica(key: str, replica_ids: Sequence[str]) -> str:
    """Rendezvous hashing: the replica with the highest hash of (key, replica id)."""
    return max(replica_ids, key=lambda rid: hashlib.blake2b(
        f"{key}\x00{rid}".encode(), digest_size=8).digest())


def rank_replicas(key: str | None, loads: Mapping[str, int | None], load_bound: int,
                  fallback: int = 2) -> list[list[str]]:
    """Replica ids in ranks to try in order (the caller takes the least loaded one of the
    first rank that accepts).

    loads: replica id -> ongoing requests (None: unknown, counted as 0).
    The key's preferred replica comes alone first when its load is within `load_bound` of
    the least loaded; the `fallback` least-loaded others come next (or first, without a key or
    when the preferred one is overloaded).
    """
    ids = sorted(loads)
    if not ids:
        return []

    def load(rid: str) -> int:
        return loads[rid] or 0

    by_load = sorted(ids, key=lambda rid: (load(rid), rid))
    if key is None:
        return [by_load[:fallback]]
    preferred = preferred_replica(key, ids)
    others = [rid for rid in by_load if rid != preferred][:fallback]
    if load(preferred) <= load(by_load[0]) + load_bound:
        return [[preferred], others] if others else [[preferred]]
    return [others]
