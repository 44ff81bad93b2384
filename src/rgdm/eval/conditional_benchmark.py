"""The stages of EDM's conditional-generation protocol, each skipped when its output exists on disk.

``rgdm benchmark conditional`` (``rgdm.cli_benchmark``) runs them in order for each property;
the budget presets are in ``rgdm.eval.conditional_budget`` and the library functions the stages
use in ``rgdm.eval.conditional``. Protocol: docs/conditional.md.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rgdm.config import _check_choice
from rgdm.eval.conditional_budget import ConditionalBudget

log = logging.getLogger("rgdm.benchmark")

REPO_ROOT = Path(__file__).resolve().parents[3]


class ConditionalBenchmark:
    """One property at one budget; every ``stage_*`` method is skipped when its output exists."""

    def __init__(self, prop: str, budget: ConditionalBudget, out_dir: Path, runs_dir: Path,
                 with_xtb: bool = True, device: str = "cpu") -> None:
        from rgdm.data.properties import PROPERTIES

        self.device = device  # where models train and sample (auto | cpu | cuda); rewards stay on the CPU
        _check_choice("--property", prop, PROPERTIES)
        self.prop, self.budget, self.runs_dir = prop, budget, Path(runs_dir)
        self.out = Path(out_dir) / budget.name / prop
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "rows").mkdir(exist_ok=True)
        from rgdm.eval.conditional import XTB_REWARDS

        self.with_xtb = with_xtb and prop in XTB_REWARDS
        self.timings: dict[str, float] = {}
        self._cache: dict[str, Any] = {}

    # --- paths ------------------------------------------------------------------------------ #
    def regressor_dir(self, split: str) -> Path:
        from rgdm.training.regression import default_run_name

        return self.runs_dir / default_run_name(self.prop, split, self.budget.remove_h)

    @property
    def conditional_dir(self) -> Path:
        return self.runs_dir / f"cond-{self.prop}-Db-{self.budget.name}"

    def rgdm_dir(self, kind: str) -> Path:
        return self.runs_dir / f"rgdm-{self.prop}-{kind}-{self.budget.name}"

    def row_path(self, row: str, physics: bool = False) -> Path:
        return self.out / ("physics" if physics else "rows") / f"{row}.json"

    # --- shared data ------------------------------------------------------------------------ #
    def db(self):
        if "db" not in self._cache:
            from rgdm.data.qm9 import load_qm9

            self._cache["db"] = load_qm9("Db", remove_h=self.budget.remove_h)
        return self._cache["db"]

    def targets(self):
        from rgdm.eval.conditional import draw_targets

        return draw_targets(self.db(), self.prop, self.budget.samples, seed=1000 + self.budget.seed)

    def scale(self) -> float:
        """The property's mean absolute deviation on D_b: the unit of the target-matching rewards."""
        return float(self.db().property_stats(self.prop)[1])

    def evaluator(self):
        from rgdm.training.regression import load_regressor

        return load_regressor(self.regressor_dir("Da")).model

    def reward_regressor(self, device: str = "cpu"):
        from rgdm.training.regression import load_regressor

        return load_regressor(self.regressor_dir("Db"), device=device).model

    def _device(self):
        from rgdm import distributed

        return distributed.resolve_device(self.device)

    # --- bookkeeping ------------------------------------------------------------------------ #
    def _timed(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 1)
        log.info("%s/%s: %s done in %.1f s", self.budget.name, self.prop, name, seconds)

    def _save_row(self, row: str, entry: dict[str, Any], physics: bool = False) -> None:
        path = self.row_path(row, physics)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry, indent=2))

    def _has_row(self, row: str, physics: bool = False) -> bool:
        return self.row_path(row, physics).is_file()

    # --- training stages -------------------------------------------------------------------- #
    def stage_regressor(self, split: str) -> None:
        from rgdm.config import from_dict, load_config, set_dotted, to_dict
        from rgdm.training.regression import RegressorConfig, train_regressor

        run_dir = self.regressor_dir(split)
        if (run_dir / "test_metrics.json").is_file():
            return
        started = time.perf_counter()
        b = self.budget
        values = to_dict(load_config(_config_path(b.regressor_config), RegressorConfig)
                         if b.regressor_config else RegressorConfig())
        values["name"] = run_dir.name
        values["data"].update({"property": self.prop, "split": split, "remove_h": b.remove_h})
        for key, value in b.regressor_overrides.items():
            set_dotted(values, key, value)
        cfg = from_dict(RegressorConfig, values).validate()
        train_regressor(cfg, run_dir, resume=_has_checkpoints(run_dir), progress=b.progress, tensorboard=False,
                        device=self.device)
        self._timed(f"regressor_{split}", time.perf_counter() - started)

    def stage_conditional_model(self) -> None:
        from rgdm.config import load_config
        from rgdm.training.pretrain import pretrain

        run_dir = self.conditional_dir
        if (run_dir / "last_metrics.json").is_file():
            return
        started = time.perf_counter()
        b = self.budget
        overrides = {"name": run_dir.name, "data.conditioning": [self.prop], "data.train_split": "Db",
                     "data.remove_h": b.remove_h, **b.pretrain_overrides}
        cfg = load_config(_config_path(b.pretrain_config), overrides=overrides)
        pretrain(cfg, run_dir, resume=_has_checkpoints(run_dir), progress=b.progress, tensorboard=False,
                 device=self.device)
        self._timed("conditional_edm_training", time.perf_counter() - started)

    def stage_rgdm(self, kind: str) -> None:
        """Fine-tune the conditional EDM with RGDM toward per-sample D_b targets (``kind``: regressor | xtb)."""
        from rgdm.config import FinetuneConfig, RGDMConfig, TrainConfig
        from rgdm.training.finetune import finetune

        run_dir = self.rgdm_dir(kind)
        if (run_dir / "last_metrics.json").is_file():
            return
        started = time.perf_counter()
        b = self.budget
        reward, description = self.target_reward(kind)
        cfg = FinetuneConfig(name=run_dir.name, base=str(self.conditional_dir), method="rgdm", reward=description,
                             target_from_data=self.prop, eval_samples=0)
        cfg.rgdm = RGDMConfig(variant=b.rgdm_variant, batch_size=b.rgdm_batch, sampling_steps=b.rgdm_sampling_steps,
                              tau=b.rgdm_tau, lambda_mle=b.rgdm_lambda_mle)
        cfg.train = TrainConfig(steps=b.rgdm_steps, lr=b.rgdm_lr, ema_decay=0.0, log_every=1, val_every=10**6,
                                checkpoint_every=10, grad_clip=1.0, max_minutes=b.rgdm_minutes,
                                num_threads=b.threads, seed=b.seed)
        finetune(cfg.validate(), run_dir, resume=_has_checkpoints(run_dir), progress=b.progress,
                 tensorboard=False, reward=reward, device=self.device)
        self._timed(f"rgdm_{kind}_training", time.perf_counter() - started)

    def target_reward(self, kind: str):
        """-|property(x) - c| / MAD for a D_b target c: the D_b regressor, or xTB mapped onto the DFT scale."""
        from rgdm.eval.conditional import AffineProperty, xtb_reward_config
        from rgdm.rewards import make_reward
        from rgdm.rewards.reward import TargetMatch

        scale, penalty = self.scale(), self.budget.reward_penalty
        if kind == "regressor":
            inner = make_reward({"name": "regressor", "model": str(self.regressor_dir("Db")), "backend": "inline"})
            return (TargetMatch(inner, scale=scale, penalty=penalty),
                    {"name": "regressor", "model": str(self.regressor_dir("Db")), "backend": "inline",
                     "scale": scale, "penalty": penalty})
        fit = self.physics_targets()["fit"]
        config = xtb_reward_config(self.prop, self.budget.xtb_workers)
        inner = AffineProperty(make_reward(config), fit["slope"], fit["intercept"])
        return (TargetMatch(inner, scale=scale, penalty=penalty),
                {**config, "scale": scale, "penalty": penalty,
                 "mapped_to_dft": {"slope": fit["slope"], "intercept": fit["intercept"]}})

    # --- rows ------------------------------------------------------------------------------- #
    def stage_reference_rows(self) -> None:
        """Naive, #Atoms and the evaluator's lower bound (no generator involved)."""
        from rgdm.eval.conditional import NodeCountPredictor, atoms_mae, mae_summary, naive_mae, predict_dataset, subset

        if all(self._has_row(r) for r in ("naive", "atoms", "lower_bound")):
            return
        started = time.perf_counter()
        db = self.db()
        real = subset(db, self.budget.lower_bound_molecules, seed=7 + self.budget.seed)
        labels = real.properties[self.prop].double()
        predictions = predict_dataset(self.evaluator(), real)
        self._save_row("lower_bound", {**mae_summary(predictions, labels), "molecules": "D_b"})
        self._save_row("naive", {**naive_mae(predictions, labels, seed=11 + self.budget.seed),
                                 "molecules": "D_b, labels shuffled"})
        predictor = NodeCountPredictor.fit(db.num_atoms, db.properties[self.prop])
        self._save_row("atoms", {**atoms_mae(predictor, self.targets()), "predictor": predictor.to_dict()})
        self._timed("reference_rows", time.perf_counter() - started)

    def _generated_row(self, row: str, model, guidance=None, extra: dict[str, Any] | None = None) -> None:
        from rgdm.eval.conditional import connected_validity, generate, mae_summary, predict, shuffled, validity

        started = time.perf_counter()
        b = self.budget
        targets = self.targets()
        batches = generate(model, self.prop, targets, b.sampling_steps or None, seed=2000 + b.seed,
                           batch_size=b.sample_batch, guidance=guidance)
        sampling_seconds = time.perf_counter() - started
        predictions = predict(self.evaluator(), batches)
        entry = {**mae_summary(predictions, targets.values), "validity": validity(batches),
                 "connected_validity": connected_validity(batches),
                 "naive_on_generated": mae_summary(predictions, shuffled(targets.values, 13))["mae"],
                 "reward_model_mae": mae_summary(predict(self.reward_regressor(), batches), targets.values)["mae"],
                 "sampling_seconds": round(sampling_seconds, 1), "sampling_steps": b.sampling_steps or model.timesteps,
                 **(extra or {})}
        self._save_row(row, entry)
        self._timed(row, time.perf_counter() - started)

    def stage_conditional_row(self) -> None:
        if self._has_row("conditional_edm"):
            return
        from rgdm.runs import load_model

        self._generated_row("conditional_edm", load_model(self.conditional_dir, device=self._device()).model)

    def stage_guidance_row(self) -> None:
        """Guidance of the conditional EDM by the D_b regressor; the scale is chosen on a few molecules."""
        if self._has_row("guidance"):
            return
        from rgdm.eval.conditional import choose_guidance_scale, draw_targets
        from rgdm.runs import load_model

        started = time.perf_counter()
        b = self.budget
        model = load_model(self.conditional_dir, device=self._device()).model
        regressor = self.reward_regressor(self._device())  # guidance differentiates it beside the model
        trial_targets = draw_targets(self.db(), self.prop, b.guidance_select_samples, seed=3000 + b.seed)
        scale, trials = choose_guidance_scale(model, self.prop, trial_targets, regressor, b.guidance_scales,
                                              b.sampling_steps or None, seed=4000 + b.seed)
        self._timed("guidance_scale_selection", time.perf_counter() - started)
        self._generated_row("guidance", model, guidance=(regressor, scale),
                            extra={"scale": scale, "scale_trials": trials})

    def stage_rgdm_row(self, kind: str) -> None:
        row = f"rgdm_{kind}"
        if self._has_row(row):
            return
        from rgdm.runs import load_model

        loaded = load_model(self.rgdm_dir(kind), device=self._device())
        metrics_path = self.rgdm_dir(kind) / "last_metrics.json"
        last = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        self._generated_row(row, loaded.model, extra={"finetune_iterations": loaded.step,
                                                      "reward_calls": last.get("reward_calls")})

    # --- physics variant -------------------------------------------------------------------- #
    def physics_targets(self) -> dict[str, Any]:
        """xTB values of random D_b molecules (heavy atoms + RDKit hydrogens), and the xTB -> DFT line."""
        path = self.out / "physics" / "targets.json"
        if path.is_file():
            return json.loads(path.read_text())
        from rgdm.eval.conditional import linear_fit, subset

        started = time.perf_counter()
        real = subset(self.db(), self.budget.physics_molecules, seed=17 + self.budget.seed)
        values, valid = xtb_values_of(real, self.prop, self.budget.xtb_workers)
        dft = real.properties[self.prop].double()
        slope, intercept, r = linear_fit(values, dft)
        keep = valid.nonzero().flatten()
        data = {"xtb": values[keep].tolist(), "dft": dft[keep].tolist(),
                "node_counts": real.num_atoms[keep].tolist(), "xtb_success": float(valid.float().mean()),
                "fit": {"slope": slope, "intercept": intercept, "pearson_r": r,
                        "mae_after_fit": float((slope * values[keep] + intercept - dft[keep]).abs().mean())},
                "molecules": len(real)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        self._timed("physics_targets", time.perf_counter() - started)
        return data

    def stage_physics_reference_rows(self) -> None:
        if self._has_row("naive", physics=True) and self._has_row("atoms", physics=True):
            return
        import torch

        from rgdm.eval.conditional import NodeCountPredictor, mae_summary, shuffled

        data = self.physics_targets()
        xtb, counts = torch.tensor(data["xtb"], dtype=torch.float64), torch.tensor(data["node_counts"])
        self._save_row("naive", {**mae_summary(xtb, shuffled(xtb, 19)), "xtb_success": 1.0}, physics=True)
        predictor = NodeCountPredictor.fit(counts, xtb)
        self._save_row("atoms", {**mae_summary(predictor(counts), xtb), "xtb_success": 1.0,
                                 "predictor": predictor.to_dict()}, physics=True)

    def stage_physics_row(self, row: str, source: Path) -> None:
        """xTB on molecules generated for xTB targets (the context is the target mapped to DFT)."""
        if self._has_row(row, physics=True) or not source.exists():
            return
        import torch

        from rgdm.eval.conditional import Targets, generate, mae_summary
        from rgdm.runs import load_model

        started = time.perf_counter()
        b = self.budget
        data = self.physics_targets()
        n = min(b.physics_samples, len(data["xtb"]))
        xtb_targets = torch.tensor(data["xtb"][:n], dtype=torch.float64)
        fit = data["fit"]
        context_targets = Targets(torch.tensor(data["node_counts"][:n]), fit["slope"] * xtb_targets + fit["intercept"])
        model = load_model(source, device=self._device()).model
        batches = generate(model, self.prop, context_targets, b.sampling_steps or None, seed=5000 + b.seed,
                           batch_size=b.sample_batch)
        values, valid = xtb_values_of(batches, self.prop, b.xtb_workers)
        entry = {**mae_summary(values, xtb_targets), "xtb_success": float(valid.float().mean())}
        self._save_row(row, entry, physics=True)
        self._timed(f"physics_{row}", time.perf_counter() - started)

    # --- everything ------------------------------------------------------------------------- #
    def run(self, on_progress=None) -> None:
        """All stages in order; ``on_progress()`` is called after each (to refresh the table)."""
        steps = [
            lambda: self.stage_regressor("Da"), lambda: self.stage_regressor("Db"), self.stage_conditional_model,
            self.stage_reference_rows, self.stage_conditional_row, self.stage_guidance_row,
        ]
        if self.with_xtb:
            steps += [self.physics_targets, self.stage_physics_reference_rows,
                      lambda: self.stage_physics_row("conditional_edm", self.conditional_dir)]
        if self.with_xtb:  # the black-box reward first: it is what the physics variant is about
            steps += [lambda: self.stage_rgdm("xtb"), lambda: self.stage_rgdm_row("xtb"),
                      lambda: self.stage_physics_row("rgdm_xtb", self.rgdm_dir("xtb"))]
        steps += [lambda: self.stage_rgdm("regressor"), lambda: self.stage_rgdm_row("regressor")]
        if self.with_xtb:
            steps += [lambda: self.stage_physics_row("rgdm_regressor", self.rgdm_dir("regressor"))]
        for step in steps:
            step()
            if on_progress is not None:
                on_progress()

    def results(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(rows, physics rows) read back from disk."""
        rows = {p.stem: json.loads(p.read_text()) for p in sorted((self.out / "rows").glob("*.json"))}
        physics_dir = self.out / "physics"
        physics = {p.stem: json.loads(p.read_text()) for p in sorted(physics_dir.glob("*.json"))
                   if p.stem != "targets"} if physics_dir.is_dir() else {}
        return rows, physics


def xtb_values_of(molecules, prop: str, workers: int):
    """xTB values of a dataset or of generated batches (the torch-free worker processes do the work)."""
    from rgdm.data.dataset import MoleculeDataset
    from rgdm.eval.conditional import xtb_values

    if isinstance(molecules, MoleculeDataset):
        molecules = [molecules.molecule(i) for i in range(len(molecules))]
        molecules = [(symbols, positions.numpy()) for symbols, positions in molecules]
    return xtb_values(molecules, prop, workers)


def _has_checkpoints(run_dir: Path) -> bool:
    return any((Path(run_dir) / "checkpoints").glob("step_*.pt"))


def _config_path(path: str) -> Path:
    """A preset path as given, or relative to the repository (so the command runs from anywhere in it)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    return REPO_ROOT / path if (REPO_ROOT / path).is_file() else candidate
