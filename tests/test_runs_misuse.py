"""Runs under misuse: Ctrl-C, two processes on one run, default names, resumed counters, and the
small things a new user trips over (rewards listing, inline timeouts, diverging losses, packaging)."""

from __future__ import annotations

import csv
import logging
import re
import shlex
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from rgdm import cli
from rgdm.config import FinetuneConfig, RGDMConfig, TrainConfig
from rgdm.training.checkpoint import checkpoint_paths, load_checkpoint

ROOT = Path(__file__).parents[1]
TINY = {
    "name": "tiny",
    "data": {"dataset": "qm9", "remove_h": True, "max_train_molecules": 256},
    "model": {"hidden_nf": 16, "n_layers": 2},
    "diffusion": {"timesteps": 50},
    "train": {"steps": 6, "batch_size": 8, "log_every": 1, "checkpoint_every": 2, "val_batches": 0,
              "num_threads": 1},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, qm9_all):
    """A directory holding ``tiny.yaml``; runs go to ``runs/`` below it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def steps_of(run_dir: Path) -> list[int]:
    return [load_checkpoint(path)["step"] for path in checkpoint_paths(run_dir / "checkpoints")]


def test_ctrl_c_exits_130_keeps_the_checkpoint_and_says_how_to_resume(workdir, capsys, monkeypatch):
    from rgdm.training.loop import Trainer

    original = Trainer._train_step

    def interrupted_at_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", interrupted_at_step_3)
    assert cli.main(["pretrain", "--config", "tiny.yaml", "--set", "train.steps=6"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    command = "rgdm pretrain --config tiny.yaml --set train.steps=6 --name tiny --resume"
    assert err[-1] == f"interrupted; resume with: {command}"
    assert steps_of(workdir / "runs" / "tiny") == [2]  # the checkpoint before the interrupt, loadable

    monkeypatch.setattr(Trainer, "_train_step", original)
    assert cli.main(shlex.split(command)[1:]) == 0  # the lock went with the interrupted command
    assert steps_of(workdir / "runs" / "tiny")[-1] == 6


HOLD_LOCK = """
import sys, time
from rgdm.runs import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_process_on_the_same_run_is_refused(workdir, capsys):
    assert cli.main(["pretrain", "--config", "tiny.yaml", "--name", "busy", "--set", "train.steps=2"]) == 0
    files = lambda: {p: p.read_bytes() for p in (workdir / "runs" / "busy").rglob("*")  # noqa: E731
                     if p.is_file() and p.name != ".lock"}
    before = files()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, "runs/busy"], cwd=workdir, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        argv = ["pretrain", "--config", "tiny.yaml", "--name", "busy", "--resume", "--set", "train.steps=4"]
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"error: runs/busy is in use by another process (pid {holder.pid}); wait for it to "
                         "finish, or give this run another name"]
        assert files() == before
    finally:
        holder.kill()  # like kill -9: an OS file lock cannot outlive its process
        holder.wait(timeout=30)
    assert cli.main(argv) == 0
    assert steps_of(workdir / "runs" / "busy")[-1] == 4


