"""Tool-call grammar, parsing and stream splitting; grammar masks on SmolLM2's vocabulary
(tokenizer only, no model)."""

from __future__ import annotations

import json

import pytest
import torch

from ember.sampling.constrained import StructuredOutputManager, unpack_bitmask
from ember.server.errors import APIError
from ember.server.serving.tools import (ToolStreamParser, parse_tool_calls, plan_tools,
                                        prepare_messages)
from ember.server.structured_protocol import NamedToolChoice, ToolDefinition
from ember.types import SamplingBatchRow, SamplingParams, StructuredOutputsParams

TOOL = ToolDefinition.model_validate({"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}})
OTHER = ToolDefinition.model_validate({"type": "function", "function": {"name": "noop"}})


@pytest.fixture(scope="module")
def tokenizer():
    from ember.loading.gguf import read_gguf
    from ember.tokenizer import Tokenizer
    from tests.conftest import smollm2_gguf

    return Tokenizer.from_gguf_metadata(read_gguf(smollm2_gguf()).metadata)


def _row(rid: str, spec: StructuredOutputsParams | None, out: list[int],
         bias: dict[int, float] | None = None) -> SamplingBatchRow:
    return SamplingBatchRow(rid, SamplingParams(structured_outputs=spec, logit_bias=bias),
                            [1], out, eos_token_id=2)


def _allowed(manager, rows, vocab) -> list[set[int]]:
    logits = manager.apply(torch.zeros(len(rows), vocab), rows)
    return [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in logits]


def test_choice_mask_eos_only_when_complete_and_bias(tokenizer) -> None:
    manager = StructuredOutputManager(tokenizer)
    spec = StructuredOutputsParams(choice=["yes", "no"])
    v = tokenizer.vocab_size
    yes = tokenizer.encode("yes", add_special_tokens=False)
    assert len(yes) == 1
    first = _allowed(manager, [_row("a", spec, []), _row("b", None, [], {5: 3.0})], v)
    assert yes[0] in first[0] and tokenizer.eos_token_id not in first[0]
    assert all(tokenizer.decode([t]) and ("yes".startswith(tokenizer.decode([t])) or
                                          "no".startswith(tokenizer.decode([t])))
               for t in first[0])
    assert len(first[1]) == v  # unconstrained row untouched
    logits = manager.apply(torch.zeros(1, v), [_row("b", None, [], {5: 3.0})])
    assert logits[0, 5] == 3.0 and logits[0, 6] == 0.0
    # after "yes" only EOS remains; a sibling sequence ("c", n > 1) keeps its own state
    done = _allowed(manager, [_row("a", spec, yes), _row("c", spec, [])], v)
    assert done[0] == {tokenizer.eos_token_id} and yes[0] in done[1]
    manager.release(["a", "c"])


def test_unpack_bitmask_matches_bits() -> None:
    masks = torch.tensor([[0b1011, -2**31]], dtype=torch.int32)
    allowed = unpack_bitmask(masks, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 1, 3, 63]


def test_plan_tools_modes_and_errors() -> None:
    assert plan_tools(None, None, None).mode == "none"
    assert plan_tools([TOOL], None, None).mode == "auto"
    named = plan_tools([TOOL, OTHER], NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "noop"}}), False)
    assert named.mode == "named" and not named.parallel
    grammar = named.constraint().grammar
    assert 'noop' in grammar and "get_weather" not in grammar and "TEXT" not in grammar
    assert "TEXT" in plan_tools([TOOL], "auto", True).constraint().grammar
    with pytest.raises(APIError, match="needs tools"):
        plan_tools(None, "required", None)
    with pytest.raises(APIError, match="not in tools"):
        plan_tools([TOOL], NamedToolChoice.model_validate(
            {"type": "function", "function": {"name": "x"}}), None)


