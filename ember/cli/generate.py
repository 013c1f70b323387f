"""`ember generate`, `ember chat`, `ember models`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from ember.cli import edge_runtime
from ember.cli.chat_loop import chat_loop
from ember.config import DEFAULT_MODEL, KV_CACHE_DTYPES, QUANTIZATIONS, EnvSettings, SpecConfig
from ember.engine.generation_defaults import GenerationDefaults
from ember.types import SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"model name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_quantization_arg(p)
    p.add_argument("--max-model-len", type=int, default=None)
    add_generation_config_arg(p)
    add_speculative_config_arg(p)
    edge_runtime.add_runtime_arg(p)


def add_speculative_config_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding, vLLM's JSON: e.g. '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 5, \"prompt_lookup_max\": 4, "
                        "\"prompt_lookup_min\": 2}' (default off)")


def add_generation_config_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="jinja2 chat template replacing the model's (base models have none)")
    p.add_argument("--generation-config", default="auto", metavar="{auto,none,vllm,FOLDER}",
                   help="default sampling values: auto (default): the model's own "
                        "(generation_config.json or GGUF general.sampling.*; else temperature "
                        "0.7, top_p 0.9, repetition_penalty 1.1); none / vllm: neutral "
                        "(temperature 1, no top-p/top-k/penalty); FOLDER: its "
                        "generation_config.json. Explicit sampling flags always win")


def add_quantization_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--quantization", "-q", default="auto",
                   choices=["none", *QUANTIZATIONS],
                   help="runtime weight format (weight-only). auto (default): the file's own "
                        "(Q4 GGUF -> int4, Q8_0/Q5_0/Q6_K -> int8, else dense); native: each "
                        "matrix in the kernel format nearest its stored type (Q4_0/Q4_1/Q4_K -> "
                        "int4, Q5_0 -> Q5, others -> int8; the LM head in 6-bit Q6_K "
                        "geometry); native-q4q8: native with Q4_K as Q4 and Q6_K as Q8 (the "
                        "layer formats before Q4K / Q6); "
                        "native-q6head: the same as native; native-q8head: native with the "
                        "exact 8-bit head of a Q8_0 file; native-q4head: native plus a 4-bit "
                        "LM head (opt-in, lossy); "
                        "int8 / int4: every matrix in one format; none: dense --dtype")
    p.add_argument("--no-cpu-kernels", action="store_true",
                   help="use PyTorch ops instead of Ember's C++ kernels")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV cache element type. auto (default): bf16 for quantized models on "
                        "the kernels, else --dtype; int8: half the KV bytes (a scale per token "
                        "and head; attention kernels only); fp32: PyTorch attention (reference)")


def add_served_model_args(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                          routed_by: str, served_help: str) -> None:
    """The model flags `ember serve` and `ember run-batch` share: repeatable --model (one
    generation model plus embedding models, told apart by `routed_by`), --served-model-name,
    --dtype, the quantization flags, --max-model-len, the generation-config flags, --seed."""
    p.add_argument("--model", "-m", action="append", default=None,
                   help=f"model name, .gguf file or HF directory (default {DEFAULT_MODEL}); "
                        f"repeatable: one generation model plus embedding models, {routed_by}")
    p.add_argument("--served-model-name", action="append", default=[], help=served_help)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_quantization_arg(p)
    p.add_argument("--max-model-len", type=int, default=None)
    add_generation_config_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seed of requests without their own")


def quantization_of(args: argparse.Namespace) -> str | None:
    return None if args.quantization == "none" else args.quantization


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    # NOTE: sampling flags default to None = the model's generation default.
    model_default = "default: the model's (see --generation-config)"
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=None, help=f"0 = greedy; {model_default}")
    p.add_argument("--top-p", type=float, default=None, help=model_default)
    p.add_argument("--top-k", type=int, default=None, help=f"0 disables; {model_default}")
    p.add_argument("--min-p", type=float, default=None, help=model_default)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"1 disables; {model_default}")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace, defaults: GenerationDefaults) -> SamplingParams:
    """SamplingParams of the CLI flags; sampling flags not given take the model's defaults."""
    return defaults.sampling_params(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=list(args.stop))


