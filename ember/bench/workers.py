"""One benchmark run of one engine, in its own process: `python -m ember.bench.workers`.

Each engine runs in a fresh process so load time and RSS are its own and peers never share
memory or threads. Prints one JSON object with the figures on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

FIGURES = ("load_s", "rss_mb", "ttft_16_ms", "prefill_512_tok_s", "decode_16_tok_s",
           "decode_512_tok_s", "batch8_tok_s", "batch32_tok_s", "layers_mb_per_token",
           "head_mb_per_token", "ppl_2048")
"""The last three: Ember only (what a decode step reads; perplexity of the first 2048 tokens
of --ppl-text by the DESIGN protocol, so a lossy plan's cost sits beside its speed)."""
PPL_TOKENS = 2048


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _prompt(tokenize: Callable[[str], list[int]], n: int) -> list[int]:
    from ember.bench.text import sample_text

    ids = tokenize(sample_text())
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


class EmberRunner:
    def __init__(self, model: str, quantization: str | None, dtype: str,
                 cpu_kernels: bool = True) -> None:
        from ember import LLM, SamplingParams

        self.params = SamplingParams
        self.llm = LLM(model, quantization=quantization, dtype=dtype, show_progress=False,
                       enable_prefix_caching=False, cpu_kernels=cpu_kernels)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.get_tokenizer().encode(text)

    def read_bytes(self) -> dict[str, float]:
        """MB a decode step reads: the layers' projections and the LM head."""
        from ember.layers.footprint import decode_read_bytes

        parts = decode_read_bytes(getattr(self.llm, "_engine").loaded.model)
        return {f"{part}_mb_per_token": n / 1e6 for part, n in parts.items()}

    def perplexity(self, text_path: str) -> float:
        from pathlib import Path

        from ember.eval.perplexity import perplexity

        text = Path(text_path).read_text(encoding="utf-8")
        return perplexity(self.llm, text, max_tokens=PPL_TOKENS).perplexity

    def generate(self, prompts: list[list[int]], n: int) -> int:
        p = self.params(max_tokens=n, temperature=0, ignore_eos=True)
        outs = self.llm.generate(prompts, p, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)


class LlamaCppRunner:
    """llama-cpp-python (llama.cpp) on the same GGUF; sequences run one after another."""

    def __init__(self, model_path: str, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads,
                         n_ctx=2048, n_batch=512, flash_attn=True, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def generate(self, prompts: list[list[int]], n: int) -> int:
        total = 0
        for prompt in prompts:
            self.llm.reset()
            for i, _ in enumerate(self.llm.generate(prompt, temp=0.0, reset=True)):
                total += 1
                if i + 1 >= n:
                    break
        return total


class EdgeRunner:
    """Ember's torch-free edge runtime (ember.edge.EdgeLLM) over the same kernels: one process
    without PyTorch, sequences one after another (as llama-cpp-python's runner)."""

    def __init__(self, model_path: str, threads: int) -> None:
        from ember.edge import EdgeLLM

        self.llm = EdgeLLM(model_path, max_context=2048, num_threads=threads)

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = self.llm.tokenizer.encode(text)
        return ids

    def generate(self, prompts: list[list[int]], n: int) -> int:
        return sum(len(self.llm.generate(p, max_tokens=n, temperature=0,
                                         ignore_eos=True).token_ids) for p in prompts)


class HFRunner:
    """HF transformers, fp32, on the same GGUF weights; batches padded on the left."""

    def __init__(self, model_path: str) -> None:
        import os

        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(model_path), gguf_file=os.path.basename(model_path),
            dtype=torch.float32).eval()
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(os.path.dirname(model_path),
                                                 gguf_file=os.path.basename(model_path))

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def generate(self, prompts: list[list[int]], n: int) -> int:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(prompts)


def measure(runner: Any, load_s: float, decode_tokens: int) -> dict[str, float]:
    r: dict[str, float] = {"load_s": load_s, "rss_mb": rss_mb()}
    p16, p512 = _prompt(runner.tokenize, 16), _prompt(runner.tokenize, 512)
    runner.generate([p16], 2)  # warm-up
    t = time.perf_counter()
    runner.generate([p16], 1)
    r["ttft_16_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    runner.generate([p512], 1)
    t512 = time.perf_counter() - t
    r["prefill_512_tok_s"] = 512 / t512
    for name, prompt, first in (("decode_16_tok_s", p16, r["ttft_16_ms"] / 1e3),
                                ("decode_512_tok_s", p512, t512)):
        t = time.perf_counter()
        n = runner.generate([prompt], decode_tokens)
        r[name] = (n - 1) / max(time.perf_counter() - t - first, 1e-9)
    for batch in (8, 32):
        prompts = [_prompt(runner.tokenize, 16 + i) for i in range(batch)]
        t = time.perf_counter()
        n = runner.generate(prompts, 128)
        r[f"batch{batch}_tok_s"] = n / (time.perf_counter() - t)
    r["rss_mb_after"] = rss_mb()
    if hasattr(runner, "read_bytes"):
        r.update(runner.read_bytes())
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", help="ember | ember-edge | llama.cpp | transformers")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--no-cpu-kernels", action="store_true",
                    help="ember: PyTorch's int4/int8 ops instead of Ember's kernels")
    ap.add_argument("--ppl-text", default=None,
                    help="ember: also report ppl_2048, the perplexity of this text's start")
    args = ap.parse_args(argv)
    if args.engine in ("ember", "transformers"):
        # NOTE: only the engines that run on PyTorch import it: llama-cpp-python's RSS must not
        # carry torch's ~200 MB (until 2026-12-01 every worker imported it, so its rss_mb was
        # llama.cpp's plus torch's)
        import torch
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runner: Any
    if args.engine == "ember":
        runner = EmberRunner(args.model_path, args.quantization, args.dtype,
                             not args.no_cpu_kernels)
    elif args.engine == "llama.cpp":
        runner = LlamaCppRunner(args.model_path, args.threads)
    elif args.engine == "ember-edge":
        runner = EdgeRunner(args.model_path, args.threads)
    elif args.engine == "transformers":
        runner = HFRunner(args.model_path)
    else:
        raise SystemExit(f"unknown engine {args.engine!r}")
    result = measure(runner, time.perf_counter() - t0, args.decode_tokens)
    if args.ppl_text and isinstance(runner, EmberRunner):
        result["ppl_2048"] = runner.perplexity(args.ppl_text)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