def test_default_names_count_up_and_resume_takes_the_newest(workdir, capsys):
    argv = ["pretrain", "--config", "tiny.yaml", "--set", "train.steps=2"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["tiny", "tiny-2"]
    assert cli.main(["pretrain", "--config", "tiny.yaml", "--set", "train.steps=4", "--resume"]) == 0
    assert steps_of(workdir / "runs" / "tiny-2")[-1] == 4 and steps_of(workdir / "runs" / "tiny")[-1] == 2


def test_bad_input_leaves_no_empty_run_directory(workdir, capsys):
    argv = ["finetune", "--from", "qm9-noh-small", "--reward", "qed", "--set", "reward.timeout=5", "--compare", "0"]
    assert cli.main(argv) == 2
    assert not any((workdir / "runs").iterdir())


def tiny_finetune(base: Path, steps: int) -> FinetuneConfig:
    return FinetuneConfig(
        name="ft", base=str(base), reward={"name": "qed", "method": "edm", "backend": "inline"},
        rgdm=RGDMConfig(batch_size=4, sampling_steps=6, num_candidates=4, explore_steps=2),
        train=TrainConfig(steps=steps, lr=1e-3, ema_decay=0.0, log_every=1, val_every=3, checkpoint_every=2),
        eval_samples=4,
    ).validate()


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the columns that measure wall time (they differ between any two runs)."""
    with (run_dir / "metrics.csv").open() as handle:
        return [{k: v for k, v in row.items() if not k.endswith(("seconds", "per_second"))}
                for row in csv.DictReader(handle)]


def test_resumed_run_continues_the_reward_counters(tmp_path, tiny_pretrained, monkeypatch):
    from rgdm.training.finetune import finetune
    from rgdm.training.loop import Trainer

    finetune(tiny_finetune(tiny_pretrained, 4), tmp_path / "straight", progress=False, tensorboard=False)
    original = Trainer._train_step

    def interrupted_after_step_2(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", interrupted_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_finetune(tiny_pretrained, 4), tmp_path / "resumed", progress=False, tensorboard=False)
    monkeypatch.setattr(Trainer, "_train_step", original)
    finetune(tiny_finetune(tiny_pretrained, 4), tmp_path / "resumed", resume=True, progress=False, tensorboard=False)
    straight, resumed = metrics_rows(tmp_path / "straight"), metrics_rows(tmp_path / "resumed")
    assert [row["step"] for row in resumed] == ["1", "2", "3", "4"]
    assert float(straight[-1]["reward_samples"]) > float(straight[1]["reward_samples"]) > 0
    assert resumed == straight


def test_a_diverging_loss_is_warned_about_once(tmp_path, caplog):
    from rgdm.training.loop import Trainer

    class Blowup:
        name = "blowup"

        def __init__(self, scale: float):
            self.scale = scale

        def loss(self, model, step):
            return (self.scale * model(torch.ones(1, 1))).pow(2).sum(), {}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def fit(scale: float, run: str) -> list[str]:
        caplog.clear()
        torch.manual_seed(0)
        config = TrainConfig(steps=3, lr=1e-6, ema_decay=0.0, log_every=1, checkpoint_every=10)
        trainer = Trainer(nn.Linear(1, 1), Blowup(scale), config, tmp_path / run, {}, tensorboard=False,
                          progress=False)
        with caplog.at_level(logging.WARNING, logger="rgdm.training"):
            trainer.fit()
        return [r.getMessage() for r in caplog.records if "diverging" in r.getMessage()]

    warned = fit(1e4, "big")
    assert len(warned) == 1 and re.match(r"step 1: loss \S+, gradient norm \S+: training is probably diverging",
                                         warned[0]), warned
    assert fit(1.0, "small") == []


def first_of_chunk(molecules):
    """A reward with a bug: scores only the first molecule of each call."""
    return [float(len(molecules[0].symbols))]


def test_inline_rewards_refuse_a_timeout_and_chunk_faults_are_logged(caplog):
    from rgdm.rewards import make_reward, reward_from_function
    from rgdm.rewards.factory import RewardConfigError

    with pytest.raises(ValueError, match="inline backend .* use backend 'process'"):
        reward_from_function(first_of_chunk, backend="inline", timeout=5)
    with pytest.raises(RewardConfigError, match=r"^reward\.timeout: the inline backend"):
        make_reward({"name": "qed", "backend": "inline", "timeout": 5})

    reward = reward_from_function(first_of_chunk, backend="inline", chunk_size=4)  # the default timeout is fine
    molecules = [(["C"] * n, torch.randn(n, 3)) for n in (1, 2, 3, 4)]
    with caplog.at_level(logging.WARNING, logger="rgdm.rewards"):
        result = reward(molecules)
    assert result.values.tolist() == [1.0, 2.0, 3.0, 4.0]  # one at a time, every molecule is scored
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("reward first_of_chunk: a call on 4 molecules failed (error: ValueError: returned 1 "
                            "values for 4 molecules)") for m in messages), messages


def test_rewards_are_listed_with_description_units_and_required_options():
    lines = {line.split()[0]: line for line in cli.reward_lines()}
    assert "drug-likeness" in lines["qed"] and "[QED" in lines["qed"]
    assert lines["xtb_gap"].endswith("[meV]")
    assert lines["regressor"].endswith("(required: model)")
    assert "(required: model, target_class)" in lines["shape_class"]
    assert all(len(line.split()) > 2 for line in lines.values())  # a description on every line


def test_python_version_agrees_between_pyproject_readme_and_ruff():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = re.fullmatch(r">=\s*3\.(\d+)", project["project"]["requires-python"]).group(1)
    assert f"Python 3.{minimum}" in (ROOT / "README.md").read_text()
    assert project["tool"]["ruff"]["target-version"] == f"py3{minimum}"
    assert sys.version_info >= (3, int(minimum))


def test_pyproject_raises_no_setuptools_warning():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the deprecated licence table
        apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))


def test_the_before_row_is_the_same_for_every_method(tmp_path, tiny_pretrained):
    """The report samples the base model with one sampler, whatever steps the method trained with."""
    from rgdm.config import RWRConfig
    from rgdm.training.finetune import finetune_and_report

    rows = {}
    for method in ("rgdm", "rwr"):
        config = tiny_finetune(tiny_pretrained, 1)
        config.method = method
        config.rwr = RWRConfig(batch_size=4, sampling_steps=5)  # rgdm trains with 6 steps
        config.eval_samples = 0
        summaries = finetune_and_report(config.validate(), tmp_path / method, compare=6, progress=False)
        rows[method] = summaries["before"]
    assert rows["rgdm"] == rows["rwr"]


def test_the_after_row_samples_the_model_the_checkpoint_serves(tmp_path, tiny_pretrained, monkeypatch):
    """With an EMA, the report's "after" model is the EMA copy that ``load_model`` (``rgdm sample``) loads,
    not the raw weights the optimizer moved."""
    import rgdm.report
    from rgdm.runs import load_model
    from rgdm.training.finetune import finetune_and_report

    reported = {}

    def capture(run_dir, base_model, tuned_model, *args, **kwargs):
        reported["after"] = tuned_model
        return {}

    monkeypatch.setattr(rgdm.report, "finetune_report", capture)
    config = tiny_finetune(tiny_pretrained, 2)
    config.train.ema_decay = 0.5
    config.eval_samples = 0
    finetune_and_report(config.validate(), tmp_path / "ema", compare=2, progress=False)
    served = load_model(tmp_path / "ema").model.state_dict()
    after = reported["after"].state_dict()
    assert all(torch.equal(after[k].cpu(), v.cpu()) for k, v in served.items())
    raw = load_model(tmp_path / "ema", use_ema=False).model.state_dict()
    assert not all(torch.equal(raw[k], v) for k, v in served.items())  # the EMA copy differs from the raw weights


def test_full_disk_while_logging_metrics_is_one_line(workdir, capsys, monkeypatch):
    import errno

    def full_disk(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    capsys.readouterr()
    assert cli.main(["pretrain", "--config", "tiny.yaml", "--name", "full"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: runs/full/metrics.csv: metrics not written (no space left on device); the checkpoints are "
        "intact, free some space and resume the run"]
    assert not list((workdir / "runs" / "full").glob("metrics.csv*"))
