"""all-MiniLM-L6-v2 embeddings against sentence-transformers on the same weights.

Targets (issue 13): cosine similarity >= 0.9999 on the fp32 path and >= 0.999 on the int8
kernel path; packed (padding-free) batching equals one-at-a-time; strict loading and length
limits fail with clear messages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ember.config import EnvSettings, ModelConfig
from ember.errors import ModelLoadError
from ember.loading.sources import PACKAGED_MODELS, packaged_path
from ember.types import InvalidRequestError

MODEL = "all-minilm-l6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "",
    " ",
    "?",
    "x",
    "Ünïcödé façade — naïve café, 東京タワー and ½ of 😀🚀 emoji.",
    "Привет, как дела? Это тест на кириллице.",
    "def f(x): return x ** 2  # code, URLs https://example.com/a?b=c&d=e",
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. " * 4,
    "However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
    "that he is considered the rightful property of some one or other of their daughters. " * 3,
    # 206 tokens: attention of sequences over 128 tokens runs in the kernels too
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
    "seemed to unite some of the best blessings of existence; and had lived nearly twenty-one "
    "years in the world with very little to distress or vex her. " * 4,
    "The quick brown fox jumps over the lazy dog.",
    "the quick brown fox jumps over the lazy dog",
    "A man is eating food.",
]


def _model_dir() -> Path:
    model = next(m for m in PACKAGED_MODELS if m.name == MODEL)
    path = packaged_path(model, EnvSettings.from_env().cache_path)
    if path is None:
        pytest.skip(f"{MODEL} not installed ({model.install_hint})")
    return path


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """sentence-transformers' fp32 embeddings (its own tokenizer, truncation at 256)."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(_model_dir()), device="cpu")
    return torch.from_numpy(model.encode(SENTENCES, batch_size=8))


def _embedder(quantization: str | None, budget: int = 2048):
    from ember.engine.embedder import Embedder

    _model_dir()
    return Embedder.from_config(ModelConfig(model=MODEL, quantization=quantization),
                                EnvSettings.from_env(), budget)


@pytest.fixture(scope="module")
def fp32():
    return _embedder(None)


def test_listed_and_resolved_as_hf_folder() -> None:
    from ember.loading.sources import list_models, resolve_model

    rows = {r.name: r for r in list_models()}
    assert rows[MODEL].status == "installed"
    env = EnvSettings.from_env()
    source = resolve_model(MODEL, (), env.cache_path)
    assert source.kind == "hf"
    assert {"model.safetensors", "tokenizer.json", "modules.json"} <= {
        p.name for p in source.path.iterdir()}
    assert str(source.path).startswith(str(env.cache_path))


def test_fp32_matches_sentence_transformers(fp32, reference: torch.Tensor) -> None:
    assert fp32.plan.weights is None and fp32.pooling.mode == "mean" and fp32.pooling.normalize
    out = fp32.embed(SENTENCES)
    assert out.shape == (len(SENTENCES), 384)
    cos = torch.nn.functional.cosine_similarity(out, reference)
    assert cos.min() >= 0.9999, cos
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_int8_kernels_match_sentence_transformers(reference: torch.Tensor) -> None:
    emb = _embedder("int8")
    if emb.plan.kernels is None:
        pytest.skip("Ember's CPU kernels are not available on this machine")
    formats = {m.format for m in emb.model.projections()}
    assert formats == {"i11-row"}, formats  # every projection on the per-row GEMM
    cos = torch.nn.functional.cosine_similarity(emb.embed(SENTENCES), reference)
    assert cos.min() >= 0.999, cos


def test_packed_equals_one_at_a_time(fp32) -> None:
    small = _embedder(None, budget=64)  # many packed chunks, single long sequences alone
    together = small.embed(SENTENCES)
    alone = torch.cat([fp32.embed([s]) for s in SENTENCES])
    torch.testing.assert_close(together, alone, atol=2e-6, rtol=0)
    # duplicates in one batch give identical vectors
    torch.testing.assert_close(together[0], together[-1], atol=1e-6, rtol=0)


