"""Data-parallel training: two gloo processes on CPU follow the single-process trajectory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from conftest import free_port
from rgdm import distributed
from rgdm.config import RunConfig, from_dict
from rgdm.training.checkpoint import checkpoint_paths, load_checkpoint
from rgdm.training.pretrain import pretrain

TINY = {
    "name": "ddp",
    "data": {"dataset": "qm9", "remove_h": True, "max_train_molecules": 256},
    "model": {"hidden_nf": 16, "n_layers": 2},
    "diffusion": {"timesteps": 50},
    "train": {"steps": 4, "batch_size": 15, "log_every": 1, "val_batches": 0, "checkpoint_every": 2,
              "num_threads": 1},
}


def test_shard_bounds_cover_the_batch_without_overlap():
    for total, world in [(15, 2), (16, 4), (5, 3), (64, 1)]:
        bounds = [distributed.shard_bounds(total, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_two_processes_match_single_process(tmp_path, qm9_all):
    """torchrun with 2 ranks (odd global batch: uneven slices) == 1 process on the same global batch."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "rgdm", "pretrain", "--config", "tiny.yaml", "--device", "cpu"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("checkpoints in") == 1  # only rank 0 reports

    single_dir = tmp_path / "single"
    pretrain(from_dict(RunConfig, TINY).validate(), single_dir, progress=False, tensorboard=False)

    ddp_paths = checkpoint_paths(tmp_path / "runs" / "ddp" / "checkpoints")
    assert [p.name for p in ddp_paths] == ["step_00000002.pt", "step_00000004.pt"]
    ddp, single = load_checkpoint(ddp_paths[-1]), load_checkpoint(checkpoint_paths(single_dir / "checkpoints")[-1])
    assert ddp["step"] == single["step"] == 4
    assert len(ddp["rank_rngs"]) == 2
    for key in ("model", "ema"):
        for name, value in single[key].items():
            torch.testing.assert_close(ddp[key][name], value, rtol=0, atol=1e-5, msg=f"{key}.{name}")
    for index, slots in single["optimizer"]["state"].items():
        for slot, value in slots.items():
            torch.testing.assert_close(ddp["optimizer"]["state"][index][slot], value, rtol=1e-4, atol=1e-7)
    # Parameters really moved: the comparison is not between two untouched initialisations.
    first = load_checkpoint(ddp_paths[0])
    assert any(not torch.equal(first["model"][k], v) for k, v in ddp["model"].items())
    # One metrics log, written by rank 0, with the global loss of every step.
    rows = (tmp_path / "runs" / "ddp" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4

    # The data order and noise do not depend on the number of processes: a 2-process run resumed
    # by one process continues on the single-process trajectory.
    longer = from_dict(RunConfig, {**TINY, "train": {**TINY["train"], "steps": 6}}).validate()
    pretrain(longer, tmp_path / "runs" / "ddp", resume=True, progress=False, tensorboard=False)
    pretrain(longer, single_dir, resume=True, progress=False, tensorboard=False)
    ddp = load_checkpoint(checkpoint_paths(tmp_path / "runs" / "ddp" / "checkpoints")[-1])
    single = load_checkpoint(checkpoint_paths(single_dir / "checkpoints")[-1])
    assert ddp["step"] == single["step"] == 6
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, rtol=0, atol=1e-5, msg=f"model.{name}")


def _collectives_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    try:
        rows = torch.full((rank + 1, 2), float(rank))  # rank 0: 1 row, rank 1: 2 rows
        gathered = distributed.all_gather(rows)
        objects = distributed.all_gather_objects({"rank": rank})
        flag = distributed.broadcast_flag(rank == 0)  # rank 0 says True, rank 1 False: rank 0 wins
        model = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(float(rank))  # different on purpose: the broadcast must fix it
        distributed.broadcast_parameters(model)
        model(torch.ones(1, 2) * (rank + 1)).sum().backward()
        loss_sum = distributed.all_reduce_gradients(model, torch.tensor(float(rank + 1)))
        queue.put((rank, gathered.tolist(), objects, flag, model.weight.tolist(), model.weight.grad.tolist(),
                   loss_sum.item()))
    finally:
        distributed.shutdown()


def test_collectives_on_two_gloo_processes():
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    mp.start_processes(_collectives_worker, args=(2, port, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get(timeout=10) for _ in range(2))
    for rank, gathered, objects, flag, weight, grad, loss_sum in results:
        assert gathered == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], rank
        assert objects == [{"rank": 0}, {"rank": 1}]
        assert flag is True
        assert weight == [[0.0, 0.0]]
        assert grad == [[3.0, 3.0]]  # d/dw of w.x summed over ranks: 1 + 2
        assert loss_sum == 3.0  # the extra tensor rides along in the same collective


def test_without_a_launcher_everything_is_a_world_of_one(monkeypatch):
    for key in distributed.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert not distributed.init_from_env()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    x = torch.arange(3.0)
    assert torch.equal(distributed.all_gather(x), x)
    assert torch.equal(distributed.all_reduce_sum(x.clone()), x)


def test_device_choice_is_checked():
    from rgdm.config import ConfigError

    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="--device: 'gpu' is not one of"):
        distributed.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            distributed.resolve_device("cuda")


def test_finetune_cli_under_torchrun_matches_single_process(tmp_path, tiny_pretrained, monkeypatch):
    """`torchrun -m rgdm finetune` with 2 ranks == `rgdm finetune` in one process (uneven 3 + 2 split)."""
    from rgdm import cli

    args = ["finetune", "--from", str(tiny_pretrained), "--reward", "qed", "--name", "ft", "--compare", "0",
            "--set", "rgdm.batch_size=5", "--set", "rgdm.sampling_steps=6", "--set", "rgdm.num_candidates=4",
            "--set", "rgdm.explore_steps=1", "--set", "train.steps=2", "--set", "train.num_threads=1",
            "--set", "eval_samples=0"]
    (tmp_path / "ddp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "rgdm", *args]
    result = subprocess.run(command, cwd=tmp_path / "ddp", env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fine-tuned model in") == 1  # only rank 0 reports

    (tmp_path / "single").mkdir()
    monkeypatch.chdir(tmp_path / "single")
    assert cli.main(args) == 0
    ddp = load_checkpoint(checkpoint_paths(tmp_path / "ddp" / "runs" / "ft" / "checkpoints")[-1])
    single = load_checkpoint(checkpoint_paths(tmp_path / "single" / "runs" / "ft" / "checkpoints")[-1])
    assert ddp["step"] == single["step"] == 2
    assert ddp["objective"]["reward_calls"] == single["objective"]["reward_calls"] > 0
    assert len(ddp["rank_rngs"]) == 2
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, rtol=0, atol=1e-5, msg=f"model.{name}")
    assert any(not torch.equal(value, single["objective"]["reference"][name])
               for name, value in single["model"].items())
