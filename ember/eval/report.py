"""Compare evaluated variants: a table (rows for the CLI to print) and a Pareto chart (PNG).

The chart has two panels: weight bytes vs perplexity and decode tok/s vs perplexity; the
Pareto frontier (no other variant both smaller / faster and better) is drawn as a line.
"""

from __future__ import annotations

from pathlib import Path

from ember.eval.quality import EvalResult

COLUMNS = ("variant", "method", "bits / sparsity", "weight MB", "disk MB", "layers", "ppl",
           "Δppl", "top-1 agree", "KL", "decode tok/s", "speed-up")


def baseline_of(results: list[EvalResult], label: str | None = None) -> EvalResult:
    """The result others are compared with: `label`, else the uncompressed reference."""
    if label is not None:
        for r in results:
            if r.label == label:
                return r
        raise ValueError(f"--baseline {label!r} is not among the results")
    for r in results:
        if r.method == "reference":
            return r
    return results[0]


def precision_of(r: EvalResult) -> str:
    """'int4 g128', '50%', '2:4', ... for the table."""
    s = r.settings
    if r.method in ("rtn", "gptq", "awq"):
        gs = "per-ch" if not s.get("group_size") else f"g{s['group_size']}"
        return f"int{s.get('bits')} {gs}{' sym' if s.get('symmetric') else ''}"
    if r.method in ("magnitude", "wanda", "sparsegpt"):
        return str(s.get("pattern") or f"{float(s.get('sparsity', 0)):.0%}")
    if r.method == "reference":
        return "fp32"
    return "dense"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(results: list[EvalResult], baseline: EvalResult) -> list[list[str]]:
    """One row of strings per result, in COLUMNS order, sorted by weight bytes."""
    rows = []
    for r in sorted(results, key=lambda r: (r.method != "reference", r.weight_bytes)):
        dppl = 100 * (r.perplexity / baseline.perplexity - 1)
        speed = (r.decode_tok_s / baseline.decode_tok_s
                 if r.decode_tok_s and baseline.decode_tok_s else None)
        rows.append([
            r.label, r.method, precision_of(r), f"{r.weight_bytes / 2**20:.1f}",
            f"{r.disk_bytes / 2**20:.1f}", str(r.architecture.get("num_layers", "-")),
            f"{r.perplexity:.3f}", f"{dppl:+.2f}%", _fmt(r.agreement, ".2%"), _fmt(r.kl, ".4f"),
            _fmt(r.decode_tok_s, ".1f"), "-" if speed is None else f"{speed:.2f}x"])
    return rows


def pareto(points: list[tuple[float, float]], larger_x_better: bool) -> list[int]:
    """Indices of Pareto-optimal points (x cost or benefit, y = perplexity, lower better),
    ordered by x."""
    order = sorted(range(len(points)), key=lambda i: points[i][0], reverse=larger_x_better)
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(results: list[EvalResult], path: Path, title: str = "") -> Path:
    """Write the two-panel Pareto chart as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    panels = [("weight MB (stored format)", lambda r: r.weight_bytes / 2**20, False),
              ("decode tok/s (single stream)", lambda r: r.decode_tok_s, True)]
    for ax, (xlabel, xfn, larger_better) in zip(axes, panels):
        pts = [(xfn(r), r.perplexity, r) for r in results if xfn(r)]
        if not pts:
            ax.set_visible(False)
            continue
        for x, y, r in pts:
            ax.scatter(x, y, s=30, color=_color(r.method))
            ax.annotate(r.label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto([(x, y) for x, y, _ in pts], larger_better)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1,
                label="Pareto frontier")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title or "Ember compression: cost vs quality")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _color(method: str) -> str:
    return {"reference": "black", "rtn": "tab:blue", "gptq": "tab:green", "awq": "tab:olive",
            "magnitude": "tab:red", "wanda": "tab:orange", "sparsegpt": "tab:purple",
            "structured": "tab:brown", "distill": "tab:cyan"}.get(method, "tab:gray")
