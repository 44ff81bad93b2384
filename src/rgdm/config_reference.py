"""Generate docs/configuration.md from the config dataclasses (a test keeps the file in sync)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

from rgdm.config import (
    DataConfig,
    DDPOConfig,
    DiffusionConfig,
    FinetuneConfig,
    ModelConfig,
    RGDMConfig,
    RunConfig,
    RWRConfig,
    TrainConfig,
)

SECTIONS = [
    ("Pre-training (`rgdm pretrain --config`)", RunConfig, [
        ("data", DataConfig), ("model", ModelConfig), ("diffusion", DiffusionConfig), ("train", TrainConfig)]),
    ("Fine-tuning (`rgdm finetune --config`)", FinetuneConfig, [("rgdm", RGDMConfig), ("ddpo", DDPOConfig),
                                                                        ("ppo", DDPOConfig), ("rwr", RWRConfig),
                                                                        ("train", TrainConfig)]),
]


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source."""
    source = inspect.getsource(cls)
    comments = {}
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1]
            if "#" in line:
                comments[node.target.id] = line.split("#", 1)[1].strip()
    return comments


def _type_name(hint: typing.Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def _default(field: dataclasses.Field, section: typing.Any = None) -> str:
    """The field's default; in ``section`` (the parent's default instance of this section, e.g. the
    fine-tuning ``train``) the value that section starts from, which ``from_dict`` fills in too."""
    if section is not None:
        value = getattr(section, field.name)
    elif field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "see below"
    return f"`{value!r}`"


def table(cls: type, prefix: str = "", section: typing.Any = None) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        rows.append(f"| `{prefix}{field.name}` | {_type_name(hints[field.name])} | {_default(field, section)} | "
                    f"{comments.get(field.name, '')} |")
    return rows


def reference_markdown() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the dataclasses in `src/rgdm/config.py` and `config_methods.py` by "
             "`python -m rgdm.config_reference`; `tests/test_config_reference.py` keeps it in sync.",
             "Unknown keys, wrong types, out-of-range values and non-finite numbers (`.nan`, `.inf`) are rejected "
             "with one line naming the key. A run `name` is one directory under `runs/`: no `/` or `\\`, "
             "not only dots. A section given in part keeps the defaults listed under its command for "
             "the rest (a fine-tuning `train:` with only `steps` keeps fine-tuning's `lr` and `ema_decay`).", ""]
    for title, top, sections in SECTIONS:
        lines += [f"## {title}", ""] + table(top) + [""]
        defaults = top()  # the sections as the command starts from them
        for name, cls in sections:
            lines += [f"### `{name}`", ""] + table(cls, f"{name}.", getattr(defaults, name)) + [""]
    return "\n".join(lines)


def main(out: Path = Path("docs/configuration.md")) -> None:
    out.write_text(reference_markdown())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
