"""Shared fixtures."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def single_thread():
    """One torch thread for the test: on tiny tensors extra threads only add synchronisation overhead
    (and two cores shared by a parallel test run are better spent on processes)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A free TCP port on localhost for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def qm9_all():
    """All 130,831 QM9 molecules with hydrogens.

    The first run parses the qm9pack CSVs into the on-disk cache (about 10 s); later runs load it.
    """
    from rgdm.data.qm9 import load_qm9

    return load_qm9("all")


def sgd_train(objective, steps: int, lr: float, after_step=None, model=None) -> tuple:
    """``steps`` plain SGD steps (no momentum) on ``objective.loss``; ``model`` defaults to a trainable copy
    of the objective's reference. Returns the model and ``after_step(model, loss)`` after each step."""
    import copy

    import torch

    if model is None:
        model = copy.deepcopy(objective.reference).requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    records = []
    for step in range(steps):
        loss, _ = objective.loss(model, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            records.append(after_step(model, loss))
    return model, records


def pool_after_each_step(objective, pooled_steps, steps: int = 10, lr: float = 0.1) -> list[list[int]]:
    """Train a copy of ``objective``'s reference for ``steps`` SGD steps; after each, the steps at which
    the batches it still keeps were drawn (``pooled_steps(objective)``)."""
    return sgd_train(objective, steps, lr, lambda model, loss: pooled_steps(objective))[1]


def tiny_run_config(steps: int, **train):
    """A tiny QM9 (no H) pre-training config: 256 molecules, a 2-layer EGNN, 50 diffusion steps."""
    from rgdm.config import RunConfig, from_dict

    values = {
        "name": "tiny",
        "data": {"dataset": "qm9", "remove_h": True, "max_train_molecules": 256},
        "model": {"hidden_nf": 16, "n_layers": 2},
        "diffusion": {"timesteps": 50},
        "train": {"steps": steps, "batch_size": 16, "log_every": 2, "val_every": 3, "val_batches": 1,
                  "checkpoint_every": 100, **train},
    }
    return from_dict(RunConfig, values).validate()


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, qm9_all):
    """A run directory holding a tiny model pre-trained for 20 steps."""
    from rgdm.training.pretrain import pretrain

    run_dir = tmp_path_factory.mktemp("tiny_pretrained") / "run"
    pretrain(tiny_run_config(20, lr=2e-3), run_dir, progress=False, tensorboard=False)
    return run_dir
