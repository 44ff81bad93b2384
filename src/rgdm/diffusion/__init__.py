"""Noise schedules, the equivariant diffusion model, reverse steps and samplers."""
