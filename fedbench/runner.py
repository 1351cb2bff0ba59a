"""Glue from a checked RunConfig to a stored run: data -> partition -> engine -> store."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fedbench
from fedbench.config import RunConfig, method_params_obj
from fedbench.data.sources import Arrays, load_dataset
from fedbench.engine.data import FederatedData, build_federated_data
from fedbench.engine.simulation import RoundResult, Simulation, resolve_device
from fedbench.store import Store
from fedbench.summary import summarize


def versions() -> dict:
    from importlib.metadata import version

    import fvcore  # noqa: F401
    return {"fedbench": fedbench.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "fvcore": version("fvcore"), "python": platform.python_version()}


@dataclass
class Prepared:
    cfg: RunConfig
    arrays: Arrays
    data: FederatedData
    device: torch.device
    run_id: str
    label: str
    backbone: torch.nn.Module | None = None
    backbone_info: dict | None = None  # provenance: name, digest, source, recipe

    @property
    def identity_digest(self) -> str:
        """What besides the config identifies a run: the dataset's content, and the backbone's weights."""
        if self.backbone_info is None:
            return self.arrays.digest
        return f"{self.arrays.digest}+{self.backbone_info['digest']}"


def load_shared_backbone(cfg: RunConfig, data_dir) -> tuple[torch.nn.Module, dict] | tuple[None, None]:
    """The frozen backbone a federated-LoRA method asks for (pretrained cache, --model-path or random),
    checked against the method's targets and ranks; (None, None) for methods without one."""
    params = method_params_obj(cfg)
    req = cfg.method_class().backbone_request(params)
    if req is None:
        return None, None
    from fedbench.pretrain import load_backbone
    module, info = load_backbone(req["name"], cfg.num_classes, data_dir, model_path=req["model_path"] or None,
                                 init=req["init"], seed=cfg.seed)
    cfg.method_class().check_backbone(params, cfg, module)
    info = {"name": info.name, "digest": info.digest, "source": str(info.source), "recipe": info.recipe}
    return module, info


def identity_digest(cfg: RunConfig, data_digest: str, data_dir, _cache: dict | None = None) -> str:
    """The digest a run id is made with (``Prepared.identity_digest``) without building the run: the
    dataset's, plus the backbone's weights for methods that have one (a sweep plans with this)."""
    params = method_params_obj(cfg)
    req = cfg.method_class().backbone_request(params)
    if req is None:
        return data_digest
    key = (req["name"], req["init"], req["model_path"], cfg.seed if req["init"] == "random" else None)
    cache = {} if _cache is None else _cache
    if key not in cache:
        cache[key] = load_shared_backbone(cfg, data_dir)[1]["digest"]
    return f"{data_digest}+{cache[key]}"


def prepare(cfg: RunConfig, data_dir: Path | str | None, device: str = "auto",
            arrays: Arrays | None = None) -> Prepared:
    """Everything that can fail on user input, done before the store is touched."""
    dev = resolve_device(device)
    arrays = arrays or load_dataset(cfg.dataset, data_dir)
    data = build_federated_data(arrays, cfg, dev)
    label = cfg.method_class().label(method_params_obj(cfg))
    backbone, info = load_shared_backbone(cfg, data_dir)
    p = Prepared(cfg, arrays, data, dev, "", label, backbone, info)
    p.run_id = cfg.run_hash(p.identity_digest)
    return p


def client_table(p: Prepared, sim: Simulation) -> list[dict]:
    counts = p.data.partition.class_counts(p.data.split_labels["train"], "train")
    return [{"client": c.id, "arch": c.arch, "n_train": c.sizes["train"], "n_val": c.sizes["val"],
             "n_test": c.sizes["test"], "class_counts": counts[c.id].tolist()} for c in sim.clients]


def execute(p: Prepared, store: Store, on_round: Callable[[RoundResult], None] | None = None,
            command: str | None = None, sweep: str | None = None) -> dict:
    """Run and store; returns the summary computed back from the stored rows."""
    sim = Simulation(p.cfg, p.data, p.device, backbone=p.backbone)
    store.start_run(p.run_id, p.cfg, p.label, p.arrays.digest, p.data.partition.digest(),
                    {**versions(), **({"backbone": p.backbone_info} if p.backbone_info else {})},
                    str(p.device), command or " ".join(sys.argv), client_table(p, sim), sweep)

    def write(r: RoundResult) -> None:
        store.write_round(p.run_id, r)
        if on_round is not None:
            on_round(r)

    try:
        sim.run(write)
    except BaseException as e:
        store.finish_run(p.run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    store.finish_run(p.run_id, "complete")
    return stored_summary(store, p.run_id)


def stored_summary(store: Store, run_id: str) -> dict:
    return summarize(store.rounds(run_id), store.client_rounds(run_id), store.round_metrics(run_id))
