#!/usr/bin/env python
"""fedbench speed suite: the ceiling, a reference FL loop and the engine on one workload, in one process.

    python benchmarks/speed.py --data-dir /work/data --out bench-64.json        # the standard workload
    python benchmarks/speed.py --data-dir /work/data --batch-size 10 --out bench-10.json
    python benchmarks/speed.py --dataset synthetic --quick --out /tmp/q.json     # smoke test (seconds)
    python benchmarks/speed.py --breakdown --threads-study --batched-study ...   # + the studies below

Workload (the issue's standard): CIFAR-10, 20 clients, pathological 2 classes each, CNN-1..5 (client i
gets CNN-(i mod 5 + 1)), fraction 1, 1 local epoch, batch 64, 5 rounds, every client evaluated every
round. Everything below runs in this process, on one device, with ``--threads`` intra-op threads.

1. **Ceiling.** Per CNN and per numeric variant (fp32, fp32cl = channels_last, bf16cl = autocast +
   channels_last; SGD fused where torch has it): a bare
   forward/backward/SGD loop on resident random tensors at the batch size (img/s, GFLOP/s), a bare
   forward at the batch size and at the evaluation chunk size; and the GEMM peak (square matmuls,
   a few sizes, best of N) in fp32 and bf16. Best-of-N windows; with ``--ceiling-passes 2`` (the
   default outside ``--quick``) it is measured before and after the runs and the faster kept, so a
   busy neighbour can only make the ideal *harder* to reach.
2. **Reference loop**, written the way common FL libraries run clients: a torchvision-style Dataset
   (host uint8 images, per-sample ToTensor/Normalize/flip/erase/crop transforms as the engine's
   ``--augment``) and a DataLoader per client, one nn.Module per client, ``.to(device)`` per batch,
   per-client local CE training (FedAvg-style; aggregation within each architecture group through
   state_dicts), client-by-client evaluation with a DataLoader at the training batch size (as
   PFLlib/HtFLlib do), ``.item()`` per batch. Same clients, samples, models, SGD and clipping as the
   engine. It does not run FedLoRA: plain local CE is how libraries run a client.
3. **Engine** (``fedbench.engine.simulation``) on the same workload: FedLoRA, the heaviest baseline
   (``--baseline auto`` measures the engine's MACs per round of FML and FedKD and takes the larger),
   and ``standalone`` (local CE only: the same work as the reference loop, for an apples-to-apples
   speedup); in each numeric variant of ``--variants``.

Ideal time per round (from the same-process ceiling, for the exact sample counts of the engine run):

    ideal = sum_{trained k} sum_{passes p} n_k E_p / ceiling_p(arch_p)  +  sum_{all k} n_test_k / fwd_ceiling(arch_k)

with passes: FedLoRA = (train f_k, E) + (forward f_k at the batch size, E2: phase 2 runs f_k under
no_grad; the adapter's own work is not in the ideal); FML/FedKD = (train f_k, E) + (train the shared
CNN, E) (FedKD's W_h, KL terms and SVDs are not in the ideal); standalone and the reference = (train
f_k, E). fwd_ceiling is the faster of the forward at the batch size and at the evaluation chunk (the
strict choice, whatever chunk a loop evaluates with). Each numeric variant (fp32, fp32 + channels_last,
...) is held to the ceiling measured in that variant. Round 1 (fvcore tracing, allocator warm-up) is
reported but not used: s/round is the median of rounds 2..R; "best" is the fastest round. Per-round
efficiency = ideal / wall time. FLOPs are 2 x the engine meter's MACs (fvcore convention; backward
derived as 2x forward).

Optional studies, each deciding an engine choice on the device it runs on:
* ``--breakdown``: FedLoRA training (``--breakdown-variant``: fp32cl where it runs, the CPU default) split
  into parts (data, meter, backward, clip, step, rest), and
  the engine with each fast path undone (one-gather transform, cached meter count, meter by wrapped
  forwards, foreach clip, prefetch thread), with candidate changes not taken (SGD foreach), and without the
  protocol's gradient clip (a diagnostic: what the clip costs against the bare ceiling);
* ``--threads-study``: the engine with every (intra-op threads, prefetch thread) pair, and one process
  per core against threads on the bare step;
* ``--batched-study``: k same-architecture clients trained together with torch.func (vmap over stacked
  parameters) against one by one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedbench.config import RunConfig, make_config
from fedbench.data.sources import Arrays, content_digest, load_dataset
from fedbench.data.transforms import BatchTransform
from fedbench.engine.allocator import tune_host_allocator
from fedbench.engine.batches import BatchSource, available_cores, default_prefetch
from fedbench.engine.data import build_federated_data
from fedbench.engine.optim import LocalOptimizer
from fedbench.engine.simulation import Simulation, resolve_device
from fedbench.metering.flops import FlopMeter
from fedbench.models.cnn import CNN_WIDTHS, cnn_spec, model_assignment
from fedbench.seeding import numpy_rng

# numeric variant -> (precision, channels_last)
VARIANTS: dict[str, tuple[str, bool]] = {
    "fp32": ("fp32", False), "fp32cl": ("fp32", True), "bf16": ("bf16", False), "bf16cl": ("bf16", True),
}
ARCHS = tuple(CNN_WIDTHS)


# --- machine and set-up ----------------------------------------------------------------------------

def set_threads(threads: int | None) -> int:
    """Pin intra-op threads explicitly (default: the cores torch sees); one inter-op thread."""
    n = threads or torch.get_num_threads()
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel region
        torch.set_num_interop_threads(1)
    return n


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info(device: torch.device, threads: int) -> dict:
    flags = cpu_flags()
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    info = {
        "device": str(device), "threads": threads, "cpus_visible": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu_model": model or platform.processor(),
        "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_start": list(os.getloadavg()),
        # the engine's host-allocator setting, applied before anything runs, so that the ceiling, the
        # reference loop and the engine share it (fedbench/engine/allocator.py)
        "host_allocator": tune_host_allocator() if device.type == "cpu" else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def data_dir_of(args) -> Path | None:
    d = args.data_dir or os.environ.get("FEDBENCH_DATA_DIR")
    return Path(d).expanduser() if d else None


def subset_arrays(arrays: Arrays, n_train: int | None, n_test: int | None, seed: int = 0) -> Arrays:
    """A seeded random subset (same class mix in expectation) of at most n_train / n_test images."""
    rng = np.random.default_rng(seed)

    def pick(x, y, n):
        if n is None or n >= len(y):
            return x, y
        ix = np.sort(rng.permutation(len(y))[:n])
        return x[ix], y[ix]

    xtr, ytr = pick(arrays.x_train, arrays.y_train, n_train)
    xte, yte = pick(arrays.x_test, arrays.y_test, n_test)
    if len(ytr) == len(arrays.y_train) and len(yte) == len(arrays.y_test):
        return arrays
    return replace(arrays, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                   digest=content_digest(xtr, ytr, xte, yte), source=f"{arrays.source} (subset)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_call(fn: Callable[[], object], device: torch.device, min_time: float, repeats: int,
              warmup: int = 3) -> float:
    """Best seconds per call over ``repeats`` windows of at least ``min_time`` seconds each."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    calls = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-7)))
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


