"""The Ray backend: the same fault isolation as the process pool, and xTB values that match it.

One local Ray instance (2 CPUs, no dashboard) serves the whole session: Ray starts slowly.
Scoring functions are defined inside a function so that Ray pickles them by value (Ray workers
cannot import this test module).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rgdm.rewards import Molecule, make_reward, reward_from_function

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_cluster():
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started_here:
        ray.shutdown()


def molecule(symbols: str, seed: int = 0) -> Molecule:
    names = tuple(symbols.split())
    return Molecule(names, np.random.default_rng(seed).normal(size=(len(names), 3)))


def make_faulty_score():
    def faulty_score(mol):
        import math
        import os
        import signal
        import time

        first = mol.symbols[0]
        if first == "He":
            raise ValueError("helium is not chemistry")
        if first == "Ne":
            return math.nan
        if first == "Kr":
            time.sleep(600)
        if first == "Xe":
            os.kill(os.getpid(), signal.SIGKILL)
        return float(mol.num_atoms)

    return faulty_score


def test_ray_backend_survives_every_fault(ray_cluster):
    reward = reward_from_function(make_faulty_score(), per_molecule=True, backend="ray", workers=2,
                                  timeout=20.0, penalty=-5.0)
    # Warm up: Ray workers start slowly, on a loaded machine past one timeout; a timed-out warm-up call
    # counts in the stats, so the faults below are checked as differences.
    for _ in range(5):
        if reward([molecule("C C")]).values.tolist() == [2.0]:
            break
    else:
        pytest.fail("the Ray workers never answered the warm-up call")
    before = reward.stats()
    batch = [molecule("C C C"), molecule("He C"), molecule("Ne C"), molecule("Kr C"), molecule("Xe C"),
             molecule("C C C C")]
    start = time.perf_counter()
    result = reward(batch)
    assert time.perf_counter() - start < 60
    assert result.values.tolist() == [3.0, -5.0, -5.0, -5.0, -5.0, 4.0]
    assert result.info["failures"] == {"error": 1, "nonfinite": 1, "timeout": 1, "crash": 1}
    stats = reward.stats()
    assert tuple(stats[key] - before[key] for key in ("errors", "nonfinite", "timeouts", "crashes")) == (1, 1, 1, 1)
    assert reward([molecule("C C C C C", seed=1)]).values.tolist() == [5.0]  # still serving


def test_ray_xtb_matches_the_process_pool(ray_cluster):
    from rgdm.data.qm9 import load_qm9

    batch = load_qm9("test").batch(torch.arange(20))
    on_ray = make_reward({"name": "xtb_gap", "backend": "ray", "workers": 2, "timeout": 60, "relax": "none"})
    in_pool = make_reward({"name": "xtb_gap", "backend": "process", "workers": 2, "timeout": 60, "relax": "none"})
    try:
        ray_result, pool_result = on_ray(batch), in_pool(batch)
    finally:
        in_pool.close()
    assert ray_result.valid.all() and pool_result.valid.all()
    torch.testing.assert_close(ray_result.values, pool_result.values, rtol=1e-6, atol=1e-3)
