"""Knowledge distillation on CPU: a student initialised from a subset of the teacher's layers
(evenly spaced, or the most important ones by the angular distance of `structured.py`) learns
the teacher's softened next-token distribution.

loss = T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the teacher's top-k tokens
(renormalised; k = 0 uses the full vocabulary), + hidden_weight * MSE(final hidden states)
(+ ce_weight * next-token cross-entropy, optional). The hidden-state loss is a normalised MSE
||h_s - h_t||^2 / ||h_t||^2 between each student layer's output and the output of the teacher
layer it was copied from (the final hidden state only when that mapping is unknown).
With `no_teacher` the loss is plain next-token cross-entropy (the comparison baseline). AdamW,
bf16 autocast, cosine learning rate with warmup; the schedule follows steps, or training time
when a time budget is set. Checkpoints every K steps are complete Ember checkpoints plus a
resumable train state (`train_state.py`); training time excludes validation and checkpointing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ember.compress import dense, train_state
from ember.compress.calib import check_text_files
from ember.compress.distill_data import TeacherCache, WindowData, build_windows
from ember.compress.dense import Model
from ember.compress.distill_log import TrainLog
from ember.compress.quantize import Progress
from ember.models.arch import ArchConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillSettings:
    """A distillation run (saved in ember.json and train_state/state.json)."""

    teacher: str
    data: tuple[str, ...]
    student_layers: int | None = None
    """Student depth; which teacher layers it keeps is `layer_choice`."""
    layer_choice: str = "even"
    """even: evenly spaced (first and last kept); importance: the layers that change the
    residual stream most (angular distance on training windows, as `ember prune
    --drop-layers`)."""
    importance_windows: int = 16
    """Training windows the layer importance is measured on (layer_choice importance)."""
    layer_ids: tuple[int, ...] | None = None
    """Explicit teacher layers for the student (overrides the even spacing)."""
    student: str | None = None
    """Initialise the student from this model instead (e.g. an `ember prune` output)."""
    steps: int = 200
    time_budget_s: float | None = None
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0
    topk: int = 64
    hidden_weight: float = 0.0
    ce_weight: float = 0.0
    """Weight of the plain next-token loss added to the KD loss (0 = pure KD)."""
    no_teacher: bool = False
    autocast: str = "bf16"
    train_embeddings: bool = False
    checkpoint_every: int = 50
    eval_every: int = 25
    val_windows: int = 8
    seed: int = 0

    def validate(self) -> None:
        if self.student is None and not self.student_layers and not self.layer_ids:
            raise ValueError("say which student: --student-layers N, --layer-ids or --student")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("--steps >= 0, --batch-size >= 1 and --seq-len >= 8 required")
        if self.autocast not in ("bf16", "none"):
            raise ValueError(f"--autocast must be bf16 or none, got {self.autocast!r}")
        if self.temperature <= 0 or self.topk < 0 or self.lr <= 0:
            raise ValueError("--temperature and --lr must be > 0, --topk >= 0")
        if self.checkpoint_every < 1 or self.eval_every < 1:
            raise ValueError("--checkpoint-every and --eval-every must be >= 1")
        if self.layer_choice not in ("even", "importance") or self.importance_windows < 1:
            raise ValueError(f"--layer-choice must be even or importance (with "
                             f"--importance-windows >= 1), got {self.layer_choice!r}")

    def metadata(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_metadata(cls, data: dict[str, Any]) -> "DistillSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("data", "layer_ids"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def student_layer_ids(num_teacher_layers: int, settings: DistillSettings) -> list[int]:
    """Teacher layers the student starts from."""
    if settings.layer_ids:
        ids = sorted(set(int(i) for i in settings.layer_ids))
        if ids[0] < 0 or ids[-1] >= num_teacher_layers:
            raise ValueError(f"--layer-ids must be in [0, {num_teacher_layers - 1}]")
        return ids
    n = int(settings.student_layers or 0)
    if not 1 <= n <= num_teacher_layers:
        raise ValueError(f"--student-layers must be in [1, {num_teacher_layers}], got {n}")
    if n == 1:
        return [num_teacher_layers - 1]
    return sorted({round(i * (num_teacher_layers - 1) / (n - 1)) for i in range(n)})


def importance_layer_ids(distances: list[float], n: int) -> list[int]:
    """The `n` layers with the largest input/output angular distance, in order."""
    if not 1 <= n <= len(distances):
        raise ValueError(f"--student-layers must be in [1, {len(distances)}], got {n}")
    return sorted(sorted(range(len(distances)), key=lambda i: -distances[i])[:n])


def choose_layer_ids(teacher: Model, num_layers: int, settings: DistillSettings,
                     data: WindowData, progress: Progress | None = None) -> list[int]:
    """Teacher layers for a fresh student: explicit, evenly spaced or by measured importance."""
    if settings.layer_ids or settings.layer_choice == "even":
        return student_layer_ids(num_layers, settings)
    from ember.compress.structured import layer_distances

    calib = data.train[data.order(0)[:settings.importance_windows]]
    distances = layer_distances(teacher, calib, progress=progress)
    ids = importance_layer_ids(distances, int(settings.student_layers or 0))
    logger.info("layer angular distances %s -> student layers %s",
                [round(d, 4) for d in distances], ids)
    return ids


def build_student(teacher: Model, arch: ArchConfig, ids: list[int]
                  ) -> tuple[nn.Module, ArchConfig]:
    """A copy of the teacher keeping only layers `ids`."""
    student = copy.deepcopy(teacher)
    student.model.layers = nn.ModuleList(student.model.layers[i] for i in ids)
    student_arch = dataclasses.replace(arch, num_layers=len(ids))
    student.config = student_arch
    return student, student_arch


def trainable(student: Model, settings: DistillSettings) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs the optimizer updates; everything else is frozen."""
    params = []
    for name, p in student.named_parameters():
        train = name.startswith(("model.layers.", "model.norm.")) or settings.train_embeddings
        p.requires_grad_(train)
        if train:
            params.append((name, p))
    return params


