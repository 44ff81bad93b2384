"""The embedded mesh shape set, the ShapeNet PC15k loader and the normalisation modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgdm.data.dataset import DataError
from rgdm.data.shapes import (
    CATEGORY_TO_SYNSET,
    SHAPES_FILE,
    SYNSET_TO_CATEGORY,
    GlobalStats,
    PointCloudDataset,
    load_pc15k,
    load_shapes,
    normalize_point_clouds,
    random_rotations,
    shapes_metadata,
    subsample_points,
)

# ----------------------------------------------------------------------------- embedded set


def test_shipped_file_is_small_and_records_provenance():
    assert SHAPES_FILE.stat().st_size <= 5_000_000
    metadata = shapes_metadata()
    assert len(metadata["classes"]) >= 3
    packages = {source["package"].split("==")[0] for source in metadata["sources"]}
    assert packages == {"pymeshlab", "libcgal-demo"}
    for name in metadata["classes"]:
        meshes = [s["file"] for s in metadata["sources"] if s["class"] == name]
        assert len(meshes) >= 3, f"class {name} should mix several source meshes"


def test_splits_are_stratified_disjoint_and_complete():
    splits = {name: load_shapes(name) for name in ("train", "val", "test")}
    total = sum(len(s) for s in splits.values())
    assert total == 1000
    for name, fraction in [("train", 0.7), ("val", 0.1), ("test", 0.2)]:
        counts = splits[name].class_counts()
        assert set(counts.values()) == {round(fraction * 200)}, counts
    fingerprints = {name: {tuple(s.points[i, :4].flatten().tolist()) for i in range(len(s))}
                    for name, s in splits.items()}
    assert len(fingerprints["train"]) == 700  # no two clouds alike
    assert not fingerprints["train"] & fingerprints["test"]
    assert not fingerprints["train"] & fingerprints["val"]


def test_clouds_are_distinct_and_shape_unit_normalised():
    train = load_shapes("train")
    assert train.points.dtype == torch.float32 and train.labels.dtype == torch.long
    assert train.points.shape[1:] == (768, 3)
    means = train.points.mean(dim=1)
    stds = train.points.reshape(len(train), -1).std(dim=1, correction=0)
    assert means.abs().max() < 2e-3  # float16 storage
    assert torch.allclose(stds, torch.ones_like(stds), atol=2e-3)
    first_two = train.of_class("humanoid").points[:2]
    assert not torch.allclose(first_two[0], first_two[1])
    # Every source mesh appears in the training split.
    assert len(set(train.sources)) == len(shapes_metadata()["sources"])


def test_subsampling_is_seeded_and_class_filter_relabels():
    a = load_shapes("val", n_points=100, seed=1)
    b = load_shapes("val", n_points=100, seed=1)
    c = load_shapes("val", n_points=100, seed=2)
    assert a.points.shape == (100, 100, 3)
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)
    picked = load_shapes("test", classes=["blob", "quadruped"])
    assert picked.class_names == ("blob", "quadruped")
    assert picked.class_counts() == {"blob": 40, "quadruped": 40}
    assert set(picked.sources) & {"cow.obj", "blobby.off"} == {"cow.obj", "blobby.off"}


def test_random_rotation_keeps_distances_and_changes_orientation():
    plain = load_shapes("test", n_points=64, seed=3)
    turned = load_shapes("test", n_points=64, seed=3, random_rotation=True)
    def distances(points):
        return torch.cdist(points.double(), points.double(), compute_mode="donot_use_mm_for_euclid_dist")

    assert torch.allclose(distances(plain.points), distances(turned.points), atol=1e-5)
    assert not torch.allclose(plain.points, turned.points, atol=1e-2)


def test_random_rotations_are_proper_orthogonal():
    rotations = random_rotations(50, torch.Generator().manual_seed(0))
    identity = torch.eye(3).expand(50, 3, 3)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), identity, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(50), atol=1e-5)


def test_bad_requests_name_the_problem():
    with pytest.raises(DataError, match="unknown split"):
        load_shapes("training")
    with pytest.raises(DataError, match="unknown classes"):
        load_shapes("train", classes=["chair"])
    with pytest.raises(DataError, match="only 768"):
        load_shapes("train", n_points=5000)
    with pytest.raises(DataError, match="not found"):
        load_shapes("train", path="/nonexistent/shapes.npz")


# ----------------------------------------------------------------------------- dataset and batches


def small_dataset() -> PointCloudDataset:
    points = torch.arange(10 * 4 * 3, dtype=torch.float32).reshape(10, 4, 3)
    return PointCloudDataset(points, torch.tensor([0, 1] * 5), ("a", "b"), split="train")


def test_batches_visit_every_cloud_once_and_are_reproducible():
    data = small_dataset()
    batches = list(data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    seen = torch.cat([b.points[:, 0, 0] for b in batches]) / 12
    assert sorted(seen.long().tolist()) == list(range(10))
    again = list(data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(x.points, y.points) for x, y in zip(batches, again, strict=True))
    assert [len(b) for b in data.batches(3, shuffle=False, drop_last=True)] == [3, 3, 3]
    first = next(data.batches(4, shuffle=False))
    assert first.labels.tolist() == [0, 1, 0, 1] and first.class_names == ("a", "b")


def test_dataset_validates_shapes_and_labels():
    with pytest.raises(DataError, match=r"\[M, P, 3\]"):
        PointCloudDataset(torch.zeros(2, 4, 2), torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(DataError, match="labels must index"):
        PointCloudDataset(torch.zeros(2, 4, 3), torch.tensor([0, 3]), ("a", "b"))


# ----------------------------------------------------------------------------- normalisation


def test_normalisation_modes_match_the_reference_formulas():
    generator = torch.Generator().manual_seed(0)
    clouds = torch.randn(3, 50, 3, generator=generator) * torch.tensor([1.0, 2.0, 3.0]) + 5.0
    unit = normalize_point_clouds(clouds, "shape_unit")
    for raw, out in zip(clouds, unit, strict=True):  # Luo & Hu: pc.flatten().std()
        expected = (raw - raw.mean(dim=0)) / raw.flatten().std(correction=0)
        assert torch.allclose(out, expected, atol=1e-5)
    box = normalize_point_clouds(clouds, "shape_bbox")
    extent = box.amax(dim=1) - box.amin(dim=1)
    assert torch.allclose(extent.amax(dim=1), torch.full((3,), 2.0))
    assert torch.allclose(box.amax(dim=1) + box.amin(dim=1), torch.zeros(3, 3), atol=1e-5)
    stats = GlobalStats.from_points(clouds)
    assert stats.std == pytest.approx(float(np.std(clouds.numpy())), rel=1e-5)
    pooled = normalize_point_clouds(clouds, "global", stats)
    assert torch.allclose(pooled.reshape(-1, 3).mean(dim=0), torch.zeros(3), atol=1e-5)
    centred = normalize_point_clouds(clouds, "global_unit", stats)
    assert torch.allclose(centred.mean(dim=1), torch.zeros(3, 3), atol=1e-5)
    with pytest.raises(DataError, match="needs global statistics"):
        normalize_point_clouds(clouds, "global")
    with pytest.raises(DataError, match="unknown normalisation"):
        normalize_point_clouds(clouds, "unit_cube")


def test_subsample_draws_distinct_points_of_each_cloud():
    clouds = torch.arange(2 * 20 * 3, dtype=torch.float32).reshape(2, 20, 3)
    picked = subsample_points(clouds, 7, torch.Generator().manual_seed(0))
    for cloud, subset in zip(clouds, picked, strict=True):
        rows = {tuple(r) for r in cloud.tolist()}
        assert len({tuple(r) for r in subset.tolist()}) == 7
        assert {tuple(r) for r in subset.tolist()} <= rows


# ----------------------------------------------------------------------------- ShapeNet PC15k


def test_category_table_has_the_55_shapenet_synsets():
    assert len(SYNSET_TO_CATEGORY) == 55
    assert CATEGORY_TO_SYNSET["airplane"] == "02691156"
    assert CATEGORY_TO_SYNSET["chair"] == "03001627"
    assert CATEGORY_TO_SYNSET["car"] == "02958343"


@pytest.fixture()
def pc15k_tree(tmp_path):
    """Two categories in PointFlow's layout; clouds of 15000 points like the real files."""
    rng = np.random.default_rng(0)
    clouds = {}
    for synset, offset in [("02691156", 1.0), ("03001627", -2.0)]:
        for split, count in [("train", 3), ("val", 1), ("test", 2)]:
            directory = tmp_path / synset / split
            directory.mkdir(parents=True)
            for k in range(count):
                cloud = (rng.normal(size=(15000, 3)) * [1.0, 2.0, 0.5] + offset).astype(np.float32)
                np.save(directory / f"model{k}.npy", cloud)
                clouds[(synset, split, k)] = cloud
    return tmp_path, clouds


