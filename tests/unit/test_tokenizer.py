"""Tokenizer on a tiny handmade byte-level BPE vocabulary (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.tokenizer import Tokenizer, normalize_message

CONTROL, USER_DEFINED, NORMAL = 3, 4, 1
SPECIALS = [("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL),
            ("<think>", USER_DEFINED)]
CHARS = ["a", "d", "e", "h", "i", "l", "m", "n", "o", "r", "s", "t", "u", "w", "x",
         "1", "2", "3", "!", "Ġ", "Ċ"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
          "Ġ Ġ", "Ġ x"]
# " x" is a normal token written as plain text (as some converters do): it must be re-spelled
# "Ġx" so that the merge "Ġ x" reaches it.
MERGED = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld", "12", "ĠĠ", " x"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_metadata(**overrides: object) -> dict[str, object]:
    entries = SPECIALS + [(t, NORMAL) for t in CHARS + MERGED]
    metadata: dict[str, object] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": [t for t, _ in entries],
        "tokenizer.ggml.token_type": [k for _, k in entries],
        "tokenizer.ggml.merges": list(MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    metadata.update(overrides)
    return metadata


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(make_metadata())


def tokens_of(tok: Tokenizer, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok.encode(text))


# ---------------------------------------------------------------- encode / decode


def test_encode_applies_merges_and_round_trips(tok):
    assert tokens_of(tok, "hello world!") == ["hello", "Ġworld", "!"]
    ids = tok.encode("hello world!")
    assert ids == [tok.token_to_id("hello"), tok.token_to_id("Ġworld"), tok.token_to_id("!")]
    assert tok.decode(ids) == "hello world!"
    assert tok.decode([]) == ""
    assert tok.encode("") == []


def test_newlines_and_spaces_round_trip(tok):
    text = "hello\n  world\n\nhe"
    assert tok.decode(tok.encode(text)) == text
    assert "Ċ" in tokens_of(tok, text)


def test_smollm_splits_digits_individually(tok):
    # The merge "1 2" exists, but the smollm pre-tokenizer isolates each digit first.
    assert tokens_of(tok, "123") == ["1", "2", "3"]
    # Whitespace before a digit stays one run (llama.cpp / SmolLM2's tokenizer.json).
    assert tokens_of(tok, "h  1") == ["h", "ĠĠ", "1"]


def test_gpt2_pre_tokenizer_keeps_digit_runs():
    gpt2 = Tokenizer.from_gguf_metadata(make_metadata(**{"tokenizer.ggml.pre": "gpt2"}))
    assert tokens_of(gpt2, "123") == ["12", "3"]
    default = Tokenizer.from_gguf_metadata(make_metadata(**{"tokenizer.ggml.pre": None}))
    assert tokens_of(default, "123") == ["12", "3"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_regex_pre_tokenizers_build_and_round_trip(pre):
    tok = Tokenizer.from_gguf_metadata(make_metadata(**{"tokenizer.ggml.pre": pre}))
    assert tok.decode(tok.encode("hello world 123!")) == "hello world 123!"


def test_plain_text_normal_token_is_respelled(tok):
    assert tok.token_to_id(" x") is None
    x_id = tok.token_to_id("Ġx")
    assert x_id == len(SPECIALS) + len(CHARS) + MERGED.index(" x")
    assert tok.encode("h x") == [tok.token_to_id("h"), x_id]
    assert tok.decode([x_id]) == " x"


def test_vocab_lookups(tok):
    assert tok.vocab_size == len(SPECIALS) + len(CHARS) + len(MERGED)
    assert tok.id_to_token(0) == "<|endoftext|>"
    all_tokens = tok.convert_ids_to_tokens(range(tok.vocab_size))
    assert tok.token_to_id("hello") == all_tokens.index("hello")
    assert tok.token_to_id("not-a-token") is None
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.id_to_token(10_000)


def test_encode_batch_matches_encode(tok):
    texts = ["hello", "<|im_start|>world", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_long_text_encodes_the_same_through_the_gil_free_path(tok):
    from ember.tokenizer import GIL_FREE_ENCODE_CHARS

    text = "hello world<|im_end|> 12 x\n" * (GIL_FREE_ENCODE_CHARS // 10)
    assert len(text) > GIL_FREE_ENCODE_CHARS  # encode takes the encode_batch path
    ids = tok.backend.encode(text, add_special_tokens=False).ids  # the GIL-holding call
    assert len(ids) > 1000
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode(text) == [*tok._prefix, *tok.backend.encode(text).ids, *tok._suffix]


# ---------------------------------------------------------------- special tokens


def test_special_ids_and_tokens(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.all_special_ids == frozenset({0, 1, 2})  # user-defined <think> is not special
    assert tok.eos_token_ids == frozenset({2})
    assert tok.chat_template == CHATML


def test_special_token_text_is_matched_whole(tok):
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids == [1, tok.token_to_id("hello"), 2]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"


def test_user_defined_token_is_matched_but_not_skipped(tok):
    ids = tok.encode("<think>hello")
    assert ids == [3, tok.token_to_id("hello")]
    assert tok.decode(ids) == "<think>hello"


def test_bos_added_only_when_metadata_asks():
    tok = Tokenizer.from_gguf_metadata(make_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello") == [1, tok.token_to_id("hello")]
    assert tok.encode("hello", add_special_tokens=False) == [tok.token_to_id("hello")]
    assert tok.encode_batch(["hello"]) == [[1, tok.token_to_id("hello")]]

    # A template that writes BOS itself gets exactly one.
    meta = make_metadata(**{"tokenizer.ggml.add_bos_token": True,
                            "tokenizer.chat_template": "{{ bos_token }}{{ messages[0].content }}"})
    templated = Tokenizer.from_gguf_metadata(meta)
    assert templated.encode_chat([{"role": "user", "content": "he"}]) == [1, tok.token_to_id("he")]


def test_llama3_family_adds_bos_by_default():
    meta = make_metadata(**{"tokenizer.ggml.pre": "llama-bpe"})
    del meta["tokenizer.ggml.add_bos_token"]
    assert Tokenizer.from_gguf_metadata(meta).encode("he")[0] == 1


def test_eot_and_eom_are_eos():
    meta = make_metadata(**{"tokenizer.ggml.eot_token_id": 0, "tokenizer.ggml.eom_token_id": 3})
    assert Tokenizer.from_gguf_metadata(meta).eos_token_ids == frozenset({0, 2, 3})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer.ggml.model": "bert"}, "unsupported GGUF tokenizer model 'bert'"),
        ({"tokenizer.ggml.model": None}, "unsupported GGUF tokenizer model"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "unsupported GGUF pre-tokenizer 'no-such-pre'"),
        ({"tokenizer.ggml.merges": ["hello"]}, "malformed GGUF merge"),
        ({"tokenizer.ggml.tokens": "abc"}, "must be a list"),
    ],
)
def test_bad_metadata_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_metadata(make_metadata(**overrides))


def test_missing_vocabulary_raises():
    meta = make_metadata()
    del meta["tokenizer.ggml.tokens"]
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata(meta)


# ---------------------------------------------------------------- chat templates


def test_chat_template_renders_chatml(tok):
    messages = [{"role": "user", "content": "hello"}]
    expected = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages) == expected
    without_prompt = expected.removesuffix("<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == without_prompt
    assert tok.encode_chat(messages) == tok.encode(expected, add_special_tokens=False)


def test_content_parts_are_joined(tok):
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    rendered = tok.apply_chat_template([{"role": "user", "content": parts}])
    assert "user\nhello\nworld<|im_end|>" in rendered
    assert normalize_message({"role": "assistant", "content": None})["content"] is None


def test_non_text_content_part_raises(tok):
    part = {"type": "image_url", "image_url": {"url": "http://x"}}
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [part]}])


def test_messages_are_not_mutated(tok):
    message = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    tok.apply_chat_template([message])
    assert message["content"] == [{"type": "text", "text": "hi"}]


def with_template(template: str) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(make_metadata(**{"tokenizer.chat_template": template}))


def test_template_variables_and_helpers():
    tok = with_template(
        "{{ bos_token }}|{{ eos_token }}|{{ custom }}|{{ tools }}|{{ {'a': '<b>'} | tojson }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
        "{% endfor %}{% generation %}gen{% endgeneration %}{{ strftime_now('%Y') | length }}"
        "{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}{{ dict(k=1).k }}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    out = tok.apply_chat_template(messages, custom="C")
    assert out == '<|im_start|>|<|im_end|>|C|None|{"a": "<b>"}agen421'


def test_template_compiled_once_per_instance(tok):
    tok.apply_chat_template([{"role": "user", "content": "hello"}])
    first = tok._compiled_chat_template
    tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert tok._compiled_chat_template is first
    assert Tokenizer.from_gguf_metadata(make_metadata())._compiled_chat_template is not first


def test_raise_exception_becomes_value_error():
    tok = with_template("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sandbox_refuses_dunder_access():
    tok = with_template("{{ ''.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="SecurityError: access to attribute '__class__'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ namespace(__class__=1) }}",
        "{% set x = messages.append(1) %}",
        "{{ dict.mro() }}",
    ],
)
def test_sandbox_blocks_escapes(template):
    tok = with_template(template)
    with pytest.raises(ValueError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_become_value_errors():
    with pytest.raises(ValueError, match="invalid chat template"):
        with_template("{% for m in messages %}").apply_chat_template([])
    with pytest.raises(ValueError, match="chat template failed"):
        with_template("{{ messages[0]['content'] + 1 }}").apply_chat_template(
            [{"role": "user", "content": "x"}])


def test_missing_template_raises():
    meta = make_metadata()
    del meta["tokenizer.chat_template"]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- from_dir


def write_dir(tmp_path: Path, tok: Tokenizer, config: dict[str, object], **extra: object) -> Path:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in extra.items():
        path = tmp_path / name.replace("__", ".")
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def test_from_dir_reads_configs(tmp_path, tok):
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML, "add_bos_token": True}
    root = write_dir(tmp_path, tok, config, generation_config__json={"eos_token_id": [2, 0]},
                     config__json={"eos_token_id": 2, "bos_token_id": 1})
    loaded = Tokenizer.from_dir(root)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.eos_token_ids == frozenset({0, 2})
    assert loaded.chat_template == CHATML
    assert loaded.encode("hello") == [1, *tok.encode("hello")]
    assert loaded.encode("hello", add_special_tokens=False) == tok.encode("hello")
    assert loaded.all_special_ids == frozenset({0, 1, 2})
    assert loaded.decode(loaded.encode("<think>hello world")) == "<think>hello world"


def test_from_dir_template_sources(tmp_path, tok):
    listed = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    root = write_dir(tmp_path, tok, {"chat_template": listed})
    assert Tokenizer.from_dir(root).chat_template == "D"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_dir(tmp_path).chat_template == "J"


def test_from_dir_eos_falls_back_to_generation_config(tmp_path, tok):
    root = write_dir(tmp_path, tok, {}, generation_config__json={"eos_token_id": 0})
    loaded = Tokenizer.from_dir(root)
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.chat_template) == (0, None, None)
    assert loaded.encode("he") == tok.encode("he")


def test_from_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_backend_cache_is_written_then_read(tmp_path, monkeypatch):
    import ember.tokenizer as tokenizer_module

    cache = tmp_path / "tok" / "backend.json"
    meta = make_metadata()
    built = Tokenizer.from_gguf_metadata(meta, backend_cache=cache)
    assert cache.is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(tokenizer_module, "_build_byte_level_bpe", no_build)
    cached = Tokenizer.from_gguf_metadata(meta, backend_cache=cache)
    for text in ("hello world", "he said <|im_end|>"):
        assert cached.encode(text) == built.encode(text)
    cache.write_text("{not json")
    monkeypatch.undo()
    again = Tokenizer.from_gguf_metadata(meta, backend_cache=cache)  # rebuilt, not an error
    assert again.encode("hello world") == built.encode("hello world")
    assert cache.read_text().startswith("{") and len(cache.read_text()) > 100  # rewritten
