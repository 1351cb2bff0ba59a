"""Partition files: a run's exact per-client split, exported for other libraries and imported back.

``fedbench data partition --export FILE`` writes one; ``fedbench run --partition-file FILE`` (or
``partition_file = "..."`` in a sweep) runs on it. JSON, gzip-compressed when the name ends in ``.gz``.

Every index is a 0-based row of the dataset's keras-layout arrays (``<dataset>.npz``), not of a
fedbench-internal split, so another library can use the file directly::

    clients[j]["train"]  rows of x_train / y_train that client j trains on
    clients[j]["val"]    rows of x_train: client j's validation samples (never trained on)
    clients[j]["test"]   rows of x_test / y_test: client j's test samples
    val_holdout          rows of x_train that fedbench holds out as validation (seeded, --val-fraction):
                         every client's val rows come from it, no client's train rows do; the rest of
                         x_train is the training pool (rows a partitioner leaves unassigned stay unused)

Lists are ascending (an imported file's lists are sorted on reading). Top-level keys:
``format`` ("fedbench-partition"), ``version`` (1), ``dataset``, ``dataset_digest`` (fedbench's content
digest of the four arrays: the one runs record), ``partition_digest`` (``Partition.digest()``, see
below), ``num_clients``, ``array_sizes`` ({"x_train": n, "x_test": m}), ``index_into`` (the table
above, as {"train": "x_train", "val": "x_train", "test": "x_test", "val_holdout": "x_train"}),
``options`` (what made it: partition, clients, seed, val_fraction and the partitioner's own; for
information, not read back), ``val_holdout`` and ``clients``.

``partition_digest`` is the digest fedbench's partitions carry (in the store, ``data partition``):
sha256 over, for each split train, val, test and each client, the int64 count then the int64
positions of the client's samples within that split's rows (train: the ascending training pool,
val: the ascending hold-out, test: x_test), first 16 hex digits. An import recomputes it and refuses
a file whose indices do not give it.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbench.data.partition import SPLITS, Partition
from fedbench.errors import ConfigError
from fedbench.files import write_bytes_atomic

FORMAT = "fedbench-partition"
VERSION = 1
INDEX_INTO = {"train": "x_train", "val": "x_train", "test": "x_test", "val_holdout": "x_train"}
KEYS = ("format", "version", "dataset", "dataset_digest", "partition_digest", "num_clients", "array_sizes",
        "index_into", "options", "val_holdout", "clients")
_DIGEST = re.compile(r"[0-9a-f]{16}")


@dataclass
class PartitionFile:
    """A partition file, read and checked in itself (``rows_and_partition`` checks it against the data)."""

    source: str                          # the file's absolute path
    dataset: str
    dataset_digest: str
    partition_digest: str
    array_sizes: dict[str, int]          # {"x_train": n, "x_test": m}
    options: dict
    val_holdout: np.ndarray              # ascending x_train rows
    clients: dict[str, list[np.ndarray]]  # split -> per client, ascending rows (train/val: x_train, test: x_test)

    @property
    def num_clients(self) -> int:
        return len(self.clients["train"])

    def rows_and_partition(self, arrays, num_classes: int) -> tuple[dict[str, np.ndarray], Partition]:
        """The rows of each split and the partition (positions into them), as the native path builds them,
        after checking the file against ``arrays`` (the data a run uses)."""
        where = f"partition file {self.source}"
        name = arrays.info.name
        if self.dataset != name:
            raise ConfigError(f"{where} is a partition of {self.dataset}, not of {name}")
        if self.dataset_digest != arrays.digest:
            raise ConfigError(f"{where} was made from other {name} data: its dataset_digest is {self.dataset_digest}, "
                              f"the data on disk ({arrays.source}) has {arrays.digest}")
        have = {"x_train": len(arrays.y_train), "x_test": len(arrays.y_test)}
        if have != self.array_sizes:
            raise ConfigError(f"{where}: array_sizes {self.array_sizes} disagree with the data's {have}")
        n = have["x_train"]
        rows = {"train": np.setdiff1d(np.arange(n, dtype=np.int64), self.val_holdout, assume_unique=True),
                "val": self.val_holdout, "test": np.arange(have["x_test"], dtype=np.int64)}
        # every client's rows lie in its split's rows (checked on reading): their positions there
        indices = {s: [np.searchsorted(rows[s], ix).astype(np.int64) for ix in self.clients[s]] for s in SPLITS}
        part = Partition(indices, num_classes)
        if part.digest() != self.partition_digest:
            raise ConfigError(f"{where}: partition_digest {self.partition_digest} does not match its indices "
                              f"(they give {part.digest()}): the file was edited or is corrupt")
        return rows, part


# --- writing -------------------------------------------------------------------------------------

def _ints(a) -> str:
    return "[" + ",".join(map(str, np.asarray(a).tolist())) + "]"


def dumps(doc: dict) -> str:
    """JSON with one line per key and per client split: small diffs between two partitions."""
    items = []
    for k in KEYS:
        if k == "clients":
            cl = ",\n".join("    {" + ",\n     ".join(f'"{s}": {_ints(c[s])}' for s in SPLITS) + "}" for c in doc[k])
            items.append(f'  "clients": [\n{cl}\n  ]')
        elif k == "val_holdout":
            items.append(f'  "val_holdout": {_ints(doc[k])}')
        else:
            items.append(f"  {json.dumps(k)}: {json.dumps(doc[k], sort_keys=True)}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def write_partition_file(path: Path | str, *, dataset: str, dataset_digest: str, partition_digest: str,
                         options: dict, array_sizes: dict[str, int], rows: dict[str, np.ndarray],
                         partition: Partition) -> None:
    """Write ``partition`` (positions into ``rows``) as rows of the original arrays, atomically."""
    clients = [{s: rows[s][partition.indices[s][j]] for s in SPLITS} for j in range(partition.num_clients)]
    doc = {"format": FORMAT, "version": VERSION, "dataset": dataset, "dataset_digest": dataset_digest,
           "partition_digest": partition_digest, "num_clients": partition.num_clients,
           "array_sizes": array_sizes, "index_into": INDEX_INTO, "options": options,
           "val_holdout": rows["val"], "clients": clients}
    data = dumps(doc).encode()
    path = Path(path)
    if path.suffix == ".gz":
        import io
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:  # same bytes for the same split
            gz.write(data)
        data = buf.getvalue()
    write_bytes_atomic(path, data)


# --- reading -------------------------------------------------------------------------------------

def read_partition_file(path: Path | str) -> PartitionFile:
    """Read and check a partition file in itself; every problem is one ConfigError line naming it."""
    p = Path(path).expanduser()
    where = f"partition file {p}"
    if not p.exists():
        raise ConfigError(f"{where} does not exist")
    if not p.is_file():
        raise ConfigError(f"{where} is not a file")
    try:
        raw = p.read_bytes()
        if p.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read {where}: {type(e).__name__}: {e}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not JSON text (not UTF-8; a .gz file needs the .gz suffix)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON (truncated or corrupt?): {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    return parse_document(doc, where, str(p.resolve()))


def _int(doc: dict, key: str, where: str, low: int = 0) -> int:
    v = doc[key]
    if type(v) is not int or v < low:
        raise ConfigError(f"{where}: {key} must be an integer >= {low}, got {v!r}")
    return v


def _rows(v, what: str, where: str, n: int, arr: str) -> np.ndarray:
    if not isinstance(v, list) or not all(type(x) is int for x in v):
        bad = v if not isinstance(v, list) else next(x for x in v if type(x) is not int)
        raise ConfigError(f"{where}: {what} must be a list of integer indices, got {type(bad).__name__} {bad!r:.40}")
    a = np.sort(np.array([x if -2**63 <= x < 2**63 else -1 for x in v], dtype=np.int64))
    if a.size and (a[0] < 0 or a[-1] >= n):
        bad = next(x for x in v if not 0 <= x < n)
        raise ConfigError(f"{where}: {what} index {bad} is out of range for {arr} ({n} rows: 0..{n - 1})")
    return a


def _first_repeat(arrays: list[np.ndarray]) -> tuple[int, list[int]] | None:
    """The smallest value held twice among ``arrays`` (within one or across two) and who holds it."""
    if not arrays:
        return None
    allv = np.concatenate(arrays)
    vals, counts = np.unique(allv, return_counts=True)
    rep = vals[counts > 1]
    if rep.size == 0:
        return None
    v = int(rep[0])
    return v, [j for j, a in enumerate(arrays) for _ in range(int(np.count_nonzero(a == v)))]


def parse_document(doc, where: str, source: str) -> PartitionFile:
    from fedbench.data.sources import DATASETS, TEXT_DATASETS

    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a fedbench partition file (its \"format\" is {doc.get('format')!r}, "
                          f"expected {FORMAT!r})")
    if "version" in doc and (type(doc["version"]) is not int or doc["version"] != VERSION):
        raise ConfigError(f"{where}: format version {doc['version']!r} is not supported (this fedbench reads "
                          f"version {VERSION})")
    unknown = [k for k in doc if k not in KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a version {VERSION} file has: {', '.join(KEYS)})")
    missing = [k for k in KEYS if k not in doc]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    images = [d for d in DATASETS if d not in TEXT_DATASETS]
    if doc["dataset"] not in images:
        raise ConfigError(f"{where}: dataset {doc['dataset']!r} is not an image dataset of fedbench "
                          f"({', '.join(images)})")
    for key in ("dataset_digest", "partition_digest"):
        if not isinstance(doc[key], str) or not _DIGEST.fullmatch(doc[key]):
            raise ConfigError(f"{where}: {key} must be 16 lowercase hex digits, got {doc[key]!r:.40}")
    num_clients = _int(doc, "num_clients", where, low=1)
    sizes = doc["array_sizes"]
    if not isinstance(sizes, dict) or set(sizes) != {"x_train", "x_test"}:
        raise ConfigError(f"{where}: array_sizes must be an object with keys x_train and x_test, got {sizes!r:.60}")
    n_train, n_test = (_int(sizes, k, f"{where}: array_sizes") for k in ("x_train", "x_test"))
    if doc["index_into"] != INDEX_INTO:
        raise ConfigError(f"{where}: index_into must be {json.dumps(INDEX_INTO)} (version {VERSION}'s indexing), "
                          f"got {json.dumps(doc['index_into'])[:80]}")
    if not isinstance(doc["options"], dict):
        raise ConfigError(f"{where}: options must be an object, got {type(doc['options']).__name__}")
    holdout = _rows(doc["val_holdout"], "val_holdout", where, n_train, "x_train")
    rep = _first_repeat([holdout])
    if rep:
        raise ConfigError(f"{where}: val_holdout lists x_train index {rep[0]} more than once")
    cl = doc["clients"]
    if not isinstance(cl, list) or len(cl) != num_clients:
        got = f"{len(cl)} entries" if isinstance(cl, list) else type(cl).__name__
        raise ConfigError(f"{where}: clients must be a list of num_clients = {num_clients} objects, got {got}")
    clients: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for j, c in enumerate(cl):
        if not isinstance(c, dict) or set(c) != set(SPLITS):
            keys = sorted(c) if isinstance(c, dict) else type(c).__name__
            raise ConfigError(f"{where}: clients[{j}] must be an object with keys train, val, test, got {keys}")
        for s in SPLITS:
            arr = INDEX_INTO[s]
            clients[s].append(_rows(c[s], f"client {j} {s}", where, n_test if s == "test" else n_train, arr))
    for s in SPLITS:
        rep = _first_repeat(clients[s])
        if rep:
            v, who = rep
            held = (f"twice in client {who[0]}'s {s} split" if who[0] == who[1]
                    else f"in the {s} split of clients {who[0]} and {who[1]}")
            raise ConfigError(f"{where}: overlapping indices: {INDEX_INTO[s]} index {v} is {held}")
    in_holdout = np.zeros(n_train, dtype=bool)
    in_holdout[holdout] = True
    for j in range(num_clients):
        tr, va = clients["train"][j], clients["val"][j]
        if in_holdout[tr].any():
            v = int(tr[in_holdout[tr]][0])
            owner = next((k for k in range(num_clients) if np.isin(v, clients["val"][k])), None)
            also = f"client {owner}'s val split" if owner is not None else "val_holdout"
            raise ConfigError(f"{where}: overlapping indices: x_train index {v} is in client {j}'s train split and "
                              f"in {also} (train and validation overlap)")
        if (~in_holdout[va]).any():
            v = int(va[~in_holdout[va]][0])
            raise ConfigError(f"{where}: client {j} val index {v} is not in val_holdout (validation rows come "
                              f"from the hold-out)")
        if tr.size == 0:
            raise ConfigError(f"{where}: client {j} has no training samples")
    return PartitionFile(source, doc["dataset"], doc["dataset_digest"], doc["partition_digest"],
                         {"x_train": n_train, "x_test": n_test}, doc["options"], holdout, clients)


# --- the files a process was given, by partition digest -------------------------------------------

_GIVEN: dict[str, PartitionFile] = {}


def register(pf: PartitionFile) -> None:
    """Make ``pf`` the imported partition that configs naming its digest run on (in this process)."""
    old = _GIVEN.get(pf.partition_digest)
    if old is not None and not np.array_equal(old.val_holdout, pf.val_holdout):
        raise ConfigError(f"partition files {old.source} and {pf.source} have the same partition_digest "
                          f"{pf.partition_digest} but different val_holdout rows")
    _GIVEN[pf.partition_digest] = pf


def lookup(digest: str) -> PartitionFile:
    pf = _GIVEN.get(digest)
    if pf is None:
        raise ConfigError(f"the run's partition_digest {digest} names an imported partition, but no partition file "
                          f"with that digest was given (--partition-file FILE, or partition_file in a sweep)")
    return pf


# --- partition files in run options and sweep documents ------------------------------------------

def with_partition_file(values: dict, path, where: str = "") -> tuple[dict, PartitionFile | None]:
    """``values`` (run options) with the imported partition of ``path`` (registered for this process):
    its digest in ``partition_digest``; dataset and clients follow the file where unset, and must agree
    with it where set. Without a path, a ``partition_digest`` alone is refused (the file holds the split)."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    given = values.get("partition_digest")
    if path is None:
        if given:
            raise ConfigError(f"{where}--partition-digest {given} names an imported partition: give its file with "
                              f"--partition-file FILE")
        return values, None
    pf = read_partition_file(path)
    for key, theirs in (("dataset", pf.dataset), ("clients", pf.num_clients)):
        mine = values.get(key)
        if mine is None:
            values[key] = theirs
        elif str(mine).strip() != str(theirs):
            raise ConfigError(f"{where}--{key} {mine} disagrees with partition file {path}: it holds a {pf.dataset} "
                              f"partition of {pf.num_clients} clients (leave --{key} out to follow the file)")
    if given and given != pf.partition_digest:
        raise ConfigError(f"{where}--partition-digest {given} disagrees with partition file {path} "
                          f"(its digest is {pf.partition_digest})")
    values["partition_digest"] = pf.partition_digest
    register(pf)
    return values, pf


