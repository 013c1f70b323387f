"""Edge footprint: resident memory of Ember (main path and the torch-free edge runtime) vs
llama.cpp on the int4 SmolLM2 (GGUF Q4_1), same harness, each engine in its own fresh process.

RSS (VmRSS) and peak (VmHWM) come from /proc/<pid>/status:
  ember:            after `import torch`, `import ember`, LLM(...) load, 64 greedy tokens.
  ember_edge:       ember.edge.EdgeLLM (no torch): after the interpreter, numpy, tokenizers +
                    jinja2 + Ember's tokenizer module, the rest of ember.edge, the kernel library,
                    load (weights + tokenizer), 64 greedy tokens (KV pages); plus the computed
                    weight and KV bytes.
  llama_cpp_python: llama_cpp.Llama(path, n_ctx=4096, n_threads=2) (PYTHONPATH
                    ~/.cache/ember-peers/llama-cpp-python-0.3.36; skipped with the reason when
                    absent): after import, load, 64 greedy tokens.
  llama_cpp:        `llama-server` (~/.cache/ember-peers/llama.cpp-native/build/bin) on the same
                    GGUF: after load (/health ok), after 64 generated tokens.
Decode tok/s of the three in-process runs: 63 tokens after the first, 2 threads (contended
unless the machine is quiet: loadavg is recorded).
Writes benchmarks/results/edge/edge_rss.json and .png.
  flock /tmp/ember-bench.lock python benchmarks/edge_rss.py      (~1-2 min)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

OUT = Path(__file__).parent / "results" / "edge"
LLAMA_BIN = Path.home() / ".cache" / "ember-peers" / "llama.cpp-native" / "build" / "bin"
LLAMA_PY = Path.home() / ".cache" / "ember-peers" / "llama-cpp-python-0.3.36"
PROMPT = "The capital of France is"

# Shared by every child: RSS/peak from /proc and a timed stream of 64 tokens.
CHILD_PRELUDE = r'''
import json, sys, time
def mem():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out
def timed_stream(stream, r, count=lambda item, n: n + 1, limit=None):
    """Consume `stream`, recording decode tok/s after the first token and time to it."""
    t0 = time.perf_counter()
    n, t1 = 0, None
    for item in stream:
        n = count(item, n)
        if t1 is None:
            t1 = time.perf_counter()
        if limit is not None and n >= limit:
            break
    t2 = time.perf_counter()
    r["generate_64"] = mem()
    r["tokens"] = n
    r["decode_tok_s"] = (n - 1) / (t2 - t1)
    r["first_token_s"] = t1 - t0
r = {"start": mem()}
'''

EMBER_CHILD = CHILD_PRELUDE + r'''
import torch
torch.set_num_threads(2)
r["import_torch"] = mem()
import ember
r["import_ember"] = mem()
r["heavy_modules_after_import_ember"] = sorted(
    m for m in ("transformers", "fastapi", "tokenizers", "numpy", "llguidance", "rich",
                "jinja2", "pydantic", "ray", "uvicorn", "sentence_transformers")
    if m in sys.modules)
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1], quantization="int4", show_progress=False)
r["load"] = mem()
r["plan"] = llm.engine.loaded.plan.describe()
core = llm.engine.core
r["kv_cache_mb"] = sum(t.numel() * t.element_size() for c in core.runner.kv_caches
                       for t in (c if isinstance(c, (list, tuple)) else [c])) / 2**20
model = llm.engine.loaded.model
r["weights_mb"] = sum(t.untyped_storage().nbytes() for t in
                      list(model.parameters()) + list(model.buffers())) / 2**20
first = core.runner.kv_caches[0]
first = first[0] if isinstance(first, (list, tuple)) else first
r["kv_cache_tokens"] = int(first.shape[0] * first.shape[1])  # (blocks, block_size, kv heads, dim)
r["kernel_library"] = getattr(getattr(llm.engine.loaded.plan, "kernels", None), "lib", None) \
    and llm.engine.loaded.plan.kernels.lib._name
r["modules_after_load"] = sorted(
    m for m in ("torch._dynamo", "torch._inductor", "triton", "transformers", "llguidance.torch",
                "numpy", "tokenizers", "jinja2") if m in sys.modules)
params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
timed_stream(llm.stream(sys.argv[2], params), r,
             count=lambda out, n: len(out.outputs[0].token_ids))
import ctypes
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MI2
    mi = libc.mallinfo2()
    r["c_heap_mb"] = {"in_use": (mi.uordblks + mi.hblkhd) / 2**20, "free_in_arenas": mi.fordblks / 2**20}
except (OSError, AttributeError):
    pass
r["heavy_modules_after_generate"] = sorted(
    m for m in ("transformers", "fastapi", "tokenizers", "numpy", "llguidance", "rich",
                "jinja2", "pydantic", "ray", "uvicorn") if m in sys.modules)
print(json.dumps(r))
'''


EDGE_CHILD = CHILD_PRELUDE + r'''
import numpy
r["import_numpy"] = mem()
import tokenizers, jinja2, ember.tokenizer
r["import_tokenizers"] = mem()
import ember.edge
from ember.edge import EdgeLLM
r["import_ember_edge"] = mem()
from ember.config import EnvSettings
from ember.kernels.library import load_kernel_library
env = EnvSettings.from_env()
lib = load_kernel_library(env.cache_dir, env.cpu_isa, env.cxx)
r["kernel_library"] = mem()
llm = EdgeLLM(sys.argv[1], max_context=4096, num_threads=2)
r["load"] = mem()
r["isa"] = llm.isa
r["weights_mb"] = llm.model.weight_bytes / 2**20
r["kv_reserved_mb"] = llm.model.kv_bytes / 2**20
a = llm.arch
r["kv_bytes_per_token"] = a.num_layers * 2 * a.num_kv_heads * a.head_dim * 2
timed_stream(llm.stream(sys.argv[2], max_tokens=64, temperature=0, ignore_eos=True), r)
r["prompt_tokens"] = len(llm.tokenizer.encode(sys.argv[2]))
r["torch_imported"] = "torch" in sys.modules
print(json.dumps(r))
'''

LLAMA_PY_CHILD = CHILD_PRELUDE + r'''
import llama_cpp
r["import_llama_cpp"] = mem()
r["version"] = llama_cpp.__version__
llm = llama_cpp.Llama(sys.argv[1], n_ctx=4096, n_threads=2, verbose=False)
r["load"] = mem()
tokens = llm.tokenize(sys.argv[2].encode())
timed_stream(llm.generate(tokens, temp=0.0, top_k=1, reset=True), r, limit=64)
print(json.dumps(r))
'''


def _child(code: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def edge_run(model: str) -> dict:
    """The torch-free edge runtime, with its RSS breakdown."""
    r = _child(EDGE_CHILD, [model, PROMPT])
    rss = {k: v["VmRSS"] for k, v in r.items() if isinstance(v, dict) and "VmRSS" in v}
    load = rss["load"] - rss["kernel_library"]
    r["breakdown_mb"] = {
        "interpreter": rss["start"],
        "numpy": rss["import_numpy"] - rss["start"],
        "tokenizers_jinja2_ember_tokenizer_modules": rss["import_tokenizers"]
        - rss["import_numpy"],
        "ember_edge_modules_and_gguf": rss["import_ember_edge"] - rss["import_tokenizers"],
        "kernel_library_and_libgomp": rss["kernel_library"] - rss["import_ember_edge"],
        "load": load,
        "of_which_weights_computed": r["weights_mb"],
        "of_which_tokenizer_and_rest": load - r["weights_mb"],
        "generate_64_tokens": rss["generate_64"] - rss["load"],
        "kv_used_after_64_computed": (r["prompt_tokens"] + r["tokens"])
        * r["kv_bytes_per_token"] / 2**20,
        "kv_reserved_virtual": r["kv_reserved_mb"],
    }
    return r


def llama_py_run(gguf: str) -> dict:
    """llama-cpp-python in the same harness (skipped, with the reason, when absent)."""
    if not (LLAMA_PY / "llama_cpp").is_dir():
        return {"skipped": f"llama-cpp-python not found at {LLAMA_PY}"}
    env = dict(os.environ, PYTHONPATH=str(LLAMA_PY))
    try:
        return _child(LLAMA_PY_CHILD, [gguf, PROMPT], env)
    except RuntimeError as e:
        return {"skipped": f"llama-cpp-python failed: {str(e)[-500:]}"}


def ember_run(model: str) -> dict:
    r = _child(EMBER_CHILD, [model, PROMPT])
    rss = {k: v["VmRSS"] for k, v in r.items() if isinstance(v, dict) and "VmRSS" in v}
    r["breakdown_mb"] = {
        "interpreter": rss["start"],
        "import_torch": rss["import_torch"] - rss["start"],
        "import_ember": rss["import_ember"] - rss["import_torch"],
        "load_weights_kernels_kv": rss["load"] - rss["import_ember"],
        "of_which_kv_cache_allocated": r["kv_cache_mb"],
        "generate_64_tokens": rss["generate_64"] - rss["load"],
    }
    return r


def _status(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _llama_kv_mb(gguf_path: str, ctx: int) -> float:
    """llama-server's KV cache at context `ctx`: f16 K and V for every layer, allocated and
    cleared (touched) at load: ctx * layers * 2 * kv_heads * head_dim * 2 bytes."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    meta = {f.name: f.contents() for f in reader.fields.values()}
    arch = meta["general.architecture"]
    layers, kv_heads = meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count_kv"]
    head_dim = meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"]
    return ctx * layers * 2 * kv_heads * head_dim * 2 / 2**20


