"""Maximum-likelihood pre-training: the denoising loss on data batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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

    def next(self) -> MoleculeBatch:
        if self.offset + self.batch_size > len(self.dataset):
            self.epoch += 1
            self.offset = 0
            self._order = self._epoch_order()
        indices = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return self.dataset.batch(indices)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._epoch_order()


class DenoisingObjective:
    """L = E_t,eps || eps - eps_theta(z_t, t) ||^2 on data batches (EDM's L2 training loss)."""

    name = "mle"

    def __init__(self, dataset: MoleculeDataset, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        self.stream = DataStream(dataset, batch_size, seed)
        self.device = device

    def loss(self, model: MoleculeDiffusion, step: int) -> tuple[Tensor, dict[str, float]]:
        batch = self.stream.next().to(self.device)
        loss = model.training_loss(batch).mean()
        return loss, {"epoch": float(self.stream.epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


@torch.no_grad()
def validation_loss(model: MoleculeDiffusion, dataset: MoleculeDataset, batch_size: int, n_batches: int,
                    seed: int = 1234) -> float:
    """Mean denoising loss on fixed validation batches with a private generator.

    A private generator keeps validation from touching the global RNG, so evaluating does not
    change the training trajectory (and resumed runs stay bit-identical).
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = model.node_count_probs.device
    losses = []
    for i, batch in enumerate(dataset.batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))):
        if i >= n_batches:
            break
        losses.append(model.training_loss(batch.to(device), generator=generator).mean().item())
    return sum(losses) / max(len(losses), 1)
