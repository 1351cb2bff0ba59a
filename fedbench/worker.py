"""One run of a sweep, in its own process: ``python -m fedbench.worker --config JSON ...``."""

from __future__ import annotations

import argparse
import json
import sys


def config_from_json(text: str):
    from fedbench.config import config_from_dict
    return config_from_dict(json.loads(text))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fedbench.worker")
    ap.add_argument("--config", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sweep", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args(argv)
    import torch

    from fedbench.config import config_to_cli
    from fedbench.errors import ConfigError
    from fedbench.runner import execute, prepare
    from fedbench.store import Store
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        cfg = config_from_json(a.config)
        p = prepare(cfg, a.data_dir, a.device)
        store = Store(a.results)
        execute(p, store, command=config_to_cli(cfg), sweep=a.sweep)
        store.close()
    except ConfigError as e:
        print(f"fedbench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
