"""benchmarks/train_step.py: its --check verdict cannot pass without timing EDM's reference."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_check_fails_when_the_edm_reference_is_missing(train_step, tmp_path, capsys):
    args = ["--config", "small", "--repeats", "1", "--warmup", "0", "--no-memory",
            "--edm-reference", str(tmp_path / "absent.py"), "--out", str(tmp_path / "out.json")]
    assert train_step.main(args) == 0  # timing our side alone is allowed ...
    assert train_step.main(args + ["--check"]) == 1  # ... but it verifies nothing
    assert "EDM reference was not timed" in capsys.readouterr().err
    assert (tmp_path / "out.json").exists()