def _llm(args: argparse.Namespace) -> Any:
    from ember.engine.llm import LLM
    return LLM(args.model, dtype=args.dtype, quantization=quantization_of(args),
               max_model_len=args.max_model_len, cpu_kernels=not args.no_cpu_kernels,
               kv_cache_dtype=args.kv_cache_dtype,
               generation_config=args.generation_config, chat_template=args.chat_template,
               speculative_config=spec_dict(args.speculative_config))


def spec_dict(text: str | None) -> dict[str, Any] | None:
    """The validated `--speculative-config` JSON as a dict (None when off)."""
    spec = SpecConfig.from_json(text)
    return dataclasses.asdict(spec) if spec.enabled else None


def _setup(args: argparse.Namespace) -> tuple[Any, SamplingParams]:
    """Load the model, print its generation defaults (stderr), build the sampling params."""
    llm = _llm(args)
    defaults: GenerationDefaults = llm.engine.generation_defaults
    Console(stderr=True).print(defaults.describe(), style="dim", highlight=False, soft_wrap=True)
    return llm, sampling_from_args(args, defaults)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.runtime == "edge":
        return edge_runtime.cmd_generate(args)
    llm, params = _setup(args)
    prompt = llm.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat \
        else args.prompt
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.runtime == "edge":
        return edge_runtime.cmd_chat(args)
    llm, params = _setup(args)
    return chat_loop(lambda messages: (out.outputs[0].delta_text for out in
                                       llm.stream(llm.encode_chat(messages), params)),
                     args.system, "ember chat")


def cmd_models(args: argparse.Namespace) -> int:
    if args.info:
        return _model_info(args)
    from ember.loading.sources import list_models
    table = Table(title="Ember models")
    for col in ("name", "status", "location", "description"):
        table.add_column(col)
    env = EnvSettings.from_env()
    for row in list_models(env.model_dirs, env.cache_path):
        table.add_row(row.name, row.status, row.location, row.description)
    Console().print(table)
    return 0


def _model_info(args: argparse.Namespace) -> int:
    """`ember models --info NAME`: load the model as `ember generate` would and print its
    execution plan on this CPU (generates nothing)."""
    from ember.config import ModelConfig
    from ember.layers.factory import format_table
    from ember.layers.footprint import decode_read_bytes
    from ember.loading.loader import load_model, requantization_report
    from ember.plan import load_kernels

    env = EnvSettings.from_env()
    config = ModelConfig(model=args.info, quantization=quantization_of(args),
                         cpu_kernels=not args.no_cpu_kernels,
                         kv_cache_dtype=args.kv_cache_dtype)
    config.validate()
    loaded = load_model(config, env, runtime=True, kernels=load_kernels(config, env))
    arch = loaded.arch
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"{loaded.source.name}: {loaded.source.path} ({loaded.source.kind})")
    console.print(f"architecture: {arch.architecture}, {arch.num_layers} layers, hidden "
                  f"{arch.hidden_size}, heads {arch.num_heads}/{arch.num_kv_heads} x "
                  f"{arch.head_dim}, vocab {arch.vocab_size}, context {arch.max_position}")
    console.print(f"stored tensors: {loaded.weight_types}")
    console.print(loaded.plan.describe())
    console.print(f"runtime formats: {loaded.runtime_formats}")
    for kind, counts in format_table(loaded.model).items():
        console.print(f"  {kind}: " + ", ".join(f"{f} x{n}" for f, n in counts.items()))
    read = decode_read_bytes(loaded.model)
    console.print(f"decode reads per token: layers {read['layers'] / 1e6:.1f} MB, LM head "
                  f"{read['head'] / 1e6:.1f} MB")
    report = requantization_report(config, env, loaded.plan)
    console.print(report or "every layer matrix reaches its runtime format exactly")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add generate, chat and models to the `ember` command."""
    p = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat message")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat, streaming replies")
    p.add_argument("--system", default=None, help="system message")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("models", help="list local models and where they come from")
    p.add_argument("--info", metavar="NAME", default=None,
                   help="load model NAME (name, .gguf or directory) and print how it runs on "
                        "this CPU: its execution plan and runtime weight formats")
    add_quantization_arg(p)
    p.set_defaults(func=cmd_models)
