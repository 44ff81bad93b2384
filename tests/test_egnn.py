"""Symmetry and masking properties of the EGNN dynamics, checked in float64."""

import pytest
import torch

from rgdm.diffusion.com import assert_mean_zero_with_mask, remove_mean_with_mask
from rgdm.models.egnn import EdgeIndex, EGNNDynamics, _pair_linear


def random_orthogonal(generator, reflect: bool) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    if reflect:
        q[:, 0] = -q[:, 0]
    return q


@pytest.fixture
def setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = EGNNDynamics(in_node_nf=5, context_nf=2, hidden_nf=16, n_layers=3).double()
    counts = torch.tensor([7, 4, 9])
    mask = (torch.arange(9)[None] < counts[:, None]).double().unsqueeze(-1)
    x = remove_mean_with_mask(torch.randn(3, 9, 3, dtype=torch.float64, generator=g), mask)
    h = torch.randn(3, 9, 5, dtype=torch.float64, generator=g) * mask
    t = torch.rand(3, dtype=torch.float64, generator=g)
    ctx = torch.randn(3, 2, dtype=torch.float64, generator=g)
    return model, x, h, t, mask, ctx, g


@pytest.mark.parametrize("grad", [True, False], ids=["training", "sampling"])
@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_reflection_translation(setup, reflect, grad):
    """Both per-edge code paths (with gradients: gathers; without: a weighted embedding bag)."""
    model, x, h, t, mask, ctx, g = setup
    q = random_orthogonal(g, reflect)
    shift = torch.randn(1, 1, 3, dtype=torch.float64, generator=g)
    with torch.set_grad_enabled(grad):
        _check_equivariance(model, x, h, t, mask, ctx, q, shift)


def _check_equivariance(model, x, h, t, mask, ctx, q, shift):
    eps_x, eps_h = model(x, h, t, mask, ctx)
    # Translating the input only changes the zero-CoM projection, which the output removes.
    eps_x2, eps_h2 = model((x @ q.T + shift) * mask, h, t, mask, ctx)
    assert torch.allclose(eps_x2, eps_x @ q.T, atol=1e-10)
    assert torch.allclose(eps_h2, eps_h, atol=1e-10)
    assert eps_x.abs().max() > 1e-3  # the test is not vacuous


def test_permutation_equivariance(setup):
    model, x, h, t, mask, ctx, g = setup
    perm = torch.randperm(9, generator=g)
    eps_x, eps_h = model(x, h, t, mask, ctx)
    eps_xp, eps_hp = model(x[:, perm], h[:, perm], t, mask[:, perm], ctx)
    assert torch.allclose(eps_xp, eps_x[:, perm], atol=1e-10)
    assert torch.allclose(eps_hp, eps_h[:, perm], atol=1e-10)


def test_masked_nodes_have_no_influence(setup):
    model, x, h, t, mask, ctx, g = setup
    eps_x, eps_h = model(x, h, t, mask, ctx)
    noise = torch.randn(x.shape, dtype=torch.float64, generator=g) * (1 - mask)
    eps_x2, eps_h2 = model(x + noise, h + noise.repeat(1, 1, 2)[..., :5] * (1 - mask), t, mask, ctx)
    assert torch.allclose(eps_x2, eps_x, atol=1e-10)
    assert torch.allclose(eps_h2, eps_h, atol=1e-10)
    assert eps_x[(1 - mask).bool().expand_as(eps_x)].abs().max() == 0
    # Extra padding changes nothing either.
    pad = lambda v: torch.cat([v, torch.zeros(v.shape[0], 3, v.shape[2], dtype=v.dtype)], dim=1)  # noqa: E731
    eps_x3, _ = model(pad(x), pad(h), t, pad(mask), ctx)
    assert torch.allclose(eps_x3[:, :9], eps_x, atol=1e-10)


def test_zero_com_kept(setup):
    model, x, h, t, mask, ctx, _ = setup
    eps_x, _ = model(x, h, t, mask, ctx)
    assert_mean_zero_with_mask(eps_x, mask, tol=1e-10)


def test_context_is_required_and_used(setup):
    model, x, h, t, mask, ctx, _ = setup
    with pytest.raises(ValueError, match="conditional"):
        model(x, h, t, mask, None)
    a, _ = model(x, h, t, mask, ctx)
    b, _ = model(x, h, t, mask, ctx + 1.0)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "sampling"])
def test_pair_linear_is_the_linear_layer_on_concatenated_edge_inputs(grad):
    """The node-side factorisation equals ``layer(cat[h_i, h_j, a_ij])`` computed edge by edge."""
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1])[:, None]).double().unsqueeze(-1)
    edges = EdgeIndex(mask, edge_nf=2)
    h = torch.randn(15, 8, dtype=torch.float64, generator=g)
    edge_attr = torch.randn(edges.num_edges, 2, dtype=torch.float64, generator=g)
    layer = torch.nn.Linear(2 * 8 + 2, 6).double()
    literal = layer(torch.cat([h[edges.row], h[edges.col], edge_attr], dim=-1))
    with torch.set_grad_enabled(grad):
        factorised = _pair_linear(layer, h, edges, edge_attr)
    assert edges.num_edges == 5 * 4 + 3 * 2  # real ordered pairs i != j; the 1-atom molecule has none
    torch.testing.assert_close(factorised, literal, rtol=1e-12, atol=1e-12)
