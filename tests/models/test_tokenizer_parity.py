"""Ember's tokenizer vs HF on the default model (SmolLM2-135M-Instruct GGUF).

Two references:
- `hf_tokenizer`: transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
- `published`: the same vocabulary with the pre-tokenizer SmolLM2's tokenizer.json declares
  (Digits(individual_digits=True) + ByteLevel), which llama.cpp's "smollm" entry also implements.

They differ only where a run of 2+ whitespace characters precedes a digit: transformers' GGUF
loader has no "smollm" entry and splits like plain GPT-2 there. Ember follows `published`; those
strings are marked `GGUF_LOADER_DIFFERS` below.
"""

from __future__ import annotations

import gguf
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from ember.tokenizer import Tokenizer

pytestmark = pytest.mark.model

GGUF_LOADER_DIFFERS = True

# (text, transformers' GGUF loader splits it differently)
TEXTS: list[tuple[str, bool]] = [
    ("Hello, world!", False),
    ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
     "must be in want of a wife.", False),
    ("The quick brown fox jumps over the lazy dog.", False),
    ("12345", False),
    ("pi is 3.14159 and e is 2.71828", False),
    ("In 2024, 1,000,000 people paid $19.99 (or €18,50) each.", False),
    ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
     "fibonacci(n - 2)\n", False),
    ('{"key": [1, 2, 3], "nested": {"a": null, "b": true}}', False),
    ("for (int i = 0; i < 10; ++i) { sum += a[i]; }", False),
    ("   leading spaces", False),
    (" single leading space", False),
    ("trailing spaces   ", False),
    ("tabs\tand\t\ttabs", False),
    ("multiple     spaces     inside", False),
    ("line one\nline two\n\nline four\r\nwindows line", False),
    ("\n\n\nstarts with newlines", False),
    ("Café naïve résumé São Paulo Zürich façade", False),
    ("日本語のテキストと中文文本，还有한국어도.", False),
    ("Emoji: 😀🎉👍🏽 and flags 🇫🇷 and family 👨‍👩‍👧‍👦", False),
    ("Ελληνικά и русский текст, עברית ועربية", False),
    ("<|im_start|>user\nhi<|im_end|>", False),
    ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n", False),
    ("text<|endoftext|>more text<repo_name>x<file_sep>", False),
    ("<|im_start|> spaced <|im_end|>", False),
    ("it's don't we'll they've I'm she'd", False),
    ("URL: https://example.com/path?q=1&r=2#frag", False),
    ("x = 1e-10; y=0x1F; z = 007", False),
    ("a  3", GGUF_LOADER_DIFFERS),
    ("Total:\n\n42 items", GGUF_LOADER_DIFFERS),
    ("col1    2\ncol2\t\t7", GGUF_LOADER_DIFFERS),
    ("", False),
]
IDS = [f"{i}:{text[:16]!r}" for i, (text, _) in enumerate(TEXTS)]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
        {"role": "assistant", "content": "Red, yellow, blue."},
        {"role": "user", "content": "And secondary?"},
    ],
    [{"role": "user", "content": "Unicode: café 日本 😀\n  indented 123"}],
]


@pytest.fixture(scope="module")
def ember_tok(gguf_path) -> Tokenizer:
    reader = gguf.GGUFReader(str(gguf_path))
    metadata = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def published(hf_tokenizer) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


@pytest.mark.parametrize(("text", "loader_differs"), TEXTS, ids=IDS)
def test_encode_matches_transformers(ember_tok, hf_tokenizer, published, text, loader_differs):
    ours = ember_tok.encode(text)
    assert ours == published.encode(text).ids
    hf_ids = hf_tokenizer(text)["input_ids"]
    if loader_differs:
        # Same text, split differently: only whitespace runs before digits are grouped.
        assert hf_tokenizer.decode(hf_ids, skip_special_tokens=False) == text
        assert ours != hf_ids
    else:
        assert ours == hf_ids


@pytest.mark.parametrize(("text", "loader_differs"), TEXTS, ids=IDS)
def test_decode_round_trip(ember_tok, hf_tokenizer, text, loader_differs):
    ids = ember_tok.encode(text)
    assert ember_tok.decode(ids, skip_special_tokens=False) == text
    assert ember_tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ember_tok.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)


def test_whitespace_before_digits_follows_llama_cpp(ember_tok):
    # llama.cpp "smollm": split every digit off first, then GPT-2's regex; "ĠĠ" stays whole.
    assert ember_tok.convert_ids_to_tokens(ember_tok.encode("a  3")) == ["a", "ĠĠ", "3"]
    assert ember_tok.convert_ids_to_tokens(ember_tok.encode("x 12")) == ["x", "Ġ", "1", "2"]


def test_pride_and_prejudice_chunk(ember_tok, hf_tokenizer, pride_text):
    text = pride_text[:20000]
    ours = ember_tok.encode(text)
    assert ours == hf_tokenizer(text)["input_ids"]
    assert ember_tok.decode(ours) == text


def test_special_ids(ember_tok, hf_tokenizer):
    assert ember_tok.vocab_size == len(hf_tokenizer) == 49152
    assert ember_tok.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert ember_tok.eos_token == "<|im_end|>"
    assert ember_tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert ember_tok.pad_token_id == 2
    assert ember_tok.eos_token_ids == frozenset({2})
    assert ember_tok.all_special_ids == frozenset(range(17))
    assert set(hf_tokenizer.all_special_ids) <= ember_tok.all_special_ids
    assert ember_tok.encode("hi")[0] != ember_tok.bos_token_id  # add_bos_token is False


@pytest.mark.parametrize("messages", CHATS, ids=["user", "system+multi-turn", "unicode"])
def test_chat_template_matches_transformers(ember_tok, hf_tokenizer, messages):
    for prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )
        assert ember_tok.apply_chat_template(messages, add_generation_prompt=prompt) == expected
        ids = ember_tok.encode_chat(messages, add_generation_prompt=prompt)
        assert ids == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]
    # One turn each, plus the default system turn when there is none, plus the prompt.
    turns = len(messages) + (messages[0]["role"] != "system") + 1
    assert ember_tok.encode_chat(messages).count(ember_tok.token_to_id("<|im_start|>")) == turns


def test_chat_content_parts_match_plain_strings(ember_tok):
    plain = [{"role": "user", "content": "first\nsecond"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"},
                                          {"type": "text", "text": "second"}]}]
    assert ember_tok.apply_chat_template(parts) == ember_tok.apply_chat_template(plain)
