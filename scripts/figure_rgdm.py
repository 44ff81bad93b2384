"""Draw docs/rgdm_closed_form.png: both RGDM variants on the closed form of DESIGN §2.

Data N(0, I_2) and the quadratic reward r(x) = -b |x - c|^2, whose pay-off pi_ref · exp(r / tau) is
the reference shifted *and shrunk*. Left: samples of the reference, of the pay-off and of the models
fine-tuned with each variant. Right: the exact relative errors of the fine-tuned mean and covariance
(``rgdm.diffusion.analytic.exact_moments``) over reward calls, with the tests' 5 % line.

    python scripts/figure_rgdm.py   # about a minute on a CPU
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rgdm.config import RGDMConfig, TrainConfig  # noqa: E402
from rgdm.diffusion.analytic import (  # noqa: E402
    exact_moments,
    gaussian_payoff,
    relative_errors,
    standard_gaussian_diffusion,
)
from rgdm.training.closed_form import (  # noqa: E402
    SAMPLING_STEPS,
    TAU,
    closed_form_reward,
    closed_form_settings,
)
from rgdm.training.loop import Trainer  # noqa: E402
from rgdm.training.rgdm import RGDMObjective  # noqa: E402
from rgdm.training.tasks import GaussianTask  # noqa: E402

COLOURS = {"step": "#d62728", "sequence": "#2ca02c"}


def finetune(variant: str, reward_fn, target) -> tuple[torch.nn.Module, list[int], list[float], list[float]]:
    torch.manual_seed(0)
    model = standard_gaussian_diffusion(2, 200)
    settings, lr = closed_form_settings(variant, "quadratic")
    config = RGDMConfig(variant=variant, sampling_steps=SAMPLING_STEPS, tau=TAU, normalize_rewards=False, **settings)
    objective = RGDMObjective(model, GaussianTask(2, reward_fn), config)
    calls, mean_errors, cov_errors = [], [], []

    def track(current, step: int) -> dict[str, float]:
        errors = relative_errors(*exact_moments(current, SAMPLING_STEPS), *target)
        calls.append(objective.reward_calls)
        mean_errors.append(errors[0])
        cov_errors.append(errors[1])
        return {}

    train = TrainConfig(steps=100, lr=lr, ema_decay=0.95, grad_clip=0.0, log_every=5, val_every=5,
                        checkpoint_every=10_000)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, objective, train, tmp, {"config": {}}, track, tensorboard=False, progress=False)
        trainer.fit()
    return trainer.sampling_model, calls, mean_errors, cov_errors


def main(out: Path = Path("docs/rgdm_closed_form.png")) -> None:
    reward_fn, params = closed_form_reward("quadratic", 2)
    reference = standard_gaussian_diffusion(2, 200)
    target = gaussian_payoff(*exact_moments(reference, SAMPLING_STEPS), "quadratic", TAU, **params)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    draw = lambda m, seed: m.sample((1500, 2), num_steps=SAMPLING_STEPS,  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(1500, 2, generator=torch.Generator().manual_seed(4))
    payoff = target[0].float() + noise @ torch.linalg.cholesky(target[1].float()).T
    left.scatter(*draw(reference, 1).T, s=3, alpha=0.25, color="#888888", label="reference π_ref")
    left.scatter(*payoff.T, s=3, alpha=0.25, color="#1f77b4", label="pay-off π_ref·exp(r/τ)")
    for variant, colour in COLOURS.items():
        model, calls, mean_errors, cov_errors = finetune(variant, reward_fn, target)
        samples = draw(model, 3)
        left.scatter(*samples[:600].T, s=3, alpha=0.35, color=colour, label=f"{variant}-level RGDM")
        right.plot(calls, [100 * e for e in mean_errors], color=colour, label=f"{variant}: mean error")
        right.plot(calls, [100 * e for e in cov_errors], color=colour, ls=":", label=f"{variant}: covariance error")
    left.scatter(*params["c"].tolist(), s=80, marker="*", color="k", label="reward's centre c")
    left.set_aspect("equal")
    left.legend(fontsize=7, loc="lower left")
    left.set_title("samples, quadratic reward (shift and shrink)")
    right.axhline(5, color="k", ls="--", lw=1, label="5 % (the tests' bound)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("reward calls")
    right.set_ylabel("relative error of the exact distribution (%)")
    right.set_title("convergence to the pay-off")
    right.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
