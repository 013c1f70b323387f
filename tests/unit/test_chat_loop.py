"""`ember chat`'s loop (shared by the engine and the edge runtime): conversation kept across
turns, /reset keeps only the system message, Ctrl-C during a reply keeps what was streamed."""

from __future__ import annotations

import builtins

import pytest

from ember.cli.chat_loop import chat_loop


def _run(monkeypatch: pytest.MonkeyPatch, lines: list[str], reply, system: str | None):
    feed = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    return chat_loop(reply, system, "test chat")


def test_conversation_reset_and_exit(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[dict[str, str]]] = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        yield f"r{len(messages)}"
        yield "!"

    assert _run(monkeypatch, ["one", "", "two", "/reset", "three", "/exit", "never"], reply,
                "be brief") == 0
    assert [[m["content"] for m in conv] for conv in seen] == [
        ["be brief", "one"],
        ["be brief", "one", "r2!", "two"],
        ["be brief", "three"],
    ]
    assert capsys.readouterr().out == "r2!\nr4!\nr2!\n"


def test_interrupted_reply_keeps_the_streamed_part(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict[str, str]]] = []

    def reply(messages):
        seen.append([dict(m) for m in messages])
        yield "partial"
        if len(seen) == 1:
            raise KeyboardInterrupt

    _run(monkeypatch, ["a", "b"], reply, None)
    assert seen[1] == [{"role": "user", "content": "a"},
                       {"role": "assistant", "content": "partial"},
                       {"role": "user", "content": "b"}]
