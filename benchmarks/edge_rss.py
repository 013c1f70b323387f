"""Edge footprint: resident memory of Ember vs native llama.cpp on the int4 SmolLM2, same harness.

Each engine runs in a fresh process; RSS (VmRSS) and peak (VmHWM) come from /proc/<pid>/status:
  ember:      after `import torch`, after `import ember`, after LLM(...) load, after 64 greedy
              tokens (steady state); the breakdown: interpreter, torch import, ember's own
              imports, weights + kernels + KV cache (load), generation (activations).
  llama.cpp:  `llama-server` (~/.cache/ember-peers/llama.cpp-native/build/bin) on the same
              GGUF: after load (/health ok), after 64 generated tokens.
Writes benchmarks/results/edge/edge_rss.json and .png.
  flock /tmp/ember-bench.lock python benchmarks/edge_rss.py      (~1 min)
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
PROMPT = "The capital of France is"

EMBER_CHILD = r'''
import json, sys, time
def mem():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out
r = {"start": mem()}
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
llm.generate([sys.argv[2]], params, use_tqdm=False)
r["generate_64"] = mem()
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


FLOOR_CHILD = r'''
import ctypes, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
r = {"start": rss()}
import numpy as np, tokenizers, jinja2, gguf
r["imports"] = rss()
lib = ctypes.CDLL(sys.argv[1]) if sys.argv[1] else None
r["kernels"] = rss()
reader = gguf.GGUFReader(sys.argv[2])
from ember.tokenizer import Tokenizer
meta = {f.name: f.contents() for f in reader.fields.values()}
tok = Tokenizer.from_gguf_metadata(meta)
del reader, meta
r["tokenizer"] = rss()
weights = np.ones(int(float(sys.argv[3]) * 2**20), dtype=np.uint8)  # Ember's runtime weights
r["weights"] = rss()
r["torch_imported"] = "torch" in sys.modules
print(json.dumps(r))
'''


def floor_run(kernel_lib: str | None, gguf: str, weights_mb: float) -> dict:
    """What a torch-free runtime over the same C kernels would hold after load, measured from
    its parts: interpreter, numpy + tokenizers + jinja2 + gguf, the kernel library, Ember's
    tokenizer, and Ember's runtime weight bytes (touched). KV pages count only as used."""
    proc = subprocess.run([sys.executable, "-c", FLOOR_CHILD, kernel_lib or "", gguf,
                           str(weights_mb)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1000:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["breakdown_mb"] = {"interpreter": r["start"], "imports": r["imports"] - r["start"],
                         "kernel_library": r["kernels"] - r["imports"],
                         "tokenizer": r["tokenizer"] - r["kernels"],
                         "weights": r["weights"] - r["tokenizer"]}
    return r


def ember_run(model: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", EMBER_CHILD, model, PROMPT],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
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


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    b = report["ember"]["breakdown_mb"]
    parts = [("interpreter", b["interpreter"]), ("import torch", b["import_torch"]),
             ("import ember", b["import_ember"]), ("load (weights+kernels+KV)",
                                                     b["load_weights_kernels_kv"]),
             ("generate 64", b["generate_64_tokens"])]
    left = 0.0
    for label, v in parts:
        ax.barh("ember", v, left=left, label=label)
        left += v
    llama = report.get("llama_cpp") or {}
    if "generate_64" in llama:
        ax.barh("llama.cpp (llama-server)", llama["load"]["VmRSS"], label="llama.cpp load")
        ax.barh("llama.cpp (llama-server)", llama["generate_64"]["VmRSS"] - llama["load"]["VmRSS"],
                left=llama["load"]["VmRSS"], label="llama.cpp generate 64")
    ax.set_xlabel("RSS (MB), int4 SmolLM2-135M, steady state after 64 tokens")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    from ember.config import EnvSettings
    from ember.loading.sources import resolve_model

    env = EnvSettings.from_env()
    model = "smollm2-135m-instruct"
    gguf = str(resolve_model(model, env.model_dirs, env.cache_path).path)
    ember = ember_run(model)
    report = {"loadavg_before": os.getloadavg(), "model": gguf,
              "ember": ember, "llama_cpp": llama_run(gguf),
              "torch_free_floor": floor_run(ember.get("kernel_library"), gguf,
                                            ember["weights_mb"]),
              "loadavg_after": os.getloadavg(),
              "note": "RSS is not timing: load average matters little, but other processes' "
                      "page-cache pressure can evict file-backed (mmapped) pages"}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "edge_rss.json").write_text(json.dumps(report, indent=2))
    plot(report, OUT / "edge_rss.png")
    e = report["ember"]
    print(json.dumps({"ember": {k: v for k, v in e.items() if k != "plan"},
                      "llama_cpp": report["llama_cpp"],
                      "torch_free_floor": report["torch_free_floor"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
