"""rgdm: E(3)-equivariant diffusion models steered by black-box rewards during training (RGDM)."""

__version__ = "0.1.0"
