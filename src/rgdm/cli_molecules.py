"""The molecule side of ``rgdm pretrain | finetune | evaluate`` (``rgdm.domains.molecules`` hands the
parsed options here), and what ``rgdm sample`` and ``rgdm demo`` share with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rgdm import cli_runs
from rgdm.cli_common import (
    EvaluateRequest,
    FinetuneRequest,
    PretrainRequest,
    checked_name,
    default_dir,
    parse_overrides,
    refuse_to_overwrite,
    resolve_device_option,
    write_text_atomically,
)
from rgdm.cli_runs import claimed_run, run_name


def pretrain_command(request: PretrainRequest) -> None:
    """``rgdm pretrain`` of a molecule config: EDM's loss; ``--sample N`` evaluates N samples at the end."""
    from rgdm import distributed
    from rgdm.config import load_config
    from rgdm.eval.sampling import sample_and_evaluate
    from rgdm.training.pretrain import pretrain as run_pretrain

    name, resume = request.name, request.resume
    overrides = parse_overrides(request.set_)
    if name is not None:
        overrides["name"] = checked_name(name)
    cfg = load_config(request.config, overrides=overrides)
    cfg.name = run_name(cfg.name, explicit=name is not None, resume=resume)
    with claimed_run(cfg.name, explicit=name is not None, resume=resume) as run_dir:
        with distributed.leaving_process_group():
            trainer = run_pretrain(cfg, run_dir, resume=resume, device=request.device,
                                   compile_model=request.compile_)
            main = distributed.is_main()
        if not main:
            return
        typer.echo(f"checkpoints in {run_dir / 'checkpoints'}")
        if request.sample:
            metrics = sample_and_evaluate(trainer.sampling_model, request.sample, run_dir / "samples",
                                          seed=cfg.train.seed)
            typer.echo(json.dumps(metrics, indent=2))


def evaluate_command(request: EvaluateRequest) -> None:
    """``rgdm evaluate`` of one molecule model (sampled) or one .xyz/.sdf file."""
    from rgdm.config import ConfigError

    model = request.models
    if len(model) > 1:
        raise ConfigError("evaluate: give one molecule model or file (several models are compared only for shapes)")
    for option, value in (("--classifier", request.classifier), ("--target", request.target)):
        if value is not None:
            raise ConfigError(f"{option}: only for shape models; {model[0]} is not one")
    _evaluate_molecules(model[0], 1000 if request.n is None else request.n, request.steps, request.seed,
                        request.novelty, request.out, request.overwrite, request.posebusters, request.device)


def finetune_command(request: FinetuneRequest) -> None:
    """``rgdm finetune`` of a molecule model: ``--target`` is a property value (reward -|p - target| / scale)."""
    from rgdm.config import ConfigError, FinetuneConfig, from_dict, load_config, set_dotted, to_dict

    base, method, reward, name = request.base, request.method, request.reward, request.name
    if request.classifier is not None:
        raise ConfigError(f"--classifier: only for shape models; {base} is not one")
    number = _property_target(base, request.target)
    values = (to_dict(load_config(request.config, FinetuneConfig, {"base": base})) if request.config
              else to_dict(FinetuneConfig()))
    values["base"], values["method"] = base, method
    if reward:
        values["reward"] = {"name": reward, "backend": _reward_backend(reward), **_heavy_atom_options(base, reward)}
    if number is not None:
        values["reward"].update({"target": number, "scale": 1.0 if request.scale is None else request.scale})
        values["target"] = number
    for key, value in parse_overrides(request.set_).items():
        set_dotted(values, key, value)
    values["name"] = name or f"{Path(base).name}-{method}-{values['reward']['name']}"
    cfg = from_dict(FinetuneConfig, values).validate()
    cfg.name = run_name(cfg.name, explicit=name is not None, resume=request.resume)
    run_finetune(cfg, request.resume, 200 if request.compare is None else request.compare,
                 explicit_name=name is not None, device=request.device)


