"""Grammar sources and their compilation for constrained decoding (llguidance).

`GrammarCompiler.source(spec)` turns a `StructuredOutputsParams` into an llguidance grammar and
validates it synchronously (~1 ms, cached), raising InvalidRequestError naming the problem, so a
bad schema is a 400 before anything is queued. `GrammarCompiler.submit(source)` compiles on a
thread pool (llguidance drops the GIL) into a template matcher, kept in an LRU cache keyed by the
grammar text. Why llguidance and how the matchers are used per step: `ember.sampling.constrained`.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import OrderedDict

import torch

from ember.tokenizer import Tokenizer
from ember.types import InvalidRequestError, StructuredOutputsParams

try:
    import llguidance
except ImportError:  # pragma: no cover - llguidance is a core dependency
    llguidance = None  # type: ignore[assignment]


def _json_options(spec: StructuredOutputsParams) -> dict[str, object]:
    if spec.whitespace_flexible:
        return {"whitespace_flexible": True}
    # NOTE: compact, json.dumps-like separators: a small model otherwise may emit whitespace
    # until max_tokens (flexible whitespace is valid JSON forever).
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (a JSON string) for `spec`; not validated."""
    if llguidance is None:
        raise InvalidRequestError("structured outputs need the llguidance package",
                                  "structured_outputs")
    m = llguidance.LLMatcher
    if spec.json is not None or spec.json_object:
        schema: object = {"type": "object"} if spec.json_object else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}",
                                          "structured_outputs.json") from exc
        if not isinstance(schema, dict):
            raise InvalidRequestError("the JSON schema must be a JSON object",
                                      "structured_outputs.json")
        return m.grammar_from_json_schema(schema, overrides=_json_options(spec))  # type: ignore
    if spec.regex is not None:
        return m.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        # NOTE: JSON string escapes are valid Lark string literals.
        return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    assert spec.grammar is not None
    return m.grammar_from_lark(spec.grammar)


def _field_name(spec: StructuredOutputsParams) -> str:
    for name in ("json", "regex", "choice", "grammar"):
        if getattr(spec, name) is not None:
            return name
    return "json_object"


def spec_key(spec: StructuredOutputsParams) -> str:
    """A canonical text key of `spec` (equal specs share one compiled grammar)."""
    value = spec.json if spec.json is not None else (
        spec.regex if spec.regex is not None else spec.choice if spec.choice is not None
        else spec.grammar)
    return json.dumps([_field_name(spec), value, spec.whitespace_flexible], sort_keys=True)


class GrammarCompiler:
    """Validates grammars and compiles them off the step loop, with an LRU cache.

    Args:
        tokenizer: the model's tokenizer (its `backend` is handed to llguidance).
        cache_size: compiled grammars kept (least recently used are dropped).
        max_workers: compile threads.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 256, max_workers: int = 2) -> None:
        if llguidance is None:
            raise RuntimeError("structured outputs need the llguidance package")
        self.eos_token_id = tokenizer.eos_token_id
        self._tokenizer = tokenizer
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self.vocab_size = tokenizer.vocab_size
        self.cache_size = cache_size
        self._sources: OrderedDict[str, str] = OrderedDict()
        """spec_key -> validated grammar text."""
        self._compiled: OrderedDict[str, concurrent.futures.Future[llguidance.LLMatcher]] = \
            OrderedDict()
        """grammar text -> future of the template matcher."""
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers,
                                                           thread_name_prefix="ember-grammar")

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's tokenizer, built on first use (~30 MB; most engines never see a
        constrained request)."""
        with self._lock:
            if self._ll_tokenizer is None:
                tok = self._tokenizer
                self._ll_tokenizer = llguidance.LLTokenizer(
                    tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id)
            return self._ll_tokenizer

    def source(self, spec: StructuredOutputsParams) -> str:
        """The validated grammar text of `spec`; InvalidRequestError names the problem (an
        unsupported schema keyword, a bad regex, a Lark syntax error)."""
        key = spec_key(spec)
        with self._lock:
            cached = self._sources.get(key)
            if cached is not None:
                self._sources.move_to_end(key)
                return cached
        try:
            text = grammar_text(spec)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                text, self.ll_tokenizer)
        except (ValueError, TypeError, RuntimeError) as exc:  # llguidance rejects the input
            is_error, messages, text = True, [str(exc)], ""
        if is_error:
            kind = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                    "choice": "choice", "grammar": "grammar"}[_field_name(spec)]
            message = messages[0].strip() if messages else "invalid"
            raise InvalidRequestError(f"unsupported or invalid {kind}: {message}",
                                      f"structured_outputs.{_field_name(spec)}")
        with self._lock:
            self._sources[key] = text
            while len(self._sources) > self.cache_size:
                self._sources.popitem(last=False)
        return text

    def submit(self, text: str) -> concurrent.futures.Future[llguidance.LLMatcher]:
        """The (maybe still running) compilation of grammar `text` into a template matcher."""
        with self._lock:
            future = self._compiled.get(text)
            if future is not None:
                self._compiled.move_to_end(text)
                return future
            future = self._pool.submit(self._compile, text)
            self._compiled[text] = future
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
            return future

    def _compile(self, text: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if not matcher.is_error():
            # NOTE: the lexer is built lazily; one mask here moves that cost off the step loop.
            # NOTE: not llguidance.torch: importing it runs a @torch.compile decorator, which
            # pulls in torch._dynamo / inductor / triton (~180 MB RSS).
            mask = torch.full(((self.vocab_size + 31) // 32,), -1, dtype=torch.int32)
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        return matcher

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A fresh matcher for `spec`, compiling (or waiting for the compile) when needed."""
        return self.submit(self.source(spec)).result().deep_copy()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
