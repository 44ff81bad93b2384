"""benchmarks/throughput.py runs end to end on the shipped model (tiny sizes) and reports real rates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_reports_sampling_and_xtb_rates(tmp_path):
    out = tmp_path / "throughput.json"
    results = _load().main(["--batch-sizes", "4", "--steps", "3", "--xtb-molecules", "2", "--workers", "1",
                            "--out", str(out)])
    assert json.loads(out.read_text()) == results
    (sampling,) = results["sampling"]
    assert sampling["batch_size"] == 4 and sampling["molecules_per_s"] > 0
    assert 0.0 <= sampling["validity"] <= 1.0
    (xtb,) = results["xtb"]
    assert xtb["workers"] == 1 and xtb["molecules"] == 2 and xtb["molecules_per_s"] > 0
    assert xtb["ratio_to_first"] == 1.0
