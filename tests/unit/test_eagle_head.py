"""The `eagle` proposer's parts on a tiny random Llama: the head file (round trip, one-line
errors), the inference math against the training module, the hidden row the runner hands
over (the one that sampled the last token, after verification), and the trainer."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from ember import SamplingParams
from ember.compress import dense
from ember.compress.draft_head import (HeadModule, HeadSettings, Sequence, head_vocab,
                                       split_held_out, train_head)
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpecConfig
from ember.engine.engine import LLMEngine
from ember.spec_decode.eagle import DraftHead, DraftHeadError, EagleProposer, HeadWeights
from tiny_llama import run_to_completion, tiny_loaded


def _random_head(hidden: int = 64, ffn: int = 32, vocab: int = 40, seed: int = 0
                 ) -> tuple[HeadModule, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.arange(3, 3 + 2 * vocab, 2)  # a sparse subset of the 257-token vocabulary
    module = HeadModule(hidden, ffn, torch.randn(vocab, hidden))
    with torch.no_grad():
        module.norm.mul_(1 + 0.1 * torch.randn(hidden))
    return module, ids


def test_head_file_round_trip_and_one_line_errors(tmp_path):
    module, ids = _random_head()
    path = tmp_path / "head.safetensors"
    module.weights(ids, 257).save(path, {"note": "test"})
    loaded = HeadWeights.load(path, 64, 257)
    for name, tensor in module.weights(ids, 257).tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    cases = [(tmp_path / "missing.safetensors", 64, 257, "no such draft-head file"),
             (path, 64, 300, "vocabulary of 257 tokens, the target has 300"),
             (path, 32, 257, "fc.weight has shape (64, 128), expected (32, 64)")]
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), {"format": "something-else"})
    cases.append((other, 64, 257, "not an Ember draft head"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    cases.append((garbage, 64, 257, "not a safetensors draft head"))
    for p, hidden, vocab, needle in cases:
        with pytest.raises(DraftHeadError, match=re.escape(needle)) as err:
            HeadWeights.load(p, hidden, vocab)
        assert "\n" not in str(err.value) and str(p) in str(err.value)


def _embed(hidden: int = 64):
    """A random 257-token input embedding table, as `Embed` (token ids -> rows)."""
    table = torch.randn(257, hidden, generator=torch.Generator().manual_seed(7))
    return lambda ids: table[ids]


def test_inference_head_equals_the_training_module():
    module, ids = _random_head()
    head = DraftHead(module.weights(ids, 257), _embed())
    h, e = torch.randn(5, 64), torch.randn(5, 64)
    f, tokens = head(h, e)
    with torch.no_grad():
        ref = module(h, e)
    torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ids[(ref @ module.out.T).argmax(-1)])


def test_inference_head_on_the_q8_kernels_drafts_as_dense(load_kernels):
    from ember.engine.draft_model import KernelHeadStep

    kernels = load_kernels()
    module, ids = _random_head(hidden=64, ffn=64, vocab=48)
    weights = module.weights(ids, 257)
    dense_head = DraftHead(weights, _embed())
    q8_head = DraftHead(weights, _embed(), KernelHeadStep(weights, kernels))
    h, e = torch.randn(64, 64), torch.randn(64, 64)
    f_ref, t_ref = dense_head(h, e)
    f, t = q8_head(h, e)
    assert float((f - f_ref).norm() / f_ref.norm()) < 0.02
    assert float((t == t_ref).float().mean()) > 0.9


@pytest.mark.parametrize("rows", [1, 3])
def test_fused_kernel_step_equals_the_same_kernels_called_one_by_one(load_kernels, rows):
    """`draft_head_step` is the per-op kernel path (Q8 GEMMs, RMS norm, SiLU) in one call, to
    the bit, its argmax over the head's vocabulary rows only (40 of the 48 padded)."""
    from ember.engine.draft_model import KernelHeadStep
    from ember.spec_decode.eagle import NORM_EPS

    kernels = load_kernels()
    module, ids = _random_head(hidden=64, ffn=32, vocab=40)  # out padded to 48 rows
    weights = module.weights(ids, 257)
    step = KernelHeadStep(weights, kernels)
    fc, gate_up, down, out = step.layers
    h, e = torch.randn(rows, 64), torch.randn(rows, 64)
    z = kernels.q8_gemm(torch.cat([h, e], -1).contiguous(), fc.q, fc.d)[:, :64].contiguous()
    gu = kernels.q8_gemm(kernels.rms_norm(z.clone(), None, step.norm, NORM_EPS),
                         gate_up.q, gate_up.d)
    f = z + kernels.q8_gemm(kernels.silu_mul(gu), down.q, down.d)[:, :64]
    logits = kernels.q8_gemm(f.contiguous(), out.q, out.d)
    got_f, got_best = step(h, e)
    assert torch.equal(got_f, f)
    assert torch.equal(got_best, logits[:, :40].argmax(-1))


