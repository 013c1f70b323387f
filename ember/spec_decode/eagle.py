"""The `eagle` proposer: a small draft head on the target's own last hidden state.

EAGLE-style (Li et al., 2024) feature-level drafting. The target's final (normed) hidden state
h_t at the row that sampled token x_{t+1} already holds the context; the head maps
(h_t, embed(x_{t+1})) to a guess of h_{t+1} and scores it on a reduced vocabulary (the tokens
the target emits most), so one draft token costs a few small matmuls instead of a draft
model's whole forward pass. Further drafts chain on the head's own predicted features.

    z = fc([h ; e])            (2D -> D)
    f = z + down(silu(gate(n)) * up(n)),  n = rmsnorm(z)
    draft = vocab[argmax(out(f))]

The drafts are the head's argmax, so the accept/resample rule stays exact (rejection.py).
The file is a safetensors with the tensors of `HEAD_SHAPES` and metadata `HEAD_FORMAT`;
`ember train-draft-head` (ember/compress/draft_head.py) writes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.types import Request

HEAD_FORMAT = "ember-draft-head-v1"
"""The `format` metadata value of a draft-head file."""
NORM_EPS = 1e-5


def head_shapes(hidden: int, ffn: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a head for a target of hidden size `hidden`, with an MLP of
    `ffn` and a reduced vocabulary of `vocab` tokens."""
    return {"fc.weight": (hidden, 2 * hidden), "norm.weight": (hidden,),
            "gate.weight": (ffn, hidden), "up.weight": (ffn, hidden),
            "down.weight": (hidden, ffn), "out.weight": (vocab, hidden), "vocab": (vocab,)}


class DraftHeadError(ValueError):
    """A draft-head file that cannot serve this target (one line naming the file)."""


@dataclass
class HeadWeights:
    """A draft head's float32 weights and its vocabulary (target token ids, (K,) int64)."""

    tensors: dict[str, torch.Tensor]
    target_vocab_size: int

    @property
    def hidden_size(self) -> int:
        return int(self.tensors["norm.weight"].shape[0])

    @property
    def ffn(self) -> int:
        """The MLP's width."""
        return int(self.tensors["gate.weight"].shape[0])

    @property
    def vocab(self) -> torch.Tensor:
        return self.tensors["vocab"]

    def save(self, path: Path, meta: dict[str, object]) -> None:
        from safetensors.torch import save_file
        info = {"format": HEAD_FORMAT, "target_vocab_size": str(self.target_vocab_size),
                "training": json.dumps(meta)}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), info)

    @classmethod
    def load(cls, path: str | Path, hidden_size: int, vocab_size: int) -> "HeadWeights":
        """Load and check a head file against the target's hidden and vocabulary sizes."""
        from safetensors import SafetensorError, safe_open
        p = Path(path)
        if not p.is_file():
            raise DraftHeadError(f"{p}: no such draft-head file")
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise DraftHeadError(f"{p}: not a safetensors draft head ({exc})") from None
        if meta.get("format") != HEAD_FORMAT:
            raise DraftHeadError(f"{p}: not an Ember draft head (format "
                                 f"{meta.get('format')!r}, expected {HEAD_FORMAT!r})")
        if meta.get("target_vocab_size") != str(vocab_size):
            raise DraftHeadError(f"{p}: trained for a vocabulary of "
                                 f"{meta.get('target_vocab_size')} tokens, the target has "
                                 f"{vocab_size}")
        if "gate.weight" not in tensors or "out.weight" not in tensors:
            raise DraftHeadError(f"{p}: missing tensor(s) "
                                 f"{sorted({'gate.weight', 'out.weight'} - set(tensors))}")
        shapes = head_shapes(hidden_size, tensors["gate.weight"].shape[0],
                             tensors["out.weight"].shape[0])
        if set(tensors) != set(shapes):
            raise DraftHeadError(f"{p}: tensors {sorted(tensors)}, expected {sorted(shapes)}")
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise DraftHeadError(f"{p}: {name} has shape {tuple(tensors[name].shape)}, "
                                     f"expected {shape} (target hidden size {hidden_size})")
        vocab = tensors["vocab"].long()
        if vocab.numel() and (int(vocab.min()) < 0 or int(vocab.max()) >= vocab_size):
            raise DraftHeadError(f"{p}: vocab holds token ids outside [0, {vocab_size})")
        out = {k: (v.long() if k == "vocab" else v.float()) for k, v in tensors.items()}
        return cls(out, vocab_size)