def test_parse_and_stream_reassemble() -> None:
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "noop", "arguments": {}}</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("noop", {})]
    assert parse_tool_calls("Hello there") is None
    parser = ToolStreamParser()
    got: dict[int, dict[str, str]] = {}
    for i in range(0, len(text), 3):
        content, deltas = parser.feed(text[i:i + 3])
        assert content == ""
        for d in deltas:
            entry = got.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
    assert [(e["name"], json.loads(e["arguments"])) for e in got.values()] == [
        ("get_weather", {"city": "Paris"}), ("noop", {})]
    text_parser = ToolStreamParser()
    assert text_parser.feed("Hi") == ("Hi", []) and text_parser.feed(" <b>") == (" <b>", [])


def test_fallback_rendering_of_tools_and_results() -> None:
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out, extra = prepare_messages(messages, [TOOL], native=False)
    assert extra == {} and out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>{"name": "get_weather", "arguments": '
                                 '{"city": "Paris"}}</tool_call>')
    assert out[3] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>"}
    _, extra = prepare_messages(messages, [TOOL], native=True)
    assert extra["tools"][0]["function"]["name"] == "get_weather"


def test_prefetched_masks_match_in_step_masks_and_roll_back(tokenizer) -> None:
    """Masks computed ahead on the worker thread (overlap) equal the masks computed in the
    step; a prefetched token the scheduler did not keep is rolled back."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    spec = StructuredOutputsParams(json=schema)
    ahead = StructuredOutputManager(tokenizer, overlap=True)
    inline = StructuredOutputManager(tokenizer, overlap=False)
    v = tokenizer.vocab_size
    text = tokenizer.encode('{"name": "Ann Lee", "age": 41}', add_special_tokens=False)
    out: list[int] = []
    for step, token in enumerate(text + [tokenizer.eos_token_id]):
        rows = [_row("s", spec, out)]
        got, want = _allowed(ahead, rows, v), _allowed(inline, rows, v)
        assert got == want and token in got[0], step
        if step == 3:  # the worker consumes a token the output then does not keep
            other = next(t for t in sorted(got[0]) if t != token)
            ahead.prefetch(rows, [[other]])
        else:
            ahead.prefetch(rows, [[token]])
        out = out + [token]
    assert _allowed(ahead, [_row("s", spec, out)], v) == [{tokenizer.eos_token_id}]
    assert ahead.timings.steps == len(text) + 2 and ahead.timings.prefetch > 0
    ahead.shutdown()
    inline.shutdown()


def test_drafts_cut_to_grammar_prefix_and_verify_rows_masked_per_position(tokenizer) -> None:
    """Speculative decoding with a grammar: a draft is cut before its first token the grammar
    rejects (the matcher is not advanced), and each verify row gets the mask of its own
    position (the same mask as after accepting the draft tokens before it)."""
    from ember.types import Request

    spec = StructuredOutputsParams(regex=r'\{"id": [0-9]+, "ok": (true|false)\}')
    manager, inline = StructuredOutputManager(tokenizer), StructuredOutputManager(tokenizer)
    v = tokenizer.vocab_size
    text = tokenizer.encode('{"id": 42, "ok": true}', add_special_tokens=False)
    out, draft = text[:2], text[2:6]
    bad = tokenizer.encode("zz", add_special_tokens=False)
    request = Request("r", [1], SamplingParams(structured_outputs=spec), eos_token_id=2,
                      output_token_ids=list(out))
    assert manager.truncate_draft(request, draft + bad + draft) == draft
    assert manager.truncate_draft(request, bad + draft) == []
    unconstrained = Request("u", [1], SamplingParams(), output_token_ids=[5])
    assert manager.truncate_draft(unconstrained, bad) == bad
    # verify rows: the constrained request (1 + 4 rows) then an unconstrained one (1 + 1)
    # and a constrained request without drafts (one row)
    rows = [_row("r", spec, list(out)), _row("u", None, [5], {7: 2.0}), _row("n", spec, [])]
    logits = torch.zeros(len(draft) + 4, v)
    manager.apply_verify(logits, rows, [draft, [9], []])
    assert set(torch.nonzero(logits[-1] > float("-inf")).flatten().tolist()) == \
        _allowed(inline, [_row("n2", spec, [])], v)[0]
    for k in range(len(draft) + 1):
        allowed = set(torch.nonzero(logits[k] > float("-inf")).flatten().tolist())
        assert allowed == _allowed(inline, [_row(f"i{k}", spec, out + draft[:k])], v)[0], k
        assert (draft + text[6:7])[k] in allowed
    assert torch.all(logits[-3:-1, 7] == 2.0) and torch.all(logits[-3:-1, 8] == 0.0)
    # the matcher was not advanced by either call
    assert _allowed(manager, [_row("r", spec, list(out))], v) == \
        _allowed(inline, [_row("fresh", spec, list(out))], v)
    manager.shutdown()
    inline.shutdown()


def test_jump_forward_drafts_the_forced_tokens(tokenizer) -> None:
    """Where the grammar allows one continuation, its tokens become the request's drafts
    (not for requests that are not caught up, already drafted, or unconstrained)."""
    from ember.types import Request

    spec = StructuredOutputsParams(regex=r'\{"identifier_of_the_record": [0-9]+\}')
    manager = StructuredOutputManager(tokenizer)
    fresh = Request("a", [1], SamplingParams(structured_outputs=spec), num_computed_tokens=0)
    behind = Request("b", [1, 1], SamplingParams(structured_outputs=spec), num_computed_tokens=0)
    plain = Request("c", [1], SamplingParams(), num_computed_tokens=0)
    assert manager.jump_forward([fresh, behind, plain]) == len(fresh.spec_token_ids) > 3
    assert tokenizer.decode(fresh.spec_token_ids) == '{"identifier_of_the_record": '
    assert behind.spec_token_ids == [] and plain.spec_token_ids == []
    manager.jump_forward_enabled = False
    fresh.spec_token_ids = []
    assert manager.jump_forward([fresh]) == 0 and fresh.spec_token_ids == []
    manager.shutdown()


def test_native_mask_apply_equals_numpy_on_a_schema(tokenizer) -> None:
    """The kernels' bitmask apply gives the numpy path's allowed sets token by token over a
    JSON schema on SmolLM2's vocabulary (and EOS only once the object is complete)."""
    from ember.kernels.build import missing_cpu_features
    from ember.kernels.ops import CpuKernels

    if missing_cpu_features():
        pytest.skip(f"CPU lacks {missing_cpu_features()}")
    kernels = CpuKernels.load(None, num_threads=2)
    assert kernels is not None, "the kernels failed to compile"
    spec = StructuredOutputsParams(json={"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer"}}, "required": ["ok", "n"],
        "additionalProperties": False})
    native = StructuredOutputManager(tokenizer, overlap=False, kernels=kernels)
    plain = StructuredOutputManager(tokenizer, overlap=False)
    v = tokenizer.vocab_size
    text = tokenizer.encode('{"ok": true, "n": 7}', add_special_tokens=False)
    out: list[int] = []
    for token in text:
        rows = [_row("u", None, [], {3: 1.0}), _row("s", spec, out)]
        got, want = _allowed(native, rows, v), _allowed(plain, rows, v)
        assert got == want and token in got[1] and len(got[0]) == v
        out = out + [token]
    assert _allowed(native, [_row("s", spec, out)], v) == [{tokenizer.eos_token_id}]
    native.shutdown()
    plain.shutdown()


def test_overlap_with_a_spare_core_or_a_large_batch(tokenizer, monkeypatch) -> None:
    """The mask worker thread runs when a core is free of kernel threads, or for a large batch."""
    import os

    from ember.sampling import constrained

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not constrained.overlap_pays(None)
    busy = StructuredOutputManager(tokenizer)
    assert not busy.overlaps(1) and not busy.overlaps(constrained.OVERLAP_MIN_ROWS - 1)
    assert busy.overlaps(constrained.OVERLAP_MIN_ROWS)  # a large batch overlaps anyway
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert constrained.overlap_pays(None) and StructuredOutputManager(tokenizer).overlaps(1)
    assert not StructuredOutputManager(tokenizer, overlap=False).overlaps(64)
