"""Token logprobs in the two OpenAI shapes: legacy completions (parallel lists with
`top_logprobs` dicts keyed by token text) and chat (`content` list with bytes)."""

from __future__ import annotations

from collections.abc import Sequence

from ember.server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob
from ember.tokenizer import Tokenizer
from ember.types import TokenLogprobs

_MIN_LOGPROB = -9999.0
"""JSON has no -inf: logprobs are clamped here (as vLLM does)."""


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def clamp(logprob: float) -> float:
    return logprob if logprob >= _MIN_LOGPROB else _MIN_LOGPROB


class TokenTexts:
    """Text and raw bytes of single tokens, cached per id.

    A byte-level BPE token may hold part of a UTF-8 character: its `raw_bytes` are exact, its
    `text` shows U+FFFD for the incomplete part (as a decoder would).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}
        self._byte_table = _byte_level_decoder()

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.raw_bytes(token_id).decode("utf-8", errors="replace")
            self._texts[token_id] = text
        return text

    def raw_bytes(self, token_id: int) -> bytes:
        data = self._bytes.get(token_id)
        if data is None:
            data = self._compute_bytes(token_id)
            self._bytes[token_id] = data
        return data

    def _compute_bytes(self, token_id: int) -> bytes:
        tok = self._tokenizer
        try:
            piece = tok.id_to_token(token_id)
        except ValueError:
            return b""
        table = self._byte_table
        if token_id not in tok.all_special_ids and piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        if token_id in tok.all_special_ids:
            return piece.encode("utf-8")
        return tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def completion_logprobs(texts: TokenTexts, token_ids: Sequence[int],
                        entries: Sequence[TokenLogprobs | None],
                        start_offset: int = 0) -> CompletionLogprobs:
    """Legacy logprobs for `token_ids` (entries[i] belongs to token_ids[i]; None for the first
    prompt token). The chosen token is always in its `top_logprobs` dict (as in vLLM)."""
    out = CompletionLogprobs()
    offset = start_offset
    for token_id, entry in zip(token_ids, entries):
        token = texts.text(token_id)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(clamp(entry.logprob))
        top: dict[str, float] = {}
        for alt_id, alt_logprob in entry.top:
            top.setdefault(texts.text(alt_id), clamp(alt_logprob))
        top.setdefault(token, clamp(entry.logprob))
        out.top_logprobs.append(top)
    return out


def text_length(logprobs: CompletionLogprobs) -> int:
    """Characters covered by the tokens of `logprobs` (to continue text_offset)."""
    return sum(len(t) for t in logprobs.tokens)


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprobs],
                  num_top: int) -> list[TokenLogprob]:
    """Chat `logprobs.content` entries with up to `num_top` alternatives each."""
    return [
        TokenLogprob(
            token=texts.text(entry.token_id), logprob=clamp(entry.logprob),
            bytes=list(texts.raw_bytes(entry.token_id)),
            top_logprobs=[TopLogprob(token=texts.text(alt), logprob=clamp(lp),
                                     bytes=list(texts.raw_bytes(alt)))
                          for alt, lp in entry.top[:num_top]])
        for entry in entries
    ]
