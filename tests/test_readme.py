"""The README's Python quick start runs as written (against the shipped pre-trained model)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def python_quick_start() -> str:
    text = README.read_text()
    section = text[text.index("### Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = python_quick_start()
    assert len(code.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["trainer"].step == 5
    assert len(namespace["symbols"]) == len(namespace["positions"]) > 0
    assert (tmp_path / "runs" / "compact" / "metrics.csv").exists()
