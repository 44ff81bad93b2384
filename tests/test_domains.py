"""The domain registry (rgdm.domains): every domain is found by name, config and model, builds a
tiny model that samples in its state space, and runs through the shared pretrain / finetune /
evaluate commands (the analytic domain end to end, as the template of a new domain)."""

from __future__ import annotations

import json

import pytest
import torch

from rgdm.config import ConfigError, FinetuneConfig, RunConfig, from_dict
from rgdm.domains import (
    UnknownDomainError,
    available_domains,
    domain_of_config,
    domain_of_config_file,
    domain_of_model,
    get_domain,
)
from rgdm.domains.analytic import AnalyticFinetuneConfig, AnalyticRunConfig
from rgdm.training.shape_configs import ShapeFinetuneConfig, ShapeRunConfig


def test_every_registered_domain_is_found_by_name():
    assert available_domains() == ["molecules", "shapes", "analytic"]
    for name in available_domains():
        domain = get_domain(name)
        assert domain.name == name
        assert {"rgdm"} <= set(domain.methods)


def test_an_unknown_domain_name_lists_the_registered_ones():
    with pytest.raises(UnknownDomainError) as err:
        get_domain("shape")
    message = str(err.value)
    assert "'shape' is unknown (did you mean 'shapes'?)" in message
    assert "registered domains: molecules, shapes, analytic" in message
    assert isinstance(err.value, ConfigError)  # the command line reports it in one line, exit code 2


def test_configs_find_their_domain():
    assert domain_of_config(RunConfig()).name == "molecules"
    assert domain_of_config(FinetuneConfig()).name == "molecules"
    assert domain_of_config(ShapeRunConfig()).name == "shapes"
    assert domain_of_config(ShapeFinetuneConfig()).name == "shapes"
    assert domain_of_config(AnalyticRunConfig()).name == "analytic"
    assert domain_of_config(AnalyticFinetuneConfig()).name == "analytic"
    with pytest.raises(UnknownDomainError, match="config of no registered domain"):
        domain_of_config(object())


def test_config_files_and_models_find_their_domain(tmp_path):
    (tmp_path / "shapes.yaml").write_text("domain: shapes\nname: x\n")
    (tmp_path / "molecules.yaml").write_text("name: x\n")  # molecule configs carry no domain key
    (tmp_path / "unknown.yaml").write_text("domain: proteins\n")
    assert domain_of_config_file(tmp_path / "shapes.yaml").name == "shapes"
    assert domain_of_config_file(tmp_path / "molecules.yaml").name == "molecules"
    assert domain_of_config_file(tmp_path / "missing.yaml").name == "molecules"  # its loader reports the problem
    with pytest.raises(UnknownDomainError, match="registered domains"):
        domain_of_config_file(tmp_path / "unknown.yaml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("domain: analytic\n")
    assert domain_of_model(run).name == "analytic"
    assert domain_of_model("qm9-noh-small").name == "molecules"  # the shipped models are molecule models


def tiny_config(name: str):
    if name == "molecules":
        return from_dict(RunConfig, {"model": {"hidden_nf": 8, "n_layers": 1}, "diffusion": {"timesteps": 10},
                                     "data": {"max_train_molecules": 32}}).validate()
    if name == "shapes":
        return from_dict(ShapeRunConfig, {"data": {"n_points": 16, "classes": ["ring_knot", "blob"]},
                                          "model": {"width": 8, "n_blocks": 1, "time_dim": 4},
                                          "diffusion": {"timesteps": 10}}).validate()
    return AnalyticRunConfig(dim=3, timesteps=10).validate()


@pytest.mark.parametrize("name", ["molecules", "shapes", "analytic"])
def test_each_domain_builds_a_tiny_model_that_samples_in_its_state_space(name, single_thread, tmp_path):
    domain = get_domain(name)
    config = tiny_config(name)
    data = domain.load_data(config)
    torch.manual_seed(0)
    model = domain.build_model(config, data)
    samples = domain.sample(model, 4, num_steps=3, seed=0)
    assert samples.x.shape[0] == 4 and torch.isfinite(samples.x).all()
    if name == "molecules":  # zero centre of mass over the real atoms; positions then one-hot and charge
        mask = samples.node_mask
        assert samples.x.shape[-1] == 3 + model.n_features and mask.shape[:2] == samples.x.shape[:2]
        centre = (samples.x[..., :3] * mask).sum(1) / mask.sum(1)
        assert centre.abs().max() < 1e-4
    elif name == "shapes":  # fixed-size clouds with zero mean
        assert samples.x.shape == (4, 16, 3)
        assert samples.x.mean(dim=1).abs().max() < 1e-5
    else:  # vectors of R^d, no centre to remove
        assert samples.x.shape == (4, 3)
    metrics = domain.metrics(model, samples)
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    assert domain.render(model, samples, tmp_path / "samples.png").stat().st_size > 0
    # the objective of pre-training gives a finite loss on this model
    loss, _ = domain.pretrain_objective(config, data, "cpu").loss(model, 0)
    assert torch.isfinite(loss)
    # a reverse step taken with score=False (sampling, look-aheads) is the same step without its log-prob
    z = model.sample_prior(tuple(samples.x.shape), samples.node_mask, torch.Generator().manual_seed(1))
    t, s = torch.full((4,), model.timesteps), torch.full((4,), model.timesteps // 2)
    noise = model.noise(z, samples.node_mask, torch.Generator().manual_seed(2))
    scored, unscored = (model.step(z, t, s, samples.node_mask, noise=noise, score=score) for score in (True, False))
    assert torch.equal(scored.sample, unscored.sample) and torch.equal(scored.mean, unscored.mean)
    assert unscored.log_prob is None and torch.isfinite(scored.log_prob).all()


def test_the_analytic_domain_runs_through_the_shared_commands(tmp_path, monkeypatch, capsys, single_thread):
    """pretrain -> finetune -> evaluate of the one-module domain, through `rgdm` itself."""
    from rgdm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "analytic.yaml").write_text(
        "name: analytic\ndomain: analytic\ndim: 2\ntimesteps: 20\nsampling_steps: 5\n"
        "train: {steps: 2, batch_size: 16, log_every: 1, val_every: 2, checkpoint_every: 2}\n")
    assert main(["pretrain", "--config", "analytic.yaml", "--device", "cpu"]) == 0
    assert (tmp_path / "runs/analytic/checkpoints").is_dir()
    argv = ["finetune", "--from", "runs/analytic", "--reward", "quadratic", "--device", "cpu",
            "--set", "train.steps=2", "--set", "rgdm.batch_size=4", "--set", "rgdm.sampling_steps=5"]
    assert main(argv) == 0
    run = tmp_path / "runs/analytic-rgdm-quadratic"
    assert "eval_exact_mean_norm" in (run / "metrics.csv").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--n", "8"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows[str(run)]) >= {"sample_mean_norm", "exact_mean_norm", "exact_variance"}
    # an option the domain has no use for is refused in one line
    assert main(["finetune", "--from", "runs/analytic", "--target", "3"]) == 2
    assert "--target: not an option of analytic models" in capsys.readouterr().err
