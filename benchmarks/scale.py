#!/usr/bin/env python
"""fedbench scale benchmark: engine cost against the number of clients and the sampled fraction, and the
memory of client state.

    python benchmarks/scale.py --data-dir /work/data --out bench-scale.json
    python benchmarks/scale.py --dataset synthetic --quick                 # smoke test (seconds)

Every client holds a fixed shard (``--shard-train`` training+validation images, ``--shard-test`` test
images; the defaults 50/10 are CIFAR-10 split 1000 ways), so N clients use N shards drawn from the
dataset (seeded subset) and the work of a round grows with the clients sampled (training) and with N
(evaluation of every client every round). For N in ``--clients`` (10, 100, 1000) and each fraction in
``--fractions`` (0.1, 1.0) the engine runs ``--rounds`` rounds of ``--method`` (FedLoRA); reported per
configuration: median s/round over rounds 2..R, training and evaluation seconds, and linear fits
train_s ~ sampled clients, eval_s ~ N and wall ~ sampled + N with R^2.

Memory: the bytes of every client tensor the engine holds (``Simulation.state.tensors``, distinct storages)
against the raw bytes of the parameters and buffers of the modules each client owns (built from their
specs; the engine re-creates SGD every round, so no optimizer state is kept across rounds: live
optimizer state is counted as well and should be 0), after round 1 and after round R, and the process
RSS at the same points.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import data_dir_of, machine_info, rss_bytes, set_threads, subset_arrays  # noqa: E402

from fedbench.config import make_config  # noqa: E402
from fedbench.data.sources import load_dataset  # noqa: E402
from fedbench.engine.data import build_federated_data  # noqa: E402
from fedbench.engine.simulation import Simulation, resolve_device  # noqa: E402


def _storage_bytes(tensors) -> tuple[int, int]:
    """(bytes of the distinct storages behind ``tensors``, number of tensors)."""
    seen: dict[int, int] = {}
    n = 0
    for t in tensors:
        n += 1
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(seen.values()), n


def live_optimizer_state_bytes() -> int:
    """Bytes of optimizer state (momentum buffers, ...) of every optimizer still alive in the process."""
    total = 0
    for o in gc.get_objects():
        if isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                total += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return total


def client_state_bytes(sim: Simulation) -> dict:
    """Client state the engine holds vs the raw parameter (and buffer) bytes of the clients' modules.

    ``held_bytes``: distinct storages of all tensors in ``sim.state.tensors`` under client keys.
    ``raw_param_bytes``: sum over clients, over the modules a client owns (``client.specs``), of the
    parameters and buffers of a freshly built module (numel x element size).
    """
    held, n = _storage_bytes(t for key, ts in sim.state.tensors.items() if key[0] == "client" for t in ts)
    server, _ = _storage_bytes(t for key, ts in sim.state.tensors.items() if key[0] != "client" for t in ts)
    cache: dict = {}
    raw = 0
    for c in sim.clients:
        for spec in c.specs.values():
            if spec not in cache:
                m = spec.build()
                cache[spec] = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
            raw += cache[spec]
    workspace = sum(t.numel() * t.element_size() for ws in sim.state.workspace.values()
                    for t in (*ws.parameters(), *ws.buffers()))  # bound to client/server storage (not extra)
    return {"held_bytes": held, "raw_param_bytes": raw, "ratio": held / raw if raw else None, "tensors": n,
            "server_bytes": server, "workspace_view_bytes": workspace}


def linear_fit(x, y) -> dict:
    """Least squares y ~ X b (X with an intercept column); slope(s), intercept and R^2."""
    X = np.column_stack([np.ones(len(y)), *(np.asarray(c, dtype=float) for c in x)])
    y = np.asarray(y, dtype=float)
    b, *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_res = float(((y - X @ b) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"intercept": float(b[0]), "slopes": [float(v) for v in b[1:]],
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def run_point(arrays, args, n_clients: int, fraction: float, device: torch.device, log) -> dict:
    cfg = make_config(dict(method=args.method, dataset=args.dataset, clients=n_clients, fraction=fraction,
                           rounds=args.rounds, epochs=1, batch_size=args.batch_size, models="hetero",
                           precision=args.precision, channels_last=args.channels_last, seed=args.seed),
                      device.type)  # unset options: the device's defaults, as `fedbench run` does
    gc.collect()
    t0 = time.perf_counter()
    sim = Simulation(cfg, build_federated_data(arrays, cfg, device), device)
    setup_s = time.perf_counter() - t0
    rows, memory = [], {}
    for t in range(1, cfg.rounds + 1):
        r = sim.run_round(t)
        rows.append({"round": t, "wall_s": r.wall_s, "train_s": r.train_s, "eval_s": r.eval_s,
                     "sampled": sum(x.selected for x in r.rows),
                     "train_samples": sum(x.train_samples for x in r.rows),
                     "eval_samples": sum(x.total or 0 for x in r.rows), "accuracy": r.accuracy()[0]})
        if t in (1, cfg.rounds):
            gc.collect()
            memory[f"round_{t}"] = {**client_state_bytes(sim), "rss_bytes": rss_bytes(),
                                    "live_optimizer_state_bytes": live_optimizer_state_bytes()}
    steady = rows[1:] if len(rows) > 1 else rows
    first, last = memory["round_1"], memory[f"round_{cfg.rounds}"]
    sim.close()
    out = {"clients": n_clients, "fraction": fraction, "sampled": cfg.per_round, "setup_s": setup_s,
           "channels_last": cfg.channels_last,
           "s_per_round": statistics.median(r["wall_s"] for r in steady),
           "train_s": statistics.median(r["train_s"] for r in steady),
           "eval_s": statistics.median(r["eval_s"] for r in steady),
           "train_samples": statistics.median(r["train_samples"] for r in steady),
           "eval_samples": steady[0]["eval_samples"], "rounds": rows, "memory": memory,
           "state_growth_bytes": last["held_bytes"] - first["held_bytes"],
           "rss_growth_bytes": last["rss_bytes"] - first["rss_bytes"]}
    log(f"  N={n_clients:5d} C={fraction:<4} sampled {cfg.per_round:5d}: {out['s_per_round']:.2f} s/round "
        f"(train {out['train_s']:.2f}, eval {out['eval_s']:.2f}); state {first['held_bytes'] / 2**20:.1f} MiB "
        f"= {first['ratio']:.3f} x raw, growth {out['state_growth_bytes']} B, RSS {last['rss_bytes'] / 2**20:.0f} MiB")
    del sim
    gc.collect()
    return out


def print_report(res: dict, console) -> None:
    from rich.table import Table

    m = res["machine"]
    console.print(f"[bold]fedbench scale[/] - {res['args']['method']} {res['args']['precision']}"
                  f"{' channels-last' if res['points'][0]['channels_last'] else ''}, {m['device']}, "
                  f"{m['threads']} thread(s); shard {res['args']['shard_train']} train+val / "
                  f"{res['args']['shard_test']} test images per client; load avg {m['loadavg_start'][0]:.2f} -> "
                  f"{m['loadavg_end'][0]:.2f}")
    t = Table(title="Engine cost vs clients (median of rounds 2..R) and client-state memory")
    for c in ("N", "fraction", "sampled", "train img", "s/round", "train s", "eval s", "ms/sampled client",
              "state MiB", "raw MiB", "state/raw", "growth r1->rR", "RSS MiB r1 -> rR"):
        t.add_column(c, justify="right")
    for p in res["points"]:
        m1, mR = p["memory"]["round_1"], p["memory"][f"round_{res['args']['rounds']}"]
        t.add_row(str(p["clients"]), str(p["fraction"]), str(p["sampled"]), f"{p['train_samples']:.0f}",
                  f"{p['s_per_round']:.3f}", f"{p['train_s']:.3f}", f"{p['eval_s']:.3f}",
                  f"{1e3 * p['train_s'] / p['sampled']:.1f}", f"{m1['held_bytes'] / 2**20:.1f}",
                  f"{m1['raw_param_bytes'] / 2**20:.1f}", f"{m1['ratio']:.3f}", f"{p['state_growth_bytes']} B",
                  f"{m1['rss_bytes'] / 2**20:.0f} -> {mR['rss_bytes'] / 2**20:.0f}")
    console.print(t)
    f = res["fits"]
    console.print(f"train_s = {f['train_vs_sampled']['intercept']:.3f} + {f['train_vs_sampled']['slopes'][0]:.4f} x "
                  f"sampled  (R^2 {f['train_vs_sampled']['r2']:.4f})")
    console.print(f"eval_s  = {f['eval_vs_clients']['intercept']:.3f} + {f['eval_vs_clients']['slopes'][0]:.5f} x N  "
                  f"(R^2 {f['eval_vs_clients']['r2']:.4f})")
    w = f["wall_vs_sampled_and_clients"]
    console.print(f"wall    = {w['intercept']:.3f} + {w['slopes'][0]:.4f} x sampled + {w['slopes'][1]:.5f} x N  "
                  f"(R^2 {w['r2']:.4f})")
    for name, ok in res["targets"].items():
        console.print(f"target {name}: {'[green]met[/]' if ok['met'] else '[red]not met[/]'} ({ok['value']})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder with cifar10.npz (default: $FEDBENCH_DATA_DIR)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"))
    p.add_argument("--clients", help="comma-separated client counts (default 10,100,1000; --quick 5,10,20)")
    p.add_argument("--fractions", default="0.1,1.0", help="comma-separated sampled fractions")
    p.add_argument("--rounds", type=int, default=3, help="rounds per point (memory checked after 1 and the last)")
    p.add_argument("--shard-train", type=int, default=50, help="training+validation images per client")
    p.add_argument("--shard-test", type=int, default=10, help="test images per client")
    p.add_argument("--method", default="fedlora")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="memory layout (default: the device's default, as for `fedbench run`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 5, 10, 20 clients")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the cores torch sees)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.clients = [int(x) for x in (args.clients or ("5,10,20" if args.quick else "10,100,1000")).split(",")]
    args.fractions = [float(x) for x in args.fractions.split(",")]
    return args


def main(argv=None) -> dict:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(highlight=False, width=max(160, shutil.get_terminal_size().columns))

    def log(msg: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")

    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    res = {"machine": machine_info(device, threads), "args": vars(args), "points": []}
    full = load_dataset(args.dataset, data_dir_of(args))
    for n in args.clients:
        want_train, want_test = n * args.shard_train, n * args.shard_test
        if want_train > len(full.y_train) or want_test > len(full.y_test):
            log(f"  N={n}: the dataset holds {len(full.y_train)}/{len(full.y_test)} images, fewer than "
                f"{want_train}/{want_test}; shards shrink")
        arrays = subset_arrays(full, want_train, want_test, args.seed)
        for f in args.fractions:
            if int(f * n) < 1:
                log(f"  N={n} C={f}: samples no client, skipped")
                continue
            res["points"].append(run_point(arrays, args, n, f, device, log))
    pts = res["points"]
    res["fits"] = {
        "train_vs_sampled": linear_fit([[p["sampled"] for p in pts]], [p["train_s"] for p in pts]),
        "eval_vs_clients": linear_fit([[p["clients"] for p in pts]], [p["eval_s"] for p in pts]),
        "wall_vs_sampled_and_clients": linear_fit([[p["sampled"] for p in pts], [p["clients"] for p in pts]],
                                                  [p["s_per_round"] for p in pts]),
    }
    big = max(pts, key=lambda p: p["clients"])
    ratio = max(p["memory"]["round_1"]["ratio"] for p in pts)
    res["targets"] = {
        "client state within 1.2x of raw parameter bytes": {"met": ratio <= 1.2, "value": f"max {ratio:.3f}x"},
        "no client-state growth from round 1 to R": {
            "met": all(p["state_growth_bytes"] == 0 for p in pts),
            "value": f"max {max(p['state_growth_bytes'] for p in pts)} B"},
        "no optimizer state kept across rounds": {
            "met": all(m["live_optimizer_state_bytes"] == 0 for p in pts for m in p["memory"].values()),
            "value": f"max {max(m['live_optimizer_state_bytes'] for p in pts for m in p['memory'].values())} B"},
        "train time linear in sampled clients (R^2 >= 0.95)": {
            "met": res["fits"]["train_vs_sampled"]["r2"] >= 0.95,
            "value": f"R^2 {res['fits']['train_vs_sampled']['r2']:.4f}"},
        f"largest N ({big['clients']}) state": {"met": True, "value": f"{big['memory']['round_1']['held_bytes'] / 2**30:.2f} GiB"},
    }
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    print_report(res, console)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
