"""Quality of 8-bit encoder GEMM schemes on all-MiniLM-L6-v2, simulated in PyTorch (fake-quant).

Each int8-plan projection's forward is replaced by: activations quantized per token (u8 with a
zero point, or fewer bits), weights re-quantized per output row from the plan's 11-bit codes
(s7, s8, or s8 with every k pair bounded |q0| + |q1| <= 128: what enc_u8_gemm runs without
vpmaddubsw saturation), optionally with the top-n "outlier" input channels (calibrated
|activation| max x weight column max, on other text than the evaluation) kept in float.
Prints the cosine similarity with Ember's fp32 embeddings (which equal sentence-transformers'
to 1e-7) on short sentences and 256-token passages; writes JSON.

    python benchmarks/embeddings_u8_study.py          # ~2 min on 1 thread
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from embeddings import MODEL, workloads  # noqa: E402

SHAPES = {(384, 1152): "qkv", (384, 384): "attn_out", (384, 1536): "ffn_up",
          (1536, 384): "ffn_down"}


def quant_w(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric RTN to `bits`, or bits=0: s8 with pairs bounded (pack_rows_u8)."""
    if bits == 0:
        from ember.kernels.encoder_ops import pack_rows_u8, unpack_rows_u8
        packed, scale, _ = pack_rows_u8(w)
        return unpack_rows_u8(packed, scale)
    qm = 2 ** (bits - 1) - 1
    s = w.abs().amax(-1, keepdim=True).clamp_min(1e-30) / qm
    return torch.round(w / s).clamp(-qm, qm) * s


def quant_a(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric (zero point) RTN to `bits` unsigned levels."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    qm = 2 ** bits - 1
    s = (hi - lo).clamp_min(1e-30) / qm
    zp = torch.round(-lo / s)
    return (torch.round(x / s + zp).clamp(0, qm) - zp) * s


def main() -> int:
    torch.set_num_threads(1)
    import ember.layers.encoder_linear as lin
    from ember.config import EnvSettings, ModelConfig
    from ember.engine.embedder import Embedder
    from ember.kernels.encoder_ops import unpack_rows_i16

    env = EnvSettings.from_env()
    fp = Embedder.from_config(ModelConfig(model=MODEL), env, 2048)
    q8 = Embedder.from_config(ModelConfig(model=MODEL, quantization="int8"), env, 2048)
    evals = workloads(fp.tokenizer, 64, 12, seed=1)
    ref = {w: fp.embed(t) for w, t in evals.items()}
    layers = [m for m in q8.model.modules() if isinstance(m, lin.RowInt16Linear)]
    dense = {id(m): unpack_rows_i16(m.packed, m.scale) for m in layers}
    orig = lin.RowInt16Linear.forward
    amax: dict[int, torch.Tensor] = {}

    def record(self: Any, x: torch.Tensor, residual: Any = None, gelu: bool = False) -> Any:
        a = x.reshape(-1, self.in_features).abs().amax(0)
        amax[id(self)] = torch.maximum(amax.get(id(self), a), a)
        return orig(self, x, residual, gelu)

    lin.RowInt16Linear.forward = record  # type: ignore[method-assign]
    for t in workloads(fp.tokenizer, 64, 4, seed=7).values():  # calibration: other text
        q8.embed(t)
    order = {i: (amax[i] * dense[i].abs().amax(0)).argsort(descending=True) for i in amax}
    scheme: dict[tuple[int, int], tuple[int, int, int]] = {}

    def fake(self: Any, x: torch.Tensor, residual: Any = None, gelu: bool = False) -> Any:
        key = (self.in_features, self.out_features)
        if key not in scheme:
            return orig(self, x, residual, gelu)
        wb, ab, n = scheme[key]
        w = dense[id(self)]
        keep = torch.ones(self.in_features, dtype=torch.bool)
        keep[order[id(self)][:n]] = False
        y = F.linear(quant_a(x * keep, ab), quant_w(w * keep, wb), self.bias)
        y = y + x[..., ~keep] @ w[:, ~keep].T
        y = F.gelu(y) if gelu else y
        return y if residual is None else y + residual

    lin.RowInt16Linear.forward = fake  # type: ignore[method-assign]
    rows = []
    everything = list(SHAPES)
    runs = [("w7 a8 row", everything, 7, 8, 0), ("w8 a8 row", everything, 8, 8, 0),
            ("w11 a8 row", everything, 11, 8, 0), ("w7 a12 row", everything, 7, 12, 0),
            ("w7 a8 out16", everything, 7, 8, 16), ("w8 a8 out16 (saturates)", everything, 8, 8, 16),
            ("w8 a7 out16 (u7 x s8)", everything, 8, 7, 16),
            ("w8pair a8 out0", everything, 0, 8, 0), ("w8pair a8 out16", everything, 0, 8, 16)]
    runs += [(f"w8pair a8 out16 {SHAPES[s]} only", [s], 0, 8, 16) for s in everything]
    runs += [("w8pair a8 out16 all but ffn_down", everything[:3], 0, 8, 16)]
    for name, shapes, wb, ab, n in runs:
        scheme.clear()
        scheme.update({s: (wb, ab, n) for s in shapes})
        row: dict[str, Any] = {"scheme": name}
        for w, texts in evals.items():
            cos = F.cosine_similarity(q8.embed(texts), ref[w])
            row[w] = {"min": float(cos.min()), "mean": float(cos.mean())}
        rows.append(row)
        print(f"{name:36s} " + "  ".join(f"{w} min {row[w]['min']:.6f} mean {row[w]['mean']:.6f}"
                                         for w in evals), flush=True)
    lin.RowInt16Linear.forward = orig  # type: ignore[method-assign]
    out = ROOT / "benchmarks/results/embeddings/u8_study.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "command": "python benchmarks/embeddings_u8_study.py",
                               "reference": "Ember fp32 embeddings"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
