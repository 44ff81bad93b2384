"""Rewards by name: ``@register_reward("name")`` on a factory that returns a scorer.

The factory's keyword arguments are the reward's parameters in the config, e.g.
``{name: xtb_gap, charge: 0}`` calls ``xtb_gap(charge=0)``. Registration is torch-free so that
worker processes can import reward modules cheaply.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rgdm.rewards.scoring import Scorer

_BUILTIN_MODULES = ("rgdm.rewards.chemistry", "rgdm.rewards.xtb", "rgdm.rewards.physics", "rgdm.rewards.learned",
                    "rgdm.rewards.shapes")


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its factory, units, and where it may run."""

    name: str
    factory: Callable[..., Scorer]
    units: str = ""
    worker_only: bool = False  # True: never run in the training (torch) process

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.factory).parameters)

    @property
    def description(self) -> str:
        return inspect.getdoc(self.factory) or ""


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(name: str, *, units: str = "", worker_only: bool = False
                    ) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: make ``factory(**params) -> Scorer`` available as ``{name: <name>, **params}``."""

    def decorate(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.factory.__qualname__ != factory.__qualname__:
            raise ValueError(f"a reward named {name!r} is already registered ({existing.factory.__module__})")
        _REGISTRY[name] = RewardSpec(name, factory, units, worker_only)
        return factory

    return decorate


def reward_spec(name: str) -> RewardSpec:
    """The registered reward ``name``; a clear error with a suggestion otherwise."""
    _import_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}{did_you_mean(name, _REGISTRY)}; "
                       f"available: {', '.join(available_rewards())}")
    return _REGISTRY[name]


def available_rewards() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