Matmul = Callable[[torch.Tensor], torch.Tensor]


def head_features(h: torch.Tensor, e: torch.Tensor, fc: Matmul, norm: torch.Tensor,
                  mlp: Matmul) -> torch.Tensor:
    """The head's guess of the next feature, z + mlp(rmsnorm(z)) with z = fc([h ; e]): the one
    definition the trainer (autograd modules) and `DraftHead` (kernel matmuls) both run."""
    z = fc(torch.cat([h, e], dim=-1).float().contiguous())
    n = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + NORM_EPS) * norm
    return z + mlp(n.contiguous())


HeadStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""One head step: (h (N, D) features, e (N, D) embeddings of the next tokens) -> (predicted next
features (N, D), argmax row of the head's vocabulary (N,) int64)."""


def dense_step(weights: HeadWeights) -> HeadStep:
    """The head's step in float32 PyTorch (`head_features`, then argmax of `out`)."""
    t = weights.tensors
    fc, down, out, norm = t["fc.weight"], t["down.weight"], t["out.weight"], t["norm.weight"]
    gate_up, ffn = torch.cat([t["gate.weight"], t["up.weight"]]), weights.ffn

    def mlp(n: torch.Tensor) -> torch.Tensor:
        gu = F.linear(n, gate_up)
        return F.linear(F.silu(gu[:, :ffn]) * gu[:, ffn:], down)

    def step(h: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = head_features(h, e, lambda x: F.linear(x, fc), norm, mlp)
        return f, F.linear(f, out).argmax(-1)
    return step


Embed = Callable[[list[int]], torch.Tensor]
"""Target token ids (N) -> their (N, D) float32 input embeddings (the target's table)."""
HeadChain = Callable[[torch.Tensor, torch.Tensor | None, list[int] | None, torch.Tensor, int],
                     list[list[int]]]
"""k chained head steps for N rows: (h (N, D) features; the embeddings of the tokens sampled
from them, either e (N, D) or `first`, their rows of vocab_embed (K, D) (the target's input
embeddings of the head's vocabulary); k) -> each row's k argmax rows of the head's vocabulary.
Step j + 1 runs on step j's predicted features and the embedding of the token it drafted."""


def step_chain(step: HeadStep) -> HeadChain:
    """`step` chained in Python."""
    def chain(h: torch.Tensor, e: torch.Tensor | None, first: list[int] | None,
              vocab_embed: torch.Tensor, k: int) -> list[list[int]]:
        x = e if e is not None else vocab_embed[first]
        out: list[list[int]] = [[] for _ in range(h.shape[0])]
        for _ in range(k):
            h, best = step(h, x)
            for row, b in zip(out, best.tolist()):
                row.append(b)
            x = vocab_embed[best]
        return out
    return chain


class DraftHead:
    """Inference form of a head: (N, D) features and the tokens sampled from them -> drafts.
    `step` runs one step's math (`dense_step` by default; the CPU kernels' fused 8-bit step
    when the target runs on them: ember/engine/draft_model.py), `chain` k steps at once
    (`step_chain` by default; the kernels' one-call chain with them). `embed`: the target's
    input embeddings, whose rows of the head's vocabulary (`vocab_embed`) a drafted token
    feeds the next step."""

    def __init__(self, weights: HeadWeights, embed: Embed, step: HeadStep | None = None,
                 chain: HeadChain | None = None) -> None:
        self.embed = embed
        self.step = dense_step(weights) if step is None else step
        self.chain = step_chain(self.step) if chain is None else chain
        self.vocab = weights.vocab
        self.ffn = weights.ffn
        """The MLP's width (reports)."""
        self._vocab_ids: list[int] = weights.vocab.tolist()
        self._row_of = {token: row for row, token in enumerate(self._vocab_ids)}
        with torch.no_grad():
            self.vocab_embed = embed(self._vocab_ids).float().contiguous()
        """(K, D): the input embeddings of the head's vocabulary tokens."""

    def __call__(self, h: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (N, D) features, e: (N, D) embeddings of the next tokens -> (predicted next
        features (N, D), draft token ids (N,))."""
        f, best = self.step(h, e)
        return f, self.vocab[best]

    def draft(self, h: torch.Tensor, tokens: list[int], k: int) -> list[list[int]]:
        """k chained drafts (target token ids) for each of N rows, from features h (N, D) and
        the tokens sampled from them."""
        # NOTE: few torch ops: each costs 30-90 us right after the target's forward (cold
        # caches), the whole head step ~80 us hot; list lookups instead where they can
        first = [self._row_of.get(token, -1) for token in tokens]
        e = None if -1 not in first else self.embed(tokens).float().contiguous()
        ids = self._vocab_ids
        return [[ids[b] for b in row] for row in
                self.chain(h, e, first if e is None else None, self.vocab_embed, k)]


_DECAY = 0.9
"""Weight of the past in the measured seconds per draft step (EWMA)."""


class EagleProposer:
    """Drafts each ready request's next tokens with a `DraftHead`, from the hidden state the
    target computed for the row that sampled its last token (`observe_hidden`)."""

    def __init__(self, head: DraftHead) -> None:
        self.head = head
        self._hidden: dict[str, tuple[int, torch.Tensor]] = {}
        """request id -> (its token count when sampled, the hidden row (D,) that sampled the
        last token)."""
        self.step_seconds: float | None = None
        """Measured seconds of one draft step for one request (EWMA), None before any."""
        self.num_steps = 0

    def observe_hidden(self, hidden: dict[str, torch.Tensor], requests: list[Request]) -> None:
        """Keep the hidden row each request's last sampled token came from (the runner's
        `ModelRunnerOutput.hidden_states`, after the scheduler appended the tokens)."""
        counts = {r.request_id: r.num_tokens for r in requests}
        for rid, row in hidden.items():
            if rid in counts:
                self._hidden[rid] = (counts[rid], row)

    def propose(self, requests: list[Request], max_len: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in requests]
        live = [i for i, (r, k) in enumerate(zip(requests, max_len))
                if k > 0 and self._hidden.get(r.request_id, (-1,))[0] == r.num_tokens]
        if not live:
            return out
        t0 = time.perf_counter()
        rows = [self._hidden[requests[i].request_id][1] for i in live]
        h = rows[0][None] if len(rows) == 1 else torch.stack(rows)
        tokens = [requests[i].all_token_ids[-1] for i in live]
        steps = max(max_len[i] for i in live)
        for i, drafts in zip(live, self.head.draft(h, tokens, steps)):
            out[i] = drafts[:max_len[i]]
        seconds = (time.perf_counter() - t0) / steps
        self.num_steps += steps
        self.step_seconds = seconds if self.step_seconds is None else (
            _DECAY * self.step_seconds + (1 - _DECAY) * seconds)
        return out

    def release(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._hidden.pop(rid, None)


__all__ = ["DraftHead", "DraftHeadError", "EagleProposer", "Embed", "HEAD_FORMAT", "HeadChain",
           "HeadStep", "HeadWeights", "Matmul", "NORM_EPS", "dense_step", "head_features",
           "head_shapes", "step_chain"]
