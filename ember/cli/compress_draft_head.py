"""`ember train-draft-head`: train an `eagle` speculative-decoding head on a target model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ember.cli.compress import StageProgress, apply_threads, console, print_summary
from ember.config import DEFAULT_MODEL


def cmd_train_draft_head(args: argparse.Namespace) -> int:
    from ember.compress.draft_head import HeadSettings, train_draft_head

    out = Path(args.output).expanduser()
    if out.is_dir():
        raise ValueError(f"output {out} is a directory; give the head's file name "
                         "(e.g. head.safetensors)")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = HeadSettings(
        model=args.model, prompts=args.prompts, samples=args.samples,
        temperature=args.temperature, max_tokens=args.max_tokens,
        data=tuple(str(Path(p).expanduser().resolve()) for p in args.data),
        text_tokens=args.text_tokens, vocab=args.vocab, ffn=args.ffn, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    apply_threads()
    with StageProgress(console()) as progress:
        report = train_draft_head(settings, out, progress)
    depth = report["held_out_acceptance_by_depth"]
    print_summary("draft head", [
        ("output", str(out)),
        ("training positions", str(report["train_positions"])),
        ("held-out acceptance", " / ".join(f"{a:.3f}" for a in depth)
         + "  (drafts 1..4 all right, chained)"),
        ("held-out vocab coverage", f"{report['held_out_vocab_coverage']:.3f}"),
        ("train time", f"{report['train_seconds']:.0f} s"),
        ("use", "--speculative-config '" + json.dumps(
            {"method": "eagle", "model": str(out), "num_speculative_tokens": 3}) + "'")])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `ember train-draft-head`."""
    p = sub.add_parser(
        "train-draft-head", help="train an eagle draft head for speculative decoding (CPU)",
        description="The target answers built-in chat prompts (greedy); a small head learns "
                    "to predict its next hidden state from the current one and the next "
                    "token (EAGLE-style), scored on the target's own distribution over the "
                    "most frequent tokens. Writes one .safetensors file for "
                    "--speculative-config '{\"method\": \"eagle\", \"model\": FILE}'.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"target (default {DEFAULT_MODEL})")
    p.add_argument("-o", "--output", required=True, help="the head file to write")
    p.add_argument("--prompts", type=int, default=500,
                   help="built-in prompts the target answers for data (default 500)")
    p.add_argument("--samples", type=int, default=3,
                   help="answers per prompt: the greedy one and SAMPLES - 1 sampled at "
                        "--temperature (default 3)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="temperature of the sampled answers (default 0.8)")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length (default 256)")
    p.add_argument("--data", nargs="*", default=[], metavar="FILE",
                   help="text files whose 512-token windows are added")
    p.add_argument("--text-tokens", type=int, default=100_000,
                   help="tokens of --data windows used at most (default 100000)")
    p.add_argument("--vocab", type=int, default=4096,
                   help="the head's vocabulary: the most frequent tokens (default 4096)")
    p.add_argument("--ffn", type=int, default=256, help="the head's MLP width (default 256)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_draft_head)
