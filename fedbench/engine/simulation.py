"""The simulation engine. It never names a method: it calls the plugin contract of methods/base.py.

Per round t:
  1. sample int(C*N) distinct clients (seeded by the master seed and t);
  2. each participant gets its download (``method.download``: the broadcast, or a payload of its own;
     bytes down), runs ``client_update`` (metered FLOPs) and returns its upload (bytes up); with
     ``client_batching`` (auto | on | off) a ``batchable`` method trains all participants through
     ``client_update_many`` in one batched pass instead (federated LoRA: fedbench/lora/batched.py; MHPFL,
     same-CNN groups: fedbench/engine/stacked.py), the rows the same per client;
  3. the server turns uploads into the next global state (``server_update``, server FLOPs); a method
     with ``push = "all"`` has it delivered to every client right away (bytes down for all), and such a
     method's initial state (``server_init``) goes to every client once before round 1's training (bytes
     down, and ``bytes_down_once``: a one-time cost, not a per-round one);
  4. every ``eval_every`` rounds (and at the last) clients are evaluated on their test split (and
     validation split, ``--eval-val``) at the moment the run's evaluation protocol names (``--eval-protocol``:
     ``yi`` the participants right after their local training; ``pfllib`` every client after the round,
     through the method's ``view`` of its next download; ``round-end`` every client after the round as it
     stands), and the global model (where the method has one) on the union of the clients' test splits
     after the round. Evaluation consumes no random stream: the training of a run is the same under
     every protocol, so one training can be evaluated under several (``also_protocols``, co-evaluation:
     ``run_round`` returns the run's own protocol's ``RoundResult`` with the others' in ``also``, each the
     rows a run of that protocol alone stores; tests/test_coevaluation.py).
The engine's jobs are separate units with public interfaces, each replaceable (the speed suite swaps
them): ``ModuleState`` (client/server tensors bound to workspace modules), ``BatchSource`` (batches),
``LocalOptimizer`` (optimiser, learning-rate schedule, clip), ``Evaluator``; this module is the round loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedbench.config import RunConfig, method_params_obj
from fedbench.engine.allocator import tune_host_allocator
from fedbench.engine.batches import PREFETCH_ENV, BatchSource, available_cores, default_prefetch  # noqa: F401
from fedbench.engine.data import FederatedData
from fedbench.engine.evaluation import Evaluator
from fedbench.engine.optim import LocalOptimizer
from fedbench.engine.state import ModuleState
from fedbench.metering.comm import payload_bytes
from fedbench.metering.flops import FlopMeter
from fedbench.methods.base import Client, Method, Party, Server, Upload
from fedbench.models.cnn import ModuleSpec, cnn_spec, model_assignment
from fedbench.seeding import numpy_rng


@dataclass
class ClientRow:
    client: int
    selected: bool
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_down_once: int = 0  # the part of bytes_down sent once per run (round 1's initial push), not per round
    train_macs: int = 0
    eval_macs: int = 0
    train_samples: int = 0
    correct: int | None = None  # None: not evaluated this round, or prediction undefined
    total: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # named metrics the method reported


@dataclass
class RoundResult:
    round: int
    wall_s: float
    train_s: float
    eval_s: float
    server_macs: int
    evaluated: bool
    rows: list[ClientRow] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # round-level named metrics (server, global model)
    also: dict[str, RoundResult] = field(default_factory=dict)  # co-evaluated protocols: their own results

    def accuracy(self) -> tuple[float | None, float | None]:
        """(unweighted mean of client accuracies, sample-weighted accuracy) over evaluated clients."""
        ev = [r for r in self.rows if r.correct is not None and r.total]
        if not ev:
            return None, None
        return (float(np.mean([r.correct / r.total for r in ev])),
                sum(r.correct for r in ev) / sum(r.total for r in ev))

    def global_accuracy(self) -> float | None:
        c, n = self.metrics.get("global_correct"), self.metrics.get("global_total")
        return None if c is None or not n else c / n


CLIENT_BATCHING = ("auto", "on", "off")
CLIENT_BATCHING_ENV = "FEDBENCH_CLIENT_BATCHING"  # on | off | auto: the default of Simulation(client_batching=None)


def resolve_client_batching(choice: str | None, device: torch.device) -> str:
    """Whether a round's participants train jointly ("on" | "off" | "auto"; methods that offer
    ``client_update_many``; an execution option like prefetch: it changes no result, only the speed).
    ``auto``: on where the method says the joint pass pays (``batching_pays``: the federated-LoRA family
    with linear adapters, SmolLM2 excepted; benchmarks/batched_round.py measured the batched ViT round 1.30x
    (10 participants) and 1.19x (50) faster on the 2-core CPU, the char-lm round 1.24x and 1.08x, the
    SmolLM2 round 0.61x (slower); per-segment convolution adapters were not faster there), off otherwise;
    for the MHPFL family's standard training (``StandardTraining.batching_pays_on``) on CUDA only (the CPU
    gain measured 0.82-1.51x by setting and load, and the CPU keeps its stored numbers bit for bit). The rule is the method's
    ``batching_pays_on(device)``."""
    choice = os.environ.get(CLIENT_BATCHING_ENV, "auto") if choice is None else choice
    choice = choice.strip().lower()
    if choice not in CLIENT_BATCHING:
        from fedbench.errors import ConfigError
        raise ConfigError(f"--client-batching {choice!r}: expected one of {', '.join(CLIENT_BATCHING)}")
    return choice


EVAL_SCOPE = "eval@"  # FLOP-meter kind of a client's evaluation under a protocol: eval@yi, eval@pfllib, ...


def check_also_protocols(cfg: RunConfig, also: tuple[str, ...]) -> tuple[str, ...]:
    """The protocols one training is evaluated under: the run's own, then ``also`` (each checked as the
    run's config with that protocol would be: pfllib only for the MHPFL family); duplicates dropped."""
    from fedbench.config import sibling_config
    out = [cfg.protocol]
    for p in also:
        q = sibling_config(cfg, p).protocol
        if q not in out:
            out.append(q)
    return tuple(out)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fedbench.errors import ConfigError
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


