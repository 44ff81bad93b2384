"""Devices: every command takes --device, tensors and random generators follow the model's device,
checkpoints load across devices, and reward scoring overlaps sampling without changing results.

No GPU is needed: CUDA is simulated where a check only needs to know what *would* happen on it
(torch.cuda.is_available patched, a generator factory that records the devices it is asked for).
"""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

import pytest
import torch

from rgdm import cli, distributed
from rgdm.training import checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "rgdm"

# One invocation per command that runs a model; `--device cuda` must be refused before any work.
COMMANDS = [
    ["pretrain", "--config", "configs/qm9_noh_small.yaml"],
    ["sample", "qm9-noh-small"],
    ["evaluate", "qm9-noh-small"],
    ["finetune", "--from", "qm9-noh-small"],
    ["demo"],
    ["train-regressor"],
    ["shapes", "pretrain", "--config", "configs/shapes_small.yaml"],
    ["shapes", "train-classifier"],
    ["shapes", "finetune", "--from", "runs/no-such-shape-run"],
    ["shapes", "evaluate", "runs/no-such-shape-run"],
    ["benchmark", "conditional"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_cuda_without_a_gpu_is_one_line_and_exit_code_2(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the configs/ paths above
    before = set(Path("runs").glob("*")) if Path("runs").is_dir() else set()
    assert cli.main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda: no CUDA device is available (use --device cpu or auto)"]
    after = set(Path("runs").glob("*")) if Path("runs").is_dir() else set()
    assert after == before  # refused before any run directory was created


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    assert distributed.resolve_device("cpu") == torch.device("cpu")


def test_cpu_generators_draw_exactly_what_they_always_drew():
    """CPU runs are unchanged: generator_on(cpu, seed) is torch.Generator().manual_seed(seed), and
    the device= arguments now given to the draws are the ones torch used by default."""
    for draw in (lambda g: torch.randn(3, 4, generator=g),
                 lambda g: torch.randint(0, 50, (7,), generator=g, device=g.device),
                 lambda g: torch.randperm(9, generator=g, device=g.device),
                 lambda g: torch.rand(2, 5, generator=g, device=g.device),
                 lambda g: torch.multinomial(torch.tensor([0.2, 0.5, 0.3]), 6, replacement=True, generator=g)):
        legacy = draw(torch.Generator().manual_seed(123))
        assert torch.equal(draw(distributed.generator_on("cpu", 123)), legacy)
    plain = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(5), device="cpu"), plain)


def test_bf16_network_changes_nothing_on_the_cpu(tiny_pretrained):
    from rgdm.runs import load_model

    model = load_model(str(tiny_pretrained), device="cpu").model
    assert model.bf16_network is False  # set only for CUDA
    counts = model.sample_node_counts(3, torch.Generator().manual_seed(0))
    mask = model.mask_from_counts(counts)
    z = model.noise(torch.empty(3, mask.shape[1], 3 + model.n_features), mask, torch.Generator().manual_seed(1))
    t = torch.full((3,), 20, dtype=torch.long)
    plain = model.predict_eps(z, t, mask)
    model.bf16_network = True
    assert torch.equal(model.predict_eps(z, t, mask), plain)
    assert model.predict_eps(z, t, mask).dtype == torch.float32


def test_bf16_autocast_is_chosen_for_cuda_tensors_only(tiny_pretrained):
    from rgdm.runs import load_model

    model = load_model(str(tiny_pretrained)).model
    cuda_like = torch.empty(0, device="meta")  # a tensor whose device type is checked, never computed on
    model.bf16_network = True
    assert not isinstance(model.network_precision(cuda_like), torch.autocast)
    monkey = type("CudaLike", (), {"device": torch.device("cuda", 0)})()
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        context = model.network_precision(monkey)
    assert isinstance(context, torch.autocast)
    model.bf16_network = False
    assert not isinstance(model.network_precision(monkey), torch.autocast)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("method", ["rgdm", "ddpo", "rwr"])
def test_objectives_draw_from_generators_on_the_models_device(tmp_path, tiny_pretrained, monkeypatch, method):
    """Every fine-tuning method builds its generators with generator_on(the model's device); the
    recorded devices are the model's (on a GPU machine that is cuda, and the same code path runs)."""
    from rgdm.training.finetune import finetune
    from test_finetune import tiny_finetune_config

    asked: list[torch.device] = []
    original = distributed.generator_on

    def recording(device, seed):
        asked.append(torch.device(device))
        return original(device, seed)

    monkeypatch.setattr(distributed, "generator_on", recording)
    trainer = finetune(tiny_finetune_config(tiny_pretrained, 1, method), tmp_path / "run", progress=False,
                       tensorboard=False, device="cpu")
    model_device = distributed.module_device(trainer.model)
    assert asked and all(device == model_device for device in asked)


def test_no_plain_cpu_generators_left_where_models_sample():
    """Where noise feeds a model, generators come from generator_on (a plain torch.Generator() would
    draw on the CPU and fail against a CUDA model)."""
    files = ["training/rgdm.py", "training/ddpo.py", "training/rwr.py",
             "eval/sampling.py", "eval/compare.py"]
    for name in files:
        text = (SRC / name).read_text()
        assert "torch.Generator().manual_seed(self.seed * 1_000_003 + step)" not in text, name
        assert "generator_on(" in text, name


def test_every_torch_load_maps_to_the_cpu():
    """A checkpoint saved on a GPU must load on a machine without one: every torch.load in the package
    passes map_location."""
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls.append((path.name, {kw.arg for kw in node.keywords}))
    assert calls
    assert all("map_location" in keywords for _, keywords in calls), calls


def test_checkpoint_of_another_device_loads_onto_the_cpu(tmp_path, monkeypatch):
    """load_checkpoint asks torch.load for map_location='cpu' (what turns CUDA tensors into CPU ones);
    the saved tensors come back on the CPU, with CUDA RNG states restored only where they fit."""
    path = checkpoint.save_checkpoint({"model": {"w": torch.arange(4.0)}, "step": 3}, tmp_path / "step_3.pt")
    seen = {}
    real_load = torch.load

    def spying_load(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    state = checkpoint.load_checkpoint(path)
    assert seen["map_location"] == "cpu"
    assert state["model"]["w"].device.type == "cpu" and torch.equal(state["model"]["w"], torch.arange(4.0))


def test_cuda_rng_states_are_saved_and_restored_when_cuda_is_in_use(monkeypatch):
    fake_states = [torch.arange(8, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: fake_states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    state = checkpoint.rng_state()
    assert state["cuda"] is fake_states
    checkpoint.set_rng_state(state)
    assert restored == [fake_states]
    # Resumed on a machine without CUDA: the CPU streams continue, the CUDA states are left alone.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint.set_rng_state(state)
    assert len(restored) == 1


def test_cpu_checkpoints_hold_no_cuda_state(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in checkpoint.rng_state()


def test_ddpo_replay_batch_is_rebuilt_on_the_requested_device():
    from rgdm.training.ddpo import ReplayBatch
    from rgdm.training.rollouts import Trajectories
    from rgdm.training.tasks import Conditions

    traj = Trajectories(Conditions((2, 3)), [2, 1, 0], torch.zeros(3, 2, 3), torch.zeros(2, 2), torch.ones(2, 3))
    batch = ReplayBatch(traj, torch.tensor([0.5, -0.5]), 4, {"reward_mean": 1.0})
    moved = []
    original = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "to", recording_to)
        rebuilt = ReplayBatch.from_state_dict(batch.state_dict(), "cpu")
    assert moved and all(str(device) == "cpu" for device in moved)
    assert torch.equal(rebuilt.advantages, batch.advantages) and rebuilt.collected_at == 4


# ------------------------------------------------------------------------------------------------- #
# Reward scoring overlapped with sampling.


def test_scoring_pipeline_keeps_order_and_overlaps_the_caller():
    from rgdm.rewards.pipeline import ScoringPipeline

    next_batch_started = threading.Event()
    overlapped = []

    def score(item: int) -> int:
        if item == 0:  # scoring batch 0 sees the caller start on batch 1: the two ran at the same time
            overlapped.append(next_batch_started.wait(timeout=10))
        return item * item

    with ScoringPipeline(score) as pipeline:
        for item in range(4):
            pipeline.submit(item)
            if item == 0:
                next_batch_started.set()  # "sampling batch 1" begins while batch 0 is being scored
        assert pipeline.results() == [0, 1, 4, 9]
    assert overlapped == [True]


def test_scoring_pipeline_bounds_the_queue_and_reports_errors():
    from rgdm.rewards.pipeline import ScoringPipeline

    running = []

    def score(item: int) -> int:
        running.append(item)
        time.sleep(0.01)
        if item == 2:
            raise RuntimeError("reward failed")
        return item

    with ScoringPipeline(score, depth=1) as pipeline:
        pipeline.submit(0)
        pipeline.submit(1)  # waits for 0: at most one batch waits unscored
        assert pipeline._done == [0]
        pipeline.submit(2)
        with pytest.raises(RuntimeError, match="reward failed"):
            pipeline.results()
    with pytest.raises(ValueError):
        ScoringPipeline(score, depth=0)


def heavy_atoms(molecules):
    """A module-level reward (picklable): the number of non-hydrogen atoms."""
    return [float(sum(symbol != "H" for symbol in m.symbols)) for m in molecules]


def test_pipelined_sample_scored_equals_the_serial_one(tiny_pretrained):
    """Overlapping scoring with sampling changes no number: same molecules, rewards and metrics."""
    from rgdm.eval.compare import sample_scored
    from rgdm.rewards import reward_from_function
    from rgdm.runs import load_model
    from rgdm.training.tasks import MoleculeTask

    model = load_model(str(tiny_pretrained)).model
    with reward_from_function(heavy_atoms, backend="inline") as reward:
        task = MoleculeTask(model, reward)
        serial = sample_scored(model, task, 6, 5, seed=3, batch_size=2, progress=False, pipelined=False)
        pipelined = sample_scored(model, task, 6, 5, seed=3, batch_size=2, progress=False, pipelined=True)
    assert (serial["reward"] == pipelined["reward"]).all()
    assert serial["metrics"] == pipelined["metrics"]
    for (sym_a, pos_a), (sym_b, pos_b) in zip(serial["molecules"], pipelined["molecules"], strict=True):
        assert sym_a == sym_b and torch.equal(pos_a, pos_b)


def test_sample_command_runs_on_the_cpu(tmp_path, tiny_pretrained):
    out = tmp_path / "mols.xyz"
    assert cli.main(["sample", str(tiny_pretrained), "--n", "2", "--steps", "3", "--device", "cpu",
                     "--out", str(out)]) == 0
    assert out.read_text().count("\n") > 2
