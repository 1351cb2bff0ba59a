"""The host-allocator setting of CPU simulation (fedbench/engine/allocator.py)."""

import os
import subprocess
import sys

import pytest

from fedbench.engine import allocator


def _in_fresh_process(env_value: str | None) -> str:
    """What tune_host_allocator returns (twice: the second call must give the same) in a new process."""
    code = "from fedbench.engine.allocator import tune_host_allocator as t; a = t(); assert t() == a; print(a)"
    env = {k: v for k, v in os.environ.items() if k != "FEDBENCH_MALLOC"}
    if env_value is not None:
        env["FEDBENCH_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_tuned_by_default_once_per_process():
    out = _in_fresh_process(None)
    assert out == str({"mmap_threshold": allocator.MMAP_THRESHOLD, "trim_threshold": allocator.TRIM_THRESHOLD})


def test_env_leaves_glibc_defaults():
    assert _in_fresh_process("default") == "None"
