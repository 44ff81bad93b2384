"""Maximum-likelihood pre-training: the denoising loss on data batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rgdm import distributed
from rgdm.data.batch import MoleculeBatch
from rgdm.data.dataset import MoleculeDataset
from rgdm.diffusion.molecules import MoleculeDiffusion


class DataStream:
    """Endless shuffled batches with a resumable position (epoch, offset).

    Each epoch's order comes from a generator seeded by (seed, epoch), so the stream is a pure
    function of its position: resuming needs only two integers.
    """

    def __init__(self, dataset: MoleculeDataset, batch_size: int, seed: int):
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def next_indices(self) -> Tensor:
        """Dataset indices of the next batch (the same on every rank of a data-parallel run)."""
        if self.offset + self.batch_size > len(self.dataset):
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order()
        indices = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return indices

    def next(self) -> MoleculeBatch:
        return self.dataset.batch(self.next_indices())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._epoch_order()


class DenoisingObjective:
    """L = E_t,eps || eps - eps_theta(z_t, t) ||^2 on data batches (EDM's L2 training loss).

    Data-parallel runs split each global batch into contiguous slices, one per rank. The noise
    level t and the noise of every molecule are drawn for the whole global batch from a generator
    seeded by (seed, step), so they depend on neither the rank layout nor the global RNG: training
    with N processes follows the single-process trajectory (up to float summation order), and a
    run may resume with a different number of processes.
    """

    name = "mle"

    def __init__(self, dataset: MoleculeDataset, batch_size: int, seed: int, device: torch.device | str = "cpu",
                 noise_offset: int = 0):
        self.stream = DataStream(dataset, batch_size, seed)
        self.seed = seed
        self.device = device
        self.noise_offset = noise_offset  # keeps a data term's noise independent of a fine-tuner's roll-outs

    def loss(self, model: MoleculeDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        """This rank's share of the global mean loss: sum over its molecules / global batch size."""
        indices = self.stream.next_indices()
        global_size = len(indices)
        t, noise = self._global_noise(model, indices, step)
        start, stop = distributed.shard_bounds(global_size)
        batch = self.stream.dataset.batch(indices[start:stop]).to(self.device)
        n_local = batch.node_mask.shape[1]  # the slice is padded to its own largest molecule
        per_molecule = _denoising_loss(model, batch, t[start:stop].to(self.device),
                                       noise[start:stop, :n_local].to(self.device))
        return per_molecule.sum() / global_size, {"epoch": float(self.stream.epoch)}

    def _global_noise(self, model: MoleculeDiffusion, indices: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(t [B], noise [B, N, 3 + F]) for the global batch, drawn on the CPU from (seed, step)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + self.noise_offset)
        node_mask = self.stream.dataset.batch(indices).node_mask
        t = torch.randint(0, model.timesteps + 1, (len(indices),), generator=generator)
        like = torch.empty(*node_mask.shape[:2], 3 + model.n_features)
        return t, model.noise(like, node_mask, generator)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


def _denoising_loss(model: MoleculeDiffusion, batch: MoleculeBatch, t: Tensor, noise: Tensor) -> Tensor:
    """Per-molecule epsilon-prediction loss [B] with given t and noise (``GaussianDiffusion.loss``)."""
    x = model.encode(batch)
    context = model.normalize_context(batch.properties)
    z_t = model.q_sample(x, t, noise)
    eps = model.predict_eps(z_t, t, batch.node_mask, context)
    return model.sq_norm(eps - noise, batch.node_mask) / model.count(x, batch.node_mask)


@torch.no_grad()
def validation_loss(model: MoleculeDiffusion, dataset: MoleculeDataset, batch_size: int, n_batches: int,
                    seed: int = 1234) -> float:
    """Mean denoising loss on fixed validation batches with a private generator.

    A private generator keeps validation from touching the global RNG, so evaluating does not
    change the training trajectory (and resumed runs stay bit-identical).
    """
    model.eval()
    device = model.node_count_probs.device
    generator = torch.Generator(device=device).manual_seed(seed)  # noise is drawn on the model's device
    losses = []
    for i, batch in enumerate(dataset.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))):
        if i >= n_batches:
            break
        losses.append(model.training_loss(batch.to(device), generator=generator).mean().item())
    return sum(losses) / max(len(losses), 1)
