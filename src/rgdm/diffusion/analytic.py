"""The analytic test bed of DESIGN §2: data x ~ N(0, I_d), its exact denoiser, and exact moments.

For a variance-preserving schedule, z_t = alpha_t x + sigma_t eps ~ N(0, I), so Tweedie's estimate
is x_hat = E[x | z_t] = alpha_t z_t and the optimal noise prediction is sigma_t z_t.

The fine-tunable family predicts x_0 with a per-time log-scale h(t) and offset e(t), both zero at
initialisation, and returns the matching noise prediction:

    x_hat(z, t) = alpha_t · exp(sigma_t^2 h(t)) · z + sigma_t^2 e(t),      eps_hat = (z - alpha_t x_hat) / sigma_t.

It holds the exact denoiser of every isotropic Gaussian N(mu, s^2 I), whose posterior mean is
mu + alpha_t s^2 (z - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2): sigma_t^2 h = log(s^2 / (alpha_t^2 s^2 + sigma_t^2)),
sigma_t^2 e = mu sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2), both smooth and finite in t. Those are the
pay-off distributions of the two closed-form rewards of the tests: a linear reward a^T x tilts N(0, I)
to N(a / tau, I) (a shift), a quadratic one -b |x - c|^2 to N(mu, s^2 I) with s^2 = 1 / (1 + 2 b / tau)
and mu = 2 b s^2 c / tau (a shift and a shrink). h and e are piecewise linear in t over a few knots,
so that every reverse step learns from exploration at nearby steps.

Why this form: a reverse-step mean moves by alpha_s sigma_t / alpha_t per unit of eps_hat (over 100
at the first step of a cosine schedule, where the step std is 1) and by about 1 per unit of x_hat at
the last steps (where the step std is 0.01). A learnable part in either space alone makes the policy,
and its log-probability ratio to the reference, hypersensitive at one end of the chain to every
optimiser step. The factor sigma_t^2 silences the correction where the data pins x_0 (t -> 0), the
factor alpha_s of the step damps it where the step forgets x_0 (t -> T): the policy is well
conditioned everywhere, as a trained network's is.

Because every reverse step of this family is affine in z, the distribution of its samples is an
exactly computable Gaussian (``exact_moments``): tests compare it with the closed form with no
sampling noise at all. A finite-step sampler of the exact denoiser is itself slightly off N(0, I)
(variance 0.977 with 200 ancestral steps, DDPM's per-step variance is the posterior's), so the
closed-form targets are computed from the reference model's own exact moments (``gaussian_payoff``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.diffusion.schedule import ConstantSchedule, NoiseSchedule, cosine_alphas2


def _interpolation_matrix(timesteps: int, knots: int) -> Tensor:
    """[T + 1, knots] weights of the piecewise-linear interpolation of knot values at t = 0..T:
    one row per integer time, so that evaluating the curve is one lookup and one product."""
    position = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps * (knots - 1)
    left = position.floor().long().clamp(max=knots - 2)
    frac = position - left
    weights = torch.zeros(timesteps + 1, knots, dtype=torch.float64)
    rows = torch.arange(timesteps + 1)
    weights[rows, left] = 1 - frac
    weights[rows, left + 1] = frac
    return weights.float()


class StandardGaussianDenoiser(nn.Module):
    """x_hat(z, t) = alpha_t exp(sigma_t^2 h(t)) z + sigma_t^2 e(t), returned as eps_hat; exact for
    N(0, I) data when h = e = 0."""

    def __init__(self, dim: int, schedule: NoiseSchedule, knots: int = 21, learn_scale: bool = True):
        super().__init__()
        self.schedule = schedule
        self.knots = nn.Parameter(torch.zeros(knots, dim))  # the offset e(t)
        self.log_scale_knots = nn.Parameter(torch.zeros(knots, 1), requires_grad=learn_scale)  # h(t)
        self.register_buffer("interpolation", _interpolation_matrix(schedule.timesteps, knots), persistent=False)

    def forward(self, z: Tensor, t_frac: Tensor, node_mask=None, context=None) -> Tensor:
        t = (t_frac * self.schedule.timesteps).round().long()
        weights = self.interpolation[t].to(z.dtype)  # [B, knots]
        alpha = self.schedule.alpha(t).to(z.dtype).unsqueeze(-1)
        sigma = self.schedule.sigma(t).to(z.dtype).unsqueeze(-1)
        scale = (sigma**2 * (weights @ self.log_scale_knots.to(z.dtype))).exp()
        x_hat = alpha * scale * z + sigma**2 * (weights @ self.knots.to(z.dtype))
        return (z - alpha * x_hat) / sigma


def standard_gaussian_diffusion(dim: int, timesteps: int = 200, learn_scale: bool = True) -> GaussianDiffusion:
    """Exact diffusion model of N(0, I_dim) on a cosine schedule with ``timesteps`` steps.

    ``learn_scale=False`` freezes g(t) = 0: the model can then only shift its samples.
    """
    schedule = ConstantSchedule(torch.as_tensor(cosine_alphas2(timesteps)).sqrt())
    return GaussianDiffusion(StandardGaussianDenoiser(dim, schedule, learn_scale=learn_scale), schedule)


def gaussian_payoff(reference_mean: Tensor, reference_cov: Tensor, reward: str, tau: float,
                    **params: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the pay-off N(m0, C0) · exp(r / tau) of a Gaussian reference model.

    ``linear``: r = a^T x -> N(m0 + C0 a / tau, C0).
    ``quadratic``: r = -b |x - c|^2 -> precision P = C0^-1 + (2 b / tau) I, N(P^-1 (C0^-1 m0 + 2 b c / tau), P^-1).
    For the exact reference N(0, I) these are N(a / tau, I) and N(2 b s^2 c / tau, s^2 I), s^2 = 1 / (1 + 2 b / tau).
    """
    m0, c0 = reference_mean.double(), reference_cov.double()
    if reward == "linear":
        a = torch.as_tensor(params["a"], dtype=torch.float64)
        return m0 + c0 @ a / tau, c0
    if reward == "quadratic":
        b, c = float(params["b"]), torch.as_tensor(params["c"], dtype=torch.float64)
        precision = torch.linalg.inv(c0) + (2.0 * b / tau) * torch.eye(len(m0), dtype=torch.float64)
        cov = torch.linalg.inv(precision)
        return cov @ (torch.linalg.solve(c0, m0) + 2.0 * b * c / tau), cov
    raise ValueError(f"unknown closed-form reward {reward!r}: expected 'linear' or 'quadratic'")


