"""The interactive loop behind `ember chat`, shared by the engine and the edge runtime: read a
line, keep the conversation, stream the reply's text pieces to stdout."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from rich.console import Console

Message = dict[str, str]


def chat_loop(reply: Callable[[list[Message]], Iterable[str]], system: str | None,
              banner: str) -> int:
    """Run the loop until EOF, Ctrl-C at the prompt, `/exit` or `/quit`. `/reset` clears the
    conversation (keeping the system message); Ctrl-C during a reply stops that reply only."""
    first: list[Message] = [{"role": "system", "content": system}] if system else []
    messages = list(first)
    Console(stderr=True).print(f"[dim]{banner}: type a message; Ctrl-D or /exit to quit, "
                               "/reset to clear[/]")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages = list(first)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            for text in reply(messages):
                sys.stdout.write(text)
                sys.stdout.flush()
                pieces.append(text)
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return 0
