"""Per-chunk, per-phase timing of a 4096-token prefill (instrumented scratch kernels)."""
import sys, time, json, os, ctypes
from pathlib import Path
import torch
torch.set_num_threads(2)
from ember import LLM, SamplingParams
N = int(os.environ.get("N", "4096"))
llm = LLM("smollm2-135m-instruct", quantization="int4", dtype="float32", show_progress=False,
          enable_prefix_caching=False, kv_cache_dtype="bf16", max_model_len=8192, kv_cache_mb=1024)
tok = llm.get_tokenizer()
ids = tok.encode(Path("/work/shared/data/emma.txt").read_text(), add_special_tokens=False)[:N]
def find(obj, name, depth=0):
    if depth > 4: return None
    for v in vars(obj).values():
        if type(v).__name__ == name: return v
    for v in vars(obj).values():
        if hasattr(v, "__dict__") and type(v).__module__.startswith("ember"):
            r = find(v, name, depth + 1)
            if r is not None: return r
runner = find(llm, "ModelRunner")
dec = runner.decoder
f = dec.kernels.lib.ember_phases; f.restype = ctypes.POINTER(ctypes.c_double)
ph = f()
NAMES = ["enter", "rowops", "qkv", "rope", "attn", "pack", "o", "gateup", "down", "plan"]
calls = []
class Wrap:
    def __init__(self, d): self.d = d
    def __call__(self, x, cos, sin, slots, bt, lens):
        before = [ph[i] for i in range(10)]
        t = time.perf_counter(); self.d(x, cos, sin, slots, bt, lens)
        w = time.perf_counter() - t
        calls.append((x.shape[0], int(lens.max()), w, [ph[i] - before[i] for i in range(10)]))
    def __getattr__(self, k): return getattr(self.d, k)
runner.decoder = Wrap(dec)
one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
llm.generate([ids[:64]], one, use_tqdm=False)
reps = int(os.environ.get("REPS", "3"))
allr = []
for rep in range(reps):
    calls.clear()
    t = time.perf_counter()
    llm.generate([ids[:N]], one, use_tqdm=False)
    wall = time.perf_counter() - t
    allr.append((wall, list(calls)))
    print(f"rep {rep}: wall {wall:.3f}s {N/wall:.0f} tok/s  decoder sum {sum(c[2] for c in calls):.3f}", file=sys.stderr)
# per chunk: min over reps of each phase
nch = len(allr[0][1])
out = {"walls": [a[0] for a in allr], "chunks": []}
for k in range(nch):
    rows, ctx = allr[0][1][k][:2]
    wmin = min(a[1][k][2] for a in allr)
    phmin = [min(a[1][k][3][i] for a in allr) for i in range(10)]
    out["chunks"].append({"rows": rows, "ctx": ctx, "wall_ms": round(wmin*1e3, 1),
                          **{n: round(v*1e3, 1) for n, v in zip(NAMES, phmin)}})
    print(json.dumps(out["chunks"][-1]), file=sys.stderr)
tot = {n: round(sum(c[n] for c in out["chunks"]), 1) for n in ["wall_ms"] + NAMES}
print("TOTAL(min per chunk)", json.dumps(tot), file=sys.stderr)
print(json.dumps(out))
