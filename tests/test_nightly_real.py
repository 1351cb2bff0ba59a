"""Real CIFAR-10 runs (minutes each on a 2-core CPU): `nox -s nightly` or `pytest -m nightly`."""

import pytest

from fedbench.config import make_config
from fedbench.runner import execute, prepare
from fedbench.store import Store

pytestmark = pytest.mark.nightly


@pytest.mark.parametrize("method,extra,floor", [("fedlora", {"rank": 8}, 0.80)])
def test_issue_protocol_learns_on_real_cifar10(real_data_dir, tmp_path, method, extra, floor):
    """The README's main job: N=10, C=1, 20 rounds, 1 epoch, pathological 2 classes, hetero CNNs."""
    cfg = make_config(dict(method=method, dataset="cifar10", clients=10, fraction=1.0, rounds=20, epochs=1,
                           **extra))
    p = prepare(cfg, real_data_dir)
    store = Store(tmp_path / "r.sqlite")
    s = execute(p, store)
    assert s["acc_last_unweighted"] > floor, s
    assert s["bytes_up"] == 20 * 10 * 8 * (500 + 10) * 4
