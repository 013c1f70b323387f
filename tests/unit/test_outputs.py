"""Unit tests for ember.engine.outputs: incremental detokenization, stop strings, merging the n
completions of a request. Uses a tiny byte-level BPE trained here (no model, no downloads)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ember.engine.outputs import IncrementalDetokenizer, OutputProcessor, ProcessedOutputs
from ember.types import (EngineCoreOutput, RequestOutput, RequestStatus, SamplingParams,
                         TokenLogprobs)

CORPUS = [
    "The café in Tokyo serves coffee and tea.",
    "日本 is Japan in Japanese, and 日本語 is the language.",
    "Hello world, hello there! Hello again.",
    "I like naïve résumé writing 🙂 a lot.",
    "Stop here. STOP! The end is near, the end.",
] * 3


class HFTokenizerAdapter:
    """Minimal stand-in for ember.tokenizer.Tokenizer around a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.eos_token_id: int = tokenizer.token_to_id("<eos>")
        self.pad_token_id: int = tokenizer.token_to_id("<pad>")
        self.all_special_ids = frozenset({self.eos_token_id, self.pad_token_id})
        self.decode_lengths: list[int] = []

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return self._tok.encode(text, add_special_tokens=False).offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(ids))
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok() -> HFTokenizerAdapter:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    adapter = HFTokenizerAdapter(bpe)
    assert len(adapter.encode("🙂")) >= 3  # the emoji really is split into byte tokens
    return adapter


def core_out(request_id: str, token_ids: list[int], status: RequestStatus | None = None,
             stop_reason: int | str | None = None, **kwargs: object) -> EngineCoreOutput:
    return EngineCoreOutput(request_id=request_id, new_token_ids=token_ids, finish_status=status,
                            stop_reason=stop_reason, **kwargs)  # type: ignore[arg-type]


def stream(processor: OutputProcessor, child_id: str, token_ids: list[int], chunk: int = 1,
           final: RequestStatus = RequestStatus.FINISHED_LENGTH,
           stop_reason: int | str | None = None) -> tuple[list[RequestOutput], list[str]]:
    """Feed `token_ids` `chunk` at a time, finishing with `final` on the last chunk; stops
    feeding once the request reports a stop string. Returns outputs and stop-string hits."""
    results: list[RequestOutput] = []
    hits: list[str] = []
    for start in range(0, len(token_ids), chunk):
        piece = token_ids[start:start + chunk]
        last = start + chunk >= len(token_ids)
        processed = processor.process([core_out(child_id, piece, final if last else None,
                                                stop_reason if last else None)])
        results.extend(processed.request_outputs)
        hits.extend(processed.stop_string_hits)
        if processed.stop_string_hits:
            break
    return results, hits


def tokens_covering(tok: HFTokenizerAdapter, text: str, sub: str) -> int:
    """How many tokens of `text` overlap the first occurrence of `sub`."""
    begin = text.index(sub)
    end = begin + len(sub)
    return sum(1 for a, b in tok.offsets(text) if a < end and b > begin)


def check_deltas(outputs: list[RequestOutput], index: int = 0) -> str:
    """Every delta is free of U+FFFD and the cumulative text is always the sum of the deltas."""
    shown = ""
    for out in outputs:
        completion = out.outputs[index]
        assert "\ufffd" not in completion.delta_text
        shown += completion.delta_text
        assert completion.text == shown
    return shown


# ---------------------------------------------------------------------------------------------
# Stop strings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["STOP!", "end is", "🙂 a", "日本語"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok: HFTokenizerAdapter, stop: str, include: bool) -> None:
    text = "Hello there, 日本 and 🙂 a café. STOP! The end is near 日本語 is 🙂 a"
    assert tokens_covering(tok, text, stop) >= 2
    ids = tok.encode(text)
    processor = OutputProcessor(tok)
    params = SamplingParams(stop=["never-matches", stop], include_stop_str_in_output=include)
    processor.add_request("r", None, tok.encode("Prompt:"), params, ["r"])
    outputs, hits = stream(processor, "r", ids)
    cut = text.index(stop) + (len(stop) if include else 0)
    expected = text[:cut]
    for out in outputs:  # never showed anything beyond the final text
        assert expected.startswith(out.outputs[0].text)
    assert check_deltas(outputs) == expected
    final = outputs[-1]
    assert hits == ["r"]
    assert final.finished and final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].stop_reason == stop
    assert not processor.has_request("r")
    # Token ids end with the token that completed the stop string.
    consumed = final.outputs[0].token_ids
    assert consumed == ids[:len(consumed)]
    assert stop in tok.decode(consumed) and stop not in tok.decode(consumed[:-1])


