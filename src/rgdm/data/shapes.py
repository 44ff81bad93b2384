"""Shape point clouds: the embedded mesh set, ShapeNet PC15k, and their normalisations.

Two sources give the same in-memory type, :class:`PointCloudDataset`:

* :func:`load_shapes` reads the set shipped with rgdm (``rgdm/data/shapes/mesh_shapes.npz``):
  five shape categories sampled from real meshes of pymeshlab and Debian's libcgal-demo, with
  random smooth deformations, aligned like ShapeNet (principal axes of each source mesh).
  ``scripts/build_shapes.py`` builds it and documents how.
* :func:`load_pc15k` reads ShapeNetCore in PointFlow's layout
  ``<root>/<synset_id>/{train,val,test}/<model>.npy`` (each ``[15000, 3]``).

Normalisation modes follow PointFlow (Yang et al. 2019) and Luo & Hu (2021):

=================  ===========================================  ===================================
mode               shift                                        scale
=================  ===========================================  ===================================
``None``           0                                            1
``"shape_unit"``   the cloud's mean                             std of the cloud's 3P coordinates
``"shape_bbox"``   the cloud's bounding-box centre              half of its longest box side
``"global_unit"``  the cloud's mean (Luo & Hu)                  std of all train coordinates
``"global"``       mean of all train points (PointFlow)         std of all train coordinates
=================  ===========================================  ===================================

As in both reference implementations, a "std of coordinates" is taken over the flattened x, y, z
values about their single scalar mean, not per axis. Global statistics come from the *train* split
of the selected categories (PointFlow); Luo & Hu pool all splits, which leaks test data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rgdm.data.dataset import DataError

SHAPES_FILE = Path(__file__).with_name("shapes") / "mesh_shapes.npz"
SPLITS = ("train", "val", "test")
NORMALIZATIONS = (None, "shape_unit", "shape_bbox", "global_unit", "global")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

SYNSET_TO_CATEGORY: dict[str, str] = {
    "02691156": "airplane", "02747177": "can", "02773838": "bag", "02801938": "basket",
    "02808440": "bathtub", "02818832": "bed", "02828884": "bench", "02843684": "birdhouse",
    "02871439": "bookshelf", "02876657": "bottle", "02880940": "bowl", "02924116": "bus",
    "02933112": "cabinet", "02942699": "camera", "02946921": "tin_can", "02954340": "cap",
    "02958343": "car", "02992529": "cellphone", "03001627": "chair", "03046257": "clock",
    "03085013": "keyboard", "03207941": "dishwasher", "03211117": "monitor", "03261776": "earphone",
    "03325088": "faucet", "03337140": "file", "03467517": "guitar", "03513137": "helmet",
    "03593526": "jar", "03624134": "knife", "03636649": "lamp", "03642806": "laptop",
    "03691459": "speaker", "03710193": "mailbox", "03759954": "microphone", "03761084": "microwave",
    "03790512": "motorcycle", "03797390": "mug", "03928116": "piano", "03938244": "pillow",
    "03948459": "pistol", "03991062": "pot", "04004475": "printer", "04074963": "remote_control",
    "04090263": "rifle", "04099429": "rocket", "04225987": "skateboard", "04256520": "sofa",
    "04330267": "stove", "04379243": "table", "04401088": "telephone", "04460130": "tower",
    "04468005": "train", "04530566": "vessel", "04554684": "washer",
}
"""The 55 ShapeNetCore v2 categories as PointFlow names them (boats are merged into vessel)."""
CATEGORY_TO_SYNSET: dict[str, str] = {name: synset for synset, name in SYNSET_TO_CATEGORY.items()}


# ----------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class GlobalStats:
    """Pooled statistics of a training set: per-axis mean [3] and one scalar std."""

    mean: Tensor
    std: float

    @classmethod
    def from_points(cls, points: Tensor) -> GlobalStats:
        flat = points.reshape(-1, 3).double()
        return cls(mean=flat.mean(dim=0).float(), std=float(flat.reshape(-1).std(correction=0)))


def normalize_point_clouds(points: Tensor, mode: str | None,
                           stats: GlobalStats | None = None) -> Tensor:
    """Shift and scale each cloud of ``points`` [M, P, 3] as ``mode`` says (see module docstring).

    The global modes need ``stats`` (usually ``GlobalStats.from_points(train_points)``).
    """
    if mode not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation {mode!r}; choose one of {NORMALIZATIONS}")
    if mode is None:
        return points
    if mode in ("global_unit", "global") and stats is None:
        raise DataError(f"normalisation {mode!r} needs global statistics of the training set")
    if mode == "shape_bbox":
        low, high = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)
        shift = (low + high) / 2
        scale = (high - low).amax(dim=2, keepdim=True) / 2
    elif mode == "global":
        shift = stats.mean.to(points).reshape(1, 1, 3)
        scale = torch.tensor(stats.std, dtype=points.dtype)
    else:
        shift = points.mean(dim=1, keepdim=True)
        if mode == "shape_unit":
            scale = points.reshape(len(points), -1).std(dim=1, correction=0).reshape(-1, 1, 1)
        else:
            scale = torch.tensor(stats.std, dtype=points.dtype)
    # A degenerate cloud (all points equal) keeps its size instead of dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (points - shift) / scale


def random_rotations(count: int, generator: torch.Generator | None = None) -> Tensor:
    """[count, 3, 3] uniformly random (Haar) rotation matrices, from random unit quaternions."""
    quaternions = torch.randn(count, 4, generator=generator)  # isotropic, so uniform on S^3
    w, x, y, z = (quaternions / quaternions.norm(dim=1, keepdim=True)).unbind(dim=1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=1).reshape(count, 3, 3)


def subsample_points(points: Tensor, n_points: int, generator: torch.Generator | None = None) -> Tensor:
    """``n_points`` points per cloud, drawn without replacement, independently for every cloud."""
    available = points.shape[1]
    if n_points > available:
        raise DataError(f"asked for {n_points} points per cloud, the clouds have only {available}")
    if n_points == available:
        return points
    order = torch.rand(points.shape[:2], generator=generator).argsort(dim=1)[:, :n_points]
    return torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, 3))


# ----------------------------------------------------------------------------- containers
@dataclass
class PointCloudBatch:
    """B clouds of P points: ``points`` [B, P, 3] float32, ``labels`` [B] long."""

    points: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.points.shape[0]

    def to(self, device: torch.device | str) -> PointCloudBatch:
        return replace(self, points=self.points.to(device), labels=self.labels.to(device))


@dataclass
class PointCloudDataset:
    """M labelled clouds of P points each.

    points:      [M, P, 3] float32 (normalised as ``normalization`` says).
    labels:      [M] long, index into ``class_names``.
    class_names: category of each label index.
    split:       "train", "val", "test" or "" when the clouds are not a split.
    sources:     per-cloud provenance (source mesh file or ShapeNet model id), may be empty.
    normalization, stats: how ``points`` were normalised (``stats`` for the global modes), so
                 other splits or generated samples can be put in the same frame.
    """

    points: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    split: str = ""
    sources: tuple[str, ...] = ()
    normalization: str | None = None
    stats: GlobalStats | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.sources = tuple(self.sources)
        if self.points.dim() != 3 or self.points.shape[-1] != 3:
            raise DataError(f"points must have shape [M, P, 3], got {list(self.points.shape)}")
        if self.labels.shape != self.points.shape[:1]:
            raise DataError(f"labels must have shape [{len(self.points)}], got {list(self.labels.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(
                self.class_names):
            raise DataError(f"labels must index the {len(self.class_names)} class names")
        if self.sources and len(self.sources) != len(self.points):
            raise DataError(f"got {len(self.sources)} sources for {len(self.points)} clouds")

    def __len__(self) -> int:
        return self.points.shape[0]

    @property
    def num_points(self) -> int:
        return self.points.shape[1]

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts, strict=True)}

    def subset(self, indices: Tensor | Sequence[int]) -> PointCloudDataset:
        index = torch.as_tensor(indices, dtype=torch.long)
        sources = tuple(self.sources[i] for i in index.tolist()) if self.sources else ()
        return replace(self, points=self.points[index], labels=self.labels[index], sources=sources)

    def of_class(self, name: str) -> PointCloudDataset:
        if name not in self.class_names:
            raise DataError(f"unknown class {name!r}; this data set has {self.class_names}")
        return self.subset(torch.nonzero(self.labels == self.class_names.index(name)).flatten())

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[PointCloudBatch]:
        """One pass over the data set in batches of ``batch_size`` clouds."""
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - len(self) % batch_size if drop_last else len(self)
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield PointCloudBatch(self.points[index], self.labels[index], self.class_names)


# ----------------------------------------------------------------------------- embedded set
def _read_shapes_file(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"{path}: shape file not found (build it with scripts/build_shapes.py)")
    required = ("points", "labels", "split", "source", "class_names", "source_files",
                "source_packages", "metadata")
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in required if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing arrays {missing}")
        return {key: archive[key] for key in archive.files}


def shapes_metadata(path: str | Path = SHAPES_FILE) -> dict[str, Any]:
    """Build settings and provenance of the embedded set: classes, meshes, packages, seed."""
    arrays = _read_shapes_file(Path(path))
    metadata = json.loads(str(arrays["metadata"]))
    metadata["classes"] = [str(name) for name in arrays["class_names"]]
    metadata["sources"] = [
        {"file": str(f), "package": str(p), "class": str(c)}
        for f, p, c in zip(arrays["source_files"], arrays["source_packages"],
                           arrays["source_classes"], strict=True)
    ]
    return metadata


def load_shapes(split: str = "train", n_points: int | None = None, normalize: str | None = "shape_unit",
                classes: Sequence[str] | None = None, seed: int = 0, random_rotation: bool = False,
                path: str | Path = SHAPES_FILE) -> PointCloudDataset:
    """The embedded mesh shape set (fixed stratified 70/10/20 split stored in the file).

    n_points:  points per cloud, a random subset drawn with ``seed`` (default: all stored points).
    normalize: applied to the full stored clouds before subsampling, as PointFlow does; the file
               is already "shape_unit", so the default keeps the stored clouds unchanged.
    classes:   keep only these categories (labels are re-indexed in the given order).
    random_rotation: turn every cloud by a uniform random rotation (drawn with ``seed``). The
               stored clouds are aligned (each source mesh in its principal-axes frame, plus a
               small tilt), like ShapeNet; rotate them to study rotation-invariant models.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    path = Path(path)
    arrays = _read_shapes_file(path)
    all_points = torch.from_numpy(arrays["points"].astype(np.float32))
    all_labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    split_codes = torch.from_numpy(arrays["split"].astype(np.int64))
    file_names = [str(name) for name in arrays["class_names"]]
    wanted = list(classes) if classes is not None else file_names
    unknown = [name for name in wanted if name not in file_names]
    if unknown:
        raise DataError(f"{path}: unknown classes {unknown}; available: {file_names}")

    # Relabel the kept classes 0..K-1 in the requested order; -1 marks dropped clouds.
    relabel = torch.full((len(file_names),), -1, dtype=torch.long)
    for new, name in enumerate(wanted):
        relabel[file_names.index(name)] = new
    labels = relabel[all_labels]
    stats = None
    if normalize in ("global_unit", "global"):
        stats = GlobalStats.from_points(all_points[(split_codes == _SPLIT_CODES["train"]) & (labels >= 0)])
    keep = torch.nonzero((split_codes == _SPLIT_CODES[split]) & (labels >= 0)).flatten()
    points = normalize_point_clouds(all_points[keep], normalize, stats)
    generator = torch.Generator().manual_seed(seed)
    if n_points is not None:
        points = subsample_points(points, n_points, generator)
    if random_rotation:
        points = points @ random_rotations(len(points), generator).transpose(1, 2)
    source_names = [str(name) for name in arrays["source_files"]]
    sources = tuple(source_names[i] for i in arrays["source"][keep.numpy()])
    return PointCloudDataset(points=points.contiguous(), labels=labels[keep], class_names=tuple(wanted),
                             split=split, sources=sources, normalization=normalize, stats=stats,
                             metadata=json.loads(str(arrays["metadata"])))