def sweep_partition_files(doc: dict, where: str) -> tuple[dict, dict]:
    """A sweep document whose ``partition_file`` keys (in [base], [axes], [[include]], [[exclude]]) are
    replaced by the files' ``partition_digest``, and the files read, by digest (registered for this
    process). A file in [base] also gives [base] its dataset and clients where no section sets them."""
    files: dict = {}

    def load(path):
        if not isinstance(path, str):
            raise ConfigError(f"{where}: partition_file must be a path (a string), got {path!r}")
        pf = read_partition_file(path)
        register(pf)
        files[pf.partition_digest] = pf
        return pf.partition_digest

    def is_file_key(k) -> bool:
        return isinstance(k, str) and k.strip().replace("-", "_") == "partition_file"

    doc = dict(doc)
    for section in ("base",):
        table = doc.get(section)
        if isinstance(table, dict) and any(is_file_key(k) for k in table):
            table = {("partition_digest" if is_file_key(k) else k): (load(v) if is_file_key(k) else v)
                     for k, v in table.items()}
            doc[section] = table
    axes = doc.get("axes")
    if isinstance(axes, dict):
        new = {}
        for k, values in axes.items():
            keys = [x.strip() for x in k.split(",")]
            at = [i for i, x in enumerate(keys) if is_file_key(x)]
            if at and isinstance(values, list):
                i = at[0]
                if len(keys) == 1:
                    values = [load(v) for v in values]
                else:
                    values = [[load(x) if j == i else x for j, x in enumerate(v)] if isinstance(v, list) else v
                              for v in values]
                keys[i] = "partition_digest"
            new[",".join(keys)] = values
        doc["axes"] = new
    for section in ("include", "exclude"):
        items = doc.get(section)
        if isinstance(items, list):
            doc[section] = [{("partition_digest" if is_file_key(k) else k):
                             (([load(x) for x in v] if isinstance(v, list) else load(v)) if is_file_key(k) else v)
                             for k, v in r.items()} if isinstance(r, dict) else r for r in items]
    base = doc.get("base")
    if isinstance(base, dict) and base.get("partition_digest") in files:
        pf = files[base["partition_digest"]]
        named = {kk.strip().replace("-", "_") for sec in ("base", "axes") for k in (doc.get(sec) or {})
                 for kk in k.split(",")}
        named |= {k.replace("-", "_") for r in doc.get("include") or [] if isinstance(r, dict) for k in r}
        for key, v in (("dataset", pf.dataset), ("clients", pf.num_clients)):
            if key not in named:
                base[key] = v
    return doc, files


def check_sweep_partitions(sw, files: dict, where: str, data_dir) -> None:
    """Every run naming an imported partition has its file, with the file's dataset and clients; every
    file matches the data on disk. Before anything runs."""
    from fedbench.data.sources import load_dataset

    for cfg in sw.configs:
        if not cfg.partition_digest:
            continue
        pf = files.get(cfg.partition_digest)
        if pf is None:
            raise ConfigError(f"{where}: partition_digest {cfg.partition_digest} names an imported partition: give "
                              f"its file as partition_file = \"FILE\"")
        for key, theirs in (("dataset", pf.dataset), ("clients", pf.num_clients)):
            if getattr(cfg, key) != theirs:
                raise ConfigError(f"{where}: a run on partition file {pf.source} has {key} = {getattr(cfg, key)}, the "
                                  f"file holds a {pf.dataset} partition of {pf.num_clients} clients")
    for pf in files.values():
        arrays = load_dataset(pf.dataset, data_dir)
        pf.rows_and_partition(arrays, arrays.info.num_classes)
