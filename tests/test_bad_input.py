"""Bad input at the command line: one clear line on stderr, exit code 2, no results overwritten.

Every case runs ``rgdm.cli.main`` in a directory that already holds a finished run, and checks
that the files of that run are byte-for-byte unchanged and that no new file is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from rgdm import cli

TINY = {
    "name": "tiny",
    "data": {"dataset": "qm9", "remove_h": True, "max_train_molecules": 256},
    "model": {"hidden_nf": 16, "n_layers": 2},
    "diffusion": {"timesteps": 50},
    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2, "val_batches": 0,
              "num_threads": 1},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, qm9_all):
    """A directory holding ``tiny.yaml`` and the finished run ``runs/tiny`` it describes."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert cli.main(["pretrain", "--config", "tiny.yaml"]) == 0
    torch.set_num_threads(threads)
    return root


@pytest.fixture
def workdir(finished_run, monkeypatch):
    monkeypatch.chdir(finished_run)
    return finished_run


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "runs").rglob("*")) if p.is_file()}


def run_dirs_with_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "runs").iterdir() if any(q.is_file() for q in p.rglob("*")))


def refused(argv: list[str], root: Path, capsys) -> str:
    """Run the CLI, check exit code 2, one stderr line and untouched results; return that line."""
    before, dirs_before = snapshot(root), run_dirs_with_files(root)
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert snapshot(root) == before
    assert run_dirs_with_files(root) == dirs_before
    return lines[0]


def write_config(root: Path, name: str, **sections) -> str:
    values = {**TINY, "name": "other"}
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    (root / name).write_text(yaml.safe_dump(values, sort_keys=False))
    return name


def line_of(root: Path, name: str, key: str) -> int:
    lines = (root / name).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith(f"{key}:"))


def test_mistyped_key_in_the_file_names_file_line_and_suggestion(workdir, capsys):
    config = write_config(workdir, "typo.yaml", model={"hiden_nf": 32})
    line = refused(["pretrain", "--config", config], workdir, capsys)
    assert line == (f"error: typo.yaml:{line_of(workdir, config, 'hiden_nf')}: model.hiden_nf: unknown key "
                    "(did you mean 'hidden_nf'?)")


def test_mistyped_section_is_reported(workdir, capsys):
    config = write_config(workdir, "section.yaml", trian={"steps": 3})
    line = refused(["pretrain", "--config", config], workdir, capsys)
    assert line.endswith("trian: unknown key (did you mean 'train'?)")


def test_mistyped_override_names_the_set_option(workdir, capsys):
    line = refused(["pretrain", "--config", "tiny.yaml", "--name", "new", "--set", "train.stesp=3"], workdir, capsys)
    assert line == "error: --set: train.stesp: unknown key (did you mean 'steps'?)"


@pytest.mark.parametrize(("section", "value", "message"), [
    ("train", {"steps": "many"}, "train.steps: expected an integer, got 'many'"),
    ("train", {"lr": -1}, "train.lr: -1.0 is outside [0.0, inf]"),
    ("train", {"batch_size": 0}, "train.batch_size: 0 is outside [1, inf]"),
    ("train", {"ema_decay": 1.5}, "train.ema_decay: 1.5 is outside [0.0, 1.0]"),
    ("model", {"attention": "yes"}, "model.attention: expected true/false, got 'yes'"),
    ("diffusion", {"timesteps": 1}, "diffusion.timesteps: 1 is outside [2, inf]"),
    ("data", {"dataset": "qm_9"}, "data.dataset: 'qm_9' is not one of qm9, files (did you mean 'qm9'?)"),
    ("data", {"dataset": "zinc"}, "data.dataset: 'zinc' is not one of qm9, files"),
])
def test_wrong_types_and_ranges(workdir, capsys, section, value, message):
    config = write_config(workdir, "wrong.yaml", **{section: value})
    key = next(iter(value))
    assert refused(["pretrain", "--config", config], workdir, capsys) == (
        f"error: wrong.yaml:{line_of(workdir, config, key)}: {message}")


def test_invalid_yaml_names_the_line(workdir, capsys):
    (workdir / "broken.yaml").write_text("name: x\ntrain:\n  steps: [1, 2\n")
    line = refused(["pretrain", "--config", "broken.yaml"], workdir, capsys)
    assert line.startswith("error: broken.yaml:") and "invalid YAML" in line


def test_missing_config_file(workdir, capsys):
    assert refused(["pretrain", "--config", "nope.yaml"], workdir, capsys) == "error: nope.yaml: config file not found"


def test_missing_data_file(workdir, capsys):
    config = write_config(workdir, "files.yaml", data={"dataset": "files", "files": ["missing.xyz"]})
    assert refused(["pretrain", "--config", config], workdir, capsys) == (
        "error: missing.xyz: no such file or directory")


def test_empty_data_file(workdir, capsys):
    (workdir / "empty.xyz").write_text("")
    config = write_config(workdir, "empty.yaml", data={"dataset": "files", "files": ["empty.xyz"]})
    assert refused(["pretrain", "--config", config], workdir, capsys) == "error: empty.xyz:1: no molecules in file"


def test_molecule_with_an_unknown_element(workdir, capsys):
    (workdir / "odd.xyz").write_text("3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"
                                     "2\nnot chemistry\nXx 0 0 0\nC 1.5 0 0\n")
    config = write_config(workdir, "odd.yaml", data={"dataset": "files", "files": ["odd.xyz"], "remove_h": False})
    assert refused(["pretrain", "--config", config], workdir, capsys) == (
        "error: odd.xyz: frame 2: unknown element 'Xx'")


def test_missing_checkpoint_or_run(workdir, capsys):
    line = refused(["sample", "runs/nothing-here", "--n", "2"], workdir, capsys)
    assert line.startswith("error: runs/nothing-here: no such run directory, checkpoint or pretrained model")
    line = refused(["finetune", "--from", "runs/nothing-here", "--reward", "validity"], workdir, capsys)
    assert line.startswith("error: runs/nothing-here: no such run directory")


def test_run_directory_without_checkpoints(workdir, capsys):
    (workdir / "runs" / "hollow").mkdir(exist_ok=True)
    assert refused(["sample", "runs/hollow", "--n", "2"], workdir, capsys) == (
        "error: runs/hollow: no usable checkpoint in this run directory")


def test_existing_run_is_not_overwritten(workdir, capsys):
    line = refused(["pretrain", "--config", "tiny.yaml"], workdir, capsys)
    assert line == "error: runs/tiny already holds a run; pass --resume to continue it or choose another --name"


def test_unknown_device(workdir, capsys):
    line = refused(["pretrain", "--config", "tiny.yaml", "--name", "new", "--device", "gpu"], workdir, capsys)
    assert line == "error: --device: 'gpu' is not one of auto, cpu, cuda"


def test_unknown_reward_and_finetune_key(workdir, capsys):
    line = refused(["finetune", "--from", "runs/tiny", "--reward", "qeed", "--compare", "0"], workdir, capsys)
    assert line.startswith("error: reward.name: unknown reward 'qeed' (did you mean 'qed'?)")
    line = refused(["finetune", "--from", "runs/tiny", "--reward", "qed", "--set", "rgdm.tua=2"], workdir, capsys)
    assert line == "error: rgdm.tua: unknown key (did you mean 'tau'?)"