def test_stop_string_hit_ignores_later_outputs(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    processor.add_request("p", "prompt", [1, 2], SamplingParams(stop=["end"], n=2),
                          ["p#0", "p#1"])
    ids = tok.encode("the end is near")
    out = processor.process([core_out("p#0", ids[:5]), core_out("p#1", ids[:1])])
    assert out.stop_string_hits == ["p#0"]
    first = out.request_outputs[0]
    assert first.outputs[0].finish_reason == "stop" and first.outputs[0].text == "the "
    assert not first.finished
    # The engine finishes p#0 later; anything still arriving for it is ignored.
    later = processor.process([core_out("p#0", ids[5:], RequestStatus.FINISHED_STOPPED, "end")])
    assert later.request_outputs == [] and later.stop_string_hits == []
    final = processor.process([core_out("p#1", ids[1:], RequestStatus.FINISHED_LENGTH)])
    assert final.stop_string_hits == ["p#1"]
    assert final.request_outputs[0].finished


def test_stop_string_in_prompt_is_not_matched(tok: HFTokenizerAdapter) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("say ST"), SamplingParams(stop=["STOP"]))
    assert detok.update(tok.encode("OP now"), is_stop_token=False) is None


def test_stop_strings_wait_for_min_tokens(tok: HFTokenizerAdapter) -> None:
    ids = tok.encode("a, b, c, d")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=[","], min_tokens=3))
    hit = None
    for i in range(len(ids)):
        hit = detok.update(ids[i:i + 1], is_stop_token=False)
        if hit:
            break
    assert hit == ","
    assert len(detok.token_ids) >= 3
    assert detok.get_delta_text(finished=True) == "a, b"


def test_text_without_stop_strings_is_not_held_back(tok: HFTokenizerAdapter) -> None:
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for tid in tok.encode("Hello world"):
        detok.update([tid], is_stop_token=False)
        assert detok.get_delta_text() == tok.decode([tid])


def test_held_back_text_released_on_length_finish(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [], SamplingParams(stop=["STOP!"]), ["r"])
    outputs, hits = stream(processor, "r", tok.encode("the end ST"))
    assert hits == []
    assert check_deltas(outputs) == "the end ST"
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Multi-byte characters, special tokens, EOS
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_multibyte_characters_never_emitted_half(tok: HFTokenizerAdapter, chunk: int) -> None:
    text = "café 🙂 日本 naïve 🙂🙂 résumé 日本語!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens are partial chars
    processor = OutputProcessor(tok)
    processor.add_request("r", None, tok.encode("Q: 🙂"), SamplingParams(max_tokens=None),
                          ["r"])
    outputs, _ = stream(processor, "r", ids, chunk=chunk)
    shown = check_deltas(outputs)
    assert shown == text == tok.decode(ids)
    assert outputs[-1].outputs[0].token_ids == ids


def test_length_finish_mid_character_matches_full_decode(tok: HFTokenizerAdapter) -> None:
    ids = tok.encode("ok 🙂")[:-1]  # ends inside the emoji
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [], SamplingParams(), ["r"])
    outputs, _ = stream(processor, "r", ids)
    assert "".join(o.outputs[0].delta_text for o in outputs) == tok.decode(ids)
    assert all("\ufffd" not in o.outputs[0].delta_text for o in outputs[:-1])


@pytest.mark.parametrize("skip_special", [True, False])
def test_eos_text_is_not_included(tok: HFTokenizerAdapter, skip_special: bool) -> None:
    ids = tok.encode("Hello world")
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [], SamplingParams(skip_special_tokens=skip_special), ["r"])
    outputs, _ = stream(processor, "r", ids + [tok.eos_token_id],
                        final=RequestStatus.FINISHED_STOPPED, stop_reason=None)
    final = outputs[-1].outputs[0]
    assert check_deltas(outputs) == final.text == "Hello world"
    assert final.token_ids == ids + [tok.eos_token_id]
    assert final.finish_reason == "stop" and final.stop_reason is None


def test_stop_token_id_text_is_not_included(tok: HFTokenizerAdapter) -> None:
    ids = tok.encode("Hello world!")
    bang = ids[-1]
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [], SamplingParams(stop_token_ids=[bang]), ["r"])
    outputs, _ = stream(processor, "r", ids, chunk=2, final=RequestStatus.FINISHED_STOPPED,
                        stop_reason=bang)
    final = outputs[-1].outputs[0]
    assert final.text == "Hello world" and final.stop_reason == bang
    assert final.token_ids == ids


@pytest.mark.parametrize("skip_special", [True, False])
def test_skip_special_tokens(tok: HFTokenizerAdapter, skip_special: bool) -> None:
    ids = tok.encode("Hi") + [tok.pad_token_id] + tok.encode(" there 🙂")
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [tok.pad_token_id],
                          SamplingParams(skip_special_tokens=skip_special), ["r"])
    outputs, _ = stream(processor, "r", ids)
    shown = check_deltas(outputs)
    assert shown == tok.decode(ids, skip_special_tokens=skip_special)
    assert ("<pad>" in shown) is (not skip_special)


def test_decoding_window_is_bounded(tok: HFTokenizerAdapter) -> None:
    ids = tok.encode("Hello world, 🙂 日本 café. " * 30)
    detok = IncrementalDetokenizer(tok, tok.encode("A long prompt " * 20),
                                   SamplingParams(stop=["xyz"]))
    tok.decode_lengths.clear()
    for tid in ids:
        detok.update([tid], is_stop_token=False)
    assert len(tok.decode_lengths) <= 2 * len(ids)
    assert max(tok.decode_lengths) <= 12  # a window, never the whole output
    detok.get_delta_text(finished=True)
    assert detok.output_text == tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# OutputProcessor: n children, logprobs, abort
