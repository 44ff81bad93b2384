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
    line = refused(["pretrain", "--config", "tiny.yaml", "--name", "tiny"], workdir, capsys)
    assert line == "error: runs/tiny already holds a run; pass --resume to continue it or choose another --name"


def test_unknown_device(workdir, capsys):
    line = refused(["pretrain", "--config", "tiny.yaml", "--name", "new", "--device", "gpu"], workdir, capsys)
    assert line == "error: --device: 'gpu' is not one of auto, cpu, cuda"


def test_unknown_reward_and_finetune_key(workdir, capsys):
    line = refused(["finetune", "--from", "runs/tiny", "--reward", "qeed", "--compare", "0"], workdir, capsys)
    assert line.startswith("error: reward.name: unknown reward 'qeed' (did you mean 'qed'?)")
    line = refused(["finetune", "--from", "runs/tiny", "--reward", "qed", "--set", "rgdm.tua=2"], workdir, capsys)
    assert line == "error: rgdm.tua: unknown key (did you mean 'tau'?)"


# --------------------------------------------------------------------------------------------- #
# Misuse a new user runs into (issue 19): usage errors, odd values, names, outputs.


@pytest.mark.parametrize(("argv", "message"), [
    (["sample", "runs/tiny", "--n", "0"], "error: Invalid value for '--n': Input should be greater than or equal to 1"),
    (["sample", "runs/tiny", "--n", "-5"], "error: Invalid value for '--n'"),
    (["sample", "runs/tiny", "--steps", "0"], "error: Invalid value for '--steps'"),
    (["sample", "runs/tiny", "--batch-size", "0"], "error: Invalid value for '--batch-size'"),
    (["evaluate", "runs/tiny", "--n", "-1"], "error: Invalid value for '--n'"),
    (["finetune", "--from", "runs/tiny", "--compare", "-1"], "error: Invalid value for '--compare'"),
    (["sample", "runs/tiny", "--frobnicate"], "error: No such option: --frobnicate"),
    (["sample"], "error: Missing argument"),
    (["frobnicate"], "error: No such command 'frobnicate'."),
])
def test_usage_errors_are_one_line_with_exit_code_2(workdir, capsys, argv, message):
    line = refused(argv, workdir, capsys)
    assert line.startswith(message), line
    assert line.endswith("--help)"), line  # points at the command's help


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_non_finite_numbers_are_refused(workdir, capsys, value):
    (workdir / "nan.yaml").write_text(f"name: other\ntrain:\n  lr: {value}\n")
    assert refused(["pretrain", "--config", "nan.yaml"], workdir, capsys) == (
        f"error: nan.yaml:3: train.lr: expected a finite number, got {yaml.safe_load(value)!r}")
    line = refused(["pretrain", "--config", "tiny.yaml", "--name", "x", "--set", f"train.lr={value}"], workdir, capsys)
    assert line.startswith("error: --set: train.lr: expected a finite number")


@pytest.mark.parametrize(("name", "reason"), [
    ("..", "only dots"), (".", "only dots"), ("../escape", "path separator"), ("a/b", "path separator"),
    ("a\\b", "path separator"), ("", "non-empty"), ("tab\tname", "control characters"),
])
def test_run_names_cannot_escape_runs(workdir, capsys, name, reason):
    for argv in (["pretrain", "--config", "tiny.yaml", "--name", name],
                 ["finetune", "--from", "runs/tiny", "--reward", "qed", "--name", name, "--compare", "0"]):
        line = refused(argv, workdir, capsys)
        assert line.startswith("error: --name") and reason in line, line
    assert not (workdir / "config.yaml").exists() and not (workdir / "metrics.csv").exists()


def test_evaluate_a_file_with_an_unknown_element(workdir, capsys):
    (workdir / "odd.xyz").write_text("2\nnot chemistry\nXx 0 0 0\nC 1.5 0 0\n")
    line = refused(["evaluate", "odd.xyz", "--no-novelty"], workdir, capsys)
    assert line.startswith("error: odd.xyz: molecule 1: element 'Xx' is unknown to EDM's bond rules (H, B, C")
    assert not (workdir / "odd_metrics.json").exists()


def test_byte_order_mark_is_not_part_of_the_data(workdir, capsys):
    """Files saved by Windows editors start with U+FEFF; it is neither data nor part of a message."""
    (workdir / "bom.xyz").write_bytes("\ufeff2\nCO\nC 0 0 0\nO 1.13 0 0\n".encode())
    from rgdm.data.readers import read_xyz

    [(symbols, _)] = read_xyz(workdir / "bom.xyz")
    assert symbols == ["C", "O"]
    (workdir / "bom.yaml").write_bytes("\ufeffname: other\ntrain:\n  stepz: 3\n".encode())
    line = refused(["pretrain", "--config", "bom.yaml"], workdir, capsys)
    assert line == "error: bom.yaml:3: train.stepz: unknown key (did you mean 'steps'?)"
    assert "\ufeff" not in line


