"""Steering a pretrained model at sampling time, with no training: SVDD-PM and twisted SMC.

Both use only reward evaluations (no gradients) of the posterior-mean look-ahead
V(z_t) = r(E[x_0 | z_t]) and work for any task of ``rgdm.training.tasks``; they are the
inference-time counterparts of RGDM's training-time steering (docs/amortisation.md compares costs).
"""

from rgdm.sampling.smc import SMCSamples, smc_sample
from rgdm.sampling.svdd import SteeredSamples, lookahead, svdd_sample

__all__ = ["SMCSamples", "SteeredSamples", "lookahead", "smc_sample", "svdd_sample"]
