"""`ember generate --runtime edge` / `ember chat --runtime edge`: the torch-free edge runtime
(ember.edge) behind the same flags. Options only the engine has (--quantization other than
auto, --dtype bfloat16, --speculative-config, --no-cpu-kernels, --kv-cache-dtype) are refused
with one line."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from ember.cli.chat_loop import chat_loop
from ember.types import SamplingParams

RUNTIMES = ("engine", "edge")
"""Values of --runtime: the full engine (ember.LLM, PyTorch) or the edge runtime."""


def add_runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=RUNTIMES, default="engine",
                   help="engine (default): the full engine; edge: the torch-free runtime over "
                        "the C kernels (Llama GGUF with Q4_0/Q4_1 or Q8_0 layers; ~half the "
                        "memory; one sequence, no speculative decoding)")


def _check_args(args: argparse.Namespace) -> None:
    engine_only = [("--quantization", args.quantization not in ("auto",)),
                   ("--dtype", args.dtype != "float32"),
                   ("--speculative-config", args.speculative_config is not None),
                   ("--no-cpu-kernels", args.no_cpu_kernels),
                   ("--kv-cache-dtype", args.kv_cache_dtype not in ("auto", "bf16"))]
    bad = [flag for flag, used in engine_only if used]
    if bad:
        raise ValueError(f"{', '.join(bad)} not supported with --runtime edge (it runs the "
                         "file's own Q4/Q8 format, float32 activations, a bf16 KV cache)")


def _load(args: argparse.Namespace) -> tuple[object, SamplingParams]:
    from ember.cli.generate import sampling_from_args
    from ember.edge import EdgeLLM

    _check_args(args)
    llm = EdgeLLM(args.model, max_context=args.max_model_len or 4096,
                  chat_template=args.chat_template, generation_config=args.generation_config)
    Console(stderr=True).print(f"edge runtime ({llm.isa} kernels), "
                               + llm.generation_defaults.describe(),
                               style="dim", highlight=False, soft_wrap=True)
    return llm, sampling_from_args(args, llm.generation_defaults)


def cmd_generate(args: argparse.Namespace) -> int:
    from ember.edge import EdgeLLM

    llm, params = _load(args)
    assert isinstance(llm, EdgeLLM)
    prompt = llm.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat \
        else args.prompt
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ember.edge import EdgeLLM

    llm, params = _load(args)
    assert isinstance(llm, EdgeLLM)
    return chat_loop(lambda messages: (delta.text for delta in
                                       llm.stream(llm.encode_chat(messages), params)),
                     args.system, "ember chat (edge runtime)")