def test_sample_refuses_to_overwrite_unless_asked(workdir, capsys):
    out = workdir / "mols.xyz"
    assert cli.main(["sample", "runs/tiny", "--n", "2", "--steps", "2", "--out", "mols.xyz"]) == 0
    written = out.read_bytes(), out.with_suffix(".sdf").read_bytes()
    line = refused(["sample", "runs/tiny", "--n", "3", "--steps", "2", "--out", "mols.xyz"], workdir, capsys)
    assert line == "error: mols.xyz exists; pass --overwrite to replace it, or choose another --out"
    assert (out.read_bytes(), out.with_suffix(".sdf").read_bytes()) == written
    out.unlink()  # the .sdf alone is protected too
    line = refused(["sample", "runs/tiny", "--n", "3", "--steps", "2", "--out", "mols.xyz"], workdir, capsys)
    assert line.startswith("error: mols.sdf exists")
    assert cli.main(["sample", "runs/tiny", "--n", "3", "--steps", "2", "--out", "mols.xyz", "--overwrite"]) == 0
    from rgdm.data.readers import read_xyz

    assert len(read_xyz(out)) == 3  # replaced: the first file held 2 molecules


def test_sample_never_writes_over_a_checkpoint(workdir, capsys):
    checkpoint = sorted((workdir / "runs" / "tiny" / "checkpoints").glob("step_*.pt"))[-1]
    for target in (checkpoint, checkpoint.with_suffix(".sdf")):
        line = refused(["sample", "runs/tiny", "--n", "2", "--out", str(target), "--overwrite"], workdir, capsys)
        assert line.endswith("give a .xyz path (the .sdf is written next to it)")


def test_sample_default_path_is_the_one_help_names(workdir, capsys):
    import typing

    out_help = typing.get_type_hints(cli.sample_cmd, include_extras=True)["out"].__metadata__[0].help
    assert "default: <run>/samples/samples.xyz" in out_help
    assert cli.main(["sample", "runs/tiny", "--n", "2", "--steps", "2"]) == 0
    try:
        assert (workdir / "runs" / "tiny" / "samples" / "samples.xyz").is_file()
        assert (workdir / "runs" / "tiny" / "samples" / "samples.sdf").is_file()
        assert not (workdir / "runs" / "tiny" / "samples.xyz").exists()
    finally:  # leave the shared run as the other tests expect it
        for path in (workdir / "runs" / "tiny" / "samples").glob("samples.*"):
            path.unlink()


def test_evaluate_refuses_to_overwrite_its_metrics(workdir, capsys):
    (workdir / "two.xyz").write_text("2\nCO\nC 0 0 0\nO 1.13 0 0\n")
    assert cli.main(["evaluate", "two.xyz", "--no-novelty"]) == 0
    metrics = (workdir / "two_metrics.json").read_bytes()
    line = refused(["evaluate", "two.xyz", "--no-novelty"], workdir, capsys)
    assert line == "error: two_metrics.json exists; pass --overwrite to replace it, or choose another --out"
    assert (workdir / "two_metrics.json").read_bytes() == metrics
    assert cli.main(["evaluate", "two.xyz", "--no-novelty", "--overwrite"]) == 0


def test_full_disk_while_writing_metrics_is_one_line(workdir, capsys, monkeypatch):
    import errno

    (workdir / "three.xyz").write_text("2\nCO\nC 0 0 0\nO 1.13 0 0\n")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    capsys.readouterr()
    assert cli.main(["evaluate", "three.xyz", "--no-novelty"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # The metrics' progress bar may come first; the failure itself is one line, and no traceback.
    assert lines[-1] == "error: .three_metrics.json.tmp: no space left on device"
    assert not any("Traceback" in line for line in lines) and sum(line.startswith("error") for line in lines) == 1
    assert not (workdir / "three_metrics.json").exists() and not (workdir / ".three_metrics.json.tmp").exists()


def test_unexpected_errors_are_one_line_with_exit_code_1(workdir, capsys, monkeypatch):
    import rgdm.runs

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(rgdm.runs, "load_model", broken)
    capsys.readouterr()
    assert cli.main(["sample", "runs/tiny", "--n", "2"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: unexpected RuntimeError: something inside broke (RGDM_DEBUG=1 shows the traceback)"]
    monkeypatch.setenv("RGDM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something inside broke"):
        cli.main(["sample", "runs/tiny", "--n", "2"])


def test_finetune_device_option(workdir, capsys, monkeypatch):
    line = refused(["finetune", "--from", "runs/tiny", "--device", "gpu", "--compare", "0"], workdir, capsys)
    assert line == "error: --device: 'gpu' is not one of auto, cpu, cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(["finetune", "--from", "runs/tiny", "--device", "cuda", "--compare", "0"], workdir, capsys)
    assert line == "error: --device cuda: no CUDA device is available (use --device cpu or auto)"


def test_inline_reward_refuses_a_timeout(workdir, capsys):
    line = refused(["finetune", "--from", "runs/tiny", "--reward", "qed", "--set", "reward.timeout=5",
                    "--compare", "0"], workdir, capsys)
    assert line.startswith("error: reward.timeout: the inline backend runs the reward in the training process")
