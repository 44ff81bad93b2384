"""Running reward normalisation per target bucket, shared by RGDM, DDPO/PPO-clip and RWR."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class RewardNormalizer:
    """Running mean/std of rewards per target bucket (DDPO's per-prompt stat tracker).

    With normalisation on, tau is measured in standard deviations of the reward: the pay-off
    becomes pi_ref · exp((r - mean) / (std · tau)), i.e. an effective temperature std · tau.
    """

    def __init__(self, buffer_size: int = 512, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, list[float]] = {}

    @staticmethod
    def bucket(target: float | None) -> str:
        return "none" if target is None or math.isnan(target) else f"{target:.6g}"

    def update(self, values: Tensor, targets: Tensor | None) -> None:
        keys = self._keys(values, targets)
        for key, value in zip(keys, values.tolist()):
            buf = self.buffers.setdefault(key, [])
            buf.append(value)
            del buf[: max(0, len(buf) - self.buffer_size)]

    def normalize(self, values: Tensor, targets: Tensor | None) -> Tensor:
        keys = self._keys(values, targets)
        everything = [v for buf in self.buffers.values() for v in buf]
        out = torch.empty_like(values)
        for i, key in enumerate(keys):
            buf = self.buffers.get(key, [])
            ref = buf if len(buf) >= self.min_count else everything
            ref_t = torch.tensor(ref or [0.0], dtype=values.dtype)
            std = ref_t.std() if len(ref) > 1 else torch.tensor(1.0)
            out[i] = (values[i] - ref_t.mean()) / (std + 1e-6)
        return out

    def _keys(self, values: Tensor, targets: Tensor | None) -> list[str]:
        if targets is None:
            return ["none"] * len(values)
        return [self.bucket(t) for t in targets.tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {k: list(v) for k, v in state["buffers"].items()}
