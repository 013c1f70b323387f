"""Distillation on a tiny teacher: the loss goes down, and --resume continues exactly."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ember.cli import main
from ember.compress.distill import (DistillSettings, importance_layer_ids, kd_loss,
                                    load_for_distill, student_layer_ids)
from ember.compress.structured import layer_distances
from tiny_llama import one_thread, save_tiny, tiny_arch, write_text  # noqa: F401 (fixture)


def _settings(tmp_path, **kw) -> DistillSettings:
    teacher = save_tiny(tmp_path / "teacher", tiny_arch(num_layers=4))
    data = write_text(tmp_path, "train.txt")
    base = dict(teacher=str(teacher), data=(str(data),), student_layers=2, steps=8,
                batch_size=2, seq_len=64, lr=3e-3, warmup_steps=1, checkpoint_every=2,
                eval_every=4, val_windows=2, temperature=2.0, topk=16)
    base.update(kw)
    return DistillSettings(**base)  # type: ignore[arg-type]


def test_student_layers_are_spread_over_the_teacher() -> None:
    s = DistillSettings(teacher="t", data=(), student_layers=15)
    ids = student_layer_ids(30, s)
    assert len(ids) == 15 and ids[0] == 0 and ids[-1] == 29


def test_importance_keeps_the_layers_that_change_the_hidden_state_most() -> None:
    assert importance_layer_ids([0.5, 0.1, 0.3, 0.05, 0.2], 3) == [0, 2, 4]
    assert importance_layer_ids([0.1, 0.2], 2) == [0, 1]


def test_importance_student_uses_the_measured_layers(tmp_path) -> None:
    settings = _settings(tmp_path, layer_choice="importance", importance_windows=4, steps=1)
    distiller = load_for_distill(settings, tmp_path / "imp", resume=False)
    teacher = distiller.teacher
    calib = distiller.data.train[distiller.data.order(0)[:4]]
    expected = importance_layer_ids(layer_distances(teacher, calib), 2)
    assert distiller.layer_ids == expected and len(distiller.student.model.layers) == 2
    for s_layer, t_id in zip(distiller.student.model.layers, expected):
        torch.testing.assert_close(s_layer.mlp.down_proj.weight,
                                   teacher.model.layers[t_id].mlp.down_proj.weight)
    distiller.run()
    resumed = load_for_distill(settings, tmp_path / "imp", resume=True)
    assert resumed.layer_ids == expected
    try:
        DistillSettings(teacher="t", data=(), student_layers=2, layer_choice="best").validate()
    except ValueError as err:
        assert "--layer-choice" in str(err)
    else:
        raise AssertionError("an unknown --layer-choice must be refused")


def test_kd_loss_is_zero_for_the_teacher_itself() -> None:
    logits = torch.randn(2, 5, 50)
    values, index = torch.topk(logits, 50, dim=-1)
    assert float(kd_loss(logits, values, index, 2.0)) < 1e-5
    assert float(kd_loss(torch.zeros_like(logits), logits, None, 1.0)) > 0.1
    student = torch.randn(2, 5, 50)
    shared = kd_loss(student, values[..., :8], index[..., :8], 1.0,
                     torch.log_softmax(student, dim=-1))
    torch.testing.assert_close(shared, kd_loss(student, values[..., :8], index[..., :8], 1.0))


def test_distill_loss_decreases(tmp_path) -> None:
    distiller = load_for_distill(_settings(tmp_path), tmp_path / "out", resume=False)
    distiller.run()
    losses = [row["kl"] for row in distiller.log.steps]
    assert len(losses) == 8
    assert sum(losses[-2:]) < 0.9 * sum(losses[:2])
    val = distiller.log.validation
    assert val[0]["step"] == 0 and val[-1]["step"] == 8 and val[-1]["val_ce"] < val[0]["val_ce"]
    for name in ("model.safetensors", "ember.json", "tokenizer.json", "train_log.csv",
                 "curve.png", "train_state/optimizer.safetensors", "train_state/state.json"):
        assert (tmp_path / "out" / name).is_file(), name


def test_resume_continues_with_identical_state(tmp_path) -> None:
    settings = _settings(tmp_path, steps=4)
    straight = load_for_distill(settings, tmp_path / "a", resume=False)
    straight.run()
    interrupted = load_for_distill(settings, tmp_path / "b", resume=False)
    interrupted.run(stop_at=2)
    assert json.loads((tmp_path / "b/train_state/state.json").read_text())["step"] == 2
    resumed = load_for_distill(settings, tmp_path / "b", resume=True)
    assert resumed.step == 2 and resumed.position == 4
    resumed.run()
    for name in ("model.safetensors", "train_state/optimizer.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in straight.log.steps] == [r["loss"] for r in resumed.log.steps]


def test_distill_cli_no_teacher_and_errors(tmp_path, capsys) -> None:
    settings = _settings(tmp_path)
    out = tmp_path / "nt"
    args = ["distill", "--teacher", settings.teacher, "--student-layers", "2", "--data",
            settings.data[0], "--steps", "2", "--seq-len", "64", "--batch-size", "2",
            "--no-teacher", "--autocast", "none", "-o", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "ember.json").read_text())
    assert meta["compression"]["method"] == "distill"
    assert meta["compression"]["settings"]["no_teacher"] is True
    assert meta["architecture"]["num_layers"] == 2
    assert main(args) == 2  # the run exists: needs --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["distill", "--resume", "-o", str(tmp_path / "none")]) == 2
    assert main(["distill", "--teacher", settings.teacher, "--data", settings.data[0],
                 "-o", str(tmp_path / "y")]) == 2
    assert "--student-layers" in capsys.readouterr().err


def test_precomputed_teacher_cache_gives_the_same_training(tmp_path) -> None:
    settings = _settings(tmp_path, steps=3)
    direct = load_for_distill(settings, tmp_path / "direct", resume=False)
    direct.run()
    cache = tmp_path / "cache"
    pre = load_for_distill(settings, tmp_path / "pre", resume=False, cache_dir=cache)
    pre.precompute_teacher()
    assert (cache / "teacher_cache.safetensors").is_file() and len(pre.cache.values) == 6
    cached = load_for_distill(settings, tmp_path / "cached", resume=False, cache_dir=cache)
    assert len(cached.cache.values) == 6
    cached.teacher = None  # every teacher output must now come from the cache
    cached.run()
    assert [r["loss"] for r in cached.log.steps] == [r["loss"] for r in direct.log.steps]


def test_layerwise_hidden_loss_runs(tmp_path) -> None:
    distiller = load_for_distill(_settings(tmp_path, steps=3, hidden_weight=1.0, topk=0),
                                 tmp_path / "h", resume=False)
    distiller.run()
    assert all("hidden_mse" in row for row in distiller.log.steps)


def test_distill_report_labels() -> None:
    from ember.eval.quality import variant_label

    assert variant_label("distill", {"student_layers": 15}, {"step": 0}) == "distill 15L untrained"
    assert (variant_label("distill", {"student_layers": 15, "ce_weight": 1.0}, {"step": 9})
            == "distill KD+1CE 15L step 9")
    assert (variant_label("distill", {"student_layers": 15, "no_teacher": True}, {"step": 9})
            == "distill next-token 15L step 9")
