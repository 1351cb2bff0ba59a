"""The MHPFL methods keep their exact numbers across engine redesigns (oracle written before the
federated-LoRA redesign by ``python tests/regression_mhpfl.py``; see that file)."""

import json

import pytest
from regression_mhpfl import ORACLE, configs, record

STORED = json.loads(ORACLE.read_text())


@pytest.mark.parametrize("name,cfg", list(configs()), ids=[n for n, _ in configs()])
def test_same_seed_same_numbers(name, cfg):
    assert STORED[name]["config"] == cfg.canonical_json(), "the config (and so the run id) changed"
    got = record(cfg)
    for want_r, got_r in zip(STORED[name]["rounds"], got, strict=True):
        assert got_r["server_macs"] == want_r["server_macs"], (name, got_r["round"])
        for want_row, got_row in zip(want_r["rows"], got_r["rows"], strict=True):
            assert got_row == want_row, (name, got_r["round"], "client,selected,up,down,train,eval,n,correct,total")
