"""The top-level ``rgdm finetune`` and ``rgdm evaluate`` on shape models, and their target checks.

A tiny shape model (2 classes, 32-point clouds, 4 training steps) and a tiny classifier are trained
once through the command line; each test runs ``rgdm.cli.main`` in that directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rgdm.cli import main
from rgdm.cli_shapes import is_shape_model

TINY_SHAPES = """\
name: tiny-shapes
domain: shapes
data: {classes: [ring_knot, blob], n_points: 32}
model: {width: 16, n_blocks: 1, time_dim: 8}
diffusion: {timesteps: 20, sampling_steps: 4}
train: {steps: 4, batch_size: 8, log_every: 2, val_every: 4, val_batches: 1, checkpoint_every: 4}
"""
TINY_CLASSIFIER = ["--name", "clf", "--set", "data.classes=[ring_knot, blob]", "--set", "data.n_points=32",
                   "--set", "width=8", "--set", "train.steps=4", "--set", "train.batch_size=8",
                   "--set", "train.val_every=4", "--set", "train.checkpoint_every=4"]
# Two iterations of short roll-outs: enough to write checkpoints and a report in about a second.
TINY_RGDM = ["--set", "train.steps=2", "--set", "rgdm.batch_size=2", "--set", "rgdm.num_candidates=2",
             "--set", "rgdm.explore_steps=1", "--set", "rgdm.sampling_steps=4"]
TINY_DDPO = ["--set", "train.steps=2", "--set", "ddpo.batch_size=2", "--set", "ddpo.sampling_steps=4"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with runs/tiny-shapes (unconditional shape model) and runs/clf (its classifier)."""
    root = tmp_path_factory.mktemp("cli_shapes")
    (root / "tiny.yaml").write_text(TINY_SHAPES)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(["pretrain", "--config", "tiny.yaml"]) == 0  # routed by `domain: shapes`
        assert main(["shapes", "train-classifier", *TINY_CLASSIFIER]) == 0
    return root


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_shape_models_are_recognised_by_their_stored_config(workdir, tmp_path):
    checkpoint = next((workdir / "runs" / "tiny-shapes" / "checkpoints").glob("step_*.pt"))
    assert is_shape_model(workdir / "runs" / "tiny-shapes")
    assert is_shape_model(checkpoint)
    # A checkpoint copied out of its run still says what it is.
    loose = tmp_path / "model.pt"
    loose.write_bytes(checkpoint.read_bytes())
    assert is_shape_model(loose)
    assert not is_shape_model("qm9-noh-small")  # shipped molecule model
    assert not is_shape_model(tmp_path / "missing")
    (tmp_path / "mols.xyz").write_text("1\n\nC 0 0 0\n")
    assert not is_shape_model(tmp_path / "mols.xyz")


