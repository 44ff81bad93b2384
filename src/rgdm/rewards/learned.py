"""Learned rewards: a trained EGNN property regressor as a reward (``{name: regressor, model: ...}``).

The reward's value is the regressor's prediction in EDM's units (e.g. the HOMO-LUMO gap in meV), so
target matching works as for any property reward::

    {name: regressor, model: runs/regressor-gap-Db-noH, backend: inline}                # the gap
    {name: regressor, model: runs/regressor-gap-Db-noH, backend: inline, target: 6000, scale: 1000}

or, in Python, ``learned_property_reward("runs/regressor-gap-Db-noH", target=6000, scale=1000)``.

Regressors are torch models, so they run best in the training process (``backend: inline``): the
molecules of a call are re-batched and scored in batches of ``batch_size``. The other backends work
too (each worker loads the model once). A molecule with an element the regressor was not trained on
(e.g. hydrogen for a heavy-atom regressor, unless ``drop_hydrogens``), no atoms, or non-finite
coordinates is an invalid sample. This module imports torch only when a regressor is loaded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rgdm.rewards.molecule import Molecule
from rgdm.rewards.registry import register_reward
from rgdm.rewards.scoring import INVALID, BatchFunction, Outcome, failure, outcome_from_value

if TYPE_CHECKING:
    from rgdm.models.regressor import PropertyRegressor
    from rgdm.rewards.reward import Reward


@functools.lru_cache(maxsize=8)
def cached_regressor(checkpoint: str, device: str = "cpu") -> PropertyRegressor:
    """The regressor of a checkpoint file, loaded once per process (EMA weights if any)."""
    from rgdm.training.regression import load_regressor

    return load_regressor(checkpoint, device=device).model


@dataclass(frozen=True)
class RegressorPrediction:
    """``fn(molecules) -> predictions``: a picklable handle on a regressor checkpoint."""

    checkpoint: str
    batch_size: int = 256
    drop_hydrogens: bool = False
    device: str = "cpu"

    @property
    def model(self) -> PropertyRegressor:
        return cached_regressor(self.checkpoint, self.device)

    def prepare(self, molecule: Molecule) -> Molecule:
        """The molecule the regressor sees (without hydrogens when asked)."""
        if not self.drop_hydrogens or "H" not in molecule.symbols:
            return molecule
        keep = [i for i, symbol in enumerate(molecule.symbols) if symbol != "H"]
        return Molecule(tuple(molecule.symbols[i] for i in keep), molecule.positions[keep])

    def why_unscorable(self, molecule: Molecule) -> str | None:
        """Why the regressor cannot score a (prepared) molecule, or None if it can."""
        if molecule.num_atoms == 0 or not molecule.symbols:
            return "no atoms with element types to score"
        unknown = sorted(set(molecule.symbols) - set(self.model.elements))
        if unknown:
            return (f"element(s) {', '.join(unknown)} unknown to the {self.model.spec.property_name} regressor "
                    f"(trained on {', '.join(self.model.elements)})")
        if not np.isfinite(molecule.positions).all():
            return "coordinates contain NaN or infinity"
        return None

    def __call__(self, molecules: Sequence[Molecule]) -> list[float]:
        """Predicted property (EDM's units) of scorable molecules, in batches of ``batch_size``."""
        import torch

        from rgdm.data.dataset import from_molecules

        if not molecules:
            return []
        model = self.model
        # Copies: Molecule positions are read-only arrays, torch wants writable ones.
        pairs = [(m.symbols, np.array(m.positions)) for m in molecules]
        dataset = from_molecules(pairs, elements=model.elements)
        predictions = []
        with torch.no_grad():
            for batch in dataset.batches(self.batch_size):
                predictions.append(model.predict(batch.to(self.device)).double().cpu())
        return torch.cat(predictions).tolist()


@dataclass(frozen=True)
class RegressorScorer(BatchFunction):
    """Scores whole chunks with a :class:`RegressorPrediction`; unscorable molecules are invalid.

    A :class:`BatchFunction`, so that rewards hand it whole batches rather than single molecules.
    """

    def evaluate(self, molecules: Sequence[Molecule], targets: Sequence[float | None]) -> list[Outcome]:
        predict: RegressorPrediction = self.fn  # type: ignore[assignment]
        prepared = [predict.prepare(m) for m in molecules]
        outcomes: list[Outcome] = [Outcome(math.nan)] * len(prepared)
        scorable = []
        for index, molecule in enumerate(prepared):
            reason = predict.why_unscorable(molecule)
            if reason is None:
                scorable.append(index)
            else:
                outcomes[index] = failure(INVALID, reason)
        values = predict([prepared[i] for i in scorable])
        for index, value in zip(scorable, values, strict=True):
            outcomes[index] = outcome_from_value(value)
        return outcomes

    def warm_up(self) -> None:
        self.fn.model  # noqa: B018 - load the checkpoint once, before the first timed call


@register_reward("regressor", units="the regressor's property, EDM's units")
def regressor(model: str, batch_size: int = 256, drop_hydrogens: bool = False, device: str = "cpu"
              ) -> RegressorScorer:
    """Property predicted by a trained EGNN regressor (``rgdm train-regressor``), in EDM's units.

    model: run directory or checkpoint file. drop_hydrogens: score molecules without their H atoms
    (for a heavy-atom regressor). Run it with ``backend: inline`` (it is a torch model).
    """
    from rgdm.runs import resolve_checkpoint
    from rgdm.training.checkpoint import CheckpointError

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        checkpoint = str(resolve_checkpoint(Path(str(model))).resolve())
        predict = RegressorPrediction(checkpoint, batch_size, bool(drop_hydrogens), str(device))
        predict.model  # noqa: B018 - fail now (one line) on a missing or foreign checkpoint
    except CheckpointError as err:
        raise ValueError(f"model: {err}") from None
    return RegressorScorer(predict)


def learned_property_reward(model: str | Path, target: float | None = None, scale: float | None = None,
                            **options: Any) -> Reward:
    """A regressor reward run in-process; ``target``/``scale`` give -|prediction - target| / scale.

    ``options``: the regressor's parameters (batch_size, drop_hydrogens, device) and execution keys
    (penalty, cache, ...); the backend defaults to ``inline``.
    """
    from rgdm.rewards.factory import make_reward

    config: dict[str, Any] = {"name": "regressor", "model": str(model), "backend": "inline", **options}
    if target is not None:
        config["target"] = target
    if scale is not None:
        config["scale"] = scale
    return make_reward(config)