def test_pc15k_loads_labels_and_subsamples(pc15k_tree):
    root, clouds = pc15k_tree
    data = load_pc15k(root, ["chair", "02691156"], split="train", n_points=512, normalize=None)
    assert data.class_names == ("chair", "airplane")
    assert data.points.shape == (6, 512, 3)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.sources[0] == "03001627/model0"
    full = {tuple(r) for r in clouds[("03001627", "train", 0)].tolist()}
    assert {tuple(r) for r in data.points[0].tolist()} <= full


def test_pc15k_shape_unit_normalises_the_full_cloud(pc15k_tree):
    root, clouds = pc15k_tree
    data = load_pc15k(root, ["airplane"], split="test", n_points=15000, normalize="shape_unit")
    raw = clouds[("02691156", "test", 0)]
    expected = (raw - raw.mean(axis=0)) / raw.reshape(-1).std()
    got = data.points[0].numpy()
    assert np.allclose(np.sort(got, axis=0), np.sort(expected, axis=0), atol=1e-4)


def test_pc15k_global_stats_come_from_the_train_split(pc15k_tree):
    root, clouds = pc15k_tree
    train_points = np.stack([c for (s, split, _), c in clouds.items() if split == "train"])
    train = load_pc15k(root, ["airplane", "chair"], split="train", n_points=256, normalize="global")
    assert np.allclose(train.stats.mean.numpy(), train_points.reshape(-1, 3).mean(axis=0), atol=1e-4)
    assert train.stats.std == pytest.approx(float(train_points.reshape(-1).astype(np.float64).std()),
                                            rel=1e-6)
    val = load_pc15k(root, ["airplane", "chair"], split="val", n_points=256, normalize="global")
    assert val.stats.std == pytest.approx(train.stats.std)
    raw = clouds[("02691156", "val", 0)]
    expected_centre = (raw.mean(axis=0) - train.stats.mean.numpy()) / train.stats.std
    assert np.allclose(val.points[0].mean(dim=0).numpy(), expected_centre, atol=0.1)


def test_pc15k_errors_name_the_file(pc15k_tree, tmp_path):
    root, _ = pc15k_tree
    with pytest.raises(DataError, match="unknown ShapeNet category"):
        load_pc15k(root, ["spaceship"])
    with pytest.raises(DataError, match="no such directory"):
        load_pc15k(root, ["car"])
    bad = root / "02691156" / "train" / "broken.npy"
    np.save(bad, np.zeros((10, 2), dtype=np.float32))
    with pytest.raises(DataError, match="broken.npy: expected shape"):
        load_pc15k(root, ["airplane"], n_points=5)
    bad.unlink()
    with pytest.raises(DataError, match="fewer than n_points"):
        load_pc15k(root, ["airplane"], n_points=20000)
    with pytest.raises(DataError, match="root directory not found"):
        load_pc15k(tmp_path / "missing", ["airplane"])