# ----------------------------------------------------------------------------- ShapeNet PC15k
def _synset_of(category: str) -> str:
    if category in CATEGORY_TO_SYNSET:
        return CATEGORY_TO_SYNSET[category]
    if category in SYNSET_TO_CATEGORY:
        return category
    raise DataError(f"unknown ShapeNet category {category!r}; use a name such as 'airplane' "
                    f"or a synset id such as '02691156'")


def _pc15k_files(root: Path, synset: str, split: str) -> list[Path]:
    directory = root / synset / split
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (expected <root>/<synset_id>/{split}/*.npy)")
    files = sorted(directory.glob("*.npy"))
    if not files:
        raise DataError(f"{directory}: no .npy point clouds")
    return files


def _read_cloud(path: Path) -> np.ndarray:
    try:
        cloud = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read point cloud ({error})") from None
    if cloud.ndim != 2 or cloud.shape[1] != 3:
        raise DataError(f"{path}: expected shape [N, 3], got {list(cloud.shape)}")
    if not np.isfinite(cloud).all():
        raise DataError(f"{path}: contains NaN or infinite coordinates")
    return cloud.astype(np.float32)


def _pc15k_train_stats(root: Path, synsets: Sequence[str]) -> GlobalStats:
    """Exact pooled mean/std of every train point, streamed so the full clouds never pile up."""
    total, total_sq, axis_sum, count = 0.0, 0.0, np.zeros(3), 0
    for synset in synsets:
        for path in _pc15k_files(root, synset, "train"):
            cloud = _read_cloud(path).astype(np.float64)
            axis_sum += cloud.sum(axis=0)
            total += cloud.sum()
            total_sq += np.square(cloud).sum()
            count += len(cloud)
    mean_coordinate = total / (3 * count)
    std = float(np.sqrt(max(total_sq / (3 * count) - mean_coordinate**2, 0.0)))
    return GlobalStats(mean=torch.from_numpy(axis_sum / count).float(), std=std)


def load_pc15k(root: str | Path, categories: Sequence[str], split: str = "train", n_points: int = 2048,
               normalize: str | None = "shape_unit", stats: GlobalStats | None = None,
               seed: int = 0) -> PointCloudDataset:
    """ShapeNetCore point clouds in PointFlow's PC15k layout.

    categories: names ("airplane") or synset ids ("02691156"); labels follow this order.
    n_points:   random subset per cloud (PointFlow trains and tests on 2048), drawn with ``seed``
                after normalising the full cloud.
    stats:      global statistics for the global modes; by default computed from the train split
                of ``categories`` (pass ``train_set.stats`` to avoid re-reading it).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    if normalize not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation {normalize!r}; choose one of {NORMALIZATIONS}")
    if not categories:
        raise DataError("give at least one ShapeNet category")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ShapeNet PC15k root directory not found")
    synsets = [_synset_of(category) for category in categories]
    if normalize in ("global_unit", "global") and stats is None:
        stats = _pc15k_train_stats(root, synsets)

    generator = torch.Generator().manual_seed(seed)
    clouds, labels, sources = [], [], []
    for label, synset in enumerate(synsets):
        for path in _pc15k_files(root, synset, split):
            full = torch.from_numpy(_read_cloud(path)).unsqueeze(0)
            if full.shape[1] < n_points:
                raise DataError(f"{path}: has {full.shape[1]} points, fewer than n_points={n_points}")
            normalised = normalize_point_clouds(full, normalize, stats)
            clouds.append(subsample_points(normalised, n_points, generator)[0])
            labels.append(label)
            sources.append(f"{synset}/{path.stem}")
    return PointCloudDataset(points=torch.stack(clouds), labels=torch.tensor(labels, dtype=torch.long),
                             class_names=tuple(SYNSET_TO_CATEGORY[s] for s in synsets), split=split,
                             sources=tuple(sources), normalization=normalize, stats=stats)
