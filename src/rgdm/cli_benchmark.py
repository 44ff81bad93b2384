"""``rgdm benchmark conditional``: EDM's conditional-generation protocol (Table 3) as one command.

    rgdm benchmark conditional --property gap --budget small      # ≤ 60 min on a 2-core CPU
    rgdm benchmark conditional --property all --budget paper      # EDM's sizes, for a GPU

The command runs *stages* and skips every stage whose output already exists, so an interrupted or
time-capped run continues where it stopped when re-run with the same options:

1. evaluator: EGNN regressor on D_a            runs/regressor-<p>-Da[-noH]
2. reward model: EGNN regressor on D_b         runs/regressor-<p>-Db[-noH]
3. conditional EDM on D_b                      runs/cond-<p>-Db-<budget>
4. rows that need no training: Naive, #Atoms, lower bound; conditional EDM; guidance
5. physics targets (GFN2-xTB of D_b molecules; gap and μ only)
6. RGDM fine-tunes of the conditional EDM      runs/rgdm-<p>-{regressor,xtb}-<budget>, and their rows
7. physics rows (xTB MAE on generated geometries)

Results go to ``<out>/<budget>/``: ``<p>/rows/*.json`` per row, ``results.json`` with every number,
``table.md`` (EDM's layout with EDM's published rows above ours). Protocol: docs/conditional.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from rgdm.cli_common import DeviceOption, resolve_device_option
from rgdm.config import _check_choice
from rgdm.eval.conditional_benchmark import ConditionalBenchmark
from rgdm.eval.conditional_budget import ConditionalBudget, get_budget

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmarks: EDM's conditional-generation protocol (rgdm benchmark conditional).")


def write_report(out_dir: Path, budget: ConditionalBudget, props: list[str], runs_dir: Path,
                 timings: dict[str, dict[str, float]], command: str) -> dict[str, Any]:
    """Collect every property's rows into ``results.json`` and ``table.md`` under ``out_dir/<budget>``."""
    from rgdm.eval.conditional_tables import EDM_TABLE3, details_table, markdown_table, physics_table

    base = Path(out_dir) / budget.name
    results: dict[str, Any] = {}
    physics: dict[str, Any] = {}
    for prop in sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        bench = ConditionalBenchmark(prop, budget, out_dir, runs_dir)
        rows, phys = bench.results()
        if rows:
            results[prop] = rows
        if phys:
            physics[prop] = phys
            target_file = bench.out / "physics" / "targets.json"
            if target_file.is_file():
                data = json.loads(target_file.read_text())
                physics[prop]["targets"] = {k: data[k] for k in ("fit", "xtb_success", "molecules")}
    previous = base / "results.json"
    old_timings = json.loads(previous.read_text()).get("timings_seconds", {}) if previous.is_file() else {}
    for prop, stage_times in timings.items():
        old_timings.setdefault(prop, {}).update(stage_times)
    payload = {"budget": asdict(budget), "command": command, "properties_requested": props,
               "results": results, "physics": physics, "edm_table3": EDM_TABLE3, "timings_seconds": old_timings}
    base.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(payload, indent=2, default=_json_default))
    parts = [f"# EDM's conditional protocol, budget {budget.name}", "", f"Command: `{command}`", "",
             "MAE of the D_a evaluator on generated molecules against their targets (lower is better).", "",
             markdown_table(results, budget.name) if results else "(no rows yet)", "",
             "## Generated rows: MAE ± standard error, RDKit validity", "", details_table(results)]
    if physics:
        parts += ["", "## Physics variant: GFN2-xTB targets, MAE by tblite on the generated geometries", "",
                  physics_table(physics)]
    (base / "table.md").write_text("\n".join(parts) + "\n")
    return payload


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


# --------------------------------------------------------------------------------------------- #
# The command.


@app.command("conditional")
def conditional_cmd(
    property_: Annotated[str, typer.Option("--property", help="alpha, gap, homo, lumo, mu, Cv or all.")] = "gap",
    budget: Annotated[str, typer.Option(help="small (≤ 60 min per property on a 2-core CPU) or paper (EDM's "
                                             "sizes, for a GPU).")] = "small",
    out: Annotated[Path, typer.Option(help="Where tables, JSON and per-row results go.")] = Path(
        "runs/benchmarks/conditional"),
    runs: Annotated[Path, typer.Option(help="Where model runs (regressors, generators) live and are reused.")] = Path(
        "runs"),
    xtb: Annotated[bool, typer.Option("--xtb/--no-xtb", help="RGDM with the xTB reward and the physics variant "
                                                             "(gap and mu).")] = True,
    device: DeviceOption = "auto",
) -> None:
    """EDM's Table 3: generate molecules for target property values; MAE of an independent regressor.

    Stages whose outputs exist are skipped: re-run the same command to continue an interrupted run.
    """
    import torch

    from rgdm.data.properties import PROPERTIES

    resolve_device_option(device)
    preset = get_budget(budget)
    props = list(PROPERTIES) if property_ == "all" else [property_]
    for prop in props:
        _check_choice("--property", prop, (*PROPERTIES, "all"))
    if preset.threads:
        torch.set_num_threads(preset.threads)
    command = f"rgdm benchmark conditional --property {property_} --budget {budget}" + ("" if xtb else " --no-xtb")
    timings: dict[str, dict[str, float]] = {}
    for prop in props:
        bench = ConditionalBenchmark(prop, preset, out, runs, with_xtb=xtb, device=device)
        timings[prop] = bench.timings
        bench.run(on_progress=lambda: write_report(out, preset, props, runs, timings, command))
    write_report(out, preset, props, runs, timings, command)
    typer.echo((out / preset.name / "table.md").read_text())
    typer.echo(f"all numbers in {out / preset.name / 'results.json'}")
