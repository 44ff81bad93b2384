"""Point-cloud generation metrics: Chamfer, EMD, and MMD / COV / 1-NNA between two sets of clouds.

Definitions follow PointFlow (Yang et al. 2019), whose code Luo & Hu (2021) reuse:

* **Chamfer distance** CD(X, Y) = mean_x min_y |x - y|^2 + mean_y min_x |x - y|^2
  (squared distances, each direction averaged, the two directions summed).
* **Earth mover's distance** EMD(X, Y) = min over bijections phi of mean_x |x - phi(x)|
  (Euclidean, not squared), for clouds of equal size. PointFlow approximates it with an auction
  algorithm on the GPU; we solve the assignment *exactly* with scipy's ``linear_sum_assignment``,
  which costs O(P^3) per pair: fine for a few hundred points, slow for 2048 (subsample first).
  With this definition EMD(X, X + t) = |t| exactly (by the triangle inequality no matching beats
  the identity), which the tests check.
* **MMD** (minimum matching distance): mean over reference clouds of the distance to the nearest
  generated cloud. Lower is better; 0 when every reference cloud is reproduced.
* **COV** (coverage): fraction of reference clouds that are the nearest reference of at least one
  generated cloud. Higher is better; at most min(1, |S| / |R|).
* **1-NNA**: leave-one-out accuracy of a 1-nearest-neighbour classifier telling generated from
  reference clouds in the union of both sets. 0.5 is ideal (the sets are indistinguishable); 1.0
  means they are separated; *below* 0.5 means generated clouds sit right next to reference ones
  (exact copies give 0.0: memorisation). Ties break fairly: a cloud whose nearest same-set and
  nearest other-set neighbours are equally far scores 0.5 (the expected value of a coin flip),
  so a set of identical clouds compared with itself scores exactly 0.5.

Before evaluation both sets are normalised per cloud as Luo & Hu's ``test_gen.py`` does
(default ``"shape_bbox"``: bounding-box centre at the origin, longest half-side 1).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rgdm.data.shapes import normalize_point_clouds

METRICS = ("cd", "emd")


def _check_clouds(name: str, clouds: Tensor) -> None:
    if clouds.dim() != 3 or clouds.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [M, P, 3], got {list(clouds.shape)}")


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """[B, P, Q] squared Euclidean distances |x|^2 + |y|^2 - 2 x.y, in float64.

    float64 keeps the cancellation error near 1e-15, so CD(X, X) is zero to machine precision.
    """
    x, y = x.double(), y.double()
    squared = x.square().sum(-1, keepdim=True) + y.square().sum(-1).unsqueeze(1) - 2 * x @ y.transpose(1, 2)
    return squared.clamp_min_(0.0)


# ----------------------------------------------------------------------------- per-pair distances
def chamfer_distance(x: Tensor, y: Tensor) -> Tensor:
    """CD between paired clouds ``x`` [B, P, 3] and ``y`` [B, Q, 3]; returns [B] float64."""
    _check_clouds("x", x)
    _check_clouds("y", y)
    squared = _squared_distances(x, y)
    return squared.amin(dim=2).mean(dim=1) + squared.amin(dim=1).mean(dim=1)


def earth_movers_distance(x: Tensor, y: Tensor) -> Tensor:
    """Exact EMD between paired clouds ``x``, ``y`` [B, P, 3] of equal size; returns [B] float64."""
    _check_clouds("x", x)
    _check_clouds("y", y)
    if x.shape != y.shape:
        raise ValueError(f"EMD needs clouds of equal shape, got {list(x.shape)} and {list(y.shape)}")
    costs = _squared_distances(x, y).sqrt().cpu().numpy()
    values = []
    for cost in costs:
        rows, cols = linear_sum_assignment(cost)
        values.append(cost[rows, cols].mean())
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- pairwise matrices
def pairwise_chamfer(xs: Tensor, ys: Tensor, batch_size: int = 64) -> Tensor:
    """[N, M] CD between every cloud of ``xs`` [N, P, 3] and every cloud of ``ys`` [M, Q, 3]."""
    _check_clouds("xs", xs)
    _check_clouds("ys", ys)
    rows = []
    for x in xs:
        row = [chamfer_distance(x.expand(len(chunk), -1, -1), chunk) for chunk in ys.split(batch_size)]
        rows.append(torch.cat(row))
    return torch.stack(rows)


def pairwise_emd(xs: Tensor, ys: Tensor | None = None) -> Tensor:
    """[N, M] exact EMD between clouds of ``xs`` and ``ys`` (``None``: ``xs`` with itself).

    The self-comparison solves only the upper triangle, since EMD is symmetric and zero on the
    diagonal.
    """
    _check_clouds("xs", xs)
    symmetric = ys is None
    ys = xs if ys is None else ys
    _check_clouds("ys", ys)
    matrix = torch.zeros(len(xs), len(ys), dtype=torch.float64)
    for i in range(len(xs)):
        start = i + 1 if symmetric else 0
        if start < len(ys):
            matrix[i, start:] = earth_movers_distance(xs[i].expand(len(ys) - start, -1, -1), ys[start:])
    if symmetric:
        matrix = matrix + matrix.T
    return matrix


def pairwise_distances(xs: Tensor, ys: Tensor | None, metric: str, batch_size: int = 64) -> Tensor:
    if metric == "cd":
        return pairwise_chamfer(xs, xs if ys is None else ys, batch_size)
    if metric == "emd":
        return pairwise_emd(xs, ys)
    raise ValueError(f"unknown point-cloud metric {metric!r}; choose from {METRICS}")


# ----------------------------------------------------------------------------- set-level metrics
def minimum_matching_distance(generated_to_reference: Tensor) -> float:
    """MMD from the [S, R] distance matrix: mean over reference clouds of the nearest generated."""
    return float(generated_to_reference.amin(dim=0).mean())


def coverage(generated_to_reference: Tensor) -> float:
    """COV from the [S, R] distance matrix: share of reference clouds matched by some generated one."""
    nearest_reference = generated_to_reference.argmin(dim=1)
    return len(torch.unique(nearest_reference)) / generated_to_reference.shape[1]


def one_nn_accuracy(generated_to_generated: Tensor, generated_to_reference: Tensor,
                    reference_to_reference: Tensor) -> float:
    """Leave-one-out 1-NN accuracy over the union of both sets; ties score 0.5 (module docstring)."""
    n_generated, n_reference = generated_to_reference.shape
    if n_generated < 2 or n_reference < 2:
        raise ValueError("1-NNA needs at least two clouds in each set")
    inf = torch.tensor(float("inf"), dtype=generated_to_generated.dtype)
    own_generated = generated_to_generated.diagonal_scatter(inf.expand(n_generated))
    own_reference = reference_to_reference.diagonal_scatter(inf.expand(n_reference))
    scores = torch.cat([
        _nearest_neighbour_scores(own_generated.amin(dim=1), generated_to_reference.amin(dim=1)),
        _nearest_neighbour_scores(own_reference.amin(dim=1), generated_to_reference.amin(dim=0)),
    ])
    return float(scores.mean())


def _nearest_neighbour_scores(nearest_same: Tensor, nearest_other: Tensor) -> Tensor:
    """1 where the own set is strictly nearer (classified right), 0 where the other is, 0.5 on ties."""
    return (nearest_same < nearest_other).double() + 0.5 * (nearest_same == nearest_other).double()


def evaluate_point_clouds(generated: Tensor, reference: Tensor, metrics: tuple[str, ...] = METRICS,
                          normalize: str | None = "shape_bbox", batch_size: int = 64) -> dict[str, float]:
    """MMD, COV and 1-NNA of ``generated`` [S, P, 3] against ``reference`` [R, P, 3].

    Returns ``{"MMD-CD", "COV-CD", "1-NNA-CD", "MMD-EMD", "COV-EMD", "1-NNA-EMD"}`` (for the
    requested ``metrics``); COV and 1-NNA are fractions in [0, 1].
    """
    _check_clouds("generated", generated)
    _check_clouds("reference", reference)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown point-cloud metrics {unknown}; choose from {METRICS}")
    generated = normalize_point_clouds(generated.float(), normalize)
    reference = normalize_point_clouds(reference.float(), normalize)
    results: dict[str, float] = {}
    for metric in metrics:
        name = metric.upper()
        cross = pairwise_distances(generated, reference, metric, batch_size)
        within_generated = pairwise_distances(generated, None, metric, batch_size)
        within_reference = pairwise_distances(reference, None, metric, batch_size)
        results[f"MMD-{name}"] = minimum_matching_distance(cross)
        results[f"COV-{name}"] = coverage(cross)
        results[f"1-NNA-{name}"] = one_nn_accuracy(within_generated, cross, within_reference)
    return results

