"""Dataset sources: a keras-layout ``.npz`` in the data directory, else a torchvision download.

Archive layout (the one ``../shared/data/materialize.py`` and ``keras.datasets`` use)::

    x_train uint8 (n, 32, 32, 3)   y_train int64 (n,)
    x_test  uint8 (m, 32, 32, 3)   y_test  int64 (m,)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbench.data.catalog import DATASETS, TEXT_DATASETS, DatasetInfo, dataset_info
from fedbench.errors import ConfigError
from fedbench.files import write_atomic


@dataclass
class Arrays:
    """One dataset in memory, checked. ``digest`` identifies its content."""

    info: DatasetInfo
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    digest: str
    source: str


def default_data_dir() -> Path:
    env = os.environ.get("FEDBENCH_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fedbench"


def content_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


def check_arrays(name: str, num_classes: int, d: dict[str, np.ndarray], where: str) -> None:
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise ConfigError(f"{where}: x_{split} must be uint8 of shape (n, 32, 32, 3), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"{where}: y_{split} must be integer labels of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ConfigError(f"{where}: y_{split} labels must lie in [0, {num_classes - 1}] for {name}, "
                              f"got [{y.min()}, {y.max()}]")


def load_npz(path: Path, info: DatasetInfo) -> Arrays:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise ConfigError(f"{path}: not a {info.name} archive: missing key(s) {', '.join(missing)} "
                                  f"(expected {', '.join(keys)})")
            d = {k: z[k] for k in keys}
    except ConfigError:
        raise
    except Exception as e:  # zipfile/pickle/OS errors: one line, named
        raise ConfigError(f"cannot read dataset file {path}: {type(e).__name__}: {e}") from None
    check_arrays(info.name, info.num_classes, d, str(path))
    d["y_train"] = d["y_train"].astype(np.int64)
    d["y_test"] = d["y_test"].astype(np.int64)
    return Arrays(info, d["x_train"], d["y_train"], d["x_test"], d["y_test"],
                  content_digest(*(d[k] for k in keys)), str(path))


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """``arrays`` as one .npz file at ``path``, atomically (through an open file: numpy appends ``.npz`` to a
    file name that lacks it, which a temporary name does)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_atomic(path, write)


def download_torchvision(info: DatasetInfo, data_dir: Path) -> Path:
    """Download through torchvision and convert to the keras layout in ``data_dir``."""
    import torchvision

    cls = getattr(torchvision.datasets, info.torchvision_class)
    root = data_dir / "torchvision"
    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = cls(root=str(root), train=train, download=True)
        out[f"x_{split}"] = np.asarray(ds.data, dtype=np.uint8)
        out[f"y_{split}"] = np.asarray(ds.targets, dtype=np.int64)
    target = data_dir / f"{info.name}.npz"
    write_npz_atomic(target, **out)
    return target


def synthetic_arrays(n_train: int = 3000, n_test: int = 600, num_classes: int = 10) -> Arrays:
    """Small class-conditional images for tests: a smooth random template per class plus noise.

    Fixed content (its own seed), so that it behaves like a dataset, not like a random stream.
    """
    rng = np.random.default_rng(20221)
    templates = rng.uniform(40, 215, size=(num_classes, 4, 4, 3))
    templates = templates.repeat(8, axis=1).repeat(8, axis=2)  # 32x32 blocks

    def draw(n):
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = templates[y] + rng.normal(0, 45, size=(n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return Arrays(DATASETS["synthetic"], x_tr, y_tr, x_te, y_te,
                  content_digest(x_tr, y_tr, x_te, y_te), "generated")


def load_dataset(name: str, data_dir: Path | str | None = None, *, download: bool = True) -> Arrays:
    info = dataset_info(name)
    if name == "synthetic":
        return synthetic_arrays()
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if name in TEXT_DATASETS:  # the parsed archive (a Corpus: digest, source, info), not image arrays
        from fedbench.data.shakespeare import load_corpus
        return load_corpus(data_dir)
    path = data_dir / f"{name}.npz"
    if path.is_dir():
        raise ConfigError(f"dataset path {path} is a directory, expected a .npz file")
    if path.exists():
        return load_npz(path, info)
    if download:
        try:
            path = download_torchvision(info, data_dir)
        except Exception as e:
            raise ConfigError(
                f"no {name}.npz in data dir {data_dir} and the torchvision download failed "
                f"({type(e).__name__}); set --data-dir or FEDBENCH_DATA_DIR to a folder holding {name}.npz "
                f"(keras layout: x_train, y_train, x_test, y_test), or go online to download it") from None
        return load_npz(path, info)
    raise ConfigError(f"no {name}.npz in data dir {data_dir}; set --data-dir or FEDBENCH_DATA_DIR, "
                      f"or allow the torchvision download")