# ---------------------------------------------------------------------------------------------


def test_two_children_merge_and_finish_together(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    prompt_ids = tok.encode("Hello")
    processor.add_request("req", "Hello", prompt_ids, SamplingParams(n=2), ["req#0", "req#1"])
    a, b = tok.encode(" world 🙂"), tok.encode(" there")
    texts = ["", ""]
    step = 0
    finished_at = None
    while step < max(len(a), len(b)):
        batch = []
        for child, ids in (("req#0", a), ("req#1", b)):
            if step < len(ids):
                status = RequestStatus.FINISHED_LENGTH if step == len(ids) - 1 else None
                batch.append(core_out(child, [ids[step]], status))
        processed = processor.process(batch)
        assert len(processed.request_outputs) == 1
        out = processed.request_outputs[0]
        assert out.request_id == "req" and out.prompt == "Hello"
        assert out.prompt_token_ids == prompt_ids
        assert [c.index for c in out.outputs] == [0, 1]
        for c in out.outputs:
            texts[c.index] += c.delta_text
            assert c.text == texts[c.index]
        if out.finished:
            finished_at = step
        step += 1
    assert finished_at == max(len(a), len(b)) - 1
    assert texts == [" world 🙂", " there"]
    assert not processor.has_request("req")
    # Child 1 finished first: later outputs show it unchanged with empty deltas.
    assert len(b) < len(a)


def test_finished_child_has_empty_deltas_afterwards(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    processor.add_request("q", None, [], SamplingParams(n=2), ["q0", "q1"])
    processor.process([core_out("q0", tok.encode("a")), core_out("q1", tok.encode("b"),
                                                                 RequestStatus.FINISHED_LENGTH)])
    out = processor.process([core_out("q0", tok.encode("c"))]).request_outputs[0]
    assert not out.finished
    assert out.outputs[1].finish_reason == "length" and out.outputs[1].text == "b"
    assert out.outputs[1].delta_text == "" and out.outputs[1].delta_token_ids == []
    assert out.outputs[0].delta_text == "c" and out.outputs[0].text == "ac"


def test_logprobs_prompt_logprobs_and_cached_tokens(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    params = SamplingParams(n=2, logprobs=1, prompt_logprobs=0)
    processor.add_request("r", None, [5, 6, 7], params, ["c0", "c1"])

    def lp(token: int) -> TokenLogprobs:
        return TokenLogprobs(token_id=token, logprob=-0.5, rank=1, top=[(token, -0.5)])

    prompt_lps: list[TokenLogprobs | None] = [None, lp(6)]
    first = processor.process([
        core_out("c0", [10], new_logprobs=[lp(10)], new_prompt_logprobs=prompt_lps,
                 num_cached_tokens=2),
        core_out("c1", [11], new_logprobs=[lp(11)], new_prompt_logprobs=[None, lp(99)]),
    ]).request_outputs[0]
    assert first.prompt_logprobs == prompt_lps and first.num_cached_tokens == 2
    second = processor.process([
        core_out("c0", [12], new_logprobs=[lp(12)], new_prompt_logprobs=[lp(7)]),
        core_out("c1", [13], RequestStatus.FINISHED_LENGTH, new_logprobs=[lp(13)]),
    ]).request_outputs[0]
    assert second.prompt_logprobs == prompt_lps + [lp(7)]
    assert second.num_cached_tokens == 2
    c0, c1 = second.outputs
    assert c0.logprobs == [lp(10), lp(12)] and c0.delta_logprobs == [lp(12)]
    assert c1.logprobs == [lp(11), lp(13)] and c1.delta_token_ids == [13]


def test_no_logprobs_requested_gives_none(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [1], SamplingParams(), ["r"])
    out = processor.process([core_out("r", [40])]).request_outputs[0]
    assert out.outputs[0].logprobs is None and out.outputs[0].delta_logprobs is None
    assert out.prompt_logprobs is None


def test_abort(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [], SamplingParams(n=2, stop=["zzz"]), ["r0", "r1"])
    processor.process([core_out("r0", tok.encode("Hello")),
                       core_out("r1", tok.encode("end"), RequestStatus.FINISHED_LENGTH)])
    final = processor.abort("r")
    assert final is not None and final.finished
    assert [c.finish_reason for c in final.outputs] == ["abort", "length"]
    assert final.outputs[0].text == "Hello"
    assert not processor.has_request("r")
    assert processor.abort("r") is None
    assert processor.process([core_out("r0", [5])]) == ProcessedOutputs()


def test_duplicate_request_rejected(tok: HFTokenizerAdapter) -> None:
    processor = OutputProcessor(tok)
    processor.add_request("r", None, [], SamplingParams(), ["r"])
    with pytest.raises(ValueError):
        processor.add_request("r", None, [], SamplingParams(), ["x"])
