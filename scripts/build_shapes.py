"""Build the embedded shape set ``src/rgdm/data/shapes/mesh_shapes.npz`` from real meshes.

The meshes come from two packages, so nothing is downloaded from the web:

* pymeshlab (PyPI) ships sample meshes in ``pymeshlab/tests/sample_meshes`` (we use ``cow.obj``);
* Debian's ``libcgal-demo`` ships CGAL's mesh collection in
  ``/usr/share/doc/libcgal-demo/data.tar.gz`` (``data/meshes/*.off``).

Command (one-off; the result is committed, so users need neither package)::

    apt-get install -y libcgal-demo
    pip install pymeshlab -c constraints.txt
    python scripts/build_shapes.py                 # writes src/rgdm/data/shapes/mesh_shapes.npz
    python scripts/build_shapes.py --clouds-per-class 50 --points 2048 --out /tmp/big.npz

Every cloud is a fresh surface sample of one source mesh, then a random smooth deformation:

1. the mesh is turned into its principal-axes frame (see 5), centred on its bounding box and
   scaled so its longest half-extent is 1;
2. ``points`` points are drawn uniformly on the surface (area-weighted triangles);
3. smooth non-rigid deformation: a twist about the mesh's z axis (up to ``max_twist`` rad per
   unit length) plus a random Fourier displacement field d(x) = sum_j a_j sin(w_j . x + phi_j)
   with small amplitudes, so the map stays a diffeomorphism (its Jacobian is close to identity);
4. anisotropic scale: an independent log-uniform factor per axis in [1/s, s];
5. a small random rotation (random axis, angle up to ``max_tilt_degrees`` degrees). The clouds are
   aligned like ShapeNet's: the source meshes share no common "up" axis (CGAL's files are z-up,
   y-up or arbitrary), so step 1 also turns every mesh into its principal-axes frame (x = most
   spread, z = least; each axis signed so the surface's third moment along it is positive).
   Aligned data keep Chamfer/EMD-based metrics about shape rather than orientation: with full
   random rotations, 1-NNA-CD between different classes dropped to near chance. Loaders can add
   uniform SO(3) rotations on request (``load_shapes(..., random_rotation=True)``).
6. normalisation as Luo & Hu train their generators (``scale_mode='shape_unit'``): zero mean per
   cloud, unit standard deviation over all its coordinates.

The split (70 % train / 10 % val / 20 % test, stratified by class) is drawn once here with the
same seed and stored in the file, so every numpy version loads the same split.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "rgdm" / "data" / "shapes" / "mesh_shapes.npz"
CGAL_ARCHIVE = Path("/usr/share/doc/libcgal-demo/data.tar.gz")
CGAL_MESH_DIR = "data/meshes"

# Shape categories and the meshes that make them. Chosen by looking at the meshes: every class has
# several distinct sources so a classifier must learn the category, not one mesh.
CLASSES: dict[str, list[tuple[str, str]]] = {
    "quadruped": [
        ("pymeshlab", "cow.obj"),
        ("libcgal-demo", "bull.off"),
        ("libcgal-demo", "camel.off"),
        ("libcgal-demo", "elephant.off"),
        ("libcgal-demo", "triceratops.off"),
        ("libcgal-demo", "diplodocus.off"),
        ("libcgal-demo", "dino.off"),
    ],
    "humanoid": [
        ("libcgal-demo", "man.off"),
        ("libcgal-demo", "homer.off"),
        ("libcgal-demo", "armadillo.off"),
    ],
    "mechanical_part": [
        ("libcgal-demo", "anchor.off"),
        ("libcgal-demo", "couplingdown.off"),
        ("libcgal-demo", "fandisk.off"),
        ("libcgal-demo", "joint.off"),
        ("libcgal-demo", "pinion.off"),
        ("libcgal-demo", "rotor.off"),
        ("libcgal-demo", "spool.off"),
        ("libcgal-demo", "part.off"),
        ("libcgal-demo", "dragknob.off"),
        ("libcgal-demo", "handle.off"),
    ],
    "ring_knot": [
        ("libcgal-demo", "knot.off"),
        ("libcgal-demo", "knot1.off"),
        ("libcgal-demo", "knot2.off"),
        ("libcgal-demo", "eight.off"),
        ("libcgal-demo", "double-torus-example.off"),
    ],
    "blob": [
        ("libcgal-demo", "blobby.off"),
        ("libcgal-demo", "blob-closed.off"),
        ("libcgal-demo", "ellipe0.003.off"),
        ("libcgal-demo", "retinal.off"),
        ("libcgal-demo", "itemb.off"),
    ],
}

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class DeformationSettings:
    max_twist: float = 0.5        # rad per unit length along z
    field_amplitude: float = 0.04  # std of each Fourier mode's displacement vector
    field_frequency: float = 1.5   # std of the wave vectors; wavelength ~ object size
    field_modes: int = 6
    max_scale: float = 1.3         # per-axis factor drawn log-uniformly in [1/max_scale, max_scale]
    max_tilt_degrees: float = 15.0  # angle of the final small random rotation


@dataclass(frozen=True)
class Mesh:
    vertices: np.ndarray  # [V, 3] float64
    faces: np.ndarray     # [F, 3] int
    package: str
    file: str


# ----------------------------------------------------------------------------- mesh sources
def load_mesh(path: Path, package: str) -> Mesh:
    import pymeshlab  # build-time dependency only

    mesh_set = pymeshlab.MeshSet()
    mesh_set.load_new_mesh(str(path))  # pymeshlab triangulates polygonal faces on load
    mesh = mesh_set.current_mesh()
    vertices = np.asarray(mesh.vertex_matrix(), dtype=np.float64)
    faces = np.asarray(mesh.face_matrix(), dtype=np.int64)
    if len(faces) == 0:
        raise SystemExit(f"{path}: mesh has no faces")
    return Mesh(vertices, faces, package, path.name)


def pymeshlab_sample_dir() -> Path:
    import pymeshlab

    return Path(pymeshlab.__file__).parent / "tests" / "sample_meshes"


def extract_cgal_meshes(names: list[str], workdir: Path) -> Path:
    """Unpack only the needed CGAL meshes from the libcgal-demo archive into ``workdir``."""
    if not CGAL_ARCHIVE.exists():
        raise SystemExit(f"{CGAL_ARCHIVE} not found: run `apt-get install -y libcgal-demo` first")
    wanted = {f"{CGAL_MESH_DIR}/{name}" for name in names}
    with tarfile.open(CGAL_ARCHIVE) as archive:
        members = [m for m in archive.getmembers() if m.name in wanted]
        missing = wanted - {m.name for m in members}
        if missing:
            raise SystemExit(f"{CGAL_ARCHIVE}: missing {sorted(missing)}")
        archive.extractall(workdir, members=members, filter="data")
    return workdir / CGAL_MESH_DIR


def package_versions() -> dict[str, str]:
    dpkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libcgal-demo"],
                          capture_output=True, text=True, check=False)
    return {"pymeshlab": importlib.metadata.version("pymeshlab"),
            "libcgal-demo": dpkg.stdout.strip() or "unknown"}


def load_all_meshes(workdir: Path) -> list[tuple[str, Mesh]]:
    """``(class_name, mesh)`` for every source, in the order of ``CLASSES``."""
    cgal_names = [f for sources in CLASSES.values() for pkg, f in sources if pkg == "libcgal-demo"]
    directories = {"libcgal-demo": extract_cgal_meshes(cgal_names, workdir),
                   "pymeshlab": pymeshlab_sample_dir()}
    return [(name, load_mesh(directories[pkg] / file, pkg))
            for name, sources in CLASSES.items() for pkg, file in sources]


# ----------------------------------------------------------------------------- geometry
def centre_and_scale(vertices: np.ndarray) -> np.ndarray:
    """Bounding-box centre at the origin, longest half-extent 1 (Luo & Hu's 'shape_bbox')."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (low + high) / 2) / ((high - low).max() / 2)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Uniform points on the surface: triangle chosen by area, then uniform barycentric coords."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    chosen = rng.choice(len(faces), size=count, p=areas / areas.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1  # fold the unit square onto the triangle
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    return a[chosen] + u[:, None] * (b[chosen] - a[chosen]) + v[:, None] * (c[chosen] - a[chosen])


def twist(points: np.ndarray, rate: float) -> np.ndarray:
    angle = rate * points[:, 2]
    cos, sin = np.cos(angle), np.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return np.stack([cos * x - sin * y, sin * x + cos * y, points[:, 2]], axis=1)


def fourier_displacement(points: np.ndarray, settings: DeformationSettings,
                         rng: np.random.Generator) -> np.ndarray:
    modes = settings.field_modes
    wave_vectors = rng.normal(0.0, settings.field_frequency, size=(modes, 3))
    phases = rng.uniform(0.0, 2 * np.pi, size=modes)
    amplitudes = rng.normal(0.0, settings.field_amplitude, size=(modes, 3))
    return points + np.sin(points @ wave_vectors.T + phases) @ amplitudes


def principal_axes_frame(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Vertices rotated into the surface's principal axes (x most spread), signed by skewness.

    Statistics come from a dense fixed-seed surface sample, so they weigh area, not vertex density.
    """
    surface = sample_surface(vertices, faces, 20000, np.random.default_rng(0))
    centre = surface.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(np.cov((surface - centre).T))
    axes = eigenvectors[:, ::-1]  # columns by decreasing variance
    skew = np.sum(((surface - centre) @ axes) ** 3, axis=0)
    axes = axes * np.where(skew < 0, -1.0, 1.0)
    if np.linalg.det(axes) < 0:  # keep a proper rotation: flip the least-spread axis
        axes[:, 2] = -axes[:, 2]
    return (vertices - centre) @ axes


def small_rotation(max_degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Rotation about a uniformly random axis by an angle uniform in [-max, max] (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def shape_unit(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(axis=0)
    return centred / centred.std()


def deformed_cloud(mesh_vertices: np.ndarray, faces: np.ndarray, count: int,
                   settings: DeformationSettings, rng: np.random.Generator) -> np.ndarray:
    points = sample_surface(mesh_vertices, faces, count, rng)
    points = twist(points, rng.uniform(-settings.max_twist, settings.max_twist))
    points = fourier_displacement(points, settings, rng)
    log_max = np.log(settings.max_scale)
    points = points * np.exp(rng.uniform(-log_max, log_max, size=3))
    points = points @ small_rotation(settings.max_tilt_degrees, rng).T
    return shape_unit(points)


# ----------------------------------------------------------------------------- data set
def stratified_split(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    split = np.empty(len(labels), dtype=np.int8)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(SPLIT_FRACTIONS["train"] * len(members))
        n_val = round(SPLIT_FRACTIONS["val"] * len(members))
        split[members[:n_train]] = SPLIT_CODES["train"]
        split[members[n_train:n_train + n_val]] = SPLIT_CODES["val"]
        split[members[n_train + n_val:]] = SPLIT_CODES["test"]
    return split


def build(clouds_per_class: int, points: int, seed: int, settings: DeformationSettings,
          workdir: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    meshes = load_all_meshes(workdir)
    class_names = list(CLASSES)
    canonical = [centre_and_scale(principal_axes_frame(m.vertices, m.faces)) for _, m in meshes]
    clouds, labels, sources = [], [], []
    for label, name in enumerate(class_names):
        members = [i for i, (cls, _) in enumerate(meshes) if cls == name]
        # Round-robin over the class's meshes: each contributes (almost) equally.
        for k in range(clouds_per_class):
            source = members[k % len(members)]
            faces = meshes[source][1].faces
            clouds.append(deformed_cloud(canonical[source], faces, points, settings, rng))
            labels.append(label)
            sources.append(source)
    labels_array = np.asarray(labels, dtype=np.int16)
    versions = package_versions()
    metadata = {
        "format": "rgdm.MeshShapes/1",
        "normalization": "shape_unit",
        "orientation": "principal axes of each source mesh, then a small random rotation",
        "seed": seed,
        "points_per_cloud": points,
        "clouds_per_class": clouds_per_class,
        "deformation": settings.__dict__,
        "split_fractions": SPLIT_FRACTIONS,
        "package_versions": versions,
        "builder": "scripts/build_shapes.py",
    }
    return {
        "points": np.stack(clouds).astype(np.float16),
        "labels": labels_array,
        "source": np.asarray(sources, dtype=np.int16),
        "split": stratified_split(labels_array, rng),
        "class_names": np.asarray(class_names),
        "source_files": np.asarray([m.file for _, m in meshes]),
        "source_packages": np.asarray([f"{m.package}=={versions[m.package]}" for _, m in meshes]),
        "source_classes": np.asarray([cls for cls, _ in meshes]),
        "metadata": np.asarray(json.dumps(metadata, sort_keys=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--clouds-per-class", type=int, default=200)
    parser.add_argument("--points", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rgdm_cgal_meshes"))
    args = parser.parse_args()

    start = time.perf_counter()
    arrays = build(args.clouds_per_class, args.points, args.seed, DeformationSettings(), args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    elapsed = time.perf_counter() - start
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({len(arrays['points'])} clouds x {args.points} points, "
          f"{size_mb:.2f} MB) in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
