"""The MHPFL regression oracle: every MHPFL method, a fixed seed, synthetic data, both numeric paths.

``python tests/regression_mhpfl.py`` (re)writes tests/data/mhpfl_regression.json from the current
engine; tests/test_regression_mhpfl.py replays the same configs and demands the same numbers, so an
engine change that moves any MHPFL result by one correct prediction, one byte or one MAC fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
ORACLE = HERE / "data" / "mhpfl_regression.json"
METHODS = {"fedlora": {}, "standalone": {}, "fedavg": {"models": "cnn1"}, "lg-fedavg": {}, "fd": {},
           "fedproto": {}, "fml": {}, "fedkd": {}, "fedgh": {}}
# round-end: the protocol every run had before protocols were named (omitted from the id, so the oracle's
# configs and numbers stand); yi and pfllib are pinned by tests/test_protocols.py
BASE = dict(dataset="synthetic", clients=5, fraction=0.6, rounds=2, epochs=1, batch_size=32, seed=7,
            eval_protocol="round-end")


def configs():
    from fedbench.config import make_config
    for name, extra in METHODS.items():
        yield name, make_config({**BASE, "method": name, **extra})


def record(cfg) -> list[dict]:
    from fedbench.data.sources import load_dataset
    from fedbench.engine.data import build_federated_data
    from fedbench.engine.simulation import Simulation
    torch.set_num_threads(1)
    data = build_federated_data(load_dataset(cfg.dataset), cfg, torch.device("cpu"))
    sim = Simulation(cfg, data, torch.device("cpu"), prefetch=False)
    out = []
    for r in sim.run():
        out.append({"round": r.round, "server_macs": r.server_macs,
                    "rows": [[x.client, int(x.selected), x.bytes_up, x.bytes_down, x.train_macs, x.eval_macs,
                              x.train_samples, x.correct, x.total] for x in r.rows]})
    return out


def main() -> int:
    ORACLE.parent.mkdir(exist_ok=True)
    doc = {name: {"config": cfg.canonical_json(), "rounds": record(cfg)} for name, cfg in configs()}
    ORACLE.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {ORACLE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
