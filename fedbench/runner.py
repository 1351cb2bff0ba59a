"""Glue from a checked RunConfig to a stored run: data -> partition -> engine -> record -> store.

``simulate`` runs the engine into a picklable ``RunRecord`` (what the store needs: the run's header,
then its rounds as they come); ``persist_start``/``store.write_round``/``store.finish_run`` write it.
A sweep's workers only simulate and its driver alone persists (fedbench/executors.py); ``execute``
(``fedbench run``) does both in one process, round by round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedbench._version import __version__
from fedbench.config import RunConfig, method_params_obj, sibling_config
from fedbench.data.sources import TEXT_DATASETS, Arrays, load_dataset
from fedbench.engine.data import FederatedData, build_federated_data
from fedbench.engine.simulation import RoundResult, Simulation, resolve_device
from fedbench.errors import ConfigError
from fedbench.presets import run_label
from fedbench.store import ClaimLost, Store
from fedbench.summary import stored_summary as _stored_summary


def versions() -> dict:
    from importlib.metadata import version

    import fvcore  # noqa: F401
    return {"fedbench": __version__, "torch": torch.__version__, "numpy": np.__version__,
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
    from fedbench.lm import LM_BACKBONES
    if req["name"] in LM_BACKBONES:
        module, info, _ = load_language_backbone(cfg, data_dir, req)
        return module, info
    from fedbench.models.loading import load_backbone
    module, info = load_backbone(req["name"], cfg.num_classes, data_dir, model_path=req["model_path"] or None,
                                 init=req["init"], seed=cfg.seed)
    cfg.method_class().check_backbone(params, cfg, module)
    info = {"name": info.name, "digest": info.digest, "source": str(info.source), "recipe": info.recipe}
    return module, info


def load_language_backbone(cfg: RunConfig, data_dir, req: dict):
    """(module, provenance, tokenizer) of a language backbone, checked against the method's targets."""
    from fedbench.data.sources import default_data_dir, load_dataset
    from fedbench.lm.loading import load_lm_backbone
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    corpus = load_dataset(cfg.dataset, data_dir)
    module, info, tok = load_lm_backbone(req["name"], corpus, data_dir, init=req["init"], seed=cfg.seed,
                                         model_path=req["model_path"] or None)
    cfg.method_class().check_backbone(method_params_obj(cfg), cfg, module)
    return module, info, tok


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
    label = run_label(cfg, cfg.method_class().label(method_params_obj(cfg)))
    if cfg.dataset in TEXT_DATASETS:  # the language tier: tokenised by the backbone's tokenizer
        from fedbench.lm.data import build_token_data
        req = cfg.method_class().backbone_request(method_params_obj(cfg))
        if req is None:
            raise ConfigError(f"--dataset {cfg.dataset} is text: it needs a method with a language backbone "
                              f"(the federated-LoRA family with --backbone char-lm or smollm2)")
        backbone, info, tok = load_language_backbone(cfg, data_dir, req)
        data = build_token_data(arrays, tok, cfg, dev)
        p = Prepared(cfg, arrays, data, dev, "", label, backbone, info)
        p.run_id = cfg.run_hash(p.identity_digest)
        return p
    data = build_federated_data(arrays, cfg, dev)
    backbone, info = load_shared_backbone(cfg, data_dir)
    p = Prepared(cfg, arrays, data, dev, "", label, backbone, info)
    p.run_id = cfg.run_hash(p.identity_digest)
    return p


def client_table(p: Prepared, sim: Simulation) -> list[dict]:
    counts = p.data.partition.class_counts(p.data.split_labels["train"], "train")
    return [{"client": c.id, "arch": c.arch, "n_train": c.sizes["train"], "n_val": c.sizes["val"],
             "n_test": c.sizes["test"], "class_counts": counts[c.id].tolist()} for c in sim.clients]


@dataclass
class RunRecord:
    """One simulated run, picklable: everything ``Store.start_run`` needs, then the engine's rounds
    as they are (``RoundResult`` objects; fields the engine adds travel with them)."""

    run_id: str
    cfg: RunConfig
    label: str
    data_digest: str
    partition_digest: str
    versions: dict
    device: str
    clients: list[dict]
    rounds: list[RoundResult] = field(default_factory=list)
    worker: str = ""  # host:pid of the process that simulated it
    also: list[RunRecord] = field(default_factory=list)  # co-evaluated runs (same training, another protocol)

    def header(self) -> RunRecord:
        """The record without its rounds (what a worker sends before the first round)."""
        return dataclasses.replace(self, rounds=[], also=[s.header() for s in self.also])


