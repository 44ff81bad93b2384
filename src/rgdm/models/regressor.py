"""An EGNN that predicts one molecular property: EDM's property classifier, as a reward or evaluator.

EDM (Hoogeboom et al. 2022) judges conditional generation with an EGNN regressor per QM9 property
(7 layers, 128 features, trained with an L1 loss on the property normalised by the training split's
mean and mean absolute deviation). Ours reads a :class:`~rgdm.data.batch.MoleculeBatch`: node
features are the one-hot atom types and, optionally, the atomic number scaled to [0, 1]; the EGNN's
invariant node features go through a node MLP, are summed over the real atoms of each molecule, and
a graph MLP maps the sum to the normalised property. Summing (not averaging) lets extensive
properties such as the polarisability or the heat capacity grow with molecule size.

The output depends only on the atoms' types and inter-atomic distances, so it is invariant to
rotations, reflections, translations and atom permutations, and padding has no influence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rgdm.data.batch import ATOMIC_NUMBERS, MoleculeBatch
from rgdm.models.egnn import EGNN


@dataclass
class RegressorSpec:
    """Everything needed to rebuild a regressor: architecture, vocabulary and property statistics.

    ``mean`` and ``mad`` are the training split's mean and mean absolute deviation of the property
    in EDM's units; the network predicts ``(value - mean) / mad``.
    """

    property_name: str
    elements: tuple[str, ...]
    mean: float
    mad: float
    units: str = ""
    hidden_nf: int = 128
    n_layers: int = 7
    include_charges: bool = True
    attention: bool = True
    normalization_factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # provenance, e.g. training split and remove_h

    def to_dict(self) -> dict[str, Any]:
        return {
            "property_name": self.property_name, "elements": list(self.elements), "mean": self.mean,
            "mad": self.mad, "units": self.units, "hidden_nf": self.hidden_nf, "n_layers": self.n_layers,
            "include_charges": self.include_charges, "attention": self.attention,
            "normalization_factor": self.normalization_factor, "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegressorSpec:
        return cls(
            property_name=str(d["property_name"]), elements=tuple(d["elements"]), mean=float(d["mean"]),
            mad=float(d["mad"]), units=str(d.get("units", "")), hidden_nf=int(d["hidden_nf"]),
            n_layers=int(d["n_layers"]), include_charges=bool(d["include_charges"]),
            attention=bool(d["attention"]), normalization_factor=float(d["normalization_factor"]),
            extra=dict(d.get("extra", {})),
        )


class PropertyRegressor(nn.Module):
    """E(3)- and permutation-invariant EGNN regressor of one scalar property per molecule."""

    def __init__(self, spec: RegressorSpec):
        super().__init__()
        if spec.mad <= 0:
            raise ValueError(f"property {spec.property_name!r}: mean absolute deviation must be positive, "
                             f"got {spec.mad}")
        unknown = [e for e in spec.elements if e not in ATOMIC_NUMBERS]
        if unknown:
            raise ValueError(f"unknown element {unknown[0]!r} in the regressor's vocabulary")
        self.spec = spec
        in_nf = len(spec.elements) + int(spec.include_charges)
        hidden = spec.hidden_nf
        self.egnn = EGNN(in_nf, hidden, hidden_nf=hidden, n_layers=spec.n_layers, attention=spec.attention,
                         normalization_factor=spec.normalization_factor)
        self.node_readout = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.graph_readout = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        charges = torch.tensor([ATOMIC_NUMBERS[e] for e in spec.elements], dtype=torch.float32)
        # Buffers travel with the weights, so a state dict alone gives predictions in EDM's units.
        self.register_buffer("scaled_charges", charges / charges.max())
        self.register_buffer("mean", torch.tensor(float(spec.mean)))
        self.register_buffer("mad", torch.tensor(float(spec.mad)))

    @property
    def elements(self) -> tuple[str, ...]:
        return self.spec.elements

    def node_features(self, atom_types: Tensor, node_mask: Tensor) -> Tensor:
        """[B, N, F] one-hot types (+ atomic number / max atomic number), zero on padding."""
        one_hot = nn.functional.one_hot(atom_types.clamp(min=0), len(self.elements)).to(node_mask.dtype)
        features = [one_hot]
        if self.spec.include_charges:
            features.append(self.scaled_charges.to(node_mask.dtype)[atom_types.clamp(min=0)].unsqueeze(-1))
        return torch.cat(features, dim=-1) * node_mask

    def forward(self, positions: Tensor, atom_types: Tensor, node_mask: Tensor) -> Tensor:
        """Normalised prediction [B] from positions [B, N, 3], atom_types [B, N], node_mask [B, N, 1]."""
        h = self.node_features(atom_types, node_mask)
        h, _ = self.egnn(h, positions, node_mask)
        h = self.node_readout(h) * node_mask
        return self.graph_readout(h.sum(dim=1)).squeeze(-1)

    def normalized(self, batch: MoleculeBatch) -> Tensor:
        """(predicted value - mean) / mad for every molecule of a batch, [B]."""
        self.check_elements(batch.elements)
        dtype = self.mean.dtype
        return self(batch.positions.to(dtype), batch.atom_types, batch.node_mask.to(dtype))

    def predict(self, batch: MoleculeBatch) -> Tensor:
        """The property in EDM's units for every molecule of a batch, [B]."""
        return self.denormalize(self.normalized(batch))

    def normalize(self, values: Tensor) -> Tensor:
        return (values.to(self.mean.dtype) - self.mean) / self.mad

    def denormalize(self, normalized: Tensor) -> Tensor:
        return normalized * self.mad + self.mean

    def check_elements(self, elements: tuple[str, ...]) -> None:
        """Batches must use this regressor's type vocabulary (index i means elements[i])."""
        if tuple(elements) != self.elements:
            raise ValueError(f"batch elements {tuple(elements)} differ from the regressor's {self.elements}; "
                             "re-encode the molecules with the regressor's vocabulary")