def _evaluate_molecules(model: str, n: int, steps: int | None, seed: int, novelty: bool, out: Path | None,
                        overwrite: bool, posebusters: bool = True, device: str = "auto") -> None:
    from rgdm.config import ConfigError
    from rgdm.eval.molecules import evaluate_molecules
    from rgdm.eval.sampling import qm9_training_smiles, sample_and_evaluate

    if out is not None and out.suffix.lower() != ".json":
        raise ConfigError(f"--out {out}: give a .json path for the metrics")
    path = Path(model)
    if path.is_file() and path.suffix.lower() in (".xyz", ".sdf"):
        from rgdm.data.readers import read_sdf, read_xyz

        out = out or path.with_name(path.stem + "_metrics.json")
        refuse_to_overwrite([out], overwrite)
        molecules = read_xyz(path) if path.suffix.lower() == ".xyz" else read_sdf(path)
        _check_elements(path, molecules)
        metrics = evaluate_molecules(molecules, qm9_training_smiles() if novelty else None)
    else:
        from rgdm.runs import load_model

        loaded = load_model(model, device=resolve_device_option(device))
        out_dir = default_dir(model) / "samples"
        out = out or out_dir / f"eval_n{n}_metrics.json"
        # sample_and_evaluate also writes the samples and its own copy of the metrics there
        refuse_to_overwrite([out, out_dir / f"eval_n{n}.xyz", out_dir / f"eval_n{n}_metrics.json"], overwrite)
        metrics = sample_and_evaluate(loaded.model, n, out_dir, tag=f"eval_n{n}", num_steps=steps, seed=seed,
                                      training_smiles=qm9_training_smiles() if novelty else None)
        from rgdm.data.readers import read_xyz

        molecules = read_xyz(out_dir / f"eval_n{n}.xyz")
    from rgdm.eval.strict import add_strict_metrics

    summary = add_strict_metrics(metrics, molecules, posebusters=posebusters)  # EDM's row and the strict row
    write_text_atomically(out, json.dumps(metrics, indent=2))
    typer.echo(summary)
    typer.echo(f"metrics written to {out}")


def _check_elements(path: Path, molecules) -> None:
    """A one-line DataError for the first atom that is not a chemical element (e.g. ``Xx``)."""
    from rgdm.data.batch import ATOMIC_NUMBERS
    from rgdm.data.dataset import DataError

    for index, (symbols, _) in enumerate(molecules):
        unknown = next((s for s in symbols if s not in ATOMIC_NUMBERS), None)
        if unknown is not None:
            raise DataError(f"{path}: molecule {index + 1}: element {unknown!r} is unknown to EDM's bond rules "
                            f"({', '.join(ATOMIC_NUMBERS)})")


def _property_target(base: str, target: str | None) -> float | None:
    """A molecule model's --target as a number; a one-line error for anything else (e.g. a class name)."""
    from rgdm.config import ConfigError
    from rgdm.runs import resolve_checkpoint

    if target is None:
        return None
    try:
        return float(target)
    except ValueError:
        resolve_checkpoint(base)  # a base that does not exist is the real problem: report that first
        raise ConfigError(f"--target {target!r}: a molecule model needs a number (a property value, e.g. "
                          f"--target 4.5); class names are targets of shape models") from None


def _reward_backend(reward: str) -> str:
    """Worker processes for the rewards that must not run beside torch (xTB), the training process otherwise."""
    from rgdm.rewards.registry import reward_spec

    try:
        return "process" if reward_spec(reward).worker_only else "inline"
    except KeyError:  # an unknown name: make_reward reports it, with a suggestion
        return "inline"


# Rewards that perceive bonds with RDKit's DetermineBonds (which needs explicit hydrogens) or run xTB.
_RDKIT_BOND_REWARDS = ("qed", "sa_score", "logp", "ring_constraint")


def _heavy_atom_options(base: str, reward: str) -> dict[str, object]:
    """Reward options a model without hydrogens needs; announced, and overridable with --set."""
    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import load_checkpoint

    elements = load_checkpoint(resolve_checkpoint(base)).get("model_spec", {}).get("elements", [])
    if "H" in elements:
        return {}
    options: dict[str, object] = {}
    if reward in _RDKIT_BOND_REWARDS:
        options = {"method": "edm"}  # EDM's bond rules; sanitising adds the implicit hydrogens
    elif reward.startswith("xtb_"):
        options = {"add_hydrogens": True}  # xTB on a bare skeleton would describe a radical
    if options:
        typer.echo(f"the model has no hydrogens: reward options {options} (override with --set reward.KEY=...)")
    return options


def run_finetune(cfg, resume: bool, compare: int, explicit_name: bool, device: str = "auto") -> None:
    from rgdm import distributed
    from rgdm.report import summary_table
    from rgdm.training.finetune import finetune_and_report

    with claimed_run(cfg.name, explicit=explicit_name, resume=resume) as run_dir:
        command = cli_runs.resume_command.removesuffix(" --resume") if cli_runs.resume_command else ""
        with distributed.leaving_process_group():
            summaries = finetune_and_report(cfg, run_dir, resume=resume, compare=compare, command=command,
                                            device=device)
            main = distributed.is_main()
        if not main:  # under torchrun, rank 0 reports
            return
        typer.echo(f"fine-tuned model in {run_dir / 'checkpoints'}")
        if summaries:
            typer.echo(summary_table(summaries, cfg.reward, cfg.target))
            typer.echo(f"report: {run_dir / 'report.md'} and {run_dir / 'report.html'}")


def write_sdf(path: Path, molecules) -> None:
    from rdkit import Chem

    from rgdm.eval.bonds import build_rdkit_mol

    writer = Chem.SDWriter(str(path))
    writer.SetKekulize(False)
    for symbols, positions in molecules:
        mol = build_rdkit_mol(symbols, positions, method="edm")
        if mol is not None:
            writer.write(mol)
    writer.close()
