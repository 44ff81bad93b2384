"""Build rewards from config dictionaries, e.g. the ``reward:`` section of a YAML preset.

    {name: xtb_gap}                                   the gap in meV (a property reward)
    {name: xtb_gap, target: 6000, scale: 1000}        -|gap - 6000| / 1000 (target matching)
    {name: xtb_gap, scale: 1000}                      same, targets given per sample at call time
    {name: qed, backend: inline}                      run in the calling process
    {name: weighted_sum, terms: [{name: qed, weight: 1.0}, {name: sa_score, weight: -0.1}]}

Execution keys valid for every reward: backend (process | ray | inline), workers, timeout (s),
penalty (value of invalid samples, default -1.0 in the reward's units), cache, cache_size,
chunk_size, address (Ray cluster; default: start Ray locally). Other keys are the reward's own
parameters (see ``available_rewards()`` and each factory's signature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rgdm.rewards.execution import BACKENDS, INLINE_TIMEOUT_MESSAGE
from rgdm.rewards.registry import RewardSpec, did_you_mean, reward_spec
from rgdm.rewards.reward import DEFAULT_PENALTY, PropertyReward, Reward, TargetMatch, WeightedSum

EXECUTION_KEYS = ("backend", "workers", "timeout", "penalty", "cache", "cache_size", "chunk_size", "address")
MATCH_KEYS = ("target", "scale")
WEIGHTED_SUM = "weighted_sum"


class RewardConfigError(ValueError):
    """A reward configuration that cannot be built; the message names the offending key."""


def make_reward(config: Mapping[str, Any], where: str = "reward") -> Reward:
    """Build a reward from ``{name: ..., **keys}``; ``where`` prefixes error messages."""
    if not isinstance(config, Mapping):
        raise RewardConfigError(f"{where}: expected a mapping with a 'name' key, got {type(config).__name__}")
    if "name" not in config:
        raise RewardConfigError(f"{where}: missing key 'name'{did_you_mean('name', config)}")
    if config["name"] == WEIGHTED_SUM:
        return _weighted_sum(config, where)
    try:
        spec = reward_spec(str(config["name"]))
    except KeyError as error:
        raise RewardConfigError(f"{where}.name: {error.args[0]}") from None
    return _single_reward(spec, config, where)


def _single_reward(spec: RewardSpec, config: Mapping[str, Any], where: str) -> Reward:
    params = {k: v for k, v in config.items() if k not in ("name", *EXECUTION_KEYS, *MATCH_KEYS)}
    _check_keys(params, spec.parameters, (*EXECUTION_KEYS, *MATCH_KEYS), where, spec.name)
    execution = _execution_options(config, where)
    if spec.worker_only and execution.get("backend") == "inline":
        raise RewardConfigError(f"{where}.backend: reward {spec.name!r} runs only in worker processes "
                                "(torch and tblite OpenMP runtimes conflict); use 'process' or 'ray'")
    try:
        scorer = spec.factory(**params)
    except (TypeError, ValueError) as error:
        raise RewardConfigError(f"{where} ({spec.name}): {error}") from None
    reward: Reward = PropertyReward(scorer, spec.name, units=spec.units, **execution)
    if "target" in config or "scale" in config:
        target = _number(config, "target", where, optional=True)
        scale = _number(config, "scale", where, default=1.0)
        reward = TargetMatch(reward, target, scale, penalty=execution.get("penalty", DEFAULT_PENALTY))
    return reward


def _weighted_sum(config: Mapping[str, Any], where: str) -> Reward:
    keys = {k: v for k, v in config.items() if k != "name"}
    _check_keys(keys, ("terms", "penalty"), (), where, WEIGHTED_SUM)
    terms = config.get("terms")
    if not isinstance(terms, list) or not terms:
        raise RewardConfigError(f"{where}.terms: expected a non-empty list of reward configs")
    built = []
    for i, term in enumerate(terms):
        if not isinstance(term, Mapping):
            raise RewardConfigError(f"{where}.terms[{i}]: expected a mapping, got {type(term).__name__}")
        weight = _number(term, "weight", f"{where}.terms[{i}]", default=1.0)
        term_config = {k: v for k, v in term.items() if k != "weight"}
        built.append((make_reward(term_config, f"{where}.terms[{i}]"), weight))
    return WeightedSum(built, penalty=_number(config, "penalty", where, default=DEFAULT_PENALTY))


def _check_keys(given: Mapping[str, Any], allowed: tuple[str, ...], also_allowed: tuple[str, ...],
                where: str, name: str) -> None:
    for key in given:
        if key not in allowed:
            choices = (*allowed, *also_allowed)
            hint = did_you_mean(key, choices)
            raise RewardConfigError(f"{where}: unknown key {key!r} for reward {name!r}{hint}; "
                                    f"allowed: {', '.join(choices)}")


def _execution_options(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    options = {k: config[k] for k in EXECUTION_KEYS if k in config}
    if "backend" in options and options["backend"] not in BACKENDS:
        raise RewardConfigError(f"{where}.backend: {options['backend']!r} is not one of {', '.join(BACKENDS)}"
                                f"{did_you_mean(str(options['backend']), BACKENDS)}")
    for key in ("workers", "cache_size", "chunk_size"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RewardConfigError(f"{where}.{key}: expected a positive integer, got {options[key]!r}")
    if "timeout" in options and options["timeout"] is not None:
        options["timeout"] = _number(options, "timeout", where)
        if options["timeout"] <= 0:
            raise RewardConfigError(f"{where}.timeout: expected positive seconds, got {options['timeout']}")
        if options.get("backend") == "inline":
            raise RewardConfigError(f"{where}.{INLINE_TIMEOUT_MESSAGE}")
    if "penalty" in options:
        options["penalty"] = _number(options, "penalty", where)
    if "cache" in options and not isinstance(options["cache"], bool):
        raise RewardConfigError(f"{where}.cache: expected true or false, got {options['cache']!r}")
    return options


def _number(config: Mapping[str, Any], key: str, where: str, default: float | None = None,
            optional: bool = False) -> Any:
    value = config.get(key, default)
    if value is None and (optional or default is None):
        if optional:
            return None
        raise RewardConfigError(f"{where}.{key}: a number is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardConfigError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)