@pytest.mark.parametrize("rows", [1, 3])
def test_kernel_chain_equals_the_fused_step_chained_in_python(load_kernels, rows):
    """`draft_head_chain` (k steps in one call, the drafted tokens' embeddings read in C) drafts
    what `draft_head_step` called k times from Python does, to the bit of every step, whether
    the first tokens come as embeddings or as rows of the head's vocabulary."""
    from ember.engine.draft_model import KernelHeadStep
    from ember.spec_decode.eagle import step_chain

    kernels = load_kernels()
    module, ids = _random_head(hidden=64, ffn=32, vocab=40)
    weights = module.weights(ids, 257)
    embed = _embed()
    fused = KernelHeadStep(weights, kernels)
    head = DraftHead(weights, embed, fused, fused.chain)
    vocab_embed = head.vocab_embed
    h, e = torch.randn(rows, 64), torch.randn(rows, 64)
    want = step_chain(fused)(h, e, None, vocab_embed, 5)
    assert fused.chain(h, e, None, vocab_embed, 5) == want
    assert len({t for row in want for t in row}) > 1  # the chain moved on
    first = [3, 17, 39][:rows]
    from_rows = step_chain(fused)(h, None, first, vocab_embed, 5)
    assert fused.chain(h, None, first, vocab_embed, 5) == from_rows
    assert from_rows == step_chain(fused)(h, vocab_embed[first], None, vocab_embed, 5)
    # DraftHead.draft: in-vocabulary tokens go as rows, any other through `embed`
    tokens = ids[first].tolist()
    assert head.draft(h, tokens, 5) == [ids[row].tolist() for row in from_rows]
    outside = [4] + tokens[1:]  # token 4 is not in the head's (odd) vocabulary
    assert head.draft(h, outside, 5) == [ids[row].tolist() for row in step_chain(fused)(
        h, embed(outside), None, vocab_embed, 5)]
    with pytest.raises(ValueError, match="embedding table"):
        kernels.draft_head_chain(fused.mats, fused.norm, 1e-5, h, None, [40] * rows,
                                 vocab_embed, 2)


def test_proposer_chains_on_predicted_features_and_skips_stale_rows():
    module, ids = _random_head()
    table = torch.randn(257, 64)
    head = DraftHead(module.weights(ids, 257), lambda t: table[t])
    proposer = EagleProposer(head)
    from ember.types import Request
    a = Request("a", [5, 6, 7], SamplingParams())
    b = Request("b", [9, 10], SamplingParams())
    h_a = torch.randn(64)
    proposer.observe_hidden({"a": h_a, "b": torch.randn(64)}, [a, b])
    b.append_output_token(11)  # b moved on since its row: that row no longer applies
    drafts = proposer.propose([a, b], [3, 2])
    f1, t1 = head(h_a[None], table[torch.tensor([7])])
    f2, t2 = head(f1, table[t1])
    _, t3 = head(f2, table[t2])
    assert drafts == [[int(t1), int(t2), int(t3)], []]
    assert proposer.propose([a], [0]) == [[]]
    proposer.release({"a", "b"})
    assert proposer.propose([a], [2]) == [[]]


