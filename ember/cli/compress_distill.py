"""`ember distill`: train a smaller student on the teacher's softened logits (or, with
--no-teacher, on plain next-token loss) and write an Ember checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ember.cli.compress import (StageProgress, apply_threads, check_output, console,
                                print_summary)
from ember.config import DEFAULT_MODEL


def _settings(args: argparse.Namespace, out: Path) -> Any:
    """DistillSettings from the arguments (or from OUT/ when resuming)."""
    from ember.compress.distill import DistillSettings, resume_settings

    if args.resume:
        return resume_settings(out, args.steps, args.time_budget)
    if not args.data:
        raise ValueError("--data FILES is required (training text, e.g. the four Austen "
                         "novels other than pride_and_prejudice.txt)")
    layer_ids = (tuple(int(i) for i in args.layer_ids.split(",")) if args.layer_ids else None)
    return DistillSettings(
        teacher=args.teacher, data=tuple(str(Path(p).expanduser().resolve()) for p in args.data),
        student_layers=args.student_layers, layer_ids=layer_ids, student=args.student,
        layer_choice=args.layer_choice, importance_windows=args.importance_windows,
        steps=200 if args.steps is None else args.steps, time_budget_s=args.time_budget,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, temperature=args.temperature, topk=args.topk,
        hidden_weight=args.hidden_weight, ce_weight=args.ce_weight, no_teacher=args.no_teacher,
        autocast=args.autocast,
        train_embeddings=args.train_embeddings, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, seed=args.seed)


def cmd_distill(args: argparse.Namespace) -> int:
    """Train (or resume), checkpointing into OUT/, then print the summary."""
    from ember.compress.distill import load_for_distill
    from ember.compress.distill_log import read_log

    out = check_output(args.output)
    if args.resume and not (out / "train_state").is_dir():
        raise ValueError(f"--resume: {out} has no train_state/ to resume from")
    if (not args.resume and not args.precompute_teacher and (out / "train_state").is_dir()
            and not args.overwrite):
        raise ValueError(f"{out} already holds a training run: pass --resume to continue it "
                         f"or --overwrite to start over")
    settings = _settings(args, out)
    apply_threads()
    compare = {}
    for other in args.compare or []:
        title, log = read_log(Path(other).expanduser())
        compare[f"{title} ({Path(other).name})"] = log
    cache_dir = Path(args.teacher_cache).expanduser() if args.teacher_cache else None
    t0 = time.perf_counter()
    with StageProgress(console()) as progress:
        distiller = load_for_distill(settings, out, args.resume, progress, cache_dir)
        if args.precompute_teacher:
            seconds = distiller.precompute_teacher(progress)
            print_summary("ember distill --precompute-teacher", [
                ("teacher", settings.teacher), ("windows", str(len(distiller.cache.values))),
                ("time", f"{seconds:.0f} s"), ("cache", str(distiller.cache_dir))])
            return 0
        distiller.compare = compare
        start_step = distiller.step
        distiller.run(progress)
    log = distiller.log
    first = log.validation[0] if log.validation else None
    last = log.validation[-1] if log.validation else None
    s = distiller.settings
    print_summary("ember distill", [
        ("teacher", s.teacher),
        ("student", f"{distiller.student_arch.num_layers} layers"
                    + (f" from teacher layers {distiller.layer_ids}" if distiller.layer_ids
                       else "")),
        ("loss", "next-token cross-entropy (no teacher)" if s.no_teacher else
         f"KL to teacher, T={s.temperature}, top-{s.topk or 'all'}"
         + (f" + {s.hidden_weight} x hidden MSE" if s.hidden_weight else "")
         + (f" + {s.ce_weight} x next-token CE" if s.ce_weight else "")),
        ("steps", f"{start_step} -> {distiller.step} ({distiller.tokens} tokens)"),
        ("training time", f"{distiller.train_s:.0f} s"
                          + (f" of a {s.time_budget_s:.0f} s budget" if s.time_budget_s else "")),
        ("held-out ppl", "-" if first is None or last is None else
         f"{first['val_ppl']:.2f} (step {first['step']}) -> {last['val_ppl']:.2f} "
         f"(step {last['step']})"),
        ("wall clock", f"{time.perf_counter() - t0:.0f} s"),
        ("output", f"{out} (curve: {out / 'curve.png'})")])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `ember distill`."""
    p = sub.add_parser("distill", help="distill a teacher into a smaller student (CPU)",
                       description="Initialise a student from a subset of the teacher's layers "
                                   "and train it on the teacher's softened logits (KL), with "
                                   "AdamW and bf16 autocast; checkpoints every K steps; "
                                   "--resume continues a run.")
    p.add_argument("--teacher", default=DEFAULT_MODEL, help=f"teacher (default {DEFAULT_MODEL})")
    p.add_argument("--student-layers", type=int, default=None,
                   help="student depth (which teacher layers: --layer-choice)")
    p.add_argument("--layer-choice", default="even", choices=["even", "importance"],
                   help="even: evenly spaced teacher layers, first and last kept; importance: "
                        "the layers that change the hidden state most (angular distance on "
                        "training windows, as `ember prune --drop-layers`)")
    p.add_argument("--importance-windows", type=int, default=16,
                   help="training windows the layer importance is measured on (default 16)")
    p.add_argument("--layer-ids", default=None, help="explicit teacher layers, e.g. 0,2,4")
    p.add_argument("--student", default=None,
                   help="initialise the student from this model (e.g. an `ember prune` output)")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE", help="training text files")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop after this much training time (the LR schedule follows it)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softening of both distributions (default 1; T=2 learned much slower here)")
    p.add_argument("--topk", type=int, default=64,
                   help="teacher logits kept per token (cacheable); 0 = full vocabulary")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of the per-layer hidden-state MSE (0 = off; the teacher "
                        "cache is then not used)")
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="add this x next-token cross-entropy to the KD loss (0 = pure KD)")
    p.add_argument("--no-teacher", action="store_true",
                   help="plain next-token loss (baseline; the teacher only initialises)")
    p.add_argument("--autocast", default="bf16", choices=["bf16", "none"])
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the (tied) embedding; frozen by default")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="where teacher top-k logits are cached (default OUT/train_state)")
    p.add_argument("--precompute-teacher", action="store_true",
                   help="only fill the teacher cache for --steps steps, then exit")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/")
    p.add_argument("--overwrite", action="store_true", help="start over in an existing OUT/")
    p.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                   help="draw these earlier runs' curves in curve.png too")
    p.add_argument("-o", "--output", required=True, help="output directory OUT/")
    p.set_defaults(func=cmd_distill)
