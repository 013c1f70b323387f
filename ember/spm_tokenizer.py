"""SentencePiece-style BPE vocabularies from GGUF metadata (`tokenizer.ggml.model == "llama"`).

llama.cpp stores these as pieces, scores and token types, usually without merges. The HF
`tokenizers` BPE model needs merges, so they are rebuilt from the vocabulary: every split of a
piece into two pieces that are themselves in the vocabulary is a merge, ranked by the merged
piece's score (best first). Gemma's scores do not follow its merge order; its pieces' order in
the file does, so Gemma ranks by position. This is the same recovery transformers' GGUF loader
performs, so both build identical tokenizers (tests/models/test_gemma3_parity.py checks ids).

Shape of the result (SentencePiece semantics): spaces become "▁" before BPE, unknown bytes fall
back to <0xNN> byte pieces, and decoding reverses both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers

logger = logging.getLogger(__name__)

SPACE = "\u2581"
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4
_RANK_BY_POSITION = frozenset({"gemma", "gemma2", "gemma3"})
"""Architectures whose merge order is the pieces' order in the file, not their scores."""


def _rebuild_merges(vocab: Mapping[str, int], rank: Mapping[str, float]
                    ) -> list[tuple[str, str]]:
    """Every (left, right) split of a piece into two vocabulary pieces, best-ranked merged
    piece first; ties by the lengths of the parts (longer first), then file order."""
    found: list[tuple[str, str, float]] = []
    for piece, score in rank.items():
        if len(piece) < 2:
            continue
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        if len(local) > 1:
            local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ValueError(f"malformed GGUF merge {merge!r} (expected 'left right')")
    return left, right


def build_sentencepiece_bpe(metadata: Mapping[str, object], tokens: Sequence[str],
                            token_types: Sequence[int], architecture: str
                            ) -> tokenizers.Tokenizer:
    """A byte-fallback BPE `tokenizers.Tokenizer` for a GGUF SentencePiece vocabulary."""
    if architecture in _RANK_BY_POSITION:
        # NOTE: Gemma files store whitespace-run pieces with real spaces ("  "); BPE sees
        # spaces as "▁" after normalisation, so those pieces are respelled to be reachable.
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    raw_merges = metadata.get("tokenizer.ggml.merges")
    merges: list[tuple[str, str]]
    if isinstance(raw_merges, (list, tuple)) and raw_merges:
        merges = [_pair(str(m)) for m in raw_merges]
    else:
        if architecture in _RANK_BY_POSITION:
            rank: dict[str, float] = {t: -float(i) for i, t in enumerate(tokens)}
        else:
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            rank = dict(zip(tokens, map(float, scores)))  # type: ignore[call-overload]
        merges = _rebuild_merges(vocab, rank)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None  # type: ignore[call-overload]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                              fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", SPACE)]
    if prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    dec: list[decoders.Decoder] = [decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                   decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    kinds = list(token_types) + [1] * (len(tokens) - len(token_types))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, kinds) if k == TOKEN_TYPE_CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, kinds) if k == TOKEN_TYPE_USER_DEFINED])
    return backend
