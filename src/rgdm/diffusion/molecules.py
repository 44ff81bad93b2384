"""E(3)-equivariant diffusion over molecules (EDM, Hoogeboom et al. 2022).

State z = [x | h] of shape [B, N, 3 + F]: zero-CoM positions x and node features h (one-hot atom
type, optionally the atomic number as EDM's "integer" feature), scaled by EDM's ``norm_values``
(1, 4, 10) so that positions dominate. Padded nodes are zero everywhere. The model stores its
elements, scaling, node-count distribution and context normalisation, so a checkpoint is enough
to sample molecules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rgdm.data.batch import ATOMIC_NUMBERS, MoleculeBatch
from rgdm.diffusion.com import remove_mean_with_mask, sample_masked_gaussian, sample_zero_com_gaussian
from rgdm.diffusion.gaussian import GaussianDiffusion
from rgdm.diffusion.schedule import NoiseSchedule
from rgdm.models.egnn import EGNNDynamics


class MoleculeDiffusion(GaussianDiffusion):
    has_node_features = True

    def __init__(self, dynamics: EGNNDynamics, schedule: NoiseSchedule, elements: tuple[str, ...],
                 node_count_probs: Tensor, include_charges: bool = True,
                 norm_values: tuple[float, float, float] = (1.0, 4.0, 10.0),
                 context_names: tuple[str, ...] = (), context_mean: Tensor | None = None,
                 context_scale: Tensor | None = None):
        super().__init__(dynamics, schedule)
        self.elements = tuple(elements)
        self.include_charges = include_charges
        self.norm_values = tuple(float(v) for v in norm_values)
        self.context_names = tuple(context_names)
        self.n_features = len(self.elements) + int(include_charges)
        self.register_buffer("node_count_probs", torch.as_tensor(node_count_probs, dtype=torch.float32))
        n_ctx = len(self.context_names)
        self.register_buffer("context_mean", torch.zeros(n_ctx) if context_mean is None else context_mean.float())
        self.register_buffer("context_scale", torch.ones(n_ctx) if context_scale is None else context_scale.float())
        self.register_buffer("atomic_numbers", torch.tensor([float(ATOMIC_NUMBERS[e]) for e in self.elements]))

    # State space: zero-CoM positions, masked features. ---------------------------------------- #

    def noise(self, like: Tensor, node_mask: Tensor | None = None, generator=None) -> Tensor:
        b, n, _ = like.shape
        mask = node_mask.to(like.dtype)
        x = sample_zero_com_gaussian((b, n, 3), mask, generator)
        h = sample_masked_gaussian((b, n, like.shape[-1] - 3), mask, generator)
        return torch.cat([x, h], dim=-1)

    def project(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        x = remove_mean_with_mask(z[..., :3], node_mask)
        return torch.cat([x, z[..., 3:] * node_mask], dim=-1)

    def dof(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        n_real = node_mask.sum(dim=(1, 2)).to(z.dtype)
        return (n_real - 1.0) * 3 + n_real * (z.shape[-1] - 3)

    def count(self, z: Tensor, node_mask: Tensor | None = None) -> Tensor:
        return node_mask.sum(dim=(1, 2)).to(z.dtype) * z.shape[-1]

    def node_features_only(self, v: Tensor) -> Tensor:
        """``v`` with the positions zeroed: the atom-type block (and the charge feature) alone."""
        return torch.cat([torch.zeros_like(v[..., :3]), v[..., 3:]], dim=-1)

    def predict_eps(self, z_t: Tensor, t: Tensor, node_mask: Tensor | None = None,
                    context: Tensor | None = None) -> Tensor:
        t_frac = t.to(z_t.dtype) / self.timesteps
        with self.network_precision(z_t):
            eps_x, eps_h = self.denoiser(z_t[..., :3], z_t[..., 3:], t_frac, node_mask, context)
        return torch.cat([eps_x, eps_h], dim=-1).to(z_t.dtype)

    # Encoding and decoding molecules. ------------------------------------------------------ #

    def encode(self, batch: MoleculeBatch) -> Tensor:
        """MoleculeBatch -> scaled state z_0 [B, N, 3 + F]."""
        if tuple(batch.elements) != self.elements:
            raise ValueError(f"batch elements {batch.elements} differ from the model's {self.elements}")
        norm_x, norm_onehot, norm_charge = self.norm_values
        parts = [batch.positions / norm_x, batch.one_hot / norm_onehot]
        if self.include_charges:
            parts.append(batch.charges / norm_charge)
        return torch.cat(parts, dim=-1) * batch.node_mask

    def decode(self, z: Tensor, node_mask: Tensor) -> MoleculeBatch:
        """State -> MoleculeBatch: positions unscaled, atom type = argmax of the one-hot block."""
        positions = remove_mean_with_mask(z[..., :3] * self.norm_values[0], node_mask)
        one_hot = z[..., 3 : 3 + len(self.elements)]
        atom_types = one_hot.argmax(dim=-1) * node_mask[..., 0].long()
        return MoleculeBatch(positions=positions, atom_types=atom_types, node_mask=node_mask,
                             elements=self.elements)

    def snap_to_data(self, x: Tensor, node_mask: Tensor | None = None) -> Tensor:
        """Atom types snapped to one-hot (argmax) and charges to atomic numbers, as in the data."""
        return self.encode(self.decode(x, node_mask))

    def normalize_context(self, properties: dict[str, Tensor]) -> Tensor | None:
        """Raw property values (EDM units) -> the network's context (mean/MAD normalised)."""
        if not self.context_names:
            return None
        missing = [k for k in self.context_names if k not in properties]
        if missing:
            raise ValueError(f"this model is conditioned on {self.context_names}; missing {missing}")
        raw = torch.stack([properties[k].float() for k in self.context_names], dim=-1)
        return (raw.to(self.context_mean.device) - self.context_mean) / self.context_scale

    def training_loss(self, batch: MoleculeBatch, generator=None) -> Tensor:
        """Per-molecule epsilon-prediction loss [B]."""
        context = self.normalize_context(batch.properties)
        return self.loss(self.encode(batch), batch.node_mask, context, generator=generator)

    # Sampling molecules. ------------------------------------------------------------------- #

    def sample_node_counts(self, n: int, generator=None) -> Tensor:
        return torch.multinomial(self.node_count_probs, n, replacement=True, generator=generator)

    @staticmethod
    def mask_from_counts(counts: Tensor) -> Tensor:
        n_max = int(counts.max())
        arange = torch.arange(n_max, device=counts.device)
        return (arange[None, :] < counts[:, None]).float().unsqueeze(-1)

    @torch.no_grad()
    def sample_molecules(self, n: int, node_counts: Tensor | None = None,
                         properties: dict[str, Tensor] | None = None, num_steps: int | None = None,
                         eta: float = 1.0, generator=None, progress: bool = False) -> MoleculeBatch:
        """Draw ``n`` molecules; node counts come from the data distribution unless given."""
        device = self.node_count_probs.device
        if node_counts is None:
            node_counts = self.sample_node_counts(n, generator)
        node_mask = self.mask_from_counts(node_counts.to(device))
        context = self.normalize_context(properties or {})
        shape = (n, node_mask.shape[1], 3 + self.n_features)
        z = self.sample(shape, node_mask, context, num_steps, eta, generator, progress=progress)
        batch = self.decode(z, node_mask)
        if properties:
            batch.properties = {k: v.to(device) for k, v in properties.items()}
        return batch
