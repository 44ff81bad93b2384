"""benchmarks/gpu.py runs end to end on the CPU with tiny settings (the GPU run uses the same code)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--device", "cpu", "--batches", "2", "--minutes", "0.02", "--repeats", "1", "--warmup", "0",
        "--samples", "2", "--sample-steps", "2", "--pretrain-batch", "2", "--finetune-steps", "1",
        "--finetune-batch", "2", "--finetune-sampling-steps", "2"]


def test_gpu_benchmark_runs_on_the_cpu_with_tiny_settings(tmp_path, qm9_all, single_thread):
    gpu = load_script()
    out = tmp_path / "gpu.json"
    assert gpu.main([*TINY, "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    fp32, bf16 = result["step_time"]
    assert fp32["batch"] == 2 and fp32["precision"] == "fp32" and fp32["ours_train_ms"] > 0
    assert fp32["ours_sample_ms"] > 0
    if result["edm_reference"] is not None:  # the EDM side is compared only when its reference exists
        assert fp32["edm_train_ms"] > 0 and fp32["train_speedup"] > 0
    else:
        assert "edm_train_ms" not in fp32
    assert bf16["skipped"] == "bf16 autocast is used on CUDA only"
    pretrain = result["pretrain"]
    assert pretrain["steps"] >= 1 and pretrain["batch_size"] == 2 and 0.0 <= pretrain["validity"] <= 1.0
    assert result["finetune"]["steps"] == 1 and result["finetune"]["device"] == "cpu"


def test_gpu_benchmark_without_the_edm_reference_times_ours_only(tmp_path, single_thread):
    gpu = load_script()
    cfg = gpu.replace(gpu.edm_config(), batch=2, hidden_nf=8, n_layers=1)
    row = gpu.time_steps(cfg, torch.device("cpu"), "fp32", None, repeats=1, warmup=0)
    assert row["ours_train_ms"] > 0 and "edm_train_ms" not in row and "train_speedup" not in row


def test_gpu_benchmark_refuses_cuda_without_a_gpu(monkeypatch, capsys):
    gpu = load_script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --device cuda: no CUDA device is available (use --device cpu or auto)")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_context(precision):
    gpu = load_script()
    context = gpu.precision_context(torch.device("cpu"), precision)()
    assert isinstance(context, torch.autocast) == (precision == "bf16")


@pytest.mark.parametrize("script", ["qm9_qed", "compare", "amortisation", "physics", "relaxation", "shapes"])
def test_benchmark_scripts_refuse_cuda_without_a_gpu_before_any_work(script, tmp_path):
    """The scripts that build or sample models take --device; cuda on a machine without a GPU stops
    them with the shared resolver's one-line error before anything is written."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever the machine has
    done = subprocess.run([sys.executable, str(SCRIPT.parent / f"{script}.py"), "--device", "cuda", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --device cuda: no CUDA device is available (use --device cpu or auto)")
    assert not out.exists()
