"""Rewards: any black box as a batched, fault-isolated, parallel reward.

A reward scores a batch of generated samples and returns a :class:`RewardResult`:
``values`` [B] (float), ``valid`` [B] (bool) and ``info`` (``info["property"]`` is the raw
property, e.g. the gap in meV, NaN where invalid). A sample that cannot be scored -- the
function raised, returned NaN/inf, hung past ``timeout``, or killed its worker process -- is
marked invalid and gets ``penalty`` (default -1.0, in the reward's units: choose it below the
worst value you expect). The event is counted in ``reward.stats()`` and logged once per distinct
reason on the ``"rgdm.rewards"`` logger; training goes on.

Built-in rewards by name (``available_rewards()``)::

    from rgdm.rewards import make_reward

    gap = make_reward({"name": "xtb_gap", "target": 6000, "scale": 1000, "workers": 2, "timeout": 30})
    result = gap(batch)                 # a MoleculeBatch, or a list of Molecule / (symbols, positions)
    result.values, result.valid, result.info["property"], gap.stats()
    gap.close()                         # stops the worker processes

Chemistry (RDKit): ``validity``, ``qed``, ``sa_score``, ``logp``, ``ring_constraint``,
``atom_count``. Physics (GFN2-xTB via tblite, run only in worker processes): ``xtb_homo``,
``xtb_lumo``, ``xtb_gap`` (meV), ``xtb_dipole`` (D), ``xtb_energy`` (eV). Compositions:
``{name: weighted_sum, terms: [...]}`` / :class:`WeightedSum`, and target matching
``-|property - target| / scale`` (``target``/``scale`` keys) / :class:`TargetMatch`. Backends:
``process`` (default; a pool of ``workers`` spawned processes), ``ray`` (local ``ray.init()`` or
``address``), ``inline`` (in the calling process; no timeout or crash isolation).

Your own function is one line away. It receives plain :class:`Molecule` objects (``.symbols``,
``.positions`` [n, 3] in Angstrom) and returns one number per molecule::

    # my_rewards.py -- module level, so worker processes can import it
    def compactness(molecules):
        return [-float(((m.positions - m.positions.mean(0)) ** 2).sum(1).mean()) for m in molecules]

    reward = reward_from_function(compactness, workers=2, timeout=10)

Register it by name for configs with ``@register_reward("compactness")`` on a factory returning
``BatchFunction(compactness)`` or ``PerMolecule(score_one)``.

Heavy packages (RDKit, tblite, Ray) are imported inside the rewards that need them; importing
this package does not even import torch until a reward object is used, so worker processes
stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Molecule": "rgdm.rewards.molecule",
    "as_molecules": "rgdm.rewards.molecule",
    "InvalidSample": "rgdm.rewards.scoring",
    "RewardSetupError": "rgdm.rewards.scoring",
    "Outcome": "rgdm.rewards.scoring",
    "PerMolecule": "rgdm.rewards.scoring",
    "BatchFunction": "rgdm.rewards.scoring",
    "register_reward": "rgdm.rewards.registry",
    "available_rewards": "rgdm.rewards.registry",
    "Reward": "rgdm.rewards.reward",
    "RewardResult": "rgdm.rewards.reward",
    "PropertyReward": "rgdm.rewards.reward",
    "TargetMatch": "rgdm.rewards.reward",
    "WeightedSum": "rgdm.rewards.reward",
    "reward_from_function": "rgdm.rewards.reward",
    "make_reward": "rgdm.rewards.factory",
    "RewardConfigError": "rgdm.rewards.factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import on first use (PEP 562): workers import reward modules without torch."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rgdm.rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