# --- ceiling ---------------------------------------------------------------------------------------

def gemm_peak(device: torch.device, dtype: torch.dtype, sizes, min_time: float, repeats: int) -> dict:
    """GFLOP/s of square n x n matmuls (2 n^3 FLOPs), best of ``repeats``; TF32 stays off on CUDA."""
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        s = time_call(lambda a=a, b=b: torch.mm(a, b), device, min_time, repeats, warmup=2)
        by_size[str(n)] = 2 * n ** 3 / s / 1e9
    return {"gflops_by_size": by_size, "peak_gflops": max(by_size.values())}


def _fused_ok(device: torch.device) -> bool:
    try:
        torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def macs_per_sample(arch: str, num_classes: int) -> dict[str, int]:
    """MACs per image of a training step and of a forward, counted by the engine's own meter."""
    meter = FlopMeter()
    m = cnn_spec(arch, num_classes).build()
    meter.attach(m)
    x = torch.randn(2, 3, 32, 32)
    with meter.scope("probe", "train"):
        m(x)[0].sum().backward()
    with meter.scope("probe", "eval"), torch.no_grad():
        m(x)
    macs = meter.take()
    return {"train": macs[("probe", "train")] // 2, "fwd": macs[("probe", "eval")] // 2}


def model_ceiling(arch: str, num_classes: int, batch: int, eval_batch: int, variant: str,
                  device: torch.device, cfg: RunConfig, min_time: float, repeats: int) -> dict:
    """Bare loops on resident tensors: train step (fwd+bwd+SGD, no clip), forward at batch, at eval chunk."""
    precision, cl = VARIANTS[variant]
    fmt = torch.channels_last if cl else torch.contiguous_format
    torch.manual_seed(0)
    model = cnn_spec(arch, num_classes).build().to(device).to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device)
    xe = torch.randn(eval_batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    # the fastest SGD torch has on the device (fused where supported): the ceiling is what the hardware can do
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          fused=_fused_ok(device))

    def train_step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(x)[0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward(inp):
        with torch.no_grad(), autocast(device, precision):
            return model(inp)

    s_train = time_call(train_step, device, min_time, repeats)
    s_fwd = time_call(lambda: forward(x), device, min_time, repeats)
    s_eval = time_call(lambda: forward(xe), device, min_time, repeats)
    return {"train_ips": batch / s_train, "fwd_ips": batch / s_fwd, "eval_ips": eval_batch / s_eval,
            "step_ms": s_train * 1e3}


def measure_ceiling(variants, batch: int, eval_batch: int, num_classes: int, device, cfg, min_time, repeats,
                    gemm_sizes, log) -> dict:
    out = {"batch": batch, "eval_batch": eval_batch, "models": {}, "gemm": {}}
    for v in variants:
        out["models"][v] = {}
        for arch in ARCHS:
            out["models"][v][arch] = model_ceiling(arch, num_classes, batch, eval_batch, v, device, cfg,
                                                   min_time, repeats)
        log(f"  ceiling {v}: " + ", ".join(f"{a} {r['train_ips']:.0f}" for a, r in out["models"][v].items())
            + " img/s (train)")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out["gemm"][name] = gemm_peak(device, dtype, gemm_sizes, min_time, repeats)
        log(f"  GEMM {name}: {out['gemm'][name]['peak_gflops']:.0f} GFLOP/s")
    return out


def merge_ceilings(a: dict, b: dict) -> dict:
    """Keep the faster of two ceiling measurements, number by number."""
    out = copy.deepcopy(a)
    for v, archs in b["models"].items():
        for arch, r in archs.items():
            mine = out["models"][v][arch]
            for k in ("train_ips", "fwd_ips", "eval_ips"):
                mine[k] = max(mine[k], r[k])
            mine["step_ms"] = min(mine["step_ms"], r["step_ms"])
    for name, g in b["gemm"].items():
        for n, val in g["gflops_by_size"].items():
            out["gemm"][name]["gflops_by_size"][n] = max(out["gemm"][name]["gflops_by_size"][n], val)
        out["gemm"][name]["peak_gflops"] = max(out["gemm"][name]["gflops_by_size"].values())
    return out


# --- the ideal ---------------------------------------------------------------------------------------

def training_passes(cfg: RunConfig, arch: str) -> list[tuple[str, str, int]]:
    """(architecture, ceiling kind, epochs) of the passes a method makes over each training sample."""
    E = cfg.epochs
    if cfg.method == "fedlora":
        return [(arch, "train_ips", E), (arch, "fwd_ips", cfg.method_params.get("adapter_epochs") or E)]
    if cfg.method in ("fml", "fedkd"):
        return [(arch, "train_ips", E), (cfg.method_params["shared_model"], "train_ips", E)]
    return [(arch, "train_ips", E)]


def counted_samples(cfg: RunConfig, n: int) -> int:
    """Samples the engine counts for one client and round (FedLoRA's phase 2 counts too)."""
    if cfg.method == "fedlora":
        return n * (cfg.epochs + (cfg.method_params.get("adapter_epochs") or cfg.epochs))
    return n * cfg.epochs


def round_work(cfg: RunConfig, trained: list[tuple[str, int]], tested: list[tuple[str, int]],
               eval_kind: str = "eval_ips") -> dict[str, dict[str, int]]:
    """Images per (ceiling kind, architecture) that one round processes: {"train": {...}, "eval": {...}}."""
    work: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    for arch, n in trained:
        for a, kind, e in training_passes(cfg, arch):
            key = f"{a}|{kind}"
            work["train"][key] = work["train"].get(key, 0) + n * e
    for arch, n in tested:
        key = f"{arch}|{eval_kind}"
        work["eval"][key] = work["eval"].get(key, 0) + n
    return work


def ideal_seconds(ceil: dict, work: dict) -> tuple[float, float]:
    """(ideal training seconds, ideal evaluation seconds): images / ceiling throughput, summed.

    Evaluation images are charged at the faster of the two measured forward ceilings (at the training
    batch size and at the evaluation chunk), whatever chunk the run used: the strict ideal."""
    def rate(key):
        arch, kind = key.split("|")
        if kind in ("eval_ips", "fwd_eval"):
            return max(ceil[arch]["eval_ips"], ceil[arch]["fwd_ips"])
        return ceil[arch][kind]

    def total(part):
        return sum(n / rate(key) for key, n in part.items())
    return total(work["train"]), total(work["eval"])


# --- the engine --------------------------------------------------------------------------------------

def workload_config(args, method: str, variant: str, **over) -> RunConfig:
    """The workload's config; options the variant does not set take the device's defaults (fused SGD on
    the CPU), as `fedbench run` would."""
    precision, cl = VARIANTS[variant]
    values = dict(method=method, dataset=args.dataset, clients=args.clients, fraction=args.fraction,
                  rounds=args.rounds, epochs=args.epochs, batch_size=args.batch_size, models="hetero",
                  precision=precision, channels_last=cl, seed=args.seed)
    values.update(over)
    return make_config(values, resolve_device(args.device).type)


def summarize_rounds(rows: list[dict]) -> dict:
    steady = rows[1:] if len(rows) > 1 else rows
    walls = [r["wall_s"] for r in steady]
    effs = [r["efficiency"] for r in steady if r.get("efficiency") is not None]
    return {
        "s_per_round": statistics.median(walls), "s_per_round_best": min(walls),
        "train_s": statistics.median(r["train_s"] for r in steady),
        "eval_s": statistics.median(r["eval_s"] for r in steady),
        "ideal_s": statistics.median(r["ideal_s"] for r in steady) if steady[0].get("ideal_s") else None,
        "train_efficiency": statistics.median(r["ideal_train_s"] / r["train_s"] for r in steady)
        if steady[0].get("ideal_train_s") else None,
        "eval_efficiency": statistics.median(r["ideal_eval_s"] / r["eval_s"] for r in steady)
        if steady[0].get("ideal_eval_s") else None,
        "efficiency": statistics.median(effs) if effs else None,
        "efficiency_best": max(effs) if effs else None,
        "gflops": statistics.median(r["gflops"] for r in steady) if steady[0].get("gflops") is not None else None,
        "first_round_s": rows[0]["wall_s"],
        "final_accuracy": rows[-1].get("accuracy"), "final_accuracy_weighted": rows[-1].get("accuracy_weighted"),
    }


def run_engine(arrays: Arrays, cfg: RunConfig, device: torch.device, ceil_v: dict, log,
               label: str) -> dict:
    """Run cfg.rounds rounds of the engine; per round: times, MACs, samples, accuracy, ideal, efficiency."""
    gc.collect()
    t0 = time.perf_counter()
    sim = Simulation(cfg, build_federated_data(arrays, cfg, device), device)
    setup_s = time.perf_counter() - t0
    rows = []
    for t in range(1, cfg.rounds + 1):
        r = sim.run_round(t)
        trained = [(sim.clients[x.client].arch, sim.clients[x.client].n_train) for x in r.rows if x.selected]
        tested = [(c.arch, c.sizes["test"]) for c in sim.clients] if r.evaluated else []
        samples = sum(x.train_samples for x in r.rows)
        expected = sum(counted_samples(cfg, n) for _, n in trained)
        work = round_work(cfg, trained, tested)
        it, ie = ideal_seconds(ceil_v, work)
        macs = sum(x.train_macs + x.eval_macs for x in r.rows) + r.server_macs
        acc, acc_w = r.accuracy()
        rows.append({"round": t, "wall_s": r.wall_s, "train_s": r.train_s, "eval_s": r.eval_s,
                     "train_samples": samples, "expected_samples": expected,
                     "eval_samples": sum(n for _, n in tested), "macs": macs,
                     "server_macs": r.server_macs, "gflops": 2 * macs / r.wall_s / 1e9,
                     "work": work, "ideal_train_s": it, "ideal_eval_s": ie, "ideal_s": it + ie,
                     "efficiency": (it + ie) / r.wall_s, "accuracy": acc, "accuracy_weighted": acc_w})
        log(f"  {label} round {t}: {r.wall_s:.2f} s (train {r.train_s:.2f}, eval {r.eval_s:.2f}), "
            f"ideal {it + ie:.2f} s, acc {acc if acc is None else round(acc, 4)}")
        if samples != expected:
            log(f"  WARNING: engine counted {samples} training samples, the ideal assumes {expected}")
    sim.close()
    del sim
    gc.collect()
    return {"label": label, "method": cfg.method, "precision": cfg.precision, "channels_last": cfg.channels_last,
            "batch_size": cfg.batch_size, "setup_s": setup_s, "rounds": rows, **summarize_rounds(rows)}


def pick_heaviest(arrays: Arrays, args, device: torch.device, candidates, log) -> tuple[str, dict]:
    """The baseline with the most engine MACs per round (training + server), measured on round 1 with
    a quarter of the clients (the same sampled clients for every candidate; no evaluation)."""
    macs = {}
    for m in candidates:
        cfg = workload_config(args, m, "fp32", fraction=max(args.fraction * 0.25, 1 / args.clients),
                              rounds=2, eval_every=2)
        sim = Simulation(cfg, build_federated_data(arrays, cfg, device), device)
        r = sim.run_round(1)
        macs[m] = sum(x.train_macs for x in r.rows) + r.server_macs
        log(f"  probe {m}: {2 * macs[m] / 1e9:.1f} GFLOP in round 1 ({sum(x.selected for x in r.rows)} clients)")
        sim.close()
        del sim
    return max(macs, key=macs.get), macs


# --- the reference loop ----------------------------------------------------------------------------------

class ClientImages(torch.utils.data.Dataset):
    """torchvision-style dataset of one client: host uint8 HWC images, a transform per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), int(self.labels[i])


def reference_transforms(info, augment: str):
    """torchvision transforms equal to the engine's --augment (Normalize, flip, erase, crop pad 4)."""
    import torchvision.transforms as T

    base = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    aug = []
    if augment != "none":
        aug.append(T.RandomHorizontalFlip())
        if augment == "spec":
            aug.append(T.RandomErasing(p=0.5, scale=(0.04, 0.2), ratio=(0.5, 2.0), value=0))
        aug.append(T.RandomCrop(32, padding=4))
    return T.Compose(base + aug), T.Compose(base)


def run_reference(arrays: Arrays, cfg: RunConfig, device: torch.device, ceil_v: dict, workers: int,
                  log) -> dict:
    """The loop common FL libraries run: per-client Dataset/DataLoader, one model object per client."""
    from torch.utils.data import DataLoader

    gc.collect()
    t0 = time.perf_counter()
    fdata = build_federated_data(arrays, cfg, torch.device("cpu"))  # only for the engine's exact partition
    host_x = np.concatenate([arrays.x_train, arrays.x_test])
    host_y = np.concatenate([arrays.y_train, arrays.y_test])
    K = fdata.num_classes
    archs = model_assignment(cfg.models, cfg.clients)
    train_tf, test_tf = reference_transforms(arrays.info, cfg.augment)
    train_loaders, test_loaders = [], []
    for k in range(cfg.clients):
        tr = fdata.index["train"][k].numpy()
        te = fdata.index["test"][k].numpy()
        train_loaders.append(DataLoader(ClientImages(host_x[tr], host_y[tr], train_tf), batch_size=cfg.batch_size,
                                        shuffle=True, num_workers=workers))
        test_loaders.append(DataLoader(ClientImages(host_x[te], host_y[te], test_tf), batch_size=cfg.batch_size,
                                       shuffle=False, num_workers=workers))
    n_train = [len(dl.dataset) for dl in train_loaders]
    n_test = [len(dl.dataset) for dl in test_loaders]
    torch.manual_seed(cfg.seed)
    models = [cnn_spec(a, K).build().to(device) for a in archs]
    del fdata
    setup_s = time.perf_counter() - t0
    rows = []
    for t in range(1, cfg.rounds + 1):
        selected = sorted(numpy_rng(cfg.seed, "sample", t).choice(cfg.clients, cfg.per_round, replace=False).tolist())
        sync(device)
        t0 = time.perf_counter()
        uploads = {}
        for k in selected:
            model = models[k]
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
            for _ in range(cfg.epochs):
                for x, y in train_loaders[k]:
                    x, y = x.to(device), y.to(device)
                    loss = F.cross_entropy(model(x)[0], y)
                    opt.zero_grad()
                    loss.backward()
                    if cfg.clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                    opt.step()
            uploads[k] = copy.deepcopy(model.state_dict())
        # server: FedAvg within each architecture group (n_train weights), sent back to the group
        for arch in sorted(set(archs)):
            group = [k for k in selected if archs[k] == arch]
            if not group:
                continue
            w = np.array([n_train[k] for k in group], dtype=np.float64)
            w /= w.sum()
            avg = {name: sum(float(wk) * uploads[k][name] for wk, k in zip(w, group, strict=True))
                   for name in uploads[group[0]]}
            for k in range(cfg.clients):
                if archs[k] == arch:
                    models[k].load_state_dict(avg)
        sync(device)
        t1 = time.perf_counter()
        correct = []
        for k in range(cfg.clients):
            model = models[k]
            model.eval()
            c = 0
            with torch.no_grad():
                for x, y in test_loaders[k]:
                    x, y = x.to(device), y.to(device)
                    c += (model(x)[0].argmax(1) == y).sum().item()
            correct.append(c)
        sync(device)
        t2 = time.perf_counter()
        trained = [(archs[k], n_train[k]) for k in selected]
        tested = [(archs[k], n_test[k]) for k in range(cfg.clients)]
        work = round_work(replace(cfg, method="standalone"), trained, tested)
        it, ie = ideal_seconds(ceil_v, work)
        acc = float(np.mean([c / n for c, n in zip(correct, n_test, strict=True) if n]))
        rows.append({"round": t, "wall_s": t2 - t0, "train_s": t1 - t0, "eval_s": t2 - t1,
                     "train_samples": sum(n * cfg.epochs for _, n in trained), "work": work, "ideal_train_s": it,
                     "ideal_eval_s": ie, "ideal_s": it + ie, "efficiency": (it + ie) / (t2 - t0),
                     "accuracy": acc, "accuracy_weighted": sum(correct) / max(1, sum(n_test))})
        log(f"  reference round {t}: {t2 - t0:.2f} s (train {t1 - t0:.2f}, eval {t2 - t1:.2f}), ideal {it + ie:.2f} s")
    del models, train_loaders, test_loaders
    gc.collect()
    return {"label": "reference loop (FedAvg-style local CE)", "method": "reference", "precision": "fp32",
            "channels_last": False, "batch_size": cfg.batch_size, "setup_s": setup_s, "workers": workers,
            "rounds": rows, **summarize_rounds(rows)}


# --- where the engine loses time ---------------------------------------------------------------------------

class Timers:
    """Accumulated seconds of wrapped callables (CPU execution is synchronous; on CUDA only host time)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    def timed(self, fn, key: str):
        timers = self

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers.s[key] = timers.s.get(key, 0.0) + time.perf_counter() - t0

        return timed


def timed_batches(timers: Timers, orig):
    """BatchSource.train_batches with the time spent producing each batch (gather + augmentation)."""

    def train_batches(self, *a, **kw):
        it = orig(self, *a, **kw)
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            finally:
                timers.s["data (gather+augment)"] = timers.s.get("data (gather+augment)", 0.0) + time.perf_counter() - t0
            yield b

    return train_batches


# The engine's fast paths, each undone by monkeypatching (fedbench itself is not edited): the breakdown
# measures what each one is worth on this device, so that every choice in the engine is a measured one.

def _clip_plain(self, params):
    """LocalOptimizer.clip_gradients as torch's clip_grad_norm_ per tensor (no foreach, multiply always)."""
    torch.nn.utils.clip_grad_norm_(params, self.cfg.clip, foreach=False)


def _train_gather_plain(self, images, idx, mode, g, pad=4):
    """BatchTransform.train_gather done the plain way: gather, normalise, flip, erase, pad, crop."""
    return self.train(images[idx], mode, g)


def _hook_leaf(self, m):
    """FlopMeter._meter_leaf with a torch forward hook instead of a wrapped forward."""
    m.register_forward_hook(self._hook)


def _no_clip(self, params):
    """No gradient clip at all: not the protocol, only what its clip costs."""


def _sgd(**impl):
    """LocalOptimizer.make with another torch SGD implementation (``impl``: foreach=..., fused=...)."""
    def make(self, params, lr=None, t=None):
        cfg = self.cfg
        return torch.optim.SGD(list(params), lr=cfg.lr if lr is None else lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, **impl)
    return make


PLAIN: dict[str, list[tuple[object, str, object]]] = {
    "plain transform (step by step)": [(BatchTransform, "train_gather", _train_gather_plain)],
    # every call rebuilds the structural key and looks it up, as before the per-call cache
    "meter hook without cache": [(FlopMeter, "_per_sample", FlopMeter._traced_cost)],
    "meter as torch forward hooks (not wrapped forwards)": [(FlopMeter, "_meter_leaf", _hook_leaf)],
    "clip: torch's clip_grad_norm_ per tensor": [(LocalOptimizer, "clip_gradients", _clip_plain)],
    "SGD for-loop (not fused)": [(LocalOptimizer, "make", _sgd(foreach=False))],
}
CANDIDATES: dict[str, list[tuple[object, str, object]]] = {
    "candidate: SGD(foreach=True) instead of fused": [(LocalOptimizer, "make", _sgd(foreach=True))],
    # not a candidate (it changes the algorithm): what the protocol's gradient clip costs, which the bare
    # ceiling does not pay
    "diagnostic: no gradient clip (changes the algorithm)": [(LocalOptimizer, "clip_gradients", _no_clip)],
}


@contextlib.contextmanager
def patched(changes: list[tuple[object, str, object]]):
    saved = [(o, n, getattr(o, n)) for o, n, _ in changes]
    try:
        for o, n, f in changes:
            setattr(o, n, f)
        yield
    finally:
        for o, n, f in reversed(saved):
            setattr(o, n, f)


def _warm_meter(sim: Simulation) -> None:
    """Trace every module shape once (fvcore) so that no measured round pays for it."""
    seen = set()
    for c in sim.clients:
        if c.arch in seen:
            continue
        seen.add(c.arch)
        x = sim.data.transform.eval(sim.data.images[sim.data.index["train"][c.id][:2]])
        with sim.meter.scope("warm", "eval"), torch.no_grad(), sim.compute():
            sim.method.predict(c, x)
    sim.meter.take()


def timed_round_variants(arrays: Arrays, cfg: RunConfig, device: torch.device, variants: dict, repeats: int,
                         timers: Timers | None = None, instrumented: str | None = None):
    """Fastest training seconds of round 2 for each variant {name: (patches, prefetch, threads)}.

    One simulation per variant shares one FederatedData; each warms up with round 1; then round 2 (the same
    clients and data order every time) is re-run ``repeats`` times, the variants interleaved so that a busy
    neighbour hits them alike. Returns ({name: seconds}, the parts of the instrumented variant, the round)."""
    sims = {}
    data = build_federated_data(arrays, cfg, device)
    threads0 = torch.get_num_threads()
    for name, (ch, prefetch, threads) in variants.items():
        torch.set_num_threads(threads or threads0)
        with patched(ch):
            sims[name] = Simulation(cfg, data, device, prefetch=prefetch)
            _warm_meter(sims[name])
            sims[name].run_round(1)
    best = dict.fromkeys(variants, math.inf)
    parts: dict[str, float] = {}
    last = None
    try:
        for _ in range(repeats):
            for name, (ch, _prefetch, threads) in variants.items():
                torch.set_num_threads(threads or threads0)
                gc.collect()
                if timers is not None:
                    timers.s.clear()
                with patched(ch):
                    last = sims[name].run_round(2)
                if last.train_s < best[name]:
                    best[name] = last.train_s
                    if name == instrumented and timers is not None:
                        parts = dict(timers.s)
    finally:
        torch.set_num_threads(threads0)
        for sim in sims.values():
            sim.close()
    trained = [(sims[name].clients[x.client].arch, sims[name].clients[x.client].n_train)
               for x in last.rows if x.selected]
    del sims, data
    gc.collect()
    return best, parts, trained


def breakdown(arrays: Arrays, args, device: torch.device, ceil_v: dict, log, variant: str = "fp32") -> dict:
    """FedLoRA training time (in ``variant``) split into parts, then what each fast path of the engine is worth.

    Fraction ``--breakdown-fraction`` of the clients trains, without evaluation (evaluation is compared
    with its own ideal in the main table); ``--breakdown-repeats`` interleaved repeats, fastest kept.
    Variants: the engine as is; the engine with one fast path undone (plain transform, uncached meter
    count, meter by torch hooks, per-tensor clip, no prefetch thread); all undone (the plain engine);
    candidates not taken; no clip (diagnostic).
    The instrumented variant (timers around the data iterator, meter, backward, clip, step) runs without
    the prefetch thread, so that the data time is the work done, not the wait.
    """
    cfg = workload_config(args, "fedlora", variant, fraction=args.breakdown_fraction, rounds=10 ** 6,
                          eval_every=10 ** 6)
    timers = Timers()
    orig_hook, orig_batches = FlopMeter._hook, BatchSource.train_batches

    def hook(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_hook(self, *a, **kw)
        finally:
            timers.s["meter counting"] = timers.s.get("meter counting", 0.0) + time.perf_counter() - t0

    instrument = [(FlopMeter, "_hook", hook), (BatchSource, "train_batches", timed_batches(timers, orig_batches)),
                  (LocalOptimizer, "clip_gradients", timers.timed(LocalOptimizer.clip_gradients, "gradient clip")),
                  (torch.Tensor, "backward", timers.timed(torch.Tensor.backward, "backward")),
                  (torch.optim.SGD, "step", timers.timed(torch.optim.SGD.step, "SGD.step")),
                  (LocalOptimizer, "make", timers.timed(LocalOptimizer.make, "make_optimizer"))]
    pf = default_prefetch(device)
    variants = {"instrumented (no prefetch)": (instrument, False, 0), "engine as is": ([], pf, 0)}
    for name, ch in PLAIN.items():
        variants[f"without: {name}"] = (ch, pf, 0)
    if pf:
        variants["without: prefetch thread"] = ([], False, 0)
    variants["plain engine (all fast paths off)"] = ([c for ch in PLAIN.values() for c in ch], False, 0)
    for name, ch in CANDIDATES.items():
        variants[name] = (ch, pf, 0)
    best, parts, trained = timed_round_variants(arrays, cfg, device, variants, args.breakdown_repeats, timers,
                                                "instrumented (no prefetch)")
    ideal, _ = ideal_seconds(ceil_v, round_work(cfg, trained, []))
    train_s = best.pop("instrumented (no prefetch)")
    parts["forward, losses, method code (rest)"] = train_s - sum(parts.values())
    log(f"  breakdown: train {train_s:.3f} s vs ideal {ideal:.3f} s; "
        + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    base_s = best["engine as is"]
    changes = {}
    for name, s_ in best.items():
        changes[name] = {"train_s": s_, "ideal_train_s": ideal, "efficiency": ideal / s_, "gain": base_s / s_ - 1}
        log(f"  {name}: {s_:.3f} s ({ideal / s_:.1%} of ideal, engine {base_s / s_ - 1:+.1%} against it)")
    return {"config": {"fraction": cfg.fraction, "repeats": args.breakdown_repeats, "batch_size": cfg.batch_size,
                       "prefetch": pf, "threads": torch.get_num_threads(), "variant": variant},
            "train_s": train_s, "ideal_train_s": ideal, "parts_s": parts, "changes": changes}


def threading_study(arrays: Arrays, args, device: torch.device, log) -> dict:
    """Threads against processes on this CPU, for the engine's own choice (``default_prefetch``).

    (a) The engine (standalone fp32, ``--breakdown-fraction`` of the clients, training only) with every
    (intra-op threads, prefetch thread) pair up to the cores; (b) the bare training step of each CNN in one
    process with all cores as threads, against one process per core with one thread each, all stepping at
    once (aggregate img/s): what splitting clients over processes could gain."""
    cores = available_cores()
    cfg = workload_config(args, "standalone", "fp32", fraction=args.breakdown_fraction, rounds=10 ** 6,
                          eval_every=10 ** 6)
    variants = {}
    for t in sorted({1, cores}):
        for pf in (False, True):
            variants[f"{t} thread(s), prefetch {'on' if pf else 'off'}"] = ([], pf, t)
    best, _, _ = timed_round_variants(arrays, cfg, device, variants, args.breakdown_repeats)
    for k, v in best.items():
        log(f"  engine standalone, {k}: {v:.3f} s")
    procs = {}
    threads0 = torch.get_num_threads()
    if cores > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        for arch in ("cnn1", "cnn5"):
            try:
                one = _ceiling_worker(arch, args.batch_size, cores, args.ceiling_time * 4, None)
            finally:  # the in-process measurement must not leave its thread count behind
                torch.set_num_threads(threads0)
            with ctx.Pool(cores) as pool:
                barrier = ctx.Manager().Barrier(cores)
                each = pool.starmap(_ceiling_worker, [(arch, args.batch_size, 1, args.ceiling_time * 4, barrier)] * cores)
            procs[arch] = {"one_process_threads_ips": one, "processes_ips": sum(each), "per_process_ips": each,
                           "gain": sum(each) / one}
            log(f"  bare {arch} step: 1 process x {cores} threads {one:.0f} img/s; {cores} processes x 1 thread "
                f"{sum(each):.0f} img/s ({sum(each) / one:.2f}x)")
    return {"cores": cores, "engine_train_s": best, "ceiling_processes": procs}


def batched_clients_study(device: torch.device, batch: int, k: int, variant: str, min_time: float, repeats: int,
                          log) -> dict:
    """Training k clients of one architecture together against one by one, at the bare-step level.

    One by one: k models, each a forward/CE/backward/SGD(momentum, weight decay) step on its own batch
    (what the engine does). Together: the k models' parameters stacked (torch.func.stack_module_state),
    per-client gradients from vmap(grad(loss)) over functional_call, one SGD update on the stacked
    tensors (torch._foreach ops); the same math per client. Reported per CNN: s per k steps and the
    speed-up of batching; the engine batches clients only where this is > 1 on the device."""

    out = {}
    for arch in ARCHS:
        try:
            s_loop, s_vmap = _batched_arch(arch, device, batch, k, variant, min_time, repeats)
        except RuntimeError as e:  # a torch build whose vmap lacks a rule: report, do not fail the suite
            out[arch] = {"error": str(e).splitlines()[0]}
            log(f"  batched clients {arch}: vmap failed ({out[arch]['error']})")
            continue
        out[arch] = {"one_by_one_s": s_loop, "batched_s": s_vmap, "speedup": s_loop / s_vmap}
        log(f"  batched clients {arch} x{k} ({variant}): one by one {s_loop * 1e3:.1f} ms, vmap {s_vmap * 1e3:.1f} ms "
            f"({s_loop / s_vmap:.2f}x)")
    return {"k": k, "batch": batch, "variant": variant, "models": out}


def _batched_arch(arch: str, device: torch.device, batch: int, k: int, variant: str, min_time: float,
                  repeats: int) -> tuple[float, float]:
    """(s for k one-by-one steps, s for one batched step of k clients) of one CNN."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    precision, cl = VARIANTS[variant]
    fmt = torch.channels_last if cl else torch.contiguous_format
    torch.manual_seed(0)
    models = [cnn_spec(arch, 10).build().to(device).to(memory_format=fmt) for _ in range(k)]
    xs = torch.randn(k, batch, 3, 32, 32, device=device)
    ys = torch.randint(0, 10, (k, batch), device=device)
    xs_list = [x.contiguous(memory_format=fmt) for x in xs]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3) for m in models]

    def one_by_one():
        for m, o, x, y in zip(models, opts, xs_list, ys, strict=True):
            with autocast(device, precision):
                loss = F.cross_entropy(m(x)[0], y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    params, buffers = stack_module_state(models)
    names = list(params)
    base = copy.deepcopy(models[0]).to("meta")

    def loss_fn(p, b, x, y):
        with autocast(device, precision):
            return F.cross_entropy(functional_call(base, (p, b), (x,))[0], y)

    per_client_grad = vmap(grad(loss_fn))
    plist = [params[n].detach() for n in names]
    mom = [torch.zeros_like(t) for t in plist]

    def together():
        g = per_client_grad(params, buffers, xs, ys)
        gl = [g[n] for n in names]
        torch._foreach_add_(gl, plist, alpha=1e-3)      # weight decay
        torch._foreach_mul_(mom, 0.9)
        torch._foreach_add_(mom, gl)                    # momentum buffer
        torch._foreach_add_(plist, mom, alpha=-0.01)    # step

    return (time_call(one_by_one, device, min_time, repeats, warmup=2),
            time_call(together, device, min_time, repeats, warmup=2))


def _ceiling_worker(arch: str, batch: int, threads: int, seconds: float, barrier) -> float:
    """img/s of the bare fp32 training step of ``arch`` with ``threads`` threads over ``seconds``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = cnn_spec(arch, 10).build()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        F.cross_entropy(model(x)[0], y).backward()
    if barrier is not None:
        barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[0], y).backward()
        opt.step()
        n += batch
    return n / (time.perf_counter() - t0)


# --- output -----------------------------------------------------------------------------------------------

def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_report(res: dict, console) -> None:
    from rich.table import Table

    m, cfg = res["machine"], res["workload"]
    console.print(f"[bold]fedbench speed suite[/] - {m['device']} ({m['cpu_model']}), {m['threads']} thread(s), "
                  f"torch {m['torch']}; AMX-BF16: {m['amx_bf16']}, AVX512-BF16: {m['avx512_bf16']}; "
                  f"load avg at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}")
    console.print(f"workload: {cfg['dataset']}, {cfg['clients']} clients, fraction {cfg['fraction']}, pathological "
                  f"{cfg['classes_per_client']} classes, CNN-1..5, E={cfg['epochs']}, batch {cfg['batch_size']}, "
                  f"{cfg['rounds']} rounds, all clients evaluated every round, fused SGD {cfg.get('fused_sgd')} (eval chunk "
                  f"{res['ceiling']['eval_batch']}).")
    ceil = res["ceiling"]
    t = Table(title=f"Ceiling: bare fwd/bwd/SGD on resident tensors, batch {ceil['batch']} (best of N)")
    for c in ("model", "variant", "train img/s", "train GFLOP/s", "step ms", f"fwd img/s (b{ceil['batch']})",
              f"fwd img/s (b{ceil['eval_batch']})"):
        t.add_column(c, justify="right" if c not in ("model", "variant") else "left")
    for v, archs in ceil["models"].items():
        for arch, r in archs.items():
            gf = r["train_ips"] * 2 * res["macs_per_sample"][arch]["train"] / 1e9
            t.add_row(arch, v, f"{r['train_ips']:.0f}", f"{gf:.1f}", f"{r['step_ms']:.2f}", f"{r['fwd_ips']:.0f}",
                      f"{r['eval_ips']:.0f}")
    console.print(t)
    console.print("GEMM peak (square matmul, best of N): " + "; ".join(
        f"{k} {g['peak_gflops']:.0f} GFLOP/s (" + ", ".join(f"n={n}: {x:.0f}" for n, x in g["gflops_by_size"].items())
        + ")" for k, g in ceil["gemm"].items()))
    ref = res.get("reference")
    t = Table(title="Per round, including evaluation of all clients (median of rounds 2..R; best in brackets)")
    for c in ("run", "variant", "s/round", "train s", "eval s", "ideal s", "% of ideal", "train, eval % of ideal",
              "vs reference", "GFLOP/s", "% GEMM peak", "accuracy"):
        t.add_column(c, justify="left" if c in ("run", "variant") else "right")
    runs = ([ref] if ref else []) + res["engine"]
    for r in runs:
        variant = r["precision"] + ("+cl" if r["channels_last"] else "")
        peak = ceil["gemm"]["bf16" if r["precision"] == "bf16" else "fp32"]["peak_gflops"]
        speed = ref["s_per_round"] / r["s_per_round"] if ref and r is not ref else None
        t.add_row(r["label"], variant, f"{r['s_per_round']:.2f} ({r['s_per_round_best']:.2f})", f"{r['train_s']:.2f}",
                  f"{r['eval_s']:.2f}", _fmt(r["ideal_s"]),
                  f"{_fmt(r['efficiency'], '.1%')} ({_fmt(r['efficiency_best'], '.1%')})",
                  f"{_fmt(r['train_efficiency'], '.0%')}, {_fmt(r['eval_efficiency'], '.0%')}",
                  _fmt(speed, ".2f") + ("x" if speed else ""), _fmt(r.get("gflops"), ".1f"),
                  _fmt(r["gflops"] / peak if r.get("gflops") else None, ".1%"), _fmt(r["final_accuracy"], ".4f"))
    console.print(t)
    console.print("ideal = sum over trained clients and passes of n_k*E/ceiling(arch) + sum over clients of "
                  "n_test/forward ceiling (FedLoRA: + phase-2 forward of f_k; FML/FedKD: + training of the shared "
                  "CNN); reference: FedAvg-style local CE per client, not FedLoRA; 'vs reference' = reference "
                  "s/round / run s/round.")
    if res.get("vs_fp32"):
        console.print("Speed-up over plain fp32 (s/round ratio; accuracy after the last round, fp32 -> variant): "
                      + ", ".join(f"{k} {v['speedup']:.2f}x ({_fmt(v['acc_fp32'], '.4f')} -> "
                                  f"{_fmt(v['acc_variant'], '.4f')})" for k, v in res["vs_fp32"].items()))
    if res.get("breakdown"):
        b = res["breakdown"]
        console.print(f"Breakdown (FedLoRA {b['config'].get('variant', 'fp32')}, fraction {b['config']['fraction']}, "
                      f"training only; parts timed "
                      f"without the prefetch thread): "
                      f"{b['train_s']:.3f} s vs ideal {b['ideal_train_s']:.3f} s")
        for k, v in b["parts_s"].items():
            console.print(f"  {k:40s} {v:8.3f} s  {v / b['train_s']:6.1%}")
        for k, v in b["changes"].items():
            console.print(f"  {k:45s} {v['train_s']:.3f} s  {v['efficiency']:.1%} of ideal"
                          + (f"  (engine as is {v['gain']:+.1%} against it)" if k != "engine as is" else ""))
    for v, bs in (res.get("batched_study") or {}).items():
        console.print(f"Batched clients ({bs['k']} per architecture, batch {bs['batch']}, {v}): " + "; ".join(
            f"{a} {r['one_by_one_s'] * 1e3:.1f} -> {r['batched_s'] * 1e3:.1f} ms ({r['speedup']:.2f}x)" if "speedup" in r
            else f"{a} failed" for a, r in bs["models"].items()))
    if res.get("threads_study"):
        ts = res["threads_study"]
        console.print(f"Threads ({ts['cores']} cores), engine standalone fp32 training, fraction "
                      f"{res['args']['breakdown_fraction']}: " + "; ".join(f"{k} {v:.3f} s"
                                                                           for k, v in ts["engine_train_s"].items()))
        for arch, r in ts["ceiling_processes"].items():
            console.print(f"  bare {arch} step: one process, {ts['cores']} threads {r['one_process_threads_ips']:.0f} "
                          f"img/s; {ts['cores']} processes x 1 thread {r['processes_ips']:.0f} img/s "
                          f"({r['gain']:.2f}x)")
    for name, ok in res["targets"].items():
        console.print(f"target {name}: {'[green]met[/]' if ok['met'] else '[red]not met[/]'} ({ok['value']})")


def targets(res: dict) -> dict:
    out = {}
    for r in res["engine"]:
        if r["precision"] == "fp32" and r["efficiency"] is not None:
            out[f"{r['label']} {r['precision']}{'+cl' if r['channels_last'] else ''} >= 95% of ideal"] = {
                "met": r["efficiency"] >= 0.95,
                "value": f"{r['efficiency']:.1%} median, {r['efficiency_best']:.1%} best"}
    for k, v in res.get("vs_fp32", {}).items():
        if v["variant"].startswith("bf16"):
            out[f"{k} >= 2x fp32"] = {"met": v["speedup"] >= 2.0, "value": f"{v['speedup']:.2f}x"}
    return out


# --- main -------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with cifar10.npz (default: $FEDBENCH_DATA_DIR)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"))
    p.add_argument("--rounds", type=int, help="rounds per run (default 5; --quick: 2)")
    p.add_argument("--clients", type=int, help="clients (default 20; --quick: 5)")
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 rounds, 5 clients, short ceiling windows, "
                                                        "real data cut to 4000/800 images")
    p.add_argument("--subset", type=int, help="keep this many training images (and a fifth as many test images)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the cores torch sees)")
    p.add_argument("--variants", default="auto",
                   help="engine numerics, comma-separated from fp32, fp32cl, bf16, bf16cl (cl = channels_last); "
                        "auto: fp32,fp32cl, plus bf16cl where the device has bf16 hardware (CUDA, AMX or "
                        "AVX512-BF16)")
    p.add_argument("--baseline", default="auto", help="heaviest baseline to run: auto (measure fml, fedkd), a "
                                                      "method name, or none")
    p.add_argument("--no-standalone", action="store_true", help="skip the engine's standalone run")
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument("--ref-workers", type=int, default=0, help="DataLoader workers of the reference loop")
    p.add_argument("--ceiling-time", type=float, help="seconds per ceiling window (default 0.5; --quick 0.03)")
    p.add_argument("--ceiling-repeats", type=int, help="ceiling windows, best kept (default 3; --quick 1)")
    p.add_argument("--ceiling-passes", type=int, help="measure the ceiling before (and after) the runs, keep the "
                                                      "faster (default 2; --quick 1)")
    p.add_argument("--breakdown", action="store_true", help="also split the engine's time and measure candidate "
                                                            "engine changes (FedLoRA fp32)")
    p.add_argument("--breakdown-only", action="store_true", help="the ceiling and the breakdown, no other run")
    p.add_argument("--batched-study", action="store_true",
                   help="also time k same-architecture clients trained together (torch.func vmap) against one "
                        "by one, per CNN")
    p.add_argument("--batched-k", type=int, default=4, help="clients per architecture group (default 4 = 20/5)")
    p.add_argument("--threads-study", action="store_true",
                   help="also time the engine with every (threads, prefetch) pair and one process per core "
                        "against threads (bare step)")
    p.add_argument("--breakdown-fraction", type=float, default=0.25)
    p.add_argument("--breakdown-variant", choices=tuple(VARIANTS),
                   help="numeric variant of the breakdown (default: fp32cl if run, else fp32)")
    p.add_argument("--breakdown-repeats", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--recompute", metavar="JSON", help="no run: re-derive ideal, efficiencies and targets of a "
                                                        "JSON this suite wrote (from --ceiling-pass), print, --out")
    p.add_argument("--ceiling-pass", choices=("merged", "first"), default="merged")
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (2 if q else 5)
    args.clients = args.clients or (5 if q else 20)
    args.ceiling_time = args.ceiling_time or (0.03 if q else 0.5)
    args.ceiling_repeats = args.ceiling_repeats or (1 if q else 3)
    args.ceiling_passes = args.ceiling_passes or (1 if q else 2)
    if args.breakdown_only:
        args.breakdown, args.no_reference, args.no_standalone, args.baseline = True, True, True, "none"
    if q and args.subset is None and args.dataset != "synthetic":
        args.subset = 4000
    if args.variants == "auto":
        flags = cpu_flags()
        has_bf16 = (args.device != "cpu" and torch.cuda.is_available()) or bool({"amx_bf16", "avx512_bf16"} & flags)
        args.variants = "fp32,fp32cl" + (",bf16cl" if has_bf16 else "")
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    return args


def recompute(path: str, ceiling_pass: str, out: str | None, console) -> dict:
    """Re-derive the ideal, efficiencies and targets of a saved run from one of its ceiling passes."""
    res = json.loads(Path(path).read_text())
    if ceiling_pass == "first" and res.get("ceiling_first"):
        res["ceiling"] = res["ceiling_first"]
        res.setdefault("notes", []).append("efficiencies from the first ceiling pass only (--recompute --ceiling-pass "
                                           "first)")
    recompute_ideal(res)
    res["targets"] = targets(res)
    print_report(res, console)
    if out:
        Path(out).write_text(json.dumps(res, indent=1, default=str))
    return res


def main(argv=None) -> dict:
    from rich.console import Console

    args = parse_args(argv)
    if args.recompute:
        return recompute(args.recompute, args.ceiling_pass, args.out,
                         Console(highlight=False, width=max(180, shutil.get_terminal_size().columns)))
    console = Console(highlight=False, width=max(180, shutil.get_terminal_size().columns))

    def log(msg: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}", highlight=False)

    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    machine = machine_info(device, threads)
    arrays = load_dataset(args.dataset, data_dir_of(args))
    if args.subset:
        arrays = subset_arrays(arrays, args.subset, max(1, args.subset // 5), args.seed)
    variants = args.variants.split(",")
    base = workload_config(args, "fedlora", "fp32")
    # the evaluation chunk of a typical client (the engine evaluates a client's test split in chunks of
    # --eval-batch-size): the ceiling's forward is measured at that size
    sizes = build_federated_data(arrays, base, torch.device("cpu")).sizes("test")
    eval_batch = int(min(base.eval_batch_size, max(1, np.median(sizes))))
    res: dict = {"machine": machine, "args": vars(args),
                 "workload": {k: getattr(base, k) for k in ("dataset", "clients", "fraction", "rounds", "epochs",
                                                            "batch_size", "partition", "classes_per_client",
                                                            "models", "augment", "clip", "lr", "momentum",
                                                            "weight_decay", "eval_batch_size", "fused_sgd")},
                 "data": {"source": arrays.source, "n_train": len(arrays.y_train), "n_test": len(arrays.y_test)},
                 "macs_per_sample": {a: macs_per_sample(a, base.num_classes) for a in ARCHS}}
    gemm_sizes = (256, 512) if args.quick else ((512, 1024, 2048) if device.type == "cpu" else (4096, 8192))
    ceil_variants = sorted(set(variants) | {"fp32"}, key=list(VARIANTS).index)

    def ceiling():
        return measure_ceiling(ceil_variants, args.batch_size, eval_batch, base.num_classes, device, base,
                               args.ceiling_time, args.ceiling_repeats, gemm_sizes, log)

    log(f"ceiling (threads={threads}, device={device})")
    res["ceiling"] = ceiling()
    ceil_m = res["ceiling"]["models"]

    if not args.no_reference:
        log("reference loop")
        res["reference"] = run_reference(arrays, base, device, ceil_m["fp32"], args.ref_workers, log)

    methods = [] if args.breakdown_only else ["fedlora"]
    if args.baseline == "auto":
        log("picking the heaviest baseline (engine MACs per round)")
        heavy, probe = pick_heaviest(arrays, args, device, ("fml", "fedkd"), log)
        res["baseline_probe_macs"] = probe
        methods.append(heavy)
    elif args.baseline != "none":
        methods.append(args.baseline)
    res["engine"] = []
    for method in methods:
        for v in variants:
            cfg = workload_config(args, method, v)
            label = f"engine {method}"
            log(f"{label} {v}")
            res["engine"].append(run_engine(arrays, cfg, device, ceil_m[v], log, label))
    if not args.no_standalone:
        for v in variants:
            if v.startswith("bf16"):
                continue
            log(f"engine standalone {v} (same work as the reference loop)")
            res["engine"].append(run_engine(arrays, workload_config(args, "standalone", v), device, ceil_m[v],
                                            log, "engine standalone (= reference work)"))
    if args.breakdown:
        bv = args.breakdown_variant or ("fp32cl" if "fp32cl" in variants else "fp32")
        log(f"breakdown of the engine's training time (FedLoRA {bv})")
        res["breakdown"] = breakdown(arrays, args, device, ceil_m[bv], log, bv)
    if args.batched_study:
        log("batched clients (torch.func) against one by one")
        res["batched_study"] = {v: batched_clients_study(device, args.batch_size, args.batched_k, v, args.ceiling_time,
                                                         args.ceiling_repeats, log) for v in variants}
    if args.threads_study:
        log("threads and processes")
        res["threads_study"] = threading_study(arrays, args, device, log)
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"a study left torch at {torch.get_num_threads()} threads, not {threads}")
    if args.ceiling_passes > 1:
        log("ceiling again (the faster of the two is kept)")
        res["ceiling_first"] = res["ceiling"]
        res["ceiling"] = merge_ceilings(res["ceiling"], ceiling())
        recompute_ideal(res)

    # every numeric variant against plain fp32, per method run in both
    res["vs_fp32"] = {}
    by = {(r["label"], r["precision"] + ("cl" if r["channels_last"] else "")): r for r in res["engine"]}
    for (label, v), r in by.items():
        if v != "fp32" and (label, "fp32") in by:
            f = by[(label, "fp32")]
            res["vs_fp32"][f"{label} {v}"] = {"variant": v, "speedup": f["s_per_round"] / r["s_per_round"],
                                              "acc_fp32": f["final_accuracy"], "acc_variant": r["final_accuracy"]}
    if res.get("reference"):
        for r in res["engine"]:
            r["speedup_vs_reference"] = res["reference"]["s_per_round"] / r["s_per_round"]
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["targets"] = targets(res)
    print_report(res, console)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {args.out}")
    return res


def recompute_ideal(res: dict) -> None:
    """Re-derive ideal times and efficiencies of every run from the final (merged) ceiling."""
    ceil = res["ceiling"]["models"]
    for r in [*res["engine"], *([res["reference"]] if res.get("reference") else [])]:
        v = r["precision"] + ("cl" if r["channels_last"] else "")
        for row in r["rounds"]:
            row["ideal_train_s"], row["ideal_eval_s"] = ideal_seconds(ceil[v], row["work"])
            row["ideal_s"] = row["ideal_train_s"] + row["ideal_eval_s"]
            row["efficiency"] = row["ideal_s"] / row["wall_s"]
        r.update(summarize_rounds(r["rounds"]))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