def _eagle_engine(path: str, num_blocks: int) -> LLMEngine:
    config = EngineConfig(model=ModelConfig(model="tiny"),
                          cache=CacheConfig(block_size=4, num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
                          spec=SpecConfig.from_dict({"method": "eagle", "model": path,
                                                     "num_speculative_tokens": 3,
                                                     "adaptive": False}))
    return LLMEngine(config, tiny_loaded())


def test_runner_hands_over_the_hidden_row_that_sampled_the_last_token(tmp_path):
    """After every step (prefill, verify with some drafts rejected, preemption), each row the
    proposer keeps equals the target's final hidden state at the position before the
    request's last token, i.e. the row whose logits produced it."""
    loaded = tiny_loaded()
    # an untrained head: its drafts are mostly rejected (the partial-acceptance rows)
    module, ids = _random_head(vocab=100)
    path = tmp_path / "head.safetensors"
    module.weights(ids, 257).save(path, {})
    engine = _eagle_engine(str(path), num_blocks=22)
    proposer = engine.core.spec.proposer
    assert isinstance(proposer, EagleProposer) and engine.core.runner.keep_hidden
    checked = 0
    original = proposer.observe_hidden

    def check(hidden, requests):
        nonlocal checked
        original(hidden, requests)
        by_id = {r.request_id: r for r in requests}
        for rid, row in hidden.items():
            ctx = by_id[rid].all_token_ids[:-1]
            with torch.no_grad():
                ref = dense.hidden_states(loaded.model, torch.tensor([ctx]))[0, -1]
            torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)
            checked += 1
    proposer.observe_hidden = check
    prompts = [[5, 17, 99, 3] * 6, [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3, [42] * 23]
    run_to_completion(engine, prompts, SamplingParams(max_tokens=30, temperature=0,
                                                      ignore_eos=True))
    stats = engine.core.spec.stats
    assert checked > 30 and stats.num_draft_tokens > 0
    assert engine.core.scheduler.num_preemptions > 0


def test_trainer_learns_the_tiny_targets_continuations():
    """On the tiny target's greedy continuations (a random 2-layer net: hard to imitate with
    one small layer), a trained head's held-out first draft is right many times more often
    than an untrained one's, and chains (depth 2 right too) sometimes."""
    loaded = tiny_loaded()
    config = EngineConfig(model=ModelConfig(model="tiny"),
                          cache=CacheConfig(block_size=4, num_blocks=256),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    prompts = [[(11 * i + 5 * j * j) % 250 + 1 for j in range(6)] for i in range(48)]
    outs = run_to_completion(LLMEngine(config, loaded), prompts,
                             SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    seqs = []
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            seq = prompt + list(out.token_ids)
            seqs.append(Sequence(seq, dense.hidden_states(
                loaded.model, torch.tensor([seq]))[0].half(), len(prompt)))
    embed, lm_head = loaded.model.model.embed_tokens.weight, loaded.model.lm_head.weight
    base = HeadSettings(model="tiny", vocab=128, ffn=64, batch_size=64, held_out=0.15)
    _, untrained = train_head(HeadSettings(**{**base.__dict__, "epochs": 0}), seqs, embed,
                              lm_head)
    weights, trained = train_head(HeadSettings(**{**base.__dict__, "epochs": 25}), seqs, embed,
                                  lm_head)
    depth, depth0 = trained["held_out_acceptance_by_depth"], untrained[
        "held_out_acceptance_by_depth"]
    assert depth[0] > 0.12 and depth[0] > 5 * depth0[0], (depth, depth0)
    assert depth[1] > 0.02 and depth[0] >= depth[1] >= depth[2]
    train = seqs[:len(seqs) - int(len(seqs) * 0.15)]  # the vocabulary of the training part
    assert torch.equal(weights.vocab, head_vocab(train, 128, 257))


def test_held_out_split_keeps_every_answer_of_a_held_out_prompt_out_of_training():
    feats = torch.zeros(4, 8)
    seqs = [Sequence([1, 2, 3, 4], feats, 1)]  # a text window
    seqs += [Sequence([1, 2, 3, 4], feats, 2, prompt=i, greedy=k == 0)
             for k in range(3) for i in range(10)]
    train, held = split_held_out(seqs, 0.2)
    assert sorted(q.prompt for q in held) == [8, 9] and all(q.greedy for q in held)
    assert all(q.prompt < 8 for q in train) and len(train) == 1 + 8 * 3
    # text windows only: the last sequences
    text = [Sequence([1, 2, 3], feats, 1) for _ in range(10)]
    assert split_held_out(text, 0.2) == (text[:8], text[8:])


def test_eagle_config_and_file_errors_are_one_line(tmp_path):
    from ember.config import ConfigError
    from ember.spec_decode.draft import DraftModelError

    with pytest.raises(ConfigError, match="required with methods 'draft' and 'eagle'"):
        SpecConfig.from_dict({"method": "eagle", "num_speculative_tokens": 3})
    module, ids = _random_head(hidden=32)
    wrong = tmp_path / "hidden32.safetensors"
    module.weights(ids, 257).save(wrong, {})
    for path, needle in [(tmp_path / "none.safetensors", "no such draft-head file"),
                         (wrong, "target hidden size 64")]:
        with pytest.raises(DraftModelError, match=needle) as err:
            _eagle_engine(str(path), num_blocks=32)
        assert "\n" not in str(err.value) and str(err.value).startswith("speculative_config.model")


def test_train_draft_head_cli_writes_a_head_the_engine_loads(tmp_path, capsys):
    """`ember train-draft-head` end to end on the tiny model (a base model: plain-text
    prompts): answers, features, training, the file; then an engine drafts with it."""
    from ember.cli import main
    from tiny_llama import save_tiny

    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "head.safetensors"
    assert main(["train-draft-head", "--model", str(model), "-o", str(out), "--prompts", "12",
                 "--samples", "2", "--max-tokens", "24", "--epochs", "2", "--batch-size", "32",
                 "--vocab", "96", "--ffn", "32"]) == 0
    assert "held-out acceptance" in capsys.readouterr().out
    weights = HeadWeights.load(out, 64, 257)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        report = json.loads(f.metadata()["training"])
    # 12 prompts x 2 answers, the one held-out prompt's both out of training, its greedy one
    # measured; an answer of at most 24 tokens trains at most 23 positions: more than 11 x 23
    # means the sampled answers are in
    assert report["held_out_sequences"] == 1 and 11 * 23 < report["train_positions"] <= 22 * 23
    assert report["settings"]["samples"] == 2
    assert weights.vocab.numel() == 96 and weights.tensors["gate.weight"].shape == (32, 64)
    engine = _eagle_engine(str(out), num_blocks=64)
    run_to_completion(engine, [[5, 17, 99, 3] * 4], SamplingParams(max_tokens=12, temperature=0,
                                                                   ignore_eos=True))
    assert engine.core.spec.proposer.num_steps > 0
    assert main(["train-draft-head", "--model", str(model), "-o", str(tmp_path)]) == 2
    assert main(["train-draft-head", "--model", str(model), "-o", str(out), "--samples",
                 "0"]) == 2


@pytest.mark.parametrize("method", ["draft", "eagle"])
def test_model_drafts_evidence_reaches_the_length_policy(method):
    """A model proposer's verified drafts feed the acceptance its draft length reads (the
    head's apart from the lookup's with `eagle`)."""
    from ember.spec_decode.decoder import SpecDecoder
    from ember.types import ModelRunnerOutput, Request, ScheduledRequest, SchedulerOutput

    class Model(EagleProposer if method == "eagle" else object):  # type: ignore[misc]
        def __init__(self) -> None:
            self.step_seconds, self._hidden = None, {}

        def propose(self, requests, max_len):
            return [[1] * k for k in max_len]

        def release(self, request_ids) -> None: ...

        def observe_hidden(self, hidden, requests) -> None: ...

    if method == "draft":
        from ember.spec_decode.draft import DraftModelProposer
        Model = type("Model", (Model, DraftModelProposer), {})  # noqa: N806
    config = SpecConfig.from_dict({"method": method, "model": "x", "num_speculative_tokens": 4})
    dec = SpecDecoder(config, Model())
    request = Request("r", [5, 6, 7], SamplingParams(max_tokens=50))
    before = dec._draft_length(request, 4, dec._extra(1))
    for _ in range(6):  # every draft accepted: the length grows to the cap
        so = SchedulerOutput(scheduled=[ScheduledRequest(request, 3, 5, [], [1, 1, 1, 1])])
        dec.observe(so, ModelRunnerOutput(sampled_token_ids={"r": [1, 1, 1, 1, 2]}))
    assert dec._draft_length(request, 4, dec._extra(1)) == 4 > before or before == 4
    own = dec._head_acceptance if method == "eagle" else dec._acceptance
    assert own["r"].trials > 0 and "r" not in (dec._acceptance if method == "eagle"
                                               else dec._head_acceptance)