def lr_at(settings: DistillSettings, step: int, train_s: float) -> float:
    """Warmup then cosine decay to min_lr_ratio * lr, over steps or over the time budget."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    if settings.time_budget_s:
        frac = min(1.0, train_s / settings.time_budget_s)
    else:
        span = max(1, settings.steps - settings.warmup_steps)
        frac = min(1.0, (step - settings.warmup_steps) / span)
    cos = 0.5 * (1 + math.cos(math.pi * frac))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cos)


def kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor,
            teacher_index: torch.Tensor | None, temperature: float,
            student_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean KL(p_teacher || p_student) at temperature T.

    student_logits (B, T, V); teacher_values (B, T, k) top-k logits with their vocabulary ids
    teacher_index (B, T, k), or (B, T, V) full logits with teacher_index None.
    student_log_probs: log_softmax(student_logits) when already computed (used at T = 1 only).
    """
    p_t = torch.softmax(teacher_values.float() / temperature, dim=-1)
    if student_log_probs is not None and temperature == 1:
        log_q = student_log_probs
    else:
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_index is not None:
        log_q = log_q.gather(-1, teacher_index.long())  # (B, T, k)
    log_p = torch.log(p_t.clamp(min=1e-12))
    return (p_t * (log_p - log_q)).sum(-1).mean() * temperature ** 2


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ||h_s - h_t||^2 / ||h_t||^2 (per token, averaged)."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.float()
        losses.append(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-6)).mean())
    return torch.stack(losses).mean()


