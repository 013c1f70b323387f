"""Resumable training state without pickle: optimizer tensors in safetensors, scalars in JSON.

OUT/train_state/optimizer.safetensors holds, per trainable parameter name, its AdamW state
tensors (`<name>.exp_avg`, `<name>.exp_avg_sq`, `<name>.step`); OUT/train_state/state.json holds
the step, the data position, elapsed training time, the settings, the optimizer's param_groups
(without the params) and the curve so far. The student's weights are the checkpoint itself
(OUT/model.safetensors, float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

STATE_DIR = "train_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer,
                   names: list[str]) -> dict[str, Any]:
    """Write the optimizer's per-parameter tensors; returns its param_groups for the JSON.

    `names[i]` is the name of the optimizer's i-th parameter (in param_groups order).
    """
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{names[index]}.{key}"] = tensor.detach().clone().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    return {"param_groups": state["param_groups"]}


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, names: list[str],
                   groups: dict[str, Any]) -> None:
    """Restore what `save_optimizer` wrote into an optimizer over the same named parameters."""
    from safetensors.torch import load_file

    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        raise ValueError(f"--resume: {path} is missing")
    tensors = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(names):
        prefix = f"{name}."
        entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                   and "." not in k[len(prefix):]}
        if entries:
            state[index] = entries
    saved_groups = groups["param_groups"]
    if sum(len(g["params"]) for g in saved_groups) != len(names):
        raise ValueError("--resume: the saved optimizer has a different number of parameters")
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


def save_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    tmp.replace(folder / STATE_FILE)


def load_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--resume: cannot read {path} ({exc})") from exc