class Simulation:
    def __init__(self, cfg: RunConfig, data: FederatedData, device: torch.device,
                 prefetch: bool | None = None, *, backbone: nn.Module | None = None,
                 batches: BatchSource | None = None, optim: LocalOptimizer | None = None,
                 evaluator: Evaluator | None = None, client_batching: str | None = None,
                 also_protocols: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.client_batching = resolve_client_batching(client_batching, device)
        self.data = data
        self.device = device
        if device.type == "cpu":
            tune_host_allocator()  # process-wide, changes no result (see engine/allocator.py)
        self.num_classes = data.num_classes
        self.meter = FlopMeter()
        self.state = ModuleState(device, self.meter, seed=cfg.seed, same_init=cfg.same_init,
                                 channels_last=cfg.channels_last)
        self.batches = batches or BatchSource(cfg, data, device, prefetch)
        self.optim = optim or LocalOptimizer(cfg, device)
        self.evaluator = evaluator or Evaluator(data, cfg, device)
        self.backbone = self._install_backbone(backbone) if backbone is not None else None
        method_cls = cfg.method_class()
        self.method: Method = method_cls(method_params_obj(cfg), cfg)
        self._metrics: dict = {}
        archs = model_assignment(cfg.models, cfg.clients)
        train_labels = data.split_labels["train"]
        self.clients: list[Client] = []
        for k, arch in enumerate(archs):
            sizes = {s: int(data.sizes(s)[k]) for s in ("train", "val", "test")}
            classes = np.unique(train_labels[data.partition.indices["train"][k]])
            counts = np.bincount(train_labels[data.partition.indices["train"][k]], minlength=self.num_classes)
            c = Client(self, k, arch, cnn_spec(arch, self.num_classes), sizes,
                       torch.as_tensor(classes, dtype=torch.int64, device=device),
                       torch.as_tensor(counts, dtype=torch.int64))
            self.clients.append(c)
        self.server = Server(self)
        self.method.setup(self.server, self.clients)
        for c in self.clients:
            self.method.client_init(c)
        self.broadcast = self.method.server_init(self.server)
        n = {"all-splits": lambda c: sum(c.sizes.values()), "train": lambda c: c.n_train,
             "uniform": lambda c: 1}[cfg.agg_weight]
        self.agg_n = np.array([n(c) for c in self.clients], dtype=np.float64)
        self.has_global_model = type(self.method).global_predict is not Method.global_predict
        self.protocol = cfg.protocol
        self.protocols = check_also_protocols(cfg, also_protocols)  # the run's own first
        self._has_view = type(self.method).view is not Method.view
        self._evals: dict[str, dict[int, dict]] = {}
        self._eval_time: dict[str, float] = {}

    def _install_backbone(self, backbone: nn.Module) -> nn.Module:
        """The one frozen backbone all clients share: on the device, eval mode, no gradients, metered."""
        backbone = backbone.to(self.device).eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        if self.cfg.channels_last:
            for m in backbone.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        self.meter.attach(backbone)
        return backbone

    # --- services used through Client/Server handles -------------------------------------------
    @staticmethod
    def _key(party: Party) -> tuple:
        return ("client", party.id) if isinstance(party, Client) else ("server",)

    def create_module(self, party: Party, name: str, spec: ModuleSpec) -> nn.Module:
        party.specs[name] = spec
        return self.state.create(self._key(party), name, spec)

    def bound_module(self, party: Party, name: str) -> nn.Module:
        return self.state.bound(self._key(party), name)

    def compute(self):
        """The precision context of client computation (bf16 autocast, or nothing)."""
        if self.cfg.precision == "bf16":
            # no weight-cast cache: the region spans many optimiser steps, and a cached bf16 copy of
            # a weight would go stale after the first step (the cache is only cleared on exit)
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def train_batches(self, client: Client, epochs: int, augment: bool, shuffle: bool, count: bool = True):
        return self.batches.train_batches(client, epochs, augment, shuffle, count)

    def make_optimizer(self, params, lr: float | None = None, t: int | None = None) -> torch.optim.Optimizer:
        return self.optim.make(params, lr, t)

    def optimizer_step(self, opt: torch.optim.Optimizer | tuple[torch.optim.Optimizer, ...], loss: torch.Tensor) -> None:
        self.optim.step(opt, loss)

    def report(self, party: Party, name: str, value: float) -> None:
        key = party.id if isinstance(party, Client) else "round"
        self._metrics.setdefault(key, {})[name] = float(value)

    def close(self) -> None:
        """Stop the data helper thread (if any)."""
        self.batches.close()

    # --- the round loop -------------------------------------------------------------------------
    def sample(self, t: int) -> list[int]:
        rng = numpy_rng(self.cfg.seed, "sample", t)
        return sorted(rng.choice(self.cfg.clients, self.cfg.per_round, replace=False).tolist())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate(self, client: Client) -> tuple[int | None, int]:
        return self.evaluator.client(self.method, client)

    def _download(self, client: Client, rows: dict, once: bool = False) -> object:
        """``client``'s download of the current broadcast, its bytes counted; ``once``: a send the run makes
        a single time (the initial state pushed to every client before round 1's training), recorded in
        ``bytes_down_once`` as well, so a report can tell it from the per-round traffic."""
        payload = self.method.download(self.server, client, self.broadcast)
        n = payload_bytes(payload)
        rows[client.id].bytes_down += n
        if once:
            rows[client.id].bytes_down_once += n
        return payload

    def run_round(self, t: int) -> RoundResult:
        cfg, method = self.cfg, self.method
        for c in self.clients:
            c.round, c.streams = t, 0
        self.server.round = t
        rows = {c.id: ClientRow(c.id, False) for c in self.clients}
        self.batches.samples[:] = 0
        self._metrics = {}
        initial: dict = {}
        if t == 1 and getattr(cfg, "eval_initial", False):  # FLOPs in round 1's eval, time in none of its times
            self._evaluate_initial(initial)
        self._sync()
        t0 = time.perf_counter()
        if t == 1 and method.push == "all" and self.broadcast is not None:
            for c in self.clients:  # the initial state, once (e.g. FedKD's dense mentee, LG-FedAvg's head)
                method.receive(c, self._download(c, rows, once=True))
        selected = self.sample(t)
        uploads = []
        w = self.agg_n[selected] / self.agg_n[selected].sum()
        evaluated = t % cfg.eval_every == 0 or t == cfg.rounds
        self._evals = {p: {} for p in self.protocols}
        self._eval_time = dict.fromkeys(self.protocols, 0.0)
        yi = evaluated and "yi" in self.protocols
        joint = self._joint(selected)
        if joint:
            self._joint_updates(selected, w, rows, uploads)
        else:
            for k, wk in zip(selected, w, strict=True):
                c, row = self.clients[k], rows[k]
                row.selected = True
                down = self._download(c, rows) if method.push == "selected" else self.broadcast
                with self.meter.scope(k, "train"), self.compute():
                    up = method.client_update(c, down)
                row.bytes_up += payload_bytes(up)
                uploads.append(Upload(k, float(wk), up))
                if yi:  # right after its local training, the model as trained
                    self._evaluate_client(c, "yi")
        if joint and yi:
            self._evaluate_clients([self.clients[k] for k in selected], "yi")
        with self.meter.scope("server", "train"):
            self.broadcast = method.server_update(self.server, uploads)
        if method.push == "all" and self.broadcast is not None:
            for c in self.clients:
                payload = self._download(c, rows)
                with self.meter.scope(c.id, "train"):
                    method.receive(c, payload)
        self._sync()
        t1 = time.perf_counter()
        round_metrics = {**self._metrics.pop("round", {}), **initial}
        in_training = dict(self._eval_time)  # yi's evaluations ran inside the training loop: eval time
        if evaluated:
            for p in self.protocols:  # every client, after the round (pfllib: through the broadcast's view)
                if p != "yi":
                    self._evaluate_clients(self.clients, p)
            if self.has_global_model:
                with self.meter.scope("global", "eval"), self.compute():
                    correct, total = self.evaluator.global_model(method, self.server)
                if correct is not None:
                    round_metrics.update(global_correct=correct, global_total=total)
        self._sync()
        t2 = time.perf_counter()
        self._named_eval_metrics(round_metrics)
        macs = self.meter.take()
        own_eval = {p: {} for p in self.protocols}  # protocol -> client -> its evaluations' MACs
        for (who, kind), v in macs.items():
            if who == "server":
                continue
            if who == "global":
                round_metrics["global_eval_macs"] = round_metrics.get("global_eval_macs", 0) + v
            elif kind == "train":
                rows[who].train_macs += v
            elif kind.startswith(EVAL_SCOPE):
                own_eval[kind[len(EVAL_SCOPE):]][who] = v
            else:  # shared by every protocol (--eval-initial)
                rows[who].eval_macs += v
        for k in rows:
            rows[k].train_samples = int(self.batches.samples[k])
            rows[k].metrics = self._metrics.get(k, {})
        server_macs = sum(v for (who, _), v in macs.items() if who == "server")
        train_s = t1 - t0 - sum(in_training.values())
        after = sum(s - in_training[q] for q, s in self._eval_time.items())  # clients' evaluations after t1
        results = {}
        for p in self.protocols:
            # the time after training less every protocol's client evaluations there, plus p's own (during or
            # after training): with one protocol exactly the round's evaluation time
            eval_s = t2 - t1 - after + self._eval_time[p]
            prows = []
            for k, r in rows.items():
                e = self._evals[p].get(k)
                prow = dataclasses.replace(r, eval_macs=r.eval_macs + own_eval[p].get(k, 0), metrics=dict(r.metrics))
                if e is not None:
                    prow.correct, prow.total = e["correct"], e["total"]
                    prow.metrics.update(e["metrics"])
                prows.append(prow)
            results[p] = RoundResult(t, train_s + eval_s, train_s, eval_s, server_macs, evaluated, prows,
                                     dict(round_metrics))
        own = results.pop(self.protocol)
        own.also = results
        return own

    def _evaluate_client(self, c: Client, protocol: str) -> None:
        """One client's evaluation at ``protocol``'s moment: its test split (correct, total), and with
        ``--eval-val`` its validation split (``val_correct``, ``val_total``), under yi also the batch-mean
        accuracy (``acc_batch_mean``); the evaluator's named metrics of the test split as they are, of the
        validation split with ``test_`` renamed ``val_``. pfllib: first the method's ``view`` of this
        client's download of the current broadcast, undone afterwards (no bytes: a device of the protocol)."""
        method, t0 = self.method, time.perf_counter()
        snap = None
        res = {"correct": None, "total": None, "metrics": {}}
        take = getattr(self.evaluator, "take_metrics", None)

        def named(rename: str = "") -> None:
            for name, v in ((take() if take is not None else {}).get(c.id) or {}).items():
                res["metrics"][name.replace("test_", rename, 1) if rename else name] = v

        with self.meter.scope(c.id, EVAL_SCOPE + protocol), self.compute():
            if protocol == "pfllib" and method.push != "all" and self._has_view and self.broadcast is not None:
                payload = method.download(self.server, c, self.broadcast)
                snap = self.state.snapshot(("client", c.id))
                method.view(c, payload)
            res["correct"], res["total"] = self.evaluate(c)
            batch_mean = self.evaluator.batch_mean
            named()
            if self.cfg.eval_val:
                vc, vt = self.evaluator.client(method, c, "val")
                if vc is not None:
                    res["metrics"]["val_correct"] = float(vc)
                res["metrics"]["val_total"] = float(vt)
                named("val_")
        if snap is not None:
            self.state.restore(snap)
        if protocol == "yi" and batch_mean is not None and res["correct"] is not None:
            res["metrics"]["acc_batch_mean"] = float(batch_mean)
        self._evals[protocol][c.id] = res
        self._sync()
        self._eval_time[protocol] += time.perf_counter() - t0

    def _evaluate_clients(self, clients: list[Client], protocol: str) -> None:
        """Every client of ``clients`` evaluated at ``protocol``'s moment: those that share a CNN in one stacked
        pass (``_stacked_eval``) where the engine batches clients and the evaluation allows it, else one by one."""
        groups: dict = {}
        if self._stacked_eval(protocol):
            for c in clients:
                groups.setdefault(c.specs.get("model"), []).append(c)
        for c in clients:
            g = groups.get(c.specs.get("model"), [c])
            if len(g) < 2:
                self._evaluate_client(c, protocol)
            elif c is g[0]:
                self._evaluate_stacked(g, protocol)

    def _stacked_eval(self, protocol: str) -> bool:
        """Stacked evaluation: with client batching on (or ``auto`` where the method's joint pass pays on this
        device), a method that predicts with each client's own CNN, the engine's own image evaluator, the test
        split only (no ``--eval-val``), and no pfllib view to install per client."""
        m = self.method
        batching = self.client_batching == "on" or (self.client_batching == "auto" and m.batching_pays_on(self.device))
        view = protocol == "pfllib" and m.push != "all" and self._has_view and self.broadcast is not None
        return (batching and m.predicts_with_model() and isinstance(self.evaluator, Evaluator)
                and not self.evaluator.token_level and not self.cfg.eval_val and not view)

    def _evaluate_stacked(self, clients: list[Client], protocol: str) -> None:
        """``_evaluate_client`` of same-CNN clients in one pass: the same rows (correct, total, MACs per client,
        under yi the batch mean)."""
        t0 = time.perf_counter()
        idx = self.data.index["test"]
        clients = sorted(clients, key=lambda c: -len(idx[c.id]))  # stable
        modules = []
        for c in clients:  # bind each client's tensors in turn and take them
            m = c.module("model")
            modules.append({n: p.detach() for n, p in m.named_parameters()})
        params = {n: torch.stack([m[n] for m in modules]) for n in modules[0]}
        ws = clients[0].module("model")
        scope = EVAL_SCOPE + protocol

        def seen(layer: str, inputs: list[torch.Tensor]) -> None:
            for c, x in zip(clients, inputs, strict=False):
                with self.meter.scope(c.id, scope):
                    self.meter.add(self.meter.call_macs(getattr(ws, layer), x, weight_grad=False, input_grad=False))

        with self.compute():
            res = self.evaluator.stacked(params, [idx[c.id] for c in clients], seen)
        for c, r in zip(clients, res, strict=True):
            metrics = {}
            if protocol == "yi" and r["batch_mean"] is not None:
                metrics["acc_batch_mean"] = float(r["batch_mean"])
            self._evals[protocol][c.id] = {"correct": r["correct"], "total": r["total"], "metrics": metrics}
        self._sync()
        self._eval_time[protocol] += time.perf_counter() - t0

    def _named_eval_metrics(self, round_metrics: dict, prefix: str = "") -> None:
        """Metrics the evaluator names (token loss, perplexity): per client, the global model's per round."""
        take = getattr(self.evaluator, "take_metrics", None)
        for who, named in (take() if take is not None else {}).items():
            for name, v in named.items():
                if who == "global":
                    round_metrics[f"global_{prefix}{name}"] = v
                else:
                    self._metrics.setdefault(who, {})[prefix + name] = v

    def _evaluate_initial(self, round_metrics: dict) -> None:
        """``--eval-initial``: every client and the global model before the first round's training (the
        starting point, e.g. the pretrained LM's perplexity), as ``initial_*`` metrics of round 1."""
        for c in self.clients:
            with self.meter.scope(c.id, "eval"), self.compute():
                correct, total = self.evaluate(c)
            if correct is not None and total:
                self.report(c, "initial_accuracy", correct / total)
        if self.has_global_model:
            with self.meter.scope("global", "eval"), self.compute():
                correct, total = self.evaluator.global_model(self.method, self.server)
            if correct is not None and total:
                round_metrics["global_initial_accuracy"] = correct / total
        self._named_eval_metrics(round_metrics, "initial_")

    def _joint(self, selected: list[int]) -> bool:
        m = self.method
        if self.client_batching == "off" or len(selected) < 2:
            return False
        return m.batchable() and (self.client_batching == "on" or m.batching_pays_on(self.device))

    def _joint_updates(self, selected: list[int], w, rows: dict, uploads: list) -> None:
        """The participants' updates in one call of ``client_update_many`` (batched local training). The
        per-client rows are those of the one-by-one loop: bytes per payload, MACs credited per client by
        the method's joint pass (anything left in the joint scope is an error), samples per client."""
        method = self.method
        clients = [self.clients[k] for k in selected]
        downs = []
        for c in clients:
            rows[c.id].selected = True
            downs.append(self._download(c, rows) if method.push == "selected" else self.broadcast)
        with self.meter.scope("joint", "train"), self.compute():
            ups = method.client_update_many(clients, downs)
        stray = {k: v for k, v in self.meter.macs.items() if k[0] == "joint" and v}
        if stray:
            raise RuntimeError(f"{method.name}: client_update_many counted {stray} MACs outside its joint pass")
        self.meter.macs.pop(("joint", "train"), None)
        for c, wk, up in zip(clients, w, ups, strict=True):
            rows[c.id].bytes_up += payload_bytes(up)
            uploads.append(Upload(c.id, float(wk), up))

    def run(self, on_round: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
        results = []
        try:
            for t in range(1, self.cfg.rounds + 1):
                r = self.run_round(t)
                results.append(r)
                if on_round is not None:
                    on_round(r)
        finally:
            self.close()
        return results
