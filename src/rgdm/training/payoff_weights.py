"""Temperature and importance weights of the pay-off pi_ref · exp(V / tau).

Candidates (or whole samples) carry unnormalised log-weights V / tau + log(proposal ratio); the
helpers here turn them into self-normalised weights, pick tau for a target effective sample size,
correct the self-normalisation's O(1/K) bias (jackknife) and truncate heavy weights (Ionides 2008).
RGDM's step and sequence levels use them, and RWR its ESS and truncation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """ESS = (Σw)^2 / Σw^2 of unnormalised log-weights along the last dimension."""
    w = torch.softmax(log_weights, dim=-1)
    return 1.0 / (w**2).sum(-1)


def payoff_log_weights(values: Tensor, tau: Tensor, log_base: Tensor) -> Tensor:
    """Unnormalised log-weights log exp(V/tau) + log_base of candidates, [..., K].

    ``values`` is [..., K] (one value per candidate) or [..., K, M]: M look-ahead samples per
    candidate, whose exp(r/tau) are averaged (an unbiased estimate of exp(V/tau) for the soft value
    V = tau log E[exp(r/tau)]). ``tau`` is [...] (one temperature per row).
    """
    tau = tau.view(*tau.shape, *([1] * (values.dim() - tau.dim())))
    scaled = values / tau
    if values.dim() == log_base.dim() + 1:
        scaled = log_mean_exp(scaled)
    return scaled + log_base


def log_mean_exp(x: Tensor) -> Tensor:
    """log mean exp(x) along the last dimension."""
    return torch.logsumexp(x, dim=-1) - math.log(x.shape[-1])


def value_variances(values: Tensor) -> tuple[Tensor, Tensor]:
    """(W, B) of [rows, K, M] look-ahead samples: the mean variance between the M samples of one
    candidate, and the mean variance between the K candidates' M-sample means (means over rows)."""
    if values.dim() != 3 or values.shape[-1] < 2:
        raise ValueError(f"look-ahead variances need [rows, K, M >= 2] samples, got {tuple(values.shape)}")
    return values.var(dim=-1).mean(), values.mean(dim=-1).var(dim=-1).mean()


def value_signal_fraction(values: Tensor, clamp: bool = True) -> Tensor:
    """The share of the spread between candidates' estimated values that is not look-ahead noise.

    ``values`` is [rows, K, M]: M noisy look-ahead samples (stochastic continuations) of each of K
    candidates, rows exploring the same step. With W the mean within-candidate variance var_m and B
    the mean between-candidate variance of the M-sample means, E[B] = var(true values) + W / M, so

        fraction = clamp(1 - W / (M · B), 0, 1)

    is the empirical-Bayes estimate of var(true values) / B, pooled over the rows (K and M are small).
    0 when the candidates' values differ by no more than their noise (or not at all). ``clamp=False``
    keeps the raw estimate, which scatters below 0 by its own error where there is no signal.
    """
    within, between = value_variances(values)
    if between <= 0:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    fraction = 1.0 - within / (values.shape[-1] * between)
    return fraction.clamp(0.0, 1.0) if clamp else fraction


def soft_values(values: Tensor, tau: Tensor | float) -> Tensor:
    """The soft value tau log mean_m exp(v_m / tau) of M look-ahead samples along the last dimension of
    ``values``; ``tau`` is a number or one temperature per row (a prefix of the leading dimensions)."""
    if not isinstance(tau, Tensor):
        return tau * log_mean_exp(values / tau)
    t = tau.view(*tau.shape, *([1] * (values.dim() - tau.dim())))
    return t.squeeze(-1) * log_mean_exp(values / t)


def shrink_toward_mean(values: Tensor, fraction: Tensor) -> Tensor:
    """Per-candidate values [rows, K] shrunk toward their mean over the K candidates by ``fraction``
    (``value_signal_fraction``).

    This is the empirical-Bayes (James-Stein) estimate of each candidate's value: where the values
    are pure noise (fraction 0) every candidate gets the row's mean and the pay-off weights reduce to
    the proposal ratio, i.e. the reference step itself; where they are exact (fraction 1) nothing
    changes. For the weights it is a per-step temperature tau / fraction.
    """
    mean = values.mean(dim=-1, keepdim=True)
    return mean + fraction * (values - mean)


def temperature_for_ess(values: Tensor, log_base: Tensor, target_ess: float, low: float = 1e-3,
                        high: float = 1e3, iterations: int = 30) -> Tensor:
    """Per-row tau such that ESS of the pay-off weights ≈ target_ess (bisection in log tau).

    Higher tau flattens the weights (ESS grows), so ESS is monotone in tau for fixed log_base.
    ``values`` is [..., K] or [..., K, M] as in ``payoff_log_weights``.
    """
    rows = log_base.shape[:-1]
    lo = torch.full(rows, math.log(low), dtype=values.dtype, device=values.device)
    hi = torch.full(rows, math.log(high), dtype=values.dtype, device=values.device)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ess = effective_sample_size(payoff_log_weights(values, mid.exp(), log_base))
        too_peaked = ess < target_ess
        lo = torch.where(too_peaked, mid, lo)
        hi = torch.where(too_peaked, hi, mid)
    return ((lo + hi) / 2).exp()


def jackknife_weights(log_weights: Tensor, groups: int) -> Tensor:
    """Self-normalised weights with the jackknife's bias correction, along the last dimension.

    The self-normalised estimate R = Σ f_k y_k / Σ f_k of a pay-off mean is biased by O(1/K): each f_k
    also sits in its own normaliser, and noisy values f (Monte Carlo look-aheads) make it worse. The
    jackknife over G = ``groups`` groups of candidates (antithetic pairs stay together),

        R_J = G · R - (G - 1) / G · Σ_g R_{-g},      R_{-g}: the estimate without group g,

    cancels the 1/K term (Quenouille; bias O(1/K^2)). R_J is linear in the y_k, so it is a weighted
    mean whose weights sum to one; a few can be slightly negative.
    """
    k = log_weights.shape[-1]
    f = torch.exp(log_weights - log_weights.amax(-1, keepdim=True))
    total = f.sum(-1, keepdim=True)
    group_sums = f.view(*f.shape[:-1], groups, k // groups).sum(-1)  # [..., G]
    without = (total - group_sums).clamp(min=1e-30)  # normaliser of R_{-g}
    own = without.repeat_interleave(k // groups, dim=-1)  # [..., K]: the normaliser that drops k's own group
    sum_over_other_groups = (1.0 / without).sum(-1, keepdim=True) - 1.0 / own
    return groups * f / total - (groups - 1) / groups * f * sum_over_other_groups


def truncate_weights(weights: Tensor) -> Tensor:
    """Truncated importance sampling (Ionides 2008): cap normalised weights at sqrt(N) times their
    mean, 1 / sqrt(N), then renormalise, along the last dimension.

    The cap is relative to the batch, so it bounds the variance whatever the policy's drift, and it
    leaves uniform weights (the fixed point, where the policy equals the pay-off) untouched. An
    absolute clip of log pi_ref / pi_theta would instead erase the reference correction once the
    policy drifts, and the objective would silently become reward-weighted regression.
    """
    cap = weights.shape[-1] ** -0.5
    capped = weights.clamp(max=cap)
    return capped / capped.sum(-1, keepdim=True)

