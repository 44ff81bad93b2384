"""Sample molecules from a trained model, write them, and score them with EDM's metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rgdm import distributed
from rgdm.data.batch import MoleculeBatch
from rgdm.diffusion.molecules import MoleculeDiffusion
from rgdm.eval.molecules import evaluate_molecules


def sample_in_chunks(model: MoleculeDiffusion, n: int, batch_size: int = 100, num_steps: int | None = None,
                     seed: int = 0, progress: bool = True) -> list[MoleculeBatch]:
    """``n`` molecules in batches, reproducible from ``seed`` (noise drawn on the model's device)."""
    generator = distributed.generator_on(distributed.module_device(model), seed)
    chunks = []
    iterator = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sampling molecules", unit="batch", total=(n + batch_size - 1) // batch_size)
    for start in iterator:
        chunks.append(model.sample_molecules(min(batch_size, n - start), num_steps=num_steps, generator=generator))
    return chunks


def molecule_list(chunks: list[MoleculeBatch]) -> list[tuple[list[str], torch.Tensor]]:
    return [m for chunk in chunks for m in chunk.molecules()]


def sample_and_evaluate(model: MoleculeDiffusion, n: int, out_dir: str | Path, tag: str = "samples",
                        batch_size: int = 100, num_steps: int | None = None, seed: int = 0,
                        training_smiles: set[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Sample, write ``<tag>.xyz`` and ``<tag>_metrics.json`` into ``out_dir``; return the metrics."""
    from rgdm.data.readers import write_xyz

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    molecules = molecule_list(sample_in_chunks(model, n, batch_size, num_steps, seed, progress))
    seconds = time.perf_counter() - started
    write_xyz(out_dir / f"{tag}.xyz", molecules)
    metrics = evaluate_molecules(molecules, training_smiles)
    metrics.update({"sampling_seconds": round(seconds, 2), "num_steps": num_steps or model.timesteps, "seed": seed})
    (out_dir / f"{tag}_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def qm9_training_smiles() -> set[str]:
    """Canonical SMILES of QM9's training split (the reference set for novelty)."""
    from rgdm.data.qm9 import qm9_smiles
    from rgdm.eval.bonds import smiles_to_canonical

    return {s for s in (smiles_to_canonical(x) for x in qm9_smiles("train")) if s}