def test_length_limit_and_truncation(fp32) -> None:
    ids = fp32.tokenize(["word " * 300])[0]
    assert len(ids) > fp32.max_model_len == 256
    with pytest.raises(InvalidRequestError, match="maximum of 256"):
        fp32.embed_ids([ids])
    out = fp32.embed_ids([ids], truncate=256)
    torch.testing.assert_close(out, fp32.embed_ids([ids[-256:]]))
    with pytest.raises(InvalidRequestError, match="no tokens"):
        fp32.embed_ids([[]])
    with pytest.raises(InvalidRequestError, match="outside"):
        fp32.embed_ids([[101, 30522, 102]])


def test_strict_loading_names_the_problem(tmp_path: Path) -> None:
    """A tiny random BERT saved by transformers: loads, matches HF's mean-pooled states,
    and a missing / unexpected / mis-shaped tensor fails naming it."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel as HFBertModel

    from ember.engine.embedder import Embedder

    torch.manual_seed(0)
    cfg = HFBertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    hf = HFBertModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    shutil.copy(_model_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    env = EnvSettings.from_env()
    emb = Embedder.from_config(ModelConfig(model=str(tmp_path)), env)
    assert emb.pooling.mode == "mean" and not emb.pooling.normalize  # no sentence-transformers files
    ids = [[101, 7592, 2088, 102], [101, 2003, 102]]
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).last_hidden_state[0].mean(0) for s in ids]
    torch.testing.assert_close(emb.embed_ids(ids), torch.stack(ref), atol=1e-5, rtol=1e-5)

    tensors = load_file(str(tmp_path / "model.safetensors"))

    def load(t: dict[str, torch.Tensor]) -> None:
        save_file(t, str(tmp_path / "model.safetensors"))
        Embedder.from_config(ModelConfig(model=str(tmp_path)), env)

    broken = dict(tensors)
    del broken["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ModelLoadError, match="missing tensors: encoder.layer.1.output.dense"):
        load(broken)
    with pytest.raises(ModelLoadError, match="unexpected tensors: extra.weight"):
        load({**tensors, "extra.weight": torch.zeros(2)})
    wrong = {**tensors, "encoder.layer.0.attention.self.key.weight": torch.zeros(32, 31)}
    with pytest.raises(ModelLoadError, match=r"key.weight has shape \(32, 31\)"):
        load(wrong)


def test_llm_embed_and_no_engine() -> None:
    from ember import LLM

    _model_dir()
    llm = LLM(model=MODEL, show_progress=False)
    vecs = llm.embed(["hello there", [101, 7592, 2045, 102]])
    assert len(vecs) == 2 and len(vecs[0]) == 384
    assert vecs[0] == pytest.approx(vecs[1], abs=1e-6)  # the same tokens, as text and ids
    assert llm._engine is None  # no scheduler / KV cache built for an encoder
    with pytest.raises(InvalidRequestError, match="embedding model"):
        llm.generate("hi")


def test_micro_batcher_packs_concurrent_requests(fp32) -> None:
    """Concurrent /v1/embeddings requests share forward steps; each gets exactly what it
    gets alone, and a bad request fails alone (400) without failing the ones packed with it."""
    import asyncio

    from ember.server.errors import APIError
    from ember.server.serving.embeddings import EmbeddingRequest, EmbeddingServing

    serving = EmbeddingServing({MODEL: fp32})
    bodies = [EmbeddingRequest(model=MODEL, input=SENTENCES[i:i + 3])
              for i in range(0, len(SENTENCES), 3)]
    bad = EmbeddingRequest(model=MODEL, input=[[101, 30522, 102]])

    async def run() -> list[object]:
        return await asyncio.gather(*(serving.create(b) for b in [*bodies[:2], bad, *bodies[2:]]),
                                    return_exceptions=True)

    results = asyncio.run(run())
    failure = results.pop(2)
    assert isinstance(failure, APIError) and failure.status == 400, failure
    stats = serving.batchers[MODEL].stats
    assert stats.requests == len(bodies) and stats.steps < len(bodies), stats
    assert stats.max_requests_per_step > 1
    for body, result in zip(bodies, results, strict=True):
        got = torch.tensor([d.embedding for d in result.data])  # type: ignore[attr-defined]
        alone = fp32.embed(body.input)
        torch.testing.assert_close(got, alone, atol=2e-6, rtol=0)
