"""Tokenizer: text <-> token ids, plus chat templates.

`Tokenizer` wraps a HF `tokenizers.Tokenizer` (Rust BPE), built from GGUF metadata or from a HF
directory. Chat templates are untrusted code shipped with models: they render in an immutable
jinja2 sandbox set up like transformers', so prompts come out byte-identical.

GGUF byte-level BPE ("gpt2" model) follows llama.cpp's pre-tokenizer table (`tokenizer.ggml.pre`):
    gpt2 family    ByteLevel(use_regex=True), i.e. the GPT-2 split regex
    digit family   Digits(individual) + ByteLevel(use_regex=True)    (smollm, starcoder, ...)
    regex family   Split(<family regex>) + ByteLevel(use_regex=False) (llama3, qwen2, gpt-4o, ...)

NOTE: transformers' GGUF loader has no "smollm" entry and falls back to plain GPT-2 splitting, so
on a whitespace run before a digit ("  12", "\\n\\n3") it differs from llama.cpp and from SmolLM2's
own tokenizer.json (Digits + ByteLevel). We follow those two.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from ember.chat_template import compile_chat_template, normalize_message
from ember.spm_tokenizer import build_sentencepiece_bpe

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2, _DIGITS = "gpt2", "digits"  # handled by ByteLevel's own GPT-2 regex
# `tokenizer.ggml.pre` -> how text is split before BPE: _GPT2, _DIGITS, or a Split regex.
_PRE_TOKENIZER_SPLITS: Mapping[str, str] = MappingProxyType(
    dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"), _GPT2)
    | dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), _DIGITS
    )
    | dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx",
         "smaug-bpe", "midm-2.0", "lfm2"),
        _LLAMA3_SPLIT,
    )
    | dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), _QWEN2_SPLIT)
    | dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), _GPT4O_SPLIT)
    | {"tekken": _TEKKEN_SPLIT}
)
# The llama3 family matches whole pre-tokens in the vocab before merging (llama.cpp's
# `ignore_merges`) and adds BOS when the file does not say otherwise.
_LLAMA3_FAMILY = frozenset(k for k, v in _PRE_TOKENIZER_SPLITS.items() if v == _LLAMA3_SPLIT)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of llama.cpp pre-tokenizer type `pre` (byte-level BPE)."""
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
            f"supported: {sorted(_PRE_TOKENIZER_SPLITS)}"
        )
    use_regex = split in (_GPT2, _DIGITS)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    if split == _GPT2:
        return byte_level
    if split == _DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])


def _byte_level_vocab(tokens: Sequence[str], kinds: Sequence[int]) -> dict[str, int]:
    """token string -> id, every BPE token spelled in the byte alphabet.

    Control and user-defined tokens keep their raw text: they are matched whole in the input as
    added tokens, never built by merges. A normal token written as plain text (some converters do
    that) is re-spelled byte by byte, as transformers does, so merges can reach it.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = frozenset(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(tokens, kinds)):
        key = token
        if kind not in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED) and set(token) - alphabet:
            key = "".join(piece for piece, _ in byte_level.pre_tokenize_str(token))
        if key in vocab:
            logger.warning("GGUF token %d %r repeats token %d; ignored", index, token, vocab[key])
            continue
        vocab[key] = index
    return vocab


def _build_byte_level_bpe(
    tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str], pre: str
) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF vocabulary pieces."""
    kinds = [*token_types, *[TOKEN_TYPE_NORMAL] * (len(tokens) - len(token_types))]
    vocab = _byte_level_vocab(tokens, kinds)
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"malformed GGUF merge {merge!r} (expected 'left right')")
        pairs.append((left, right))
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_FAMILY)
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # NOTE: normalized=False matches the raw text; ids come from `vocab`, which holds that text.
    added = [(t, k == TOKEN_TYPE_CONTROL) for t, k in zip(tokens, kinds)
             if k in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED) and t in vocab]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, special in added if special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, special in added if not special])
    if (size := backend.get_vocab_size(with_added_tokens=True)) != len(tokens):
        logger.warning("tokenizer has %d ids but the GGUF lists %d tokens", size, len(tokens))
    return backend


def _cached_backend(path: Path | None) -> tokenizers.Tokenizer | None:
    """A cached backend, or None when absent or unreadable (then it is rebuilt)."""
    if path is None or not path.is_file():
        return None
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # a truncated or foreign file: rebuild
        logger.warning("ignoring tokenizer cache %s: %s", path, exc)
        return None


def _store_backend(backend: tokenizers.Tokenizer, path: Path) -> None:
    """Write atomically (rename), so concurrent loaders never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot cache the tokenizer in %s: %s", path, exc)


def _as_str_list(value: object, key: str) -> list[str]:
    """A GGUF string array as `list[str]` (tolerates bytes items)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"GGUF metadata {key!r} must be a list, got {type(value).__name__}")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]


def _optional_int(metadata: Mapping[str, object], key: str) -> int | None:
    value = metadata.get(key)
    return None if value is None else int(value)  # type: ignore[call-overload]