def simulate(p: Prepared, on_start: Callable[[RunRecord], None] | None = None,
             on_round: Callable[[RoundResult], None] | None = None, prefetch: bool | None = None,
             client_batching: str | None = None, also_protocols: tuple[str, ...] = ()) -> RunRecord:
    """Run the engine; ``on_start`` gets the record's header before the first round, ``on_round`` each
    round as it ends. Touches no store. ``prefetch``: the engine's batch prefetch (None: its default);
    ``client_batching``: auto | on | off (None: $FEDBENCH_CLIENT_BATCHING, else auto). Execution options
    change no result and are not part of the run's identity; the batching used is recorded with the
    versions (``execution``). ``also_protocols``: co-evaluation, the same training evaluated under these
    protocols too, each a run of its own in ``rec.also`` (its id that of the config with that protocol;
    its rounds in ``RoundResult.also``), recorded in ``execution`` as ``co_evaluated``."""
    sim = Simulation(p.cfg, p.data, p.device, prefetch=prefetch, backbone=p.backbone,
                     client_batching=client_batching, also_protocols=also_protocols)
    provenance = {"backbone": p.backbone_info} if p.backbone_info else {}
    provenance["execution"] = {"client_batching": sim.client_batching}
    if len(sim.protocols) > 1:  # the rounds' times are of one training shared by these protocols
        provenance["execution"]["co_evaluated"] = list(sim.protocols)
    rec = RunRecord(p.run_id, p.cfg, p.label, p.arrays.digest, p.data.partition.digest(),
                    {**versions(), **provenance}, str(p.device), client_table(p, sim),
                    worker=f"{socket.gethostname()}:{os.getpid()}")
    for q in sim.protocols[1:]:
        cq = sibling_config(p.cfg, q)
        rec.also.append(dataclasses.replace(rec, run_id=cq.run_hash(p.identity_digest), cfg=cq, rounds=[], also=[]))
    if on_start is not None:
        on_start(rec.header())

    def each(r: RoundResult) -> None:
        rec.rounds.append(r)
        for sib in rec.also:
            sib.rounds.append(r.also[sib.cfg.protocol])
        if on_round is not None:
            on_round(r)

    sim.run(each)
    return rec


def persist_start(store: Store, rec: RunRecord, command: str | None, sweep: str | None) -> None:
    """Create (or reset) the record's run in the store, under the store's claim on it."""
    store.start_run(rec.run_id, rec.cfg, rec.label, rec.data_digest, rec.partition_digest, rec.versions,
                    rec.device, command or " ".join(sys.argv), rec.clients, sweep)


def execute(p: Prepared, store: Store, on_round: Callable[[RoundResult], None] | None = None,
            command: str | None = None, sweep: str | None = None, client_batching: str | None = None,
            on_start: Callable[[RunRecord], None] | None = None) -> dict:
    """Simulate and store round by round, under the store's claim on the run (taken if free; ``ClaimBusy``
    if a live process holds it, see ``claim_or_wait``); returns the summary computed back from the stored
    rows. ``on_start`` gets the record's header once it is stored, ``on_round`` each round once stored."""
    started = False

    def start(rec: RunRecord) -> None:
        nonlocal started
        persist_start(store, rec, command, sweep)
        started = True
        if on_start is not None:
            on_start(rec)

    def write(r: RoundResult) -> None:
        store.write_round(p.run_id, r)
        if on_round is not None:
            on_round(r)

    with store.keep_alive():
        try:
            simulate(p, start, write, client_batching=client_batching)
        except BaseException as e:
            if started:
                with contextlib.suppress(ClaimLost):  # taken over: the run is another process's now
                    store.finish_run(p.run_id, "failed", f"{type(e).__name__}: {e}")
            else:
                store.release(p.run_id, f"{type(e).__name__}: {e}")
            raise
        store.finish_run(p.run_id, "complete")
    return stored_summary(store, p.run_id)


def claim_or_wait(store: Store, run_id: str, rerun_complete: bool = False,
                  say: Callable[[str], None] | None = None, poll: float = 1.0) -> bool:
    """Claim a run for this process, waiting while another live process (a sweep, another ``fedbench
    run``) holds it. True: claimed, run it. False: it became complete meanwhile (and ``rerun_complete``
    is off). A holder that dies is taken over (at once on this host, after the lease elsewhere)."""
    told = None
    while True:
        got = store.claim(run_id, rerun_complete)
        if got != "busy":
            return got == "claimed"
        holder = store.claim_holder(run_id)
        if holder is not None and holder != told and say is not None:
            say(f"run {run_id} is being run by {holder}; waiting for it to finish (Ctrl-C to stop waiting)")
            told = holder
        time.sleep(poll)


def stored_summary(store: Store, run_id: str) -> dict:
    return _stored_summary(store, run_id)
