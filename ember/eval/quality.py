"""Quality and cost of a model variant: perplexity (the engine's own computation, DESIGN.md
protocol), teacher-forced top-1 agreement and mean KL against a reference, weight bytes and
single-stream decode speed."""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ember.eval.perplexity import perplexity, windows_of
from ember.types import SamplingParams

if TYPE_CHECKING:
    from ember.engine.llm import LLM
    from ember.loading.loader import LoadedModel

logger = logging.getLogger(__name__)

RESULT_KIND = "ember-eval"
Progress = Callable[[str, int, int], None]


@dataclass
class WeightBytes:
    """Bytes of a model's weights three ways."""

    disk: int
    """Weight file(s) on disk (.gguf, or model.safetensors / *.safetensors)."""
    effective: int
    """Stored-format bytes: quantized codes + scales + zeros, sparse-encoded bytes for pruned
    weights, dense bytes otherwise (what a runtime using the stored format would hold)."""
    memory: int
    """What the loaded runtime model holds now (parameters in the runtime dtype)."""


@dataclass
class EvalResult:
    """One evaluated variant (written as JSON by `ember eval --json`)."""

    label: str
    model: str
    kind: str
    method: str
    settings: dict[str, Any]
    perplexity: float
    mean_nll: float
    num_scored_tokens: int
    text: str
    text_sha256: str
    window: int
    max_tokens: int
    disk_bytes: int
    weight_bytes: int
    memory_bytes: int
    decode_tok_s: float | None = None
    """Best of the runs: on a shared machine other load only ever slows a run down."""
    decode_tok_s_runs: list[float] = field(default_factory=list)
    decode_measurement: str = "one pass: best of the runs"
    agreement: float | None = None
    kl: float | None = None
    reference: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    threads: int = 0
    created: str = ""
    result_kind: str = RESULT_KIND

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_bytes(loaded: "LoadedModel") -> WeightBytes:
    """Disk, effective (stored format) and in-memory bytes of a loaded model's weights."""
    src = loaded.source
    memory = _param_bytes(loaded.model)
    if src.kind == "gguf":
        size = src.path.stat().st_size
        eff = (sum(t.raw.nbytes for t in loaded.gguf.tensors.values())
               if loaded.gguf is not None else size)
        return WeightBytes(size, eff, memory)
    if src.kind == "ember":
        from ember.loading.ember_checkpoint import read_metadata
        from ember.loading.ember_format import WEIGHTS_FILE
        meta = read_metadata(src.path)
        return WeightBytes((src.path / WEIGHTS_FILE).stat().st_size,
                           effective_bytes(meta["tensors"]), memory)
    disk = sum(p.stat().st_size for p in src.path.glob("*.safetensors"))
    return WeightBytes(disk, disk, memory)


def effective_bytes(tensors: dict[str, dict[str, Any]]) -> int:
    """Stored-format bytes from ember.json tensor entries (sparse_bytes where recorded)."""
    from ember.loading.ember_format import DENSE_DTYPES
    total = 0
    for entry in tensors.values():
        shape = [int(d) for d in entry["shape"]]
        fmt = entry["format"]
        if "sparse_bytes" in entry:
            total += int(entry["sparse_bytes"])
        elif fmt in DENSE_DTYPES:
            total += math.prod(shape) * torch.empty(0, dtype=DENSE_DTYPES[fmt]).element_size()
        else:
            out_f, in_f = shape
            groups = math.ceil(in_f / int(entry["group_size"]))
            scale_size = 2 if entry.get("scale_dtype", "float16") == "float16" else 4
            codes = out_f * (in_f if int(entry["bits"]) == 8 else math.ceil(in_f / 2))
            total += codes + 2 * out_f * groups * scale_size
    return total


