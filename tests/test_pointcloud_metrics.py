"""Point-cloud metrics on cases with known answers (PointFlow's definitions, exact EMD)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rgdm.eval.pointclouds import (
    chamfer_distance,
    coverage,
    earth_movers_distance,
    evaluate_point_clouds,
    minimum_matching_distance,
    one_nn_accuracy,
    pairwise_chamfer,
    pairwise_emd,
)


def brute_force_chamfer(x: np.ndarray, y: np.ndarray) -> float:
    def one_way(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean([min(float(np.sum((p - q) ** 2)) for q in b) for p in a]))

    return one_way(x, y) + one_way(y, x)


def brute_force_emd(x: np.ndarray, y: np.ndarray) -> float:
    """Mean matched Euclidean distance, minimised over every permutation (tiny clouds only)."""
    return min(float(np.mean(np.linalg.norm(x - y[list(p)], axis=1)))
               for p in itertools.permutations(range(len(y))))


def gaussian_clouds(count: int, points: int, seed: int) -> torch.Tensor:
    return torch.randn(count, points, 3, generator=torch.Generator().manual_seed(seed))


def sphere_clouds(count: int, points: int, seed: int) -> torch.Tensor:
    clouds = gaussian_clouds(count, points, seed)
    return clouds / clouds.norm(dim=-1, keepdim=True)


def plane_clouds(count: int, points: int, seed: int) -> torch.Tensor:
    clouds = torch.rand(count, points, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    clouds[..., 2] = 0.0
    return clouds


# ----------------------------------------------------------------------------- Chamfer
def test_chamfer_matches_brute_force_numpy_on_unequal_sizes():
    rng = np.random.default_rng(3)
    for points_x, points_y in [(17, 23), (30, 30), (5, 40)]:
        x, y = rng.normal(size=(points_x, 3)), rng.normal(size=(points_y, 3))
        fast = chamfer_distance(torch.tensor(x[None]), torch.tensor(y[None]))
        assert fast.item() == pytest.approx(brute_force_chamfer(x, y), rel=1e-10)


def test_chamfer_of_a_cloud_with_itself_is_zero_and_is_symmetric():
    x, y = gaussian_clouds(4, 100, 0), gaussian_clouds(4, 80, 1)
    assert torch.all(chamfer_distance(x, x) == 0)
    assert torch.allclose(chamfer_distance(x, y), chamfer_distance(y, x))
    assert torch.all(chamfer_distance(x, y) > 0)


def test_chamfer_of_a_permuted_cloud_is_zero_and_of_a_translation_is_positive():
    x = gaussian_clouds(1, 50, 2)
    permuted = x[:, torch.randperm(50, generator=torch.Generator().manual_seed(0))]
    assert chamfer_distance(x, permuted).item() == 0
    assert chamfer_distance(x, x + torch.tensor([0.3, 0.0, 0.0])).item() > 0


def test_pairwise_chamfer_equals_paired_calls():
    xs, ys = gaussian_clouds(5, 40, 4), gaussian_clouds(3, 30, 5)
    matrix = pairwise_chamfer(xs, ys, batch_size=2)
    assert matrix.shape == (5, 3)
    for i, j in itertools.product(range(5), range(3)):
        assert matrix[i, j].item() == pytest.approx(chamfer_distance(xs[i:i + 1], ys[j:j + 1]).item())


# ----------------------------------------------------------------------------- EMD
def test_emd_matches_brute_force_over_all_permutations():
    rng = np.random.default_rng(7)
    for _ in range(3):
        x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
        exact = earth_movers_distance(torch.tensor(x[None]), torch.tensor(y[None])).item()
        assert exact == pytest.approx(brute_force_emd(x, y), rel=1e-12)


def test_emd_of_a_translated_cloud_is_the_translation_length():
    x = gaussian_clouds(1, 64, 8).double()
    shift = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)  # length 1.3
    assert earth_movers_distance(x, x + shift).item() == pytest.approx(1.3, rel=1e-9)


def test_emd_is_zero_for_permutation_and_symmetric():
    x, y = gaussian_clouds(2, 40, 9), gaussian_clouds(2, 40, 10)
    permuted = x[:, torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    assert torch.allclose(earth_movers_distance(x, permuted), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(earth_movers_distance(x, y), earth_movers_distance(y, x))


def test_emd_is_at_least_the_chamfer_one_way_distance():
    # Every matched partner is at least as far as the nearest neighbour.
    x, y = gaussian_clouds(3, 30, 11), gaussian_clouds(3, 30, 12)
    nearest = torch.cdist(x.double(), y.double()).amin(dim=2).mean(dim=1)
    assert torch.all(earth_movers_distance(x, y) >= nearest - 1e-12)


def test_emd_rejects_unequal_cloud_sizes():
    with pytest.raises(ValueError, match="equal shape"):
        earth_movers_distance(gaussian_clouds(1, 10, 0), gaussian_clouds(1, 12, 0))


def test_symmetric_pairwise_emd_equals_the_full_matrix():
    xs = gaussian_clouds(5, 20, 13)
    full = pairwise_emd(xs, xs.clone())
    assert torch.allclose(pairwise_emd(xs), full, atol=1e-12)
    assert torch.all(full.diagonal() < 1e-12)


# ----------------------------------------------------------------------------- MMD / COV / 1-NNA
def test_mmd_and_coverage_on_a_hand_made_matrix():
    # Two generated clouds, three references: both generated pick reference 0.
    distances = torch.tensor([[0.0, 4.0, 9.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    assert minimum_matching_distance(distances) == pytest.approx((0.0 + 2.0 + 3.0) / 3)
    assert coverage(distances) == pytest.approx(1 / 3)


@pytest.mark.parametrize("metric", ["cd", "emd"])
def test_exact_copies_give_mmd_zero_full_coverage_and_one_nna_zero(metric):
    reference = gaussian_clouds(12, 24, 14)
    results = evaluate_point_clouds(reference.clone(), reference, metrics=(metric,))
    name = metric.upper()
    assert results[f"MMD-{name}"] == pytest.approx(0.0, abs=1e-12)
    assert results[f"COV-{name}"] == 1.0
    # Each cloud's nearest neighbour is its twin in the other set: the memorisation signature.
    assert results[f"1-NNA-{name}"] == 0.0


def test_one_nna_ties_score_half():
    # Six copies of one cloud against themselves: every distance is 0, every neighbour a tie.
    clouds = gaussian_clouds(1, 16, 15).expand(6, -1, -1)
    results = evaluate_point_clouds(clouds, clouds, metrics=("cd",))
    assert results["1-NNA-CD"] == 0.5
    zeros = torch.zeros(6, 6, dtype=torch.float64)
    assert one_nn_accuracy(zeros, zeros, zeros) == 0.5


def test_independent_samples_of_one_distribution_give_one_nna_near_half():
    generated, reference = sphere_clouds(80, 32, 16), sphere_clouds(80, 32, 17)
    results = evaluate_point_clouds(generated, reference, metrics=("cd",))
    assert 0.4 < results["1-NNA-CD"] < 0.6
    assert results["COV-CD"] > 0.4


@pytest.mark.parametrize("metric", ["cd", "emd"])
def test_well_separated_sets_give_one_nna_one(metric):
    # Spheres against flat squares: different shapes survive the per-cloud normalisation.
    spheres, planes = sphere_clouds(10, 32, 18), plane_clouds(10, 32, 19)
    results = evaluate_point_clouds(spheres, planes, metrics=(metric,))
    assert results[f"1-NNA-{metric.upper()}"] == 1.0
    within = evaluate_point_clouds(sphere_clouds(10, 32, 20), spheres, metrics=(metric,))
    assert results[f"MMD-{metric.upper()}"] > within[f"MMD-{metric.upper()}"]


def test_evaluation_normalises_scale_and_position_as_luo_and_hu():
    reference = sphere_clouds(8, 32, 21)
    moved = reference * 7.0 + torch.tensor([5.0, -3.0, 2.0])
    normalised = evaluate_point_clouds(moved, reference, metrics=("cd",))
    assert normalised["MMD-CD"] == pytest.approx(0.0, abs=1e-10)
    raw = evaluate_point_clouds(moved, reference, metrics=("cd",), normalize=None)
    assert raw["MMD-CD"] > 10 and raw["1-NNA-CD"] == 1.0


def test_evaluation_rejects_unknown_metric_and_bad_shapes():
    clouds = gaussian_clouds(3, 8, 0)
    with pytest.raises(ValueError, match="unknown point-cloud metrics"):
        evaluate_point_clouds(clouds, clouds, metrics=("jsd",))
    with pytest.raises(ValueError, match=r"\[M, P, 3\]"):
        evaluate_point_clouds(clouds[..., :2], clouds)


def test_one_nna_needs_two_clouds_per_set():
    one = torch.zeros(1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least two"):
        one_nn_accuracy(one, torch.zeros(1, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64))


def test_metrics_tell_shape_classes_apart_on_the_embedded_set():
    from rgdm.data.shapes import load_shapes

    test = load_shapes("test", n_points=128)
    blobs, knots = test.of_class("blob").points, test.of_class("ring_knot").points
    between = evaluate_point_clouds(blobs[:20], knots[:20], metrics=("cd",))
    within = evaluate_point_clouds(blobs[:20], blobs[20:40], metrics=("cd",))
    assert all(math.isfinite(v) for v in between.values())
    assert between["MMD-CD"] > within["MMD-CD"]
    assert between["1-NNA-CD"] > 0.8
    assert within["1-NNA-CD"] < 0.7
