"""What the engine's host-allocator setting (fedbench/engine/allocator.py) is worth, in fresh processes.

The setting is process-wide and its effect depends on the process's history, so each setting runs in
a child process of its own: the speed suite's workload (CIFAR-10, 20 clients, CNN-1..5), FedLoRA,
a quarter of the clients training, no evaluation; round 1 warms up, round 2 is run ``--repeats``
times. Printed per setting: the fastest training time, the minor page faults of that round, and the
peak resident memory. The children alternate (default, tuned, default, ...) ``--pairs`` times.

    python benchmarks/allocator.py --data-dir DIR --threads 1 [--batch-size 64] [--variant fp32cl]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("default", "tuned")


def child(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import speed

    from fedbench.data.sources import load_dataset
    from fedbench.engine.allocator import tune_host_allocator
    from fedbench.engine.data import build_federated_data
    from fedbench.engine.simulation import Simulation

    torch.set_num_threads(args.threads)
    sargs = speed.parse_args(["--data-dir", args.data_dir, "--batch-size", str(args.batch_size)])
    cfg = speed.workload_config(sargs, "fedlora", args.variant, fraction=args.fraction, rounds=10 ** 6,
                                eval_every=10 ** 6)
    device = torch.device("cpu")
    sim = Simulation(cfg, build_federated_data(load_dataset("cifar10", Path(args.data_dir)), cfg, device), device)
    speed._warm_meter(sim)
    sim.run_round(1)
    best = None
    for _ in range(args.repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        r = sim.run_round(2)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        if best is None or r.train_s < best["train_s"]:
            best = {"train_s": r.train_s, "minor_faults": faults}
    sim.close()
    best["applied"] = tune_host_allocator()  # idempotent: what this process runs with (None: glibc's defaults)
    best["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("FEDBENCH_DATA_DIR"), help="folder with cifar10.npz")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variant", default="fp32cl", choices=("fp32", "fp32cl"))
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("--data-dir (or FEDBENCH_DATA_DIR) is needed: a folder with cifar10.npz")
    if args.child:
        print(json.dumps(child(args)))
        return {}
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.pairs):
        for setting in SETTINGS:
            env = dict(os.environ, FEDBENCH_MALLOC=setting, PYTHONPATH=str(HERE.parent))
            cmd = [sys.executable, __file__, "--child", setting, "--data-dir", args.data_dir,
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--variant", args.variant,
                   "--fraction", str(args.fraction), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            r = runs[setting][-1]
            print(f"{setting:8s} train {r['train_s']:.3f} s, minor page faults {r['minor_faults']}, "
                  f"peak RSS {r['max_rss_mib']:.0f} MiB", flush=True)
    best = {s: min(runs[s], key=lambda r: r["train_s"]) for s in SETTINGS}
    gain = best["default"]["train_s"] / best["tuned"]["train_s"] - 1
    print(f"FedLoRA {args.variant}, batch {args.batch_size}, {args.threads} thread(s): tuned allocator "
          f"{best['tuned']['train_s']:.3f} s vs glibc default {best['default']['train_s']:.3f} s "
          f"({gain:+.1%}); page faults {best['tuned']['minor_faults']} vs {best['default']['minor_faults']}")
    res = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "runs": runs, "best": best, "gain": gain}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
