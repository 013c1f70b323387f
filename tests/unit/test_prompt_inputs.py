"""vLLM's prompt forms in `LLM.generate`: text, token ids, {"prompt"}, {"prompt_token_ids"}
and lists of these (mixed); anything else is refused with a message listing the forms."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from ember.engine.inputs import ACCEPTED_FORMS, parse_prompts
from ember.types import InvalidRequestError
from tiny_llama import one_thread, save_tiny  # noqa: F401 (fixture)

TEXT = "Hello there"
IDS = [72, 101, 108]
GREEDY = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> LLM:
    path = save_tiny(tmp_path_factory.mktemp("m"))
    return LLM(str(path), show_progress=False, kv_cache_mb=4, cpu_kernels=False)


def test_parse_prompts_accepts_every_form():
    assert parse_prompts(TEXT) == [TEXT]
    assert parse_prompts(IDS) == [IDS]
    assert parse_prompts(tuple(IDS)) == [IDS]
    assert parse_prompts({"prompt": TEXT}) == [TEXT]
    assert parse_prompts({"prompt_token_ids": IDS}) == [IDS]
    assert parse_prompts([[1, 2], [3]]) == [[1, 2], [3]]  # a batch of id lists
    assert parse_prompts([TEXT, IDS, {"prompt": "x"}, {"prompt_token_ids": [4]}]) == \
        [TEXT, IDS, "x", [4]]
    assert parse_prompts([]) == []


@pytest.mark.parametrize("bad, where", [
    ({"text": "hi"}, "keys ['text']"),
    ({"prompt": "hi", "prompt_token_ids": [1]}, "keys ['prompt', 'prompt_token_ids']"),
    ({"prompt": 3}, "keys ['prompt']"),
    ({"prompt_token_ids": [1.0, 2.0]}, "prompt_token_ids"),
    ([1.5, 2.5], "prompts[0]"),
    ([1, 2.5], "float 2.5"),
    ([True, False], "bool True"),
    (None, "NoneType None"),
    (3, "int 3"),
    ([TEXT, None], "prompts[1]"),
    ([[1, 2], [3, "x"]], "prompts[1]"),
    ([{"prompt": "a"}, {"prompt_ids": [1]}], "prompts[1]"),
])
def test_parse_prompts_refuses_other_forms_naming_the_accepted_ones(bad, where):
    with pytest.raises(InvalidRequestError) as info:
        parse_prompts(bad)
    assert ACCEPTED_FORMS in str(info.value) and where in str(info.value)
    assert info.value.param == "prompt"


def test_every_prompt_form_gives_the_same_tokens(tiny_llm):
    ids = tiny_llm.get_tokenizer().encode(TEXT)
    forms = [TEXT, {"prompt": TEXT}, ids, {"prompt_token_ids": ids}]
    alone = [tiny_llm.generate(form, GREEDY, use_tqdm=False) for form in forms]
    assert all(len(outs) == 1 for outs in alone)
    batched = tiny_llm.generate(forms, GREEDY, use_tqdm=False)
    for out in [outs[0] for outs in alone] + batched:
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == batched[0].outputs[0].token_ids
    assert [o.prompt for o in batched] == [TEXT, TEXT, None, None]
    streamed = list(tiny_llm.stream({"prompt_token_ids": ids}, GREEDY))
    assert streamed[-1].outputs[0].token_ids == batched[0].outputs[0].token_ids


def test_generate_refuses_bad_forms_and_keeps_the_range_message(tiny_llm):
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        tiny_llm.generate([{"prompt_ids": [1, 2]}], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="float"):
        tiny_llm.generate([[1.0, 2.0]], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"integers in \[0, 257\)"):
        tiny_llm.generate([{"prompt_token_ids": [1, 257]}], GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"integers in \[0, 257\)"):
        tiny_llm.generate([-1, 2], GREEDY, use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()  # nothing left queued