def decode_speed(llm: "LLM", prompt: list[int], max_tokens: int = 64,
                 repeats: int = 5) -> list[float]:
    """Single-stream greedy decode tokens/s (first token excluded), one value per repeat."""
    rates = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(repeats):
        stamps = []
        for out in llm.stream(prompt, params):
            stamps.append((time.perf_counter(), len(out.outputs[0].token_ids)))
        (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
        if n_last > n_first and t_last > t_first:
            rates.append((n_last - n_first) / (t_last - t_first))
    return rates


@torch.no_grad()
def agreement_and_kl(model: nn.Module, reference: nn.Module, windows: list[list[int]],
                     progress: Progress | None = None) -> tuple[float, float]:
    """Teacher-forced top-1 agreement and mean KL(reference || model) per predicted token, over
    the same windows and positions perplexity scores."""
    from ember.compress import dense

    agree, kl_sum, count = 0, 0.0, 0
    for i, window in enumerate(windows):
        ids = torch.tensor([window], dtype=torch.int64)  # (1, T)
        lp = torch.log_softmax(dense.logits(model, ids)[0, :-1], dim=-1)  # (T-1, V)
        lr = torch.log_softmax(dense.logits(reference, ids)[0, :-1], dim=-1)
        agree += int((lp.argmax(-1) == lr.argmax(-1)).sum())
        kl_sum += float((lr.exp() * (lr - lp)).sum())
        count += lp.shape[0]
        if progress is not None:
            progress("agreement / KL", i + 1, len(windows))
    return agree / count, kl_sum / count


def describe(loaded: "LoadedModel") -> tuple[str, str, dict[str, Any]]:
    """(label, method, settings) of a model from its ember.json (or its source kind)."""
    if loaded.source.kind != "ember":
        dtype = str(loaded.dtype).removeprefix("torch.")
        return f"{loaded.source.name} ({dtype})", "reference", \
            {"source_types": dict(loaded.weight_types)}
    from ember.loading.ember_checkpoint import read_metadata
    comp = read_metadata(loaded.source.path).get("compression") or {}
    method = str(comp.get("method", "?"))
    settings = dict(comp.get("settings") or {})
    return variant_label(method, settings, comp.get("summary") or {}), method, settings


def variant_label(method: str, s: dict[str, Any], summary: dict[str, Any]) -> str:
    """Short human label, e.g. 'gptq int4 g128 sym' or 'wanda 2:4'."""
    if method in ("rtn", "gptq", "awq"):
        gs = "per-ch" if not s.get("group_size") else f"g{s['group_size']}"
        sym = "sym" if s.get("symmetric") else "asym"
        return f"{method} int{s.get('bits')} {gs} {sym}"
    if method in ("magnitude", "wanda", "sparsegpt"):
        return f"{method} {s.get('pattern') or format(s.get('sparsity', 0), '.0%')}"
    if method == "structured":
        parts = [f"drop {s['drop_layers']}" if s.get("drop_layers") else "",
                 f"ffn {s['ffn_keep']}" if s.get("ffn_keep") else "",
                 f"heads {s['heads_keep']}" if s.get("heads_keep") else ""]
        return "structured " + " ".join(p for p in parts if p)
    if method == "distill":
        layers = f"{s.get('student_layers', '?')}L"
        if summary.get("step") == 0:
            return f"distill {layers} untrained"
        mode = ("next-token" if s.get("no_teacher") else
                "KD" + (f"+{s['ce_weight']:g}CE" if s.get("ce_weight") else ""))
        return f"distill {mode} {layers} step {summary.get('step', '?')}"
    return method


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def evaluate(llm: "LLM", text: str, text_name: str, *, reference: nn.Module | None = None,
             candidate: nn.Module | None = None, reference_name: str | None = None,
             window: int = 512, max_tokens: int = 8192, decode_tokens: int = 64,
             decode_repeats: int = 5, progress: Progress | None = None) -> EvalResult:
    """Evaluate one loaded engine on `text`: perplexity, bytes and decode speed through the
    engine; with `reference`, also agreement / KL of `candidate` (the same model as loaded for
    offline use, i.e. before the engine's runtime weight layout) against it."""
    loaded = llm.engine.loaded
    label, method, settings = describe(loaded)
    ppl = perplexity(llm, text, window=window, max_tokens=max_tokens)
    if progress is not None:
        progress("perplexity", 1, 1)
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    agreement = kl = None
    if reference is not None:
        if candidate is None:
            raise ValueError("agreement / KL need the candidate model as loaded offline")
        if reference.config.vocab_size != loaded.arch.vocab_size:  # type: ignore[union-attr]
            raise ValueError("--reference has a different vocabulary than the model")
        agreement, kl = agreement_and_kl(candidate, reference,
                                         windows_of(ids, window, max_tokens), progress)
    rates = decode_speed(llm, ids[:32], decode_tokens, decode_repeats) if decode_tokens else []
    nbytes = weight_bytes(loaded)
    arch = loaded.arch
    return EvalResult(
        label=label, model=str(loaded.source.path), kind=loaded.source.kind, method=method,
        settings=settings, perplexity=ppl.perplexity, mean_nll=ppl.mean_nll,
        num_scored_tokens=ppl.num_scored_tokens, text=text_name, text_sha256=text_sha256(text),
        window=window, max_tokens=max_tokens, disk_bytes=nbytes.disk,
        weight_bytes=nbytes.effective, memory_bytes=nbytes.memory,
        decode_tok_s=max(rates) if rates else None, decode_tok_s_runs=rates,
        agreement=agreement, kl=kl, reference=reference_name,
        architecture={"num_layers": arch.num_layers, "intermediate_size": arch.intermediate_size,
                      "num_heads": arch.num_heads, "num_kv_heads": arch.num_kv_heads},
        threads=torch.get_num_threads(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def load_results(paths: list[str]) -> list[EvalResult]:
    """Eval results from JSON files, or from directories (their *.json and */eval.json)."""
    import json

    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(path.glob("*.json")) + sorted(path.glob("*/eval.json"))
        else:
            raise ValueError(f"--report: {path} does not exist")
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{f}: cannot read ({exc})") from exc
        if isinstance(data, dict) and data.get("result_kind") == RESULT_KIND:
            results.append(EvalResult.from_dict(data))
    if not results:
        raise ValueError(f"--report: no ember eval results (*.json) in {', '.join(paths)}")
    return results
