"""Padded, masked batches of molecules: the one data structure the models and rewards share."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class MoleculeBatch:
    """A batch of B molecules padded to N nodes.

    positions:  [B, N, 3] float, Angstrom, zero centre of mass over real nodes, padding = 0.
    atom_types: [B, N] long, index into ``elements``; padding = 0 (check node_mask).
    node_mask:  [B, N, 1] float, 1.0 for real atoms.
    elements:   element symbols of the type indices, e.g. ("H", "C", "N", "O", "F").
    properties: optional per-molecule scalars [B] in EDM's units (see rgdm.data.qm9.PROPERTIES).
    """

    positions: Tensor
    atom_types: Tensor
    node_mask: Tensor
    elements: tuple[str, ...]
    properties: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_atoms(self) -> Tensor:
        return self.node_mask.sum(dim=(1, 2)).long()

    @property
    def one_hot(self) -> Tensor:
        """[B, N, F] float one-hot of atom types, zero on padding."""
        oh = torch.nn.functional.one_hot(self.atom_types.clamp(min=0), len(self.elements))
        return oh.to(self.positions.dtype) * self.node_mask

    @property
    def charges(self) -> Tensor:
        """[B, N, 1] float atomic numbers, zero on padding (EDM's integer feature)."""
        z = torch.tensor([ATOMIC_NUMBERS[e] for e in self.elements], dtype=self.positions.dtype,
                         device=self.positions.device)
        return z[self.atom_types.clamp(min=0)].unsqueeze(-1) * self.node_mask

    def __len__(self) -> int:
        return self.positions.shape[0]

    def to(self, device: torch.device | str) -> MoleculeBatch:
        return replace(
            self,
            positions=self.positions.to(device),
            atom_types=self.atom_types.to(device),
            node_mask=self.node_mask.to(device),
            properties={k: v.to(device) for k, v in self.properties.items()},
        )

    def molecules(self) -> list[tuple[list[str], Tensor]]:
        """Unpadded ``(symbols, positions [n, 3])`` per molecule, for rewards and writers."""
        out = []
        for b in range(len(self)):
            real = self.node_mask[b, :, 0] > 0.5
            symbols = [self.elements[int(i)] for i in self.atom_types[b, real]]
            out.append((symbols, self.positions[b, real].detach().cpu()))
        return out


ATOMIC_NUMBERS = {
    "H": 1, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Al": 13, "Si": 14, "P": 15, "S": 16,
    "Cl": 17, "As": 33, "Br": 35, "I": 53, "Hg": 80, "Bi": 83,
}