def llama_run(gguf: str) -> dict | None:
    server = LLAMA_BIN / "llama-server"
    if not server.is_file():
        return {"skipped": f"no llama-server at {server}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(server), "-m", gguf, "-t", "2", "-c", "4096", "--port", str(port),
                             "--host", "127.0.0.1", "-fa", "on"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        r = {"load": _status(proc.pid)}
        body = json.dumps({"prompt": PROMPT, "n_predict": 64, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/completion", body,
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()
        r["generate_64"] = _status(proc.pid)
        r["context"] = 4096
        r["kv_cache_mb"] = _llama_kv_mb(gguf, 4096)
        return r
    finally:
        proc.terminate()
        proc.wait(30)


def _rss(run: dict, stage: str) -> float | None:
    return (run.get(stage) or {}).get("VmRSS") if isinstance(run, dict) else None


def summary(report: dict) -> dict:
    """RSS after load / after 64 tokens and decode tok/s per engine; the edge target ratio."""
    rows = {}
    for key in ("ember", "ember_edge", "llama_cpp_python", "llama_cpp"):
        run = report.get(key) or {}
        if "skipped" in run or "error" in run:
            rows[key] = {"skipped": run.get("skipped") or run.get("error")}
            continue
        rows[key] = {"rss_load_mb": _rss(run, "load"), "rss_64_mb": _rss(run, "generate_64"),
                     "peak_mb": (run.get("generate_64") or {}).get("VmHWM"),
                     "decode_tok_s": run.get("decode_tok_s")}
    edge, peer = rows.get("ember_edge", {}), rows.get("llama_cpp_python", {})
    if edge.get("rss_load_mb") and peer.get("rss_load_mb"):
        rows["target_edge_load_le_llama_cpp_python"] = {
            "edge_mb": edge["rss_load_mb"], "llama_cpp_python_mb": peer["rss_load_mb"],
            "met": edge["rss_load_mb"] <= peer["rss_load_mb"]}
    main, e = rows.get("ember", {}), rows.get("ember_edge", {})
    if main.get("decode_tok_s") and e.get("decode_tok_s"):
        rows["edge_vs_main_decode"] = e["decode_tok_s"] / main["decode_tok_s"]
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    b = report["ember"]["breakdown_mb"]
    stacks = {"ember (torch)": [("interpreter", b["interpreter"]),
                                ("import torch", b["import_torch"]),
                                ("import ember", b["import_ember"]),
                                ("load (weights+kernels+KV)", b["load_weights_kernels_kv"]),
                                ("generate 64", b["generate_64_tokens"])]}
    e = report["ember_edge"]["breakdown_mb"]
    stacks["ember edge (no torch)"] = [
        ("interpreter", e["interpreter"]), ("numpy", e["numpy"]),
        ("tokenizers+jinja2", e["tokenizers_jinja2_ember_tokenizer_modules"]),
        ("ember.edge+gguf", e["ember_edge_modules_and_gguf"]),
        ("kernel lib", e["kernel_library_and_libgomp"]),
        ("weights", e["of_which_weights_computed"]),
        ("tokenizer+rest", e["of_which_tokenizer_and_rest"]),
        ("generate 64", e["generate_64_tokens"])]
    for key, label in (("llama_cpp_python", "llama-cpp-python"),
                       ("llama_cpp", "llama.cpp (llama-server)")):
        run = report.get(key) or {}
        if "generate_64" in run:
            load = run["load"]["VmRSS"]
            stacks[label] = [("load", load), ("generate 64", run["generate_64"]["VmRSS"] - load)]
    colors: dict[str, object] = {}
    cmap = plt.get_cmap("tab20")
    for name, parts in stacks.items():
        left = 0.0
        for label, v in parts:
            if label not in colors:
                colors[label] = cmap(len(colors) % 20)
            ax.barh(name, v, left=left, color=colors[label],
                    label=label if label not in ax.get_legend_handles_labels()[1] else None)
            left += v
        ax.text(left + 3, name, f"{left:.0f} MB", va="center", fontsize=8)
    load = report.get("loadavg_before", [0])[0]
    ax.set_xlabel(f"RSS (MB), int4 SmolLM2-135M (GGUF Q4_1), after load + 64 tokens "
                  f"(loadavg {load:.1f})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    from ember.config import EnvSettings
    from ember.loading.sources import resolve_model

    env = EnvSettings.from_env()
    model = "smollm2-135m-instruct"
    gguf = str(resolve_model(model, env.model_dirs, env.cache_path).path)
    report: dict = {"loadavg_before": os.getloadavg(), "model": gguf, "prompt": PROMPT,
                    "threads": 2, "context": 4096}
    for key, run in (("ember_edge", lambda: edge_run(model)),
                     ("llama_cpp_python", lambda: llama_py_run(gguf)),
                     ("ember", lambda: ember_run(model)),
                     ("llama_cpp", lambda: llama_run(gguf))):
        print(f"measuring {key} ...", file=sys.stderr, flush=True)
        report[key] = run()
    report["loadavg_after"] = os.getloadavg()
    report["summary"] = summary(report)
    report["note"] = ("RSS is not timing: load average matters little, but other processes' "
                      "page-cache pressure can evict file-backed (mmapped) pages; decode tok/s "
                      "is contended unless loadavg is low")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "edge_rss.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "edge_rss.png")
    print(json.dumps({"summary": report["summary"],
                      "ember_edge_breakdown_mb": report["ember_edge"]["breakdown_mb"],
                      "ember_breakdown_mb": report["ember"]["breakdown_mb"],
                      "loadavg": [report["loadavg_before"], report["loadavg_after"]]},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
