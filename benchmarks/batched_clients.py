#!/usr/bin/env python
"""MHPFL clients sharing a CNN trained in one stacked pass against client by client, per round, in one process.

    python benchmarks/batched_clients.py --threads 1                  # CPU: the four settings below
    python benchmarks/batched_clients.py --device cuda --pack 1,2,4   # a GPU, + the packing factor
    python benchmarks/batched_clients.py --rounds 4 --local-steps 10 --out r.json
    python benchmarks/batched_clients.py --layouts cnn1:10:10,cnn5:10:10 --settings 10:1:10   # + the layouts

Settings: (N, C) = (10, 1) and (50, 1), batch 10 and 64; ``standalone`` (the MHPFL family's standard local
training, which every opted-in method runs), CNN-1..5 (client k gets CNN-(k mod 5 + 1): N = 50 gives ten
clients per architecture), CIFAR-shaped synthetic data (``--dataset``), ``--local-steps`` batches per
client and round, the run's CPU/CUDA defaults (SGD momentum 0.9, weight decay 1e-3, clip 50). For each
setting the same run is simulated twice through the public engine (``Simulation(client_batching="off" |
"on")``), the two runs' rounds interleaved so a busy neighbour slows both alike; s/round is the median of
the rounds after the first (round 1 traces the meter). Achieved FLOP/s = 2 x the engine's metered
training MACs of a round / its training time; the ratio is client-by-client time / batched time. Every
client is evaluated in the last round of each run (one round: a rough figure), timed apart (``eval s``:
client by client against every same-CNN group in one pass).

Grid estimate: ``benchmarks/paper.toml`` (``--grid``): each run's training samples per round (C x its
training split x epochs) times rounds, at the best measured seconds per trained sample of this device
at batch 64 (the paper's batch is 512: a GPU does better there), summed over the grid's runs. A lower
bound in work: it counts each run's standard local training once; FML and FedKD train a second model,
FedLoRA a second phase, and evaluation is not counted.

Packing (``--pack 1,2,4``): k processes on the device at once, each the (N = 50, C = 1, batch 64) run
batched, started together; packing factor = aggregate rounds per second of k processes / that of one.
Meaningful on a GPU (several runs hide each other's launch gaps); on a 2-core CPU they only share cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch
from batched_round import interleaved_rounds, open_device

from fedbench.config import make_config
from fedbench.engine.simulation import Simulation
from fedbench.runner import prepare
from fedbench.sweep import load_sweep

TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000}
SETTINGS = [(10, 1.0, 10), (50, 1.0, 10), (10, 1.0, 64), (50, 1.0, 64)]  # (N, C, batch)


def run_config(n: int, c: float, batch: int, a, rounds: int | None = None) -> dict:
    return dict(method="standalone", dataset=a.dataset, clients=n, fraction=c, batch_size=batch,
                local_steps=a.local_steps, rounds=rounds or a.rounds, eval_every=10 ** 6, seed=0)


def simulation(device: torch.device, values: dict, batching: str, a) -> Simulation:
    cfg = make_config(values, device.type)
    p = prepare(cfg, a.data_dir, str(device))
    return Simulation(cfg, p.data, p.device, client_batching=batching)


def measure(device: torch.device, n: int, c: float, batch: int, a) -> dict[str, dict]:
    rounds = interleaved_rounds({b: simulation(device, run_config(n, c, batch, a), b, a) for b in ("off", "on")},
                                a.rounds)
    out = {}
    for b, rs in rounds.items():
        timed = rs[1:] or rs
        s = statistics.median(r.train_s for r in timed)
        macs = statistics.median(sum(row.train_macs for row in r.rows) for r in timed)
        samples = statistics.median(sum(row.train_samples for row in r.rows) for r in timed)
        out[b] = {"clients": n, "fraction": c, "batch": batch, "batching": b, "s_per_round": s,
                  "rounds_s": [r.train_s for r in rs], "eval_s": rs[-1].eval_s, "train_macs": macs,
                  "samples": samples, "flops_per_s": 2 * macs / s, "s_per_sample": s / samples}
    assert out["off"]["train_macs"] == out["on"]["train_macs"], "the two paths count different work"
    return out


def grid_estimate(path: str, s_per_sample: float) -> tuple[int, float, float]:
    """(runs, trained samples, seconds) of the sweep at ``s_per_sample``."""
    sw = load_sweep(path)
    samples = 0.0
    for cfg in sw.configs:  # the training pool: the 50k training images less the validation hold-out
        samples += cfg.fraction * TRAIN_IMAGES[cfg.dataset] * (1 - cfg.val_fraction) * cfg.epochs * cfg.rounds
    return len(sw.configs), samples, samples * s_per_sample


def _packed_worker(device: str, values: dict, a, start, out) -> None:
    torch.set_num_threads(max(1, a.threads))
    dev = torch.device(device)
    sim = simulation(dev, values, "on", a)
    sim.run_round(1)  # warm-up (meter tracing) before the common start
    start.wait()
    t0 = time.perf_counter()
    for t in range(2, values["rounds"] + 1):
        sim.run_round(t)
    out.put(time.perf_counter() - t0)
    sim.close()


def packing(device: torch.device, ks: list[int], a) -> dict[int, float]:
    """Aggregate rounds per second of k processes at once, each the (50, 1, 64) run batched."""
    ctx = mp.get_context("spawn")
    values = run_config(50, 1.0, 64, a, rounds=a.pack_rounds + 1)
    rates = {}
    for k in ks:
        start, out = ctx.Barrier(k + 1), ctx.Queue()
        procs = [ctx.Process(target=_packed_worker, args=(str(device), values, a, start, out)) for _ in range(k)]
        for p in procs:
            p.start()
        start.wait()
        walls = [out.get() for _ in procs]
        for p in procs:
            p.join()
        rates[k] = k * a.pack_rounds / max(walls)
    return rates


def layout_study(device: torch.device, arch: str, clients: int, batch: int, reps: int = 3) -> dict[str, float]:
    """Seconds of one forward + backward of ``clients`` CNNs of ``arch`` on their own batches, per layout:
    ``loop`` (one module per client), ``vmap`` (torch.func.functional_call under vmap over stacked
    parameters: convolutions lower to grouped ones), ``grouped`` (the clients' channels side by side, one
    grouped convolution per layer, batched matmuls) and ``split`` (the engine's: one convolution per client,
    batched matmuls; engine/stacked.py). Best of ``reps``."""
    import torch.nn.functional as F
    from torch.func import functional_call, vmap

    from fedbench.engine.stacked import LINEARS, cnn_forward
    from fedbench.models.cnn import CNN, CNN_WIDTHS
    models = [CNN(*CNN_WIDTHS[arch], num_classes=10).to(device) for _ in range(clients)]
    x = torch.randn(clients, batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (clients, batch), device=device)
    P = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_()
         for n, _ in models[0].named_parameters()}

    def loop():
        for m, xc, yc in zip(models, x, y, strict=True):
            F.cross_entropy(m(xc)[0], yc).backward()

    def vmapped():
        f = lambda p, xc, yc: F.cross_entropy(functional_call(models[0], p, (xc,))[0], yc)  # noqa: E731
        torch.autograd.grad(vmap(f)(P, x, y).sum(), list(P.values()))

    def grouped():
        h = x.transpose(0, 1).reshape(batch, clients * 3, 32, 32)
        for name in ("conv1", "conv2"):
            w = P[f"{name}.weight"]
            h = F.max_pool2d(F.relu(F.conv2d(h, w.reshape(-1, *w.shape[2:]), P[f"{name}.bias"].reshape(-1),
                                             groups=clients)), 2)
        h = h.reshape(batch, clients, -1).transpose(0, 1)
        for name in LINEARS:
            h = torch.baddbmm(P[f"{name}.bias"][:, None], h, P[f"{name}.weight"].transpose(1, 2))
            h = F.relu(h) if name != LINEARS[-1] else h
        torch.autograd.grad(F.cross_entropy(h.reshape(-1, h.shape[-1]), y.reshape(-1)), list(P.values()))

    def split():
        p = {n: (list(t) if n.startswith("conv") else t) for n, t in P.items()}
        logits = cnn_forward(p, list(x), True)
        torch.autograd.grad(sum(F.cross_entropy(lg, yc) for lg, yc in zip(logits, y, strict=True)), list(P.values()))

    out = {}
    for name, fn in (("loop", loop), ("vmap", vmapped), ("grouped", grouped), ("split", split)):
        fn()
        best = float("inf")
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--dataset", default="synthetic", help="synthetic (CIFAR-shaped) or cifar10 (--data-dir)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--local-steps", type=int, default=5, help="batches per client and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (the first is not timed)")
    ap.add_argument("--settings", default="", help="N:C:batch,... (default: 10:1:10,50:1:10,10:1:64,50:1:64; none: skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--grid", default="benchmarks/paper.toml", help="sweep file for the grid estimate ('' : none)")
    ap.add_argument("--pack", default="", help="process counts for the packing factor, e.g. 1,2,4 ('' : skip)")
    ap.add_argument("--pack-rounds", type=int, default=3)
    ap.add_argument("--layouts", default="", help="ARCH:CLIENTS:BATCH,... forward+backward per layout (loop, vmap, "
                                                  "grouped, split), e.g. cnn1:10:10,cnn5:10:10 ('' : skip)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    device, name, peak = open_device(a.device, a.threads)
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; standalone, CNN-1..5, {a.dataset}, {a.local_steps} local "
          f"steps, {a.rounds} rounds (first not timed)")
    doc = {"device": str(device), "device_name": name, "peak_flops": peak, "args": vars(a)}
    if a.layouts:
        doc["layouts"] = {}
        for spec in a.layouts.split(","):
            arch, k, b = spec.split(":")
            r = doc["layouts"][spec] = layout_study(device, arch, int(k), int(b))
            print(f"layout {arch}, {k} clients, batch {b}: " + ", ".join(
                f"{n} {s * 1e3:.1f} ms ({r['loop'] / s:.2f}x)" for n, s in r.items()), flush=True)
    settings = SETTINGS
    if a.settings == "none":
        settings = []
    elif a.settings:
        settings = [(int(n), float(c), int(b)) for n, c, b in (s.split(":") for s in a.settings.split(","))]
    if settings:
        print(f"{'N':>4} {'C':>4} {'batch':>5} | {'one by one s/rnd':>16} {'GFLOP/s':>8} | {'batched s/rnd':>13} "
              f"{'GFLOP/s':>8} | {'ratio':>5} | eval s: one by one, batched, ratio")
    results = []
    for n, c, b in settings:
        r = measure(device, n, c, b, a)
        results += [r["off"], r["on"]]
        off, on = r["off"], r["on"]
        print(f"{n:4d} {c:4.1f} {b:5d} | {off['s_per_round']:16.3f} {off['flops_per_s'] / 1e9:8.2f} | "
              f"{on['s_per_round']:13.3f} {on['flops_per_s'] / 1e9:8.2f} | {off['s_per_round'] / on['s_per_round']:5.2f} | "
              f"{off['eval_s']:.3f} {on['eval_s']:.3f} {off['eval_s'] / on['eval_s']:.2f}",
              flush=True)
    doc["results"] = results
    at64 = [r for r in results if r["batch"] == 64]
    if a.grid and at64:
        best = min(at64, key=lambda r: r["s_per_sample"])
        runs, samples, secs = grid_estimate(a.grid, best["s_per_sample"])
        doc["grid"] = {"file": a.grid, "runs": runs, "samples": samples, "seconds": secs,
                       "from": {k: best[k] for k in ("clients", "batch", "batching", "s_per_sample")}}
        print(f"grid {a.grid}: {runs} runs, {samples:.3g} trained samples; at {best['s_per_sample'] * 1e6:.1f} us/sample "
              f"(N={best['clients']}, batch 64, {best['batching']}): {secs / 3600:.1f} h of local training (a lower "
              f"bound: extra passes and evaluation not counted)")
    if a.pack:
        rates = packing(device, [int(k) for k in a.pack.split(",")], a)
        doc["packing"] = rates
        for k, rate in rates.items():
            print(f"packing: {k} process(es): {rate:.2f} rounds/s in all, factor {rate / rates[min(rates)]:.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
