"""Crash safety of training runs, exercised through the real command line.

A run killed with SIGKILL and resumed ends bit-for-bit where the uninterrupted run ends (pre-training
and fine-tuning); a damaged newest checkpoint is reported and the previous one used; checkpoints of
another format or config are refused with one clear line; a full disk while saving keeps the
previous checkpoint intact.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rgdm import cli
from rgdm.training.checkpoint import FORMAT_VERSION, CheckpointError, checkpoint_paths, load_checkpoint

TINY = {
    "name": "tiny",
    "data": {"dataset": "qm9", "remove_h": True, "max_train_molecules": 256},
    "model": {"hidden_nf": 16, "n_layers": 2},
    "diffusion": {"timesteps": 50},
    "train": {"steps": 4, "batch_size": 8, "log_every": 1, "checkpoint_every": 2, "val_batches": 0,
              "num_threads": 1},
}
FINETUNE_ARGS = ["--reward", "validity", "--set", "rgdm.sampling_steps=5", "--set", "rgdm.batch_size=4",
                 "--set", "train.checkpoint_every=2", "--set", "train.num_threads=1", "--set", "eval_samples=0",
                 "--compare", "0"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Runs go to ``tmp_path/runs``; the torch thread count set by a run is restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    yield
    torch.set_num_threads(threads)


def rgdm_subprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rgdm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def kill_after_first_checkpoint(cwd: Path, checkpoint_dir: Path, *args: str) -> None:
    """Start ``rgdm *args``, SIGKILL it once a checkpoint exists, and check it died mid-run."""
    process = subprocess.Popen([sys.executable, "-m", "rgdm", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not checkpoint_paths(checkpoint_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # let it run on past the checkpoint: the kill lands mid-step or mid-write
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"


def assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        if a[key] is None or b[key] is None:
            assert a[key] is b[key] is None
            continue
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index, slots in state_a.items():
        for slot, value in slots.items():
            assert torch.equal(value, state_b[index][slot]), f"optimizer {index}.{slot} differs"
    assert_same_tree(a["objective"], b["objective"], "objective")


WALL_CLOCK_SUFFIXES = ("seconds", "samples_per_second")


def assert_same_tree(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and numbers are equal, tensors exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if isinstance(key, str) and key.endswith(WALL_CLOCK_SUFFIXES):
                continue  # time spent (reward counters), not state: it differs between any two runs
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def newest(run_dir: Path) -> dict:
    return load_checkpoint(checkpoint_paths(run_dir / "checkpoints")[-1])


def temp_files(run_dir: Path) -> list[Path]:
    return list((run_dir / "checkpoints").glob(".*"))


def test_pretraining_killed_and_resumed_matches_uninterrupted_run(tmp_path, qm9_all):
    steps = ["--set", "train.steps=80"]
    kill_after_first_checkpoint(tmp_path, tmp_path / "runs" / "killed" / "checkpoints",
                                "pretrain", "--config", "tiny.yaml", "--name", "killed", *steps)
    interrupted_at = load_checkpoint(checkpoint_paths(tmp_path / "runs" / "killed" / "checkpoints")[-1])["step"]
    assert 2 <= interrupted_at < 80

    resumed = rgdm_subprocess(tmp_path, "pretrain", "--config", "tiny.yaml", "--name", "killed", "--resume", *steps)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert cli.main(["pretrain", "--config", "tiny.yaml", "--name", "straight", *steps]) == 0

    assert_identical(newest(tmp_path / "runs" / "killed"), newest(tmp_path / "runs" / "straight"))
    assert not temp_files(tmp_path / "runs" / "killed")


def test_finetuning_killed_and_resumed_matches_uninterrupted_run(tmp_path, qm9_all):
    assert cli.main(["pretrain", "--config", "tiny.yaml", "--set", "train.steps=2"]) == 0
    base = str(tmp_path / "runs" / "tiny")
    args = ["finetune", "--from", base, *FINETUNE_ARGS, "--set", "train.steps=16"]
    kill_after_first_checkpoint(tmp_path, tmp_path / "runs" / "killed" / "checkpoints", *args, "--name", "killed")
    assert load_checkpoint(checkpoint_paths(tmp_path / "runs" / "killed" / "checkpoints")[-1])["step"] < 16

    resumed = rgdm_subprocess(tmp_path, *args, "--name", "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert cli.main([*args, "--name", "straight"]) == 0

    killed, straight = newest(tmp_path / "runs" / "killed"), newest(tmp_path / "runs" / "straight")
    assert killed["step"] == 16
    assert_identical(killed, straight)
    assert not temp_files(tmp_path / "runs" / "killed")


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, qm9_all, damage):
    assert cli.main(["pretrain", "--config", "tiny.yaml"]) == 0  # checkpoints at steps 2 and 4
    latest = checkpoint_paths(tmp_path / "runs" / "tiny" / "checkpoints")[-1]
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))

    resumed = rgdm_subprocess(tmp_path, "pretrain", "--config", "tiny.yaml", "--resume", "--set", "train.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warning = next(line for line in resumed.stderr.splitlines() if "step_00000004.pt" in line)
    assert "corrupt checkpoint" in warning and "falling back to the previous checkpoint" in warning
    assert "resumed from" in resumed.stderr and "step_00000002.pt at step 2" in resumed.stderr

    assert cli.main(["pretrain", "--config", "tiny.yaml", "--name", "straight", "--set", "train.steps=6"]) == 0
    assert_identical(newest(tmp_path / "runs" / "tiny"), newest(tmp_path / "runs" / "straight"))


def rewrite_checkpoint(path: Path, **changes) -> None:
    state = torch.load(path, weights_only=True)
    state.update(changes)
    torch.save(state, path)


def test_checkpoint_of_another_format_version_is_refused(tmp_path, qm9_all):
    assert cli.main(["pretrain", "--config", "tiny.yaml"]) == 0
    paths = checkpoint_paths(tmp_path / "runs" / "tiny" / "checkpoints")
    for path in paths:
        rewrite_checkpoint(path, format_version=FORMAT_VERSION + 1, rgdm_version="99.0")
    before = {p: p.read_bytes() for p in paths}

    sampled = rgdm_subprocess(tmp_path, "sample", str(paths[-1]), "--n", "2")
    assert sampled.returncode == 2
    assert sampled.stderr.strip() == (f"error: {paths[-1]}: checkpoint format {FORMAT_VERSION + 1} (rgdm 99.0) is "
                                      f"not supported by rgdm {__import__('rgdm').__version__} "
                                      f"(format {FORMAT_VERSION})")

    resumed = rgdm_subprocess(tmp_path, "pretrain", "--config", "tiny.yaml", "--resume", "--set", "train.steps=6")
    assert resumed.returncode == 2
    error = resumed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: no usable checkpoint to resume (2 found;") and "format" in error
    assert "Traceback" not in resumed.stderr
    assert {p: p.read_bytes() for p in paths} == before  # nothing overwritten


def test_resume_with_another_config_is_refused(tmp_path, qm9_all):
    assert cli.main(["pretrain", "--config", "tiny.yaml"]) == 0
    paths = checkpoint_paths(tmp_path / "runs" / "tiny" / "checkpoints")
    before = {p: p.read_bytes() for p in paths}
    resumed = rgdm_subprocess(tmp_path, "pretrain", "--config", "tiny.yaml", "--resume",
                              "--set", "model.hidden_nf=32", "--set", "train.steps=6")
    assert resumed.returncode == 2
    assert resumed.stderr.strip().splitlines()[-1] == (
        "error: runs/tiny/checkpoints/step_00000004.pt: the run was started with a different config "
        "(changed: model.hidden_nf); use a new run name")
    assert checkpoint_paths(tmp_path / "runs" / "tiny" / "checkpoints") == paths
    assert {p: p.read_bytes() for p in paths} == before


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, qm9_all, monkeypatch, capsys):
    assert cli.main(["pretrain", "--config", "tiny.yaml", "--set", "train.steps=2"]) == 0
    checkpoint_dir = tmp_path / "runs" / "tiny" / "checkpoints"
    previous = checkpoint_paths(checkpoint_dir)
    assert [p.name for p in previous] == ["step_00000002.pt"]
    saved_bytes = previous[0].read_bytes()

    def save_until_the_disk_is_full(obj, handle, *args, **kwargs):
        handle.write(b"\0" * 4096)  # part of the file reaches the disk, then the device is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    capsys.readouterr()
    code = cli.main(["pretrain", "--config", "tiny.yaml", "--resume", "--set", "train.steps=4"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error == ("error: runs/tiny/checkpoints/step_00000004.pt: checkpoint not written (no space left on "
                     "device); the previous checkpoints are intact")
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["step_00000002.pt"]  # no temp file left
    assert previous[0].read_bytes() == saved_bytes
    assert load_checkpoint(previous[0])["step"] == 2


def test_unwritable_checkpoint_directory_is_a_clear_error(tmp_path):
    from rgdm.training.checkpoint import save_checkpoint

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint directory should be")
    with pytest.raises(CheckpointError, match=r"not_a_dir/step_00000000.pt: cannot write a checkpoint here"):
        save_checkpoint({"step": 0}, blocker / "step_00000000.pt")
