#!/usr/bin/env python
"""Memory of the federated-LoRA family: N clients on one frozen backbone.

    python benchmarks/lora_memory.py --data-dir /work/data            # 1000 clients, r = 8, ViT, FedIT
    python benchmarks/lora_memory.py --dataset synthetic --clients 50  # quick

The engine holds the backbone once and, per client, only its own tensors (adapters, and its head where
the head is shared or local), bound to one workspace module per rank. This script builds the simulation
for ``--clients`` clients through the public interfaces (``fedbench.runner.prepare``, ``Simulation``),
runs ``--rounds`` rounds with ``--fraction`` of them sampled, and reports, in one process:

* ideal = backbone bytes + N x adapter bytes (the target of the issue: engine memory within 1.2x of it);
* engine = distinct storages of the backbone, every party's tensors (``sim.state.tensors``) and the
  workspaces, i.e. what the engine keeps resident across rounds;
* the process RSS growth while the clients are built (their state), and after the rounds (which adds the
  allocator's cache of a round's activations and of the final evaluation's batches: a constant, not per
  client).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import machine_info, rss_bytes  # noqa: E402

from fedbench.config import make_config  # noqa: E402
from fedbench.engine.simulation import Simulation  # noqa: E402
from fedbench.runner import prepare  # noqa: E402


def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
    return sum(seen.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--method", default="fedit")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--backbone", default="vit")
    ap.add_argument("--backbone-init", default="pretrained")
    ap.add_argument("--head", default="shared")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = make_config(dict(method=a.method, dataset=a.dataset, partition="iid", clients=a.clients,
                           fraction=a.fraction, rounds=a.rounds, local_steps=2, batch_size=32, optimizer="adamw",
                           lr=1e-3, eval_every=10 ** 6, rank=a.rank, backbone=a.backbone,
                           backbone_init=a.backbone_init, head=a.head, min_size=1), "cpu")
    p = prepare(cfg, a.data_dir, "cpu")
    gc.collect()
    rss0 = rss_bytes()
    sim = Simulation(cfg, p.data, p.device, prefetch=False, backbone=p.backbone)
    gc.collect()
    rss_built = rss_bytes()
    for t in range(1, a.rounds + 1):
        sim.run_round(t)
    sim.close()
    gc.collect()
    rss1 = rss_bytes()
    backbone = storage_bytes(list(sim.backbone.parameters()) + list(sim.backbone.buffers()))
    ad = sim.clients[0].module("lora")
    adapter = sum(t.numel() * t.element_size() for t in ad.parameters())
    clients = storage_bytes(t for k, ts in sim.state.tensors.items() if k[0] == "client" for t in ts)
    server = storage_bytes(t for k, ts in sim.state.tensors.items() if k[0] != "client" for t in ts)
    workspace = storage_bytes(t for ws in sim.state.workspace.values() for t in (*ws.parameters(), *ws.buffers()))
    head = clients - a.clients * adapter
    ideal = backbone + a.clients * adapter
    engine = backbone + clients + server + workspace
    res = {"machine": machine_info(torch.device("cpu"), 1), "config": cfg.to_dict(), "clients": a.clients, "backbone_bytes": backbone,
           "adapter_bytes_per_client": adapter, "head_bytes_all_clients": head, "client_state_bytes": clients,
           "server_state_bytes": server, "workspace_bytes": workspace, "ideal_bytes": ideal,
           "engine_bytes": engine, "engine_over_ideal": engine / ideal,
           "rss_growth_build_bytes": rss_built - rss0, "rss_growth_build_over_ideal": (rss_built - rss0) / ideal,
           "rss_growth_after_rounds_bytes": rss1 - rss0}
    mib = 2 ** 20
    print(f"{a.clients} clients, {a.method}, {a.backbone} r={a.rank}, head={a.head}")
    print(f"  backbone {backbone / mib:.2f} MiB, adapter {adapter / 1024:.1f} KiB per client")
    print(f"  ideal (backbone + N x adapter)   {ideal / mib:9.2f} MiB")
    print(f"  engine-held tensors              {engine / mib:9.2f} MiB  = {engine / ideal:.3f} x ideal "
          f"(clients {clients / mib:.2f}, of which heads {head / mib:.2f}; server {server / mib:.2f}; "
          f"workspaces {workspace / mib:.2f})")
    print(f"  RSS growth building the clients  {(rss_built - rss0) / mib:9.2f} MiB  = {(rss_built - rss0) / ideal:.3f} x ideal")
    print(f"  RSS growth after {a.rounds} rounds        {(rss1 - rss0) / mib:9.2f} MiB  (adds the allocator's cache of one "
          f"round's activations and the last evaluation's batches, independent of N)")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