class Distiller:
    """One distillation run: models, data, optimizer, log; `run()` trains and checkpoints."""

    def __init__(self, settings: DistillSettings, out: Path, teacher_loaded: Any,
                 student: Model, student_arch: ArchConfig, data: WindowData,
                 files: list[Any], layer_ids: list[int] | None,
                 cache_dir: Path | None = None) -> None:
        self.settings, self.out = settings, out
        self.teacher_loaded = teacher_loaded
        self.teacher = teacher_loaded.model
        self.student, self.student_arch = student, student_arch
        self.data, self.files, self.layer_ids = data, files, layer_ids
        self.named = trainable(student, settings)
        self.optimizer = torch.optim.AdamW([p for _, p in self.named], lr=settings.lr,
                                           betas=(0.9, 0.95), weight_decay=settings.weight_decay)
        self.step, self.position, self.train_s, self.tokens = 0, 0, 0.0, 0
        self.log = TrainLog()
        self.compare: dict[str, TrainLog] = {}
        """Other runs' curves drawn next to this one in curve.png."""
        identity = {"teacher": settings.teacher, "data": [f.sha256 for f in files],
                    "seq_len": settings.seq_len, "topk": settings.topk, "seed": settings.seed,
                    "autocast": settings.autocast}
        self.cache_dir = cache_dir or out / train_state.STATE_DIR
        """Where the teacher's top-k logits are cached (shareable between runs)."""
        self.cache = TeacherCache.load(self.cache_dir, identity)

    # ---- one step ----------------------------------------------------------------------

    def _autocast(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16,
                              enabled=self.settings.autocast == "bf16")

    @torch.no_grad()
    def _teacher(self, index: torch.Tensor, ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
        """Teacher (values, index or None, hidden targets or None) for a batch."""
        s = self.settings
        use_cache = s.topk > 0 and s.hidden_weight == 0
        if use_cache and (hit := self.cache.get(index)) is not None:
            return hit[0], hit[1], None
        outputs: list[torch.Tensor] = []
        with self._autocast():
            final = dense.hidden_states(self.teacher, ids, outputs)
            logits = self.teacher.lm_head(final).float()  # (B, T, V)
        hidden = ([outputs[i] for i in self.layer_ids] if self.layer_ids is not None
                  else [final])
        if s.topk == 0:
            return logits, None, hidden
        values, top = torch.topk(logits, s.topk, dim=-1)  # (B, T, k)
        if use_cache:
            self.cache.put(index, values, top)
            # NOTE: train on the cached (bf16) values from the first use on, so a resumed or
            # repeated window sees exactly the same targets.
            values, top = self.cache.get(index)  # type: ignore[misc]
        return values, top, hidden

    def train_step(self, index: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
        s = self.settings
        teacher = None if s.no_teacher else self._teacher(index, ids)
        outputs: list[torch.Tensor] = []
        with self._autocast():
            final = dense.hidden_states(self.student, ids, outputs)
            logits = self.student.lm_head(final).float()  # (B, T, V)
        hidden = outputs if self.layer_ids is not None else [final]
        vocab = logits.shape[-1]
        # NOTE: one log_softmax over the vocabulary serves both the next-token loss and (at
        # T = 1) the KL, so a KD step costs about what a next-token step costs.
        log_probs = torch.log_softmax(logits, dim=-1)  # (B, T, V)
        ce = F.nll_loss(log_probs[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        parts = {"ce": float(ce.detach())}
        if teacher is None:
            loss = ce
        else:
            loss = kd_loss(logits, teacher[0], teacher[1], s.temperature, log_probs)
            parts["kl"] = float(loss.detach())
            if s.ce_weight > 0:
                loss = loss + s.ce_weight * ce
            if s.hidden_weight > 0 and teacher[2] is not None:
                mse = hidden_loss(hidden, teacher[2])
                parts["hidden_mse"] = float(mse.detach())
                loss = loss + s.hidden_weight * mse
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], s.grad_clip)
        self.optimizer.step()
        parts["loss"] = float(loss.detach())
        return parts

    @torch.no_grad()
    def validate(self) -> float:
        """Mean next-token cross-entropy of the student on the held-out windows."""
        total, count = 0.0, 0
        for i in range(0, self.data.val.shape[0], self.settings.batch_size):
            ids = self.data.val[i:i + self.settings.batch_size]
            with self._autocast():
                logits = dense.logits(self.student, ids)
            vocab = logits.shape[-1]
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                           ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
        return total / count

    # ---- loop, checkpoints, resume ---------------------------------------------------------

    def _done(self, stop_at: int | None) -> bool:
        s = self.settings
        return (self.step >= s.steps or (stop_at is not None and self.step >= stop_at)
                or (s.time_budget_s is not None and self.train_s >= s.time_budget_s))

    def _record_validation(self) -> None:
        if self.log.has_validation(self.step):
            return
        val = self.validate()
        self.log.add_validation(self.step, self.train_s, self.tokens, val)

    def run(self, progress: Progress | None = None, stop_at: int | None = None) -> None:
        """Train until steps / time budget / stop_at, validating and checkpointing on the way."""
        s = self.settings
        try:
            while not self._done(stop_at):
                if self.step % s.eval_every == 0:
                    self._record_validation()
                index, ids = self.data.batch(self.position, s.batch_size)
                lr = lr_at(s, self.step, self.train_s)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                parts = self.train_step(index, ids)
                self.train_s += time.perf_counter() - t0
                self.step += 1
                self.position += s.batch_size
                self.tokens += ids.numel()
                self.log.add_step(self.step, self.train_s, self.tokens, lr, parts)
                if progress is not None:
                    self._report(progress, parts["loss"])
                if self.step % s.checkpoint_every == 0:
                    self.save()
        except KeyboardInterrupt:
            logger.warning("interrupted at step %d; saving a checkpoint", self.step)
            self.save()
            raise
        self._record_validation()
        self.save()

    def precompute_teacher(self, progress: Progress | None = None) -> float:
        """Fill the teacher cache for the windows of the first `steps` steps (no training);
        returns the seconds it took. Training runs sharing the cache then skip the teacher."""
        s = self.settings
        if s.topk == 0 or s.hidden_weight > 0 or s.no_teacher:
            raise ValueError("--precompute-teacher needs --topk > 0, no --hidden-weight and a "
                             "teacher")
        t0 = time.perf_counter()
        for step in range(s.steps):
            index, ids = self.data.batch(step * s.batch_size, s.batch_size)
            self._teacher(index, ids)
            if progress is not None:
                progress("teacher logits", step + 1, s.steps)
        seconds = time.perf_counter() - t0
        self.cache.save(self.cache_dir)
        return seconds

    def _report(self, progress: Progress, loss: float) -> None:
        """Progress over steps, or over training seconds when a time budget is set."""
        s = self.settings
        if s.time_budget_s:
            progress("distill (seconds)", int(self.train_s), int(s.time_budget_s),
                     f"step {self.step}  loss {loss:.3f}")
        else:
            progress("distill", self.step, s.steps, f"loss {loss:.3f}  {self.train_s:.0f}s")

    def save(self) -> None:
        """Write the student checkpoint, the train state, the teacher cache and the curve."""
        from ember.compress.checkpoint import Compression, save_checkpoint

        summary = {"step": self.step, "tokens": self.tokens, "train_s": round(self.train_s, 1),
                   "layer_ids": self.layer_ids, "val_ce": self.log.last_validation()}
        save_checkpoint(self.out, self.teacher_loaded, Compression(
            "distill", self.settings.metadata(), summary, [f.metadata() for f in self.files]),
            model=self.student, arch=self.student_arch)
        folder = self.out / train_state.STATE_DIR
        groups = train_state.save_optimizer(folder, self.optimizer, [n for n, _ in self.named])
        train_state.save_state(folder, {
            "step": self.step, "position": self.position, "train_s": self.train_s,
            "tokens": self.tokens, "settings": self.settings.metadata(),
            "param_names": [n for n, _ in self.named], "optimizer": groups,
            "layer_ids": self.layer_ids, "log": self.log.to_dict()})
        if self.cache.values:
            self.cache.save(self.cache_dir)
        self.log.write(self.out, title=_title(self.settings), compare=self.compare)

    def restore(self) -> None:
        """Continue from OUT/train_state (the student weights were loaded from OUT/)."""
        folder = self.out / train_state.STATE_DIR
        state = train_state.load_state(folder)
        names = [n for n, _ in self.named]
        if state.get("param_names") != names:
            raise ValueError("--resume: the saved state is for different trainable parameters")
        train_state.load_optimizer(folder, self.optimizer, names, state["optimizer"])
        self.step, self.position = int(state["step"]), int(state["position"])
        self.train_s, self.tokens = float(state["train_s"]), int(state["tokens"])
        self.log = TrainLog.from_dict(state.get("log") or {})


def _title(s: DistillSettings) -> str:
    if s.no_teacher:
        return "distill: next-token loss (no teacher)"
    extras = (f" + {s.ce_weight:g} CE" if s.ce_weight else "") + (
        f" + {s.hidden_weight:g} hidden" if s.hidden_weight else "")
    return f"distill: KD T={s.temperature:g} top-{s.topk or 'all'}{extras}"


def load_for_distill(settings: DistillSettings, out: Path, resume: bool,
                     progress: Progress | None = None,
                     cache_dir: Path | None = None) -> Distiller:
    """Load teacher, student (fresh or from OUT/ when resuming) and data; build a Distiller."""
    from ember.config import EnvSettings, ModelConfig
    from ember.loading.loader import load_model

    settings.validate()
    files = check_text_files(list(settings.data), "training")
    env = EnvSettings.from_env()

    def loader(stage: str) -> Any:
        return None if progress is None else (lambda d, t: progress(stage, d, t))

    teacher = load_model(ModelConfig(model=settings.teacher), env, loader("loading teacher"))
    teacher.model.requires_grad_(False)
    data = build_windows(files, teacher.tokenizer, settings.seq_len, settings.seed,
                         settings.val_windows)
    layer_ids: list[int] | None = None
    student: Model
    if resume:
        loaded = load_model(ModelConfig(model=str(out)), env, loader("loading student"))
        student, arch = loaded.model, loaded.arch
        layer_ids = train_state.load_state(out / train_state.STATE_DIR).get("layer_ids")
    elif settings.student is not None:
        loaded = load_model(ModelConfig(model=settings.student), env, loader("loading student"))
        student, arch = loaded.model, loaded.arch
    else:
        layer_ids = choose_layer_ids(teacher.model, teacher.arch.num_layers, settings, data,
                                     progress)
        student, arch = build_student(teacher.model, teacher.arch, layer_ids)
    if arch.vocab_size != teacher.arch.vocab_size:
        raise ValueError("the student and the teacher have different vocabularies")
    distiller = Distiller(settings, out, teacher, student, arch, data, files, layer_ids,
                          cache_dir)
    if resume:
        distiller.restore()
    return distiller


def resume_settings(out: Path, steps: int | None, time_budget_s: float | None
                    ) -> DistillSettings:
    """The settings of the run saved in OUT/, with --steps / --time-budget overridden."""
    state = train_state.load_state(out / train_state.STATE_DIR)
    settings = DistillSettings.from_metadata(state["settings"])
    changes: dict[str, Any] = {}
    if steps is not None:
        changes["steps"] = steps
    if time_budget_s is not None:
        changes["time_budget_s"] = time_budget_s
    return dataclasses.replace(settings, **changes)