def test_finetune_and_evaluate_a_shape_run_from_the_top_level_commands(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = ["finetune", "--method", "rgdm", "--from", "runs/tiny-shapes", "--reward", "shape_class",
            "--classifier", "runs/clf", "--target", "ring_knot", "--compare", "4", *TINY_RGDM]
    assert main(argv) == 0
    run = workdir / "runs" / "tiny-shapes-rgdm-shape_class"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["domain"] == "shapes" and config["target_class"] == "ring_knot"
    assert config["reward"] == {"name": "shape_class", "backend": "inline", "model": "runs/clf",
                                "target_class": "ring_knot"}
    assert [row["model"] for row in json.loads((run / "metrics.json").read_text())] == ["before", "after"]
    assert (run / "report.md").read_text().startswith("# Samples toward 'ring_knot' (4 per model")

    # Target class and classifier default to the ones the run was fine-tuned with.
    assert main(["evaluate", str(run), "--n", "3"]) == 0
    rows = json.loads((run / "eval" / "metrics.json").read_text())
    assert [row["model"] for row in rows] == [run.name]
    assert 0.0 <= rows[0]["target_accuracy"] <= 1.0 and rows[0]["target_log_prob"] <= 0.0
    assert {"MMD-CD", "COV-CD", "1-NNA-CD"} <= rows[0].keys()
    assert (run / "eval" / "report.md").exists() and (run / "eval" / "samples.png").exists()
    report = (run / "eval" / "metrics.json").read_bytes()
    assert main(["evaluate", str(run), "--n", "2"]) == 2  # an existing report is kept ...
    assert (run / "eval" / "metrics.json").read_bytes() == report
    assert main(["evaluate", str(run), "--n", "2", "--overwrite"]) == 0  # ... unless replacing it is asked for
    assert json.loads((run / "eval" / "metrics.json").read_bytes()) != json.loads(report)

    # Several models (a run and a checkpoint file) in one report, with explicit options.
    checkpoint = run / "checkpoints" / "step_00000002.pt"
    argv = ["evaluate", "runs/tiny-shapes", str(checkpoint), "--target", "blob", "--classifier", "runs/clf",
            "--n", "3", "--out", "reports/both"]
    assert main(argv) == 0
    rows = json.loads((workdir / "reports" / "both" / "metrics.json").read_text())
    assert [row["model"] for row in rows] == ["tiny-shapes", f"{run.name}/step_00000002.pt"]


def test_ddpo_fine_tunes_a_shape_model_through_the_top_level_command(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = ["finetune", "--method", "ddpo", "--from", "runs/tiny-shapes", "--target", "ring_knot",
            "--classifier", "runs/clf", "--compare", "0", *TINY_DDPO]
    assert main(argv) == 0
    run = workdir / "runs" / "tiny-shapes-ddpo-shape_class"  # shape_class is the shape models' default reward
    assert yaml.safe_load((run / "config.yaml").read_text())["method"] == "ddpo"
    assert list((run / "checkpoints").glob("step_*.pt"))
    assert not (run / "report.md").exists()  # --compare 0


def test_the_shapes_group_still_offers_the_same_commands(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = ["shapes", "finetune", "--from", "runs/tiny-shapes", "--target", "blob", "--classifier", "runs/clf",
            "--name", "via-group", "--compare", "0", *TINY_RGDM]
    assert main(argv) == 0
    assert main(["shapes", "evaluate", "runs/via-group", "--n", "3"]) == 0
    rows = json.loads((workdir / "runs" / "via-group" / "eval" / "metrics.json").read_text())
    assert rows[0]["model"] == "via-group"
    assert (workdir / "runs" / "via-group" / "eval" / "report.md").read_text().startswith("# Samples toward 'blob'")


def test_a_molecule_model_needs_a_number_as_target(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["finetune", "--from", "qm9-noh-small", "--reward", "qed", "--target", "ring_knot"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --target 'ring_knot': a molecule model needs a number")
    assert not (workdir / "runs" / "qm9-noh-small-rgdm-qed").exists()
    # A missing base is the more useful message when the target is not a number either.
    assert main(["finetune", "--from", "runs/tiny-shapez", "--target", "ring_knot"]) == 2
    assert "runs/tiny-shapez: no such run directory" in one_error_line(capsys)
    # Shape-only options are refused for molecule models, not ignored.
    assert main(["evaluate", "qm9-noh-small", "--target", "ring_knot"]) == 2
    assert one_error_line(capsys) == "error: --target: only for shape models; qm9-noh-small is not one"


def test_a_shape_model_needs_one_of_its_classes_as_target(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    before = sorted(p.name for p in (workdir / "runs").iterdir())
    assert main(["finetune", "--from", "runs/tiny-shapes", "--target", "rign_knot", "--classifier", "runs/clf"]) == 2
    assert one_error_line(capsys) == ("error: --target 'rign_knot': not a class of this shape model "
                                      "(did you mean 'ring_knot'? classes: ring_knot, blob)")
    assert main(["evaluate", "runs/tiny-shapes", "--target", "chair", "--classifier", "runs/clf"]) == 2
    assert "--target 'chair': not a class of this shape model" in one_error_line(capsys)
    assert main(["finetune", "--from", "runs/tiny-shapes", "--classifier", "runs/clf"]) == 2
    assert one_error_line(capsys) == "error: --reward shape_class needs --target, one of: ring_knot, blob"
    assert main(["evaluate", "runs/tiny-shapes", "--classifier", "runs/clf"]) == 2  # nothing to default from
    assert "--target: name the class to evaluate against" in one_error_line(capsys)
    assert main(["finetune", "--from", "runs/tiny-shapes", "--target", "blob"]) == 2  # no runs/shape-classifier
    assert "--classifier runs/shape-classifier: no such classifier run" in one_error_line(capsys)
    assert main(["finetune", "--from", "runs/tiny-shapes", "--target", "blob", "--scale", "2"]) == 2
    assert one_error_line(capsys).startswith("error: --scale: only for molecule property targets")
    assert main(["finetune", "--from", "runs/clf", "--target", "blob"]) == 2  # a classifier is no base model
    assert "runs/clf: not a shape diffusion model" in one_error_line(capsys)
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == before  # nothing was started


def test_a_checkpoint_of_the_earlier_additive_denoiser_is_refused_in_one_line(workdir, monkeypatch, capsys, tmp_path):
    import torch

    from rgdm.training.checkpoint import load_checkpoint, save_checkpoint

    monkeypatch.chdir(workdir)
    state = load_checkpoint(next((workdir / "runs" / "tiny-shapes" / "checkpoints").glob("step_*.pt")))
    # The earlier denoiser's config had no edge_width, and its blocks mixed a concatenated global feature.
    del state["config"]["model"]["edge_width"]
    state["config"]["model"]["knn"] = 0
    state["model"] = state["ema"] = {"blocks.0.mix.weight": torch.zeros(16, 48), "head.2.weight": torch.zeros(3, 16)}
    old = save_checkpoint({k: v for k, v in state.items() if k not in ("format_version", "rgdm_version")},
                          tmp_path / "old.pt")
    assert main(["evaluate", str(old), "--target", "blob", "--classifier", "runs/clf"]) == 2
    line = one_error_line(capsys)
    assert "trained with the earlier PointNet denoiser" in line and "rgdm pretrain --config" in line
    assert main(["finetune", "--from", str(old), "--target", "blob", "--classifier", "runs/clf",
                 "--name", "from-old"]) == 2
    assert "trained with the earlier PointNet denoiser" in one_error_line(capsys)
    assert not (workdir / "runs" / "from-old").exists()