def _int_ids(value: object) -> list[int]:
    """An `eos_token_id`-style config entry (int, list of ints, or null) as a list."""
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [int(v) for v in value]
    return [] if value is None else [int(value)]  # type: ignore[call-overload]


def _special_token_content(value: object) -> str | None:
    """A tokenizer_config.json special-token entry: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} when the file is absent."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def _dir_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """A HF directory's chat template: tokenizer_config's (a string, or a list of
    {"name", "template"} where "default" wins), else chat_template.jinja / chat_template.json."""
    value = config.get("chat_template")
    if value is None and (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    if value is None:
        value = _read_json(root / "chat_template.json").get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError,
                  AttributeError)

GIL_FREE_ENCODE_CHARS = 4096
"""Texts longer than this are encoded with the backend's `encode_batch`, which releases the GIL;
its `encode` holds the GIL throughout (a 3.5 MB /tokenize text stopped the server's event loop,
/health included, for seconds while a worker thread encoded it)."""


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Build with `from_gguf_metadata` or `from_dir`. Not mutated after
    construction; safe to share between threads.

    Attributes:
        backend: the wrapped `tokenizers.Tokenizer` (do not mutate).
        bos_token_id / eos_token_id / pad_token_id / unk_token_id: special ids, or None. For chat
            models `eos_token_id` is the end-of-turn token (SmolLM2: `<|im_end|>`).
        eos_token_ids: every id that ends generation (EOS, GGUF EOT/EOM, generation_config's).
        bos_token / eos_token: those tokens as text (what chat templates see), or None.
        vocab_size: number of ids, added tokens included.
        all_special_ids: ids of special added tokens plus BOS/EOS/PAD/UNK.
        chat_template: the jinja2 chat template source, or None.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ) -> None:
        """Wrap a configured `backend`. With `add_bos_token` / `add_eos_token`, `encode` adds
        BOS / EOS itself (on top of whatever `backend`'s post-processor does)."""
        self.backend = backend
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        named = {i for i in (bos_token_id, eos_token_id, pad_token_id, unk_token_id)
                 if i is not None}
        self.eos_token_ids = frozenset(
            {i for i in (eos_token_id, *extra_eos_token_ids) if i is not None})
        self.bos_token = None if bos_token_id is None else backend.id_to_token(bos_token_id)
        self.eos_token = None if eos_token_id is None else backend.id_to_token(eos_token_id)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        added = backend.get_added_tokens_decoder()
        self.all_special_ids = frozenset({i for i, t in added.items() if t.special} | named)
        self.chat_template = chat_template
        self._prefix = [bos_token_id] if add_bos_token and bos_token_id is not None else []
        self._suffix = [eos_token_id] if add_eos_token and eos_token_id is not None else []

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, object],
                           backend_cache: Path | None = None) -> Tokenizer:
        """Build from GGUF metadata (`{key: field.contents()}` of a `gguf.GGUFReader`).

        backend_cache: a JSON file for the built `tokenizers` backend, keyed by the caller to
        the GGUF file: read when present, written after a build (a 262k SentencePiece
        vocabulary takes seconds to turn into BPE merges, reading it back a fraction).

        Supports byte-level BPE (`tokenizer.ggml.model == "gpt2"`) with llama.cpp's
        pre-tokenizers. Control (3) tokens become special added tokens and user-defined (4) ones
        plain added tokens, so both are matched whole in input text. `encode` adds BOS only if
        `tokenizer.ggml.add_bos_token` is true (if absent: true for the llama3 family only).

        Raises:
            ValueError: no vocabulary, or an unsupported tokenizer model / pre-tokenizer.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model): "
                "byte-level BPE ('gpt2') and SentencePiece BPE ('llama') are supported; "
                "use a HF directory with tokenizer.json"
            )
        if "tokenizer.ggml.tokens" not in metadata:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens = _as_str_list(metadata["tokenizer.ggml.tokens"], "tokenizer.ggml.tokens")
        types = _int_ids(metadata.get("tokenizer.ggml.token_type"))
        pre = str(metadata.get("tokenizer.ggml.pre") or "default")
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        if model == "llama":
            # NOTE: llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
            add_bos = True if add_bos is None else add_bos
        backend = _cached_backend(backend_cache)
        if backend is None:
            if model == "llama":
                backend = build_sentencepiece_bpe(metadata, tokens, types,
                                                  str(metadata.get("general.architecture", "")))
            else:
                merges = _as_str_list(metadata.get("tokenizer.ggml.merges") or [],
                                      "tokenizer.ggml.merges")
                backend = _build_byte_level_bpe(tokens, types, merges, pre)
            if backend_cache is not None:
                _store_backend(backend, backend_cache)
        template = metadata.get("tokenizer.chat_template")
        eot_eom = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        extra_eos = [_optional_int(metadata, key) for key in eot_eom]
        return cls(
            backend,
            bos_token_id=_optional_int(metadata, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_optional_int(metadata, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_optional_int(metadata, "tokenizer.ggml.padding_token_id"),
            unk_token_id=_optional_int(metadata, "tokenizer.ggml.unknown_token_id"),
            extra_eos_token_ids=[i for i in extra_eos if i is not None],
            chat_template=None if template is None else str(template),
            add_bos_token=bool(add_bos) if add_bos is not None else pre in _LLAMA3_FAMILY,
            add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a HF-style directory: tokenizer.json, plus (optional) tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja, config.json and generation_config.json.

        tokenizer.json's post-processor is trusted for BOS; `encode` adds BOS itself only when
        tokenizer_config says `add_bos_token` and the post-processor does not.

        Raises:
            FileNotFoundError: no tokenizer.json in `path`.
        """
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {root}")
        backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        model_config = _read_json(root / "config.json")
        generation = _read_json(root / "generation_config.json")

        def special_id(name: str, fallback: object = None) -> int | None:
            content = _special_token_content(config.get(name, special_map.get(name)))
            token_id = None if content is None else backend.token_to_id(content)
            return token_id if token_id is not None else next(iter(_int_ids(fallback)), None)

        eos_extra = _int_ids(model_config.get("eos_token_id"))
        eos_extra += _int_ids(generation.get("eos_token_id"))
        bos_id = special_id("bos_token", model_config.get("bos_token_id"))
        # NOTE: probe the post-processor so that BOS is never added twice.
        add_bos = bool(config.get("add_bos_token")) and backend.encode("a").ids[:1] != [bos_id]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=special_id("eos_token", eos_extra),
            pad_token_id=special_id("pad_token", generation.get("pad_token_id")),
            unk_token_id=special_id("unk_token"),
            extra_eos_token_ids=eos_extra,
            chat_template=_dir_chat_template(root, config),
            add_bos_token=add_bos,
            add_eos_token=bool(config.get("add_eos_token", False)),
        )

    def with_chat_template(self, template: str) -> "Tokenizer":
        """A copy of this tokenizer that renders chats with `template` (checked to compile)."""
        compile_chat_template(template)
        clone = copy.copy(self)
        clone.__dict__.pop("_compiled_chat_template", None)  # the cached_property's value
        clone.chat_template = template
        return clone

    @property
    def bos_prefix(self) -> list[int]:
        """[BOS] when `encode` adds it (Gemma, Llama 3), else [] (SmolLM2)."""
        return list(self._prefix)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text (e.g. "<|im_end|>") is matched whole. With
        `add_special_tokens`, BOS/EOS are added as the model asks."""
        if len(text) > GIL_FREE_ENCODE_CHARS:  # the backend's encode_batch releases the GIL
            ids: list[int] = self.backend.encode_batch(
                [text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return [*self._prefix, *ids, *self._suffix] if add_special_tokens else ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """`encode` of many texts (in parallel, in the Rust backend)."""
        batch = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        if not add_special_tokens:
            return [e.ids for e in batch]
        return [[*self._prefix, *e.ids, *self._suffix] for e in batch]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special_tokens` is False."""
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str:
        """Vocabulary string of `token_id` (byte-level spelling, e.g. "Ġthe").

        Raises:
            ValueError: `token_id` is not in the vocabulary.
        """
        token = self.backend.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} not in the vocabulary ({self.vocab_size} ids)")
        return str(token)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """`id_to_token` of each id."""
        return [self.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        """Id of vocabulary string `token`, or None."""
        token_id = self.backend.token_to_id(token)
        return None if token_id is None else int(token_id)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template, sandboxed like transformers.

        The template sees `messages` (content parts joined into strings), `add_generation_prompt`,
        `bos_token`, `eos_token`, `tools=None`, `documents=None` and `kwargs` (which override
        those), plus the helpers `raise_exception` and `strftime_now`.

        Raises:
            ValueError: no chat template; a template that fails to compile or render (including
                `raise_exception` and sandbox violations); unsupported content parts.
        """
        template = self._compiled_chat_template
        variables: dict[str, Any] = {"tools": None, "documents": None}
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        variables.update({k: v for k, v in specials.items() if v is not None})
        variables.update(kwargs)
        variables["messages"] = [normalize_message(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return str(template.render(**variables))
        except _RENDER_ERRORS as e:
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat. The template writes its own special tokens (BOS too,
        if the model wants one), so the text is encoded without adding any."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    @cached_property
    def _compiled_chat_template(self) -> jinja2.Template:
        # NOTE: compiled once per instance: compiling costs milliseconds, rendering microseconds.
        if self.chat_template is None:
            raise ValueError("this model has no chat template (a base model): send a prompt "
                             "to /v1/completions, or give the server one with "
                             "--chat-template FILE")
        return compile_chat_template(self.chat_template)

    def __repr__(self) -> str:
        has_template = self.chat_template is not None
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={sorted(self.eos_token_ids)}, chat_template={has_template})")
