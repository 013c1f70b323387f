"""Constrained decoding on the real SmolLM2: every output is valid against its schema, greedy
and sampled, batched, with n > 1, logprobs and a tight KV cache (preemption)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ember.types import InvalidRequestError, SamplingParams, StructuredOutputsParams

SCHEMAS: dict[str, dict] = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                 "minItems": 2, "maxItems": 4}},
        "required": ["tags"], "additionalProperties": False},
    "enum_bounds": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["color", "score", "ratio"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30},
        "year": {"type": "integer", "minimum": 1700, "maximum": 2030},
        "done": {"type": "boolean"}},
        "required": ["title"], "additionalProperties": False},
    "defs": {"$defs": {"person": {"type": "object", "properties": {
        "first": {"type": "string", "maxLength": 15},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["first", "age"], "additionalProperties": False}},
        "type": "object", "properties": {
            "author": {"$ref": "#/$defs/person"},
            "editors": {"type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 2}},
        "required": ["author", "editors"], "additionalProperties": False},
    "top_array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                  "minItems": 1, "maxItems": 5},
}
PROMPT = "Answer with JSON only. {}"


def _chat(llm, messages_list, params):
    return llm.chat(messages_list, params)


def test_schema_valid_greedy_and_sampled_batched(llm) -> None:
    names = list(SCHEMAS)
    messages = [[{"role": "user", "content": PROMPT.format(f"Give me an example {name}.")}]
                for name in names]
    params = []
    for name in names:
        spec = StructuredOutputsParams(json=SCHEMAS[name])
        params.append(SamplingParams(temperature=0, max_tokens=100, structured_outputs=spec))
    for name in names:
        spec = StructuredOutputsParams(json=SCHEMAS[name])
        params.append(SamplingParams(temperature=1.0, top_p=0.95, n=1 if name != "array" else 2,
                                     seed=7, max_tokens=100, structured_outputs=spec,
                                     logprobs=1))
    outs = llm.chat(messages + messages, params)
    checked = 0
    for out, name in zip(outs, names + names):
        for completion in out.outputs:
            assert completion.finish_reason == "stop", (name, completion.text)
            value = json.loads(completion.text)
            jsonschema.validate(value, SCHEMAS[name])
            checked += 1
            if completion.logprobs is not None:  # logprobs are of the masked distribution
                assert all(lp.rank == 1 or lp.logprob > float("-inf")
                           for lp in completion.logprobs)
    assert checked == 2 * len(names) + 1


def test_regex_choice_grammar_and_logit_bias(llm) -> None:
    outs = llm.generate(
        ["The date today is", "Is the sky blue?", "Say hello:", "Say hello:"],
        [SamplingParams(temperature=0, max_tokens=20,
                        structured_outputs=StructuredOutputsParams(regex=r"\d{4}-\d{2}-\d{2}")),
         SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=8,
                        structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
         SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(
             grammar='start: "hi" (" " NAME)?\nNAME: /[a-z]{1,8}/\n')),
         SamplingParams(temperature=0, max_tokens=4)])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", outs[0].outputs[0].text)
    assert {c.text for c in outs[1].outputs} <= {"yes", "no"}
    assert re.fullmatch(r"hi( [a-z]{1,8})?", outs[2].outputs[0].text)
    # logit_bias: ban the greedy first token, then force another one.
    first = outs[3].outputs[0].token_ids[0]
    banned = llm.generate(["Say hello:"], SamplingParams(temperature=0, max_tokens=1,
                                                        logit_bias={first: -100}))
    assert banned[0].outputs[0].token_ids[0] != first
    forced = llm.generate(["Say hello:"], SamplingParams(temperature=0, max_tokens=1,
                                                        logit_bias={1234: 100}))
    assert forced[0].outputs[0].token_ids == [1234]


def test_max_tokens_and_stop_strings_with_grammar(llm) -> None:
    spec = StructuredOutputsParams(json=SCHEMAS["nested"])
    out = llm.chat([{"role": "user", "content": PROMPT.format("a person")}],
                   SamplingParams(temperature=0, max_tokens=3, structured_outputs=spec))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    assert out.outputs[0].text.startswith("{")
    out = llm.chat([{"role": "user", "content": PROMPT.format("a person")}],
                   SamplingParams(temperature=0, max_tokens=60, structured_outputs=spec,
                                  stop=['"address"']))[0]
    assert out.outputs[0].finish_reason == "stop" and '"address"' not in out.outputs[0].text


def test_unsupported_schema_feature_is_named(llm) -> None:
    with pytest.raises(InvalidRequestError, match="uniqueItems"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(
            json={"type": "array", "uniqueItems": True})))
    with pytest.raises(InvalidRequestError, match="regex"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(
            regex="(ab")))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])


def test_preemption_keeps_grammar_state(make_llm) -> None:
    """A KV cache too small for the batch preempts and recomputes; outputs stay valid."""
    tight = make_llm(block_size=4, num_blocks=24, enable_prefix_caching=False)  # shared
    before = tight.engine.core.scheduler.num_preemptions
    spec = StructuredOutputsParams(json=SCHEMAS["top_array"])
    # NOTE: ~11 blocks each (long prompt, short output): two running requests outgrow the 23
    # usable blocks, so one is preempted and recomputed mid-output.
    prompts = [f"Here is a list of small whole numbers between minus five and five, written "
               f"as a JSON array, for item number {i}:" for i in range(3)]
    outs = tight.generate(prompts, SamplingParams(temperature=0.7, seed=1, max_tokens=30,
                                                  structured_outputs=spec))
    assert tight.engine.core.scheduler.num_preemptions > before
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS["top_array"])


def test_compiling_grammar_does_not_block_the_batch(llm, monkeypatch) -> None:
    """A request whose grammar is still compiling waits outside the batch; others decode."""
    import threading

    compiler = llm.engine.core.structured.compiler
    release = threading.Event()
    real_compile = compiler._compile

    def slow_compile(text: str):
        release.wait(timeout=60)
        return real_compile(text)

    monkeypatch.setattr(compiler, "_compile", slow_compile)
    engine = llm.engine
    spec = StructuredOutputsParams(regex=r"slow-[0-9]{2}")
    engine.add_request("slow", "Code:", SamplingParams(temperature=0, max_tokens=8,
                                                       structured_outputs=spec))
    engine.add_request("fast", "Hello", SamplingParams(temperature=0, max_tokens=4))
    finished: dict[str, object] = {}
    while "fast" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "slow" not in finished and [r.request_id for r in engine.core._compiling] == ["slow"]
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert re.fullmatch(r"slow-[0-9]{2}", finished["slow"].outputs[0].text)


def test_speculative_greedy_identical_with_grammar(make_llm) -> None:
    """n-gram drafts of constrained requests are cut to their grammar-valid prefix and
    verified with per-position masks: greedy tokens equal those without speculation."""
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["name", "city", "tags"], "additionalProperties": False}
    record = '{"name": "Elizabeth Bennet", "city": "Longbourn", "tags": ["sister", "reader"]}'
    prompts = [f"Copy this JSON exactly: {record}\nCopy: ",
               f"Here is a record: {record}. Write it again as JSON: "]
    spec_cfg = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2, "disable_by_batch_size": 16,
                "adaptive": False}  # drafted whatever the batch's measured row cost
    params = SamplingParams(temperature=0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(json=schema))
    ref = make_llm(quantization="auto")
    from ember import LLM

    spec = LLM(quantization="auto", show_progress=False, speculative_config=spec_cfg)
    stats = spec.engine.core.spec.stats
    before = stats.num_accepted_tokens
    want = [o.outputs[0] for o in ref.generate(prompts, params)]
    got = [o.outputs[0] for o in spec.generate(prompts, params)]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert stats.num_accepted_tokens > before  # constrained requests were drafted
    for out in got:
        jsonschema.validate(json.loads(out.text), schema)


def test_jump_forward_greedy_identical_and_fewer_steps(make_llm) -> None:
    """Grammar-forced runs (long fixed keys) are drafted and verified in one step: greedy
    tokens equal token-by-token decoding, with fewer engine steps."""
    schema = {"type": "object", "properties": {
        "customer_full_legal_name": {"type": "string", "maxLength": 20},
        "customer_primary_shipping_address": {"type": "string", "maxLength": 20},
        "customer_is_subscribed_to_newsletter": {"type": "boolean"}},
        "required": ["customer_full_legal_name", "customer_primary_shipping_address",
                     "customer_is_subscribed_to_newsletter"], "additionalProperties": False}
    llm = make_llm(quantization="auto")
    manager = llm.engine.core.structured
    params = SamplingParams(temperature=0, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=schema))
    prompts = ["A customer record as JSON: ", "Describe a shop customer in JSON: "]

    def run(jump: bool) -> tuple[list[list[int]], int, int]:
        manager.jump_forward_enabled = jump
        manager.timings.reset()
        try:
            outs = llm.generate(prompts, params)
        finally:
            manager.jump_forward_enabled = True
        for out in outs:
            jsonschema.validate(json.loads(out.outputs[0].text), schema)
        return ([o.outputs[0].token_ids for o in outs], manager.timings.steps,
                manager.timings.forced_tokens)

    plain, plain_steps, _ = run(False)
    jumped, jumped_steps, forced = run(True)
    assert jumped == plain
    assert forced > 20 and jumped_steps < plain_steps