@torch.no_grad()
def exact_moments(model: GaussianDiffusion, num_steps: int | None = None, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mean [D] and covariance [D, D] of ``model.sample`` for a model whose reverse steps are affine in z.

    Each step z_s = A z_t + b + std · eps maps N(m, C) to N(A m + b, A C A^T + std^2 I); the final
    denoised estimate is affine too. A and b are read off the model at z = 0 and the unit vectors, in
    float64, and the affine form is checked at a random point (a non-affine model is refused).
    """
    dim = model.denoiser.knots.shape[1]
    grid = model.time_grid(num_steps)
    basis = torch.cat([torch.zeros(1, dim), torch.eye(dim)]).double()
    probe = torch.randn(1, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    points = torch.cat([basis, probe])
    mean, cov = torch.zeros(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64)
    model = model.double()
    try:
        for t_int, s_int in zip(grid[:-1], grid[1:]):
            t = torch.full((len(points),), t_int, dtype=torch.long)
            s = torch.full((len(points),), s_int, dtype=torch.long)
            out, std = model.step_distribution(points, t, s, eta=eta)
            a_matrix, b = _affine(out, points, dim)
            mean, cov = a_matrix @ mean + b, a_matrix @ cov @ a_matrix.T + float(std[0]) ** 2 * torch.eye(dim).double()
        x0 = model.predict_x0(points, torch.zeros(len(points), dtype=torch.long))
        a_matrix, b = _affine(x0, points, dim)
        return a_matrix @ mean + b, a_matrix @ cov @ a_matrix.T
    finally:
        model.float()


def _affine(values: Tensor, points: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """A, b with values = A point + b, from the values at 0, e_1..e_D; checked at the extra probe point."""
    b = values[0]
    a_matrix = (values[1 : dim + 1] - b).T
    predicted = a_matrix @ points[-1] + b
    if not torch.allclose(predicted, values[-1], atol=1e-8 * (1 + values[-1].abs().max().item())):
        raise ValueError("exact_moments needs reverse steps that are affine in z; this model's are not")
    return a_matrix, b


def relative_errors(mean: Tensor, cov: Tensor, target_mean: Tensor, target_cov: Tensor) -> tuple[float, float]:
    """|mean - mu| / |mu|, and the largest entry of |cov - Sigma| relative to Sigma's largest diagonal entry."""
    mean_error = (mean - target_mean).norm() / target_mean.norm().clamp(min=1e-12)
    cov_error = (cov - target_cov).abs().max() / target_cov.diagonal().max()
    return float(mean_error), float(cov_error)
