"""EDM's conditional-generation protocol (Hoogeboom et al. 2022, Table 3), reproduced and extended.

The protocol judges how well a generator hits a requested value of one QM9 property:

1. QM9's training split is cut into two halves. An EGNN regressor trained on **D_a** is the
   *evaluator*; generators (and any reward model) train on **D_b** only.
2. Targets and node counts are drawn *jointly* from D_b (a 5-atom molecule with the polarisability
   of a 9-atom one would be an impossible request).
3. Each generator draws one molecule per (node count, target); the score is the mean absolute error
   between the evaluator's prediction on **every** generated molecule and its target. EDM scores all
   samples, valid or not (``eval_conditional_qm9.py``, task ``edm``), and so do we; the validity of
   each row is reported beside it.

Reference rows, computed the same way:

* **Naive** (upper bound): the evaluator on real D_b molecules against *shuffled* D_b labels, i.e.
  a generator that ignores its target but makes perfect QM9 molecules (EDM's task ``naive``).
* **#Atoms**: a predictor that sees only the node count, here the median property per node count on
  D_b (the MAE-optimal function of the count), scored against the drawn (count, target) pairs.
* **Lower bound**: the evaluator's own MAE on D_b (EDM's task ``qm9_second_half``), the error a
  generator that returned the real molecule would still get.

Generators: the conditional EDM (the target is a network input), gradient **guidance** of the same
model by the D_b regressor (:func:`guided_sample`), and **RGDM** fine-tuning of the conditional EDM
with a target-matching reward (a D_b regressor, or GFN2-xTB). The physics variant replaces the
evaluator with GFN2-xTB (tblite) on the generated geometry: targets are xTB values of D_b molecules,
and no gradient-guidance method can use that black box.

Everything here is a library function; ``rgdm benchmark conditional`` (``rgdm.cli_benchmark``) runs
the stages (``rgdm.eval.conditional_benchmark``) and writes the table (``rgdm.eval.conditional_tables``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.data.batch import MoleculeBatch
from rgdm.data.dataset import MoleculeDataset, sample_with_property
from rgdm.diffusion.molecules import MoleculeDiffusion
from rgdm.models.regressor import PropertyRegressor
from rgdm.rewards.reward import Reward, RewardResult

# --------------------------------------------------------------------------------------------- #
# The physics variant's properties.

XTB_REWARDS: dict[str, str] = {"gap": "xtb_gap", "mu": "xtb_dipole"}
"""Properties with a GFN2-xTB counterpart (same units as QM9's column): the physics variant."""


# --------------------------------------------------------------------------------------------- #
# Targets and errors.


@dataclass
class Targets:
    """What every generator is asked for: one (node count, property value) pair per molecule."""

    node_counts: Tensor  # [n] long
    values: Tensor  # [n] float64, the property in EDM's units

    def __len__(self) -> int:
        return len(self.values)

    def chunks(self, size: int) -> list[Targets]:
        return [Targets(self.node_counts[i: i + size], self.values[i: i + size]) for i in range(0, len(self), size)]


def draw_targets(dataset: MoleculeDataset, prop: str, n: int, seed: int) -> Targets:
    """``n`` (node count, value) pairs drawn jointly from ``dataset`` (D_b), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    counts, values = sample_with_property(dataset, prop, n, generator)
    return Targets(counts.long(), values.double())


def mae_summary(predictions: Tensor, targets: Tensor) -> dict[str, float]:
    """MAE, its standard error, the mean signed error (bias) and the number of molecules.

    Non-finite predictions (molecules a black box could not score) are left out.
    """
    predictions, targets = predictions.double().reshape(-1), targets.double().reshape(-1)
    keep = torch.isfinite(predictions) & torch.isfinite(targets)
    signed = predictions[keep] - targets[keep]
    errors = signed.abs()
    n = int(keep.sum())
    if n == 0:
        return {"mae": math.nan, "se": math.nan, "bias": math.nan, "n": 0}
    se = float(errors.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return {"mae": float(errors.mean()), "se": se, "bias": float(signed.mean()), "n": n}


def shuffled(values: Tensor, seed: int) -> Tensor:
    """A random permutation of ``values`` (the Naive row's labels)."""
    generator = torch.Generator().manual_seed(seed)
    return values[torch.randperm(len(values), generator=generator)]


def naive_mae(predictions: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
    """EDM's Naive row: predictions on real molecules against their labels shuffled."""
    return mae_summary(predictions, shuffled(labels, seed))


@dataclass
class NodeCountPredictor:
    """#Atoms: the property predicted from the number of (heavy) atoms alone.

    The median per node count is the function of the count with the smallest MAE on its data
    (EDM's baseline is an L1-trained network that only sees the count); counts never seen in the
    data fall back to the overall median.
    """

    medians: dict[int, float]
    overall: float

    @classmethod
    def fit(cls, node_counts: Tensor, values: Tensor) -> NodeCountPredictor:
        node_counts, values = node_counts.long().reshape(-1), values.double().reshape(-1)
        keep = torch.isfinite(values)
        node_counts, values = node_counts[keep], values[keep]
        if len(values) == 0:
            raise ValueError("NodeCountPredictor.fit: no finite property values")
        medians = {int(c): float(values[node_counts == c].median()) for c in node_counts.unique()}
        return cls(medians, float(values.median()))

    def __call__(self, node_counts: Tensor) -> Tensor:
        return torch.tensor([self.medians.get(int(c), self.overall) for c in node_counts.reshape(-1)],
                            dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"medians": {str(k): v for k, v in sorted(self.medians.items())}, "overall": self.overall}


def atoms_mae(predictor: NodeCountPredictor, targets: Targets) -> dict[str, float]:
    """#Atoms row: |f(node count) - target| over the drawn (count, target) pairs."""
    return mae_summary(predictor(targets.node_counts), targets.values)


# --------------------------------------------------------------------------------------------- #
# The evaluator (or any regressor) on generated molecules.


def remap_types(batch: MoleculeBatch, elements: Sequence[str]) -> MoleculeBatch:
    """The same molecules with atom-type indices into ``elements`` (a regressor's vocabulary)."""
    elements = tuple(elements)
    if tuple(batch.elements) == elements:
        return batch
    missing = sorted(set(batch.elements) - set(elements))
    if missing:
        raise ValueError(f"element(s) {', '.join(missing)} unknown to the regressor (it knows {', '.join(elements)})")
    mapping = torch.tensor([elements.index(e) for e in batch.elements], device=batch.atom_types.device)
    types = mapping[batch.atom_types] * batch.node_mask[..., 0].long()
    return MoleculeBatch(batch.positions, types, batch.node_mask, elements, dict(batch.properties))


@torch.no_grad()
def predict(regressor: PropertyRegressor, batches: Sequence[MoleculeBatch]) -> Tensor:
    """The regressor's prediction (EDM's units) for every molecule of ``batches``, [n] float64."""
    regressor.eval()
    out = [regressor.predict(remap_types(b, regressor.elements)).double().cpu() for b in batches]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def predict_dataset(regressor: PropertyRegressor, dataset: MoleculeDataset, batch_size: int = 256) -> Tensor:
    """Predictions on real molecules, in dataset order, [len(dataset)] float64."""
    return predict(regressor, list(dataset.batches(batch_size)))


def subset(dataset: MoleculeDataset, n: int, seed: int) -> MoleculeDataset:
    """A fixed random subset of ``n`` molecules (all of them when n is 0 or larger than the set)."""
    if n <= 0 or n >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return dataset.subset(torch.randperm(len(dataset), generator=generator)[:n])


# --------------------------------------------------------------------------------------------- #
# Generation: conditional sampling, with or without gradient guidance.


def context_for(model: MoleculeDiffusion, prop: str, values: Tensor) -> Tensor | None:
    """The network context for raw target values (None for an unconditional model)."""
    if not model.context_names:
        return None
    if model.context_names != (prop,):
        raise ValueError(f"the model is conditioned on {model.context_names}, not on {prop!r}")
    return model.normalize_context({prop: values.float()})


def property_gradient(model: MoleculeDiffusion, regressor: PropertyRegressor, x0: Tensor, node_mask: Tensor,
                      target: Tensor, max_norm: float = 1.0) -> Tensor:
    """Gradient, with respect to the positions block of the state, of the guidance loss on x̂0.

    The loss is ½ (f(x̂0) - target)² in the regressor's normalised units (target / MAD). Atom types
    are the argmax of x̂0's one-hot block (not differentiated); only positions move. The gradient of
    each molecule is clipped to an RMS of ``max_norm`` per atom so that early, noisy estimates
    cannot throw atoms away. Returns a tensor shaped like ``x0`` (zero outside the positions).
    """
    batch = remap_types(model.decode(x0.detach(), node_mask), regressor.elements)
    norm_x = model.norm_values[0]
    with torch.enable_grad():
        positions = batch.positions.detach().clone().requires_grad_(True)
        predicted = regressor(positions, batch.atom_types, batch.node_mask)
        goal = (target.to(predicted.dtype) - regressor.mean) / regressor.mad
        loss = 0.5 * (predicted - goal).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, positions)
    grad = grad * node_mask
    n_atoms = node_mask.sum(dim=(1, 2)).clamp(min=1)
    rms = grad.pow(2).sum(dim=(1, 2)).div(n_atoms).sqrt()
    grad = grad * (max_norm / rms.clamp(min=max_norm)).view(-1, 1, 1)
    out = torch.zeros_like(x0)
    out[..., :3] = grad * norm_x  # positions in the state are Angstrom / norm_x
    return out


@torch.no_grad()
def guided_sample(model: MoleculeDiffusion, node_mask: Tensor, context: Tensor | None, regressor: PropertyRegressor,
                  target: Tensor, scale: float, num_steps: int | None = None, eta: float = 1.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """Reverse diffusion with regressor guidance on the Tweedie estimate x̂0 (EEGSDE-style).

    At each step t -> s the model's Gaussian step is taken with its mean moved down the gradient
    of ½ (f(x̂0) - target)²: mean <- mean - scale · alpha_s · grad, i.e. x̂0 itself takes a gradient
    step of size ``scale`` inside the DDIM update (mean = alpha_s x̂0 + ...). The denoiser's
    Jacobian is left out (x̂0 is treated as a function of z_t through z_t / alpha_t only), which
    keeps the cost at one regressor backward pass per step. ``scale = 0`` is plain sampling.
    """
    shape = (node_mask.shape[0], node_mask.shape[1], 3 + model.n_features)
    z = model.sample_prior(shape, node_mask, generator)
    grid = model.time_grid(num_steps)
    batch = shape[0]
    for t_int, s_int in zip(grid[:-1], grid[1:]):
        t = torch.full((batch,), t_int, dtype=torch.long, device=z.device)
        s = torch.full((batch,), s_int, dtype=torch.long, device=z.device)
        eps = model.predict_eps(z, t, node_mask, context)
        mean, std = model.step_distribution(z, t, s, node_mask, context, eta, eps=eps)
        if scale > 0:
            x0 = model.predict_x0(z, t, node_mask, context, eps=eps)
            grad = property_gradient(model, regressor, x0, node_mask, target)
            mean = model.project(mean - scale * model.schedule.alpha(s)[0] * grad, node_mask)
        z = mean + std.view(-1, 1, 1) * model.noise(mean, node_mask, generator)
    x = model.predict_x0(z, torch.zeros(batch, dtype=torch.long, device=z.device), node_mask, context)
    return model.project(x, node_mask)


@torch.no_grad()
def generate(model: MoleculeDiffusion, prop: str, targets: Targets, num_steps: int | None, seed: int,
             batch_size: int = 250, guidance: tuple[PropertyRegressor, float] | None = None) -> list[MoleculeBatch]:
    """One molecule per (node count, target), in chunks; the same seed gives the same noise.

    ``guidance = (regressor, scale)`` adds gradient guidance (:func:`guided_sample`). Noise is drawn
    on the model's device (the regressor must be on it too); the batches come back on the CPU.
    """
    model.eval()
    device = distributed.module_device(model)
    generator = distributed.generator_on(device, seed)
    out = []
    for chunk in targets.chunks(batch_size):
        node_mask = model.mask_from_counts(chunk.node_counts.to(device))
        context = context_for(model, prop, chunk.values.to(device))
        if guidance is None:
            shape = (len(chunk), node_mask.shape[1], 3 + model.n_features)
            z = model.sample(shape, node_mask, context, num_steps=num_steps, generator=generator)
        else:
            regressor, scale = guidance
            z = guided_sample(model, node_mask, context, regressor, chunk.values.to(device), scale, num_steps,
                              generator=generator)
        batch = model.decode(z, node_mask).to("cpu")
        batch.properties = {prop: chunk.values.float()}
        out.append(batch)
    return out


def validity(batches: Sequence[MoleculeBatch]) -> float:
    """Fraction of molecules whose largest fragment sanitises in RDKit (EDM bonds)."""
    from rgdm.eval.molecules import evaluate_molecules

    molecules = [m for b in batches for m in b.molecules()]
    return float(evaluate_molecules(molecules)["validity"]) if molecules else math.nan


def connected_validity(batches: Sequence[MoleculeBatch]) -> float:
    """Fraction of molecules that sanitise *and* are one connected fragment.

    EDM's validity only asks the largest fragment to sanitise, so a sampler that tears molecules
    apart into single atoms (each one a valid methane or water) scores 100 %; this one does not.
    """
    from rgdm.rewards.chemistry import validity_score
    from rgdm.rewards.molecule import as_molecules

    molecules = as_molecules([m for b in batches for m in b.molecules()])
    if not molecules:
        return math.nan
    return sum(validity_score(m, "edm", allow_fragments=False) for m in molecules) / len(molecules)


def choose_guidance_scale(model: MoleculeDiffusion, prop: str, targets: Targets, regressor: PropertyRegressor,
                          scales: Sequence[float], num_steps: int | None, seed: int,
                          min_validity_ratio: float = 0.9) -> tuple[float, list[dict[str, float]]]:
    """Pick the guidance scale on a few molecules, judged by the *guiding* regressor (never the evaluator).

    The guiding regressor always prefers larger scales (they push its own prediction to the target,
    adversarially if need be), so a scale only counts if the molecules stay chemically sane: the
    fraction of valid, *connected* molecules (:func:`connected_validity`; large scales tear molecules
    apart, which EDM's largest-fragment validity does not see) must be at least
    ``min_validity_ratio`` times the unguided one. Returns the chosen scale and the trial results.
    """
    trials = []
    for scale in sorted(set(float(s) for s in scales) | {0.0}):
        batches = generate(model, prop, targets, num_steps, seed, guidance=(regressor, scale) if scale else None)
        summary = mae_summary(predict(regressor, batches), targets.values)
        trials.append({"scale": scale, "guide_mae": summary["mae"], "validity": validity(batches),
                       "connected_validity": connected_validity(batches)})
    base = trials[0]["connected_validity"]
    allowed = [t for t in trials if t["connected_validity"] >= min_validity_ratio * base] or trials[:1]
    best = min(allowed, key=lambda t: t["guide_mae"])
    return best["scale"], trials


# --------------------------------------------------------------------------------------------- #
# Rewards for RGDM and the physics variant.


class AffineProperty(Reward):
    """A property reward mapped linearly, ``a · property + b`` (e.g. an xTB gap onto the DFT scale).

    Lets a reward in one set of units chase targets in another: wrapped in ``TargetMatch`` it
    gives -|a · xTB(x) + b - c| / scale for a DFT target c.
    """

    def __init__(self, reward: Reward, slope: float, intercept: float) -> None:
        self.reward, self.slope, self.intercept = reward, float(slope), float(intercept)
        self.name = f"{reward.name}_mapped"
        self.penalty = reward.penalty

    def __call__(self, samples: Any, targets: Any = None) -> RewardResult:
        inner = self.reward(samples, None)
        prop = inner.info["property"].double() * self.slope + self.intercept
        values = torch.where(inner.valid, prop, torch.full_like(prop, self.penalty)).float()
        return RewardResult(values, inner.valid.clone(), {**inner.info, "property": prop.float(),
                                                          "raw_property": inner.info["property"]})

    def stats(self) -> dict[str, float]:
        return self.reward.stats()

    def close(self) -> None:
        self.reward.close()


def xtb_reward_config(prop: str, workers: int = 1, timeout: float = 60.0, relax: str = "none") -> dict[str, Any]:
    """The make_reward config of the GFN2-xTB counterpart of ``prop`` on heavy-atom molecules.

    ``relax`` is "none" here: the physics variant's numbers in docs/conditional.md were measured on
    the generated geometries (single points), and the protocol keeps them reproducible.
    """
    if prop not in XTB_REWARDS:
        raise ValueError(f"no xTB counterpart for {prop!r} (physics variant: {', '.join(XTB_REWARDS)})")
    return {"name": XTB_REWARDS[prop], "add_hydrogens": True, "workers": workers, "timeout": timeout,
            "relax": relax}


def xtb_values(batches_or_molecules: Any, prop: str, workers: int = 1, relax: str = "none") -> tuple[Tensor, Tensor]:
    """GFN2-xTB values (NaN where xTB or RDKit fails) and the valid mask, via worker processes.

    ``relax`` ("none", "mmff" or "xtb") chooses the geometry the property is measured at.
    """
    from rgdm.rewards import make_reward

    if isinstance(batches_or_molecules, Sequence) and batches_or_molecules and \
            isinstance(batches_or_molecules[0], MoleculeBatch):
        molecules = [m for b in batches_or_molecules for m in b.molecules()]
    else:
        molecules = list(batches_or_molecules)
    if not molecules:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    with make_reward(xtb_reward_config(prop, workers, relax=relax)) as reward:
        result = reward(molecules)
    values = result.info["property"].double()
    return torch.where(result.valid, values, torch.full_like(values, math.nan)), result.valid.clone()


def linear_fit(x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """Least-squares y ≈ a x + b over finite pairs; returns (a, b, Pearson r)."""
    x, y = x.double(), y.double()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 2 or float(x.std()) == 0.0:
        return 1.0, 0.0, math.nan
    xc, yc = x - x.mean(), y - y.mean()
    a = float((xc * yc).sum() / (xc * xc).sum())
    b = float(y.mean() - a * x.mean())
    r = float((xc * yc).sum() / ((xc * xc).sum() * (yc * yc).sum()).sqrt())
    return a, b, r
