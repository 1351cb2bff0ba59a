"""One run of a sweep, in its own fresh process: ``python -m fedbench.worker --config JSON --fd N ...``.

It simulates the run and writes its record to file descriptor N as pickled messages (see
fedbench/executors.py); it never opens the results store: the sweep's driver persists.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys


def main(argv=None) -> int:
    from fedbench.executors import PREFETCH_CHOICES, RunSettings, perform
    ap = argparse.ArgumentParser(prog="fedbench.worker")
    ap.add_argument("--config", required=True)
    ap.add_argument("--fd", type=int, required=True, help="file descriptor the messages are written to")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prefetch", default="auto", choices=PREFETCH_CHOICES)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--partition-file", action="append", default=[], help="an imported partition (repeatable)")
    ap.add_argument("--also-eval", default="", help="protocols the same training is evaluated under too (comma-separated)")
    a = ap.parse_args(argv)
    out = os.fdopen(a.fd, "wb")

    def emit(msg) -> None:
        pickle.dump(msg, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    ok = perform(a.config, RunSettings(a.device, a.threads, a.prefetch, a.data_dir, tuple(a.partition_file)), emit,
                 also=tuple(p for p in a.also_eval.split(",") if p))
    out.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
