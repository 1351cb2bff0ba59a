"""Run presets: ``common`` (the default) leaves every stored run's identity unchanged; ``reference`` fills
each federated-LoRA method's published setting beneath the options given explicitly, in the config and
the label; a bad name or a method without a reference is one line, exit 2."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from fedbench.config import CORE_FIELDS, config_from_dict, make_config
from fedbench.errors import ConfigError
from fedbench.presets import REFERENCES, describe, run_label
from fedbench.registry import get_method, methods

ROOT = Path(__file__).resolve().parents[3]


def _stored_values(row: dict) -> dict:
    """The options of a stored run, from reports/lora-vision/runs.csv (integers written as 16.0 there)."""
    names = {f.name for f in dataclasses.fields(get_method(row["method"]).Params)}
    vals = {k: v for k, v in row.items() if k in CORE_FIELDS and v != ""}
    vals.update({k[3:]: v for k, v in row.items() if k.startswith("hp_") and k[3:] in names})
    return {k: (v[:-2] if re.fullmatch(r"-?\d+\.0", v) else v) for k, v in vals.items()}


# methods whose stored runs were computed under a rule fixed since: FedRot-LoRA through its new
# --fedrot-phase option (the stored runs had the early phase), the others through Method.rule_revision
RULE_FIXED = {"fedrot-lora", "flora", "ilora", "hetlora", "flexlora", "raflora", "flasc", "fslora"}


def test_common_preset_leaves_every_stored_lora_vision_identity_unchanged():
    """The oracle (tests/data/lora_vision_identities.json): sha256 of each stored run's canonical config
    under the code before presets and late options (commit 1bd4038), keyed by run id. The run id hashes
    exactly this JSON with the data digest, so equal JSON is an unchanged id. A method whose rule was fixed
    since must get a new identity (a store must not serve the old rule's result); every other keeps it."""
    oracle = json.loads((ROOT / "tests/data/lora_vision_identities.json").read_text())
    rows = list(csv.DictReader((ROOT / "reports/lora-vision/runs.csv").open()))
    assert len(rows) == len(oracle) == 81
    assert {m for m in methods() if get_method(m).rule_revision} == RULE_FIXED - {"fedrot-lora"}
    for row in rows:
        for preset in (None, "common"):
            vals = _stored_values(row) | ({"preset": preset} if preset else {})
            cfg = make_config(vals)
            same = hashlib.sha256(cfg.canonical_json().encode()).hexdigest() == oracle[row["run_id"]]
            assert same == (row["method"] not in RULE_FIXED), row["label"]
            assert "preset" not in cfg.canonical_json() and "rank_scaling" not in cfg.canonical_json()


def test_reference_fills_the_published_values_and_explicit_options_win():
    ref = REFERENCES["flasc"].values
    cfg = make_config({"method": "flasc", "preset": "reference"})
    mp = cfg.method_params
    assert (mp["rank"], cfg.optimizer, cfg.lr, mp["server_opt"], mp["server_wd"], cfg.agg_weight) == \
        (16, "sgd", 1e-3, "adamw", 0.01, "uniform") == \
        (ref["rank"], ref["optimizer"], ref["lr"], ref["server_opt"], ref["server_wd"], ref["agg_weight"])
    assert run_label(cfg, "FLASC (...)") == "FLASC (...) [preset reference]"
    over = make_config({"method": "flasc", "preset": "reference", "lr": "0.05", "rank": 4})
    assert over.lr == 0.05 and over.method_params["rank"] == 4 and over.optimizer == "sgd"
    assert run_label(over, "FLASC (...)") == "FLASC (...) [preset reference; overridden: --rank, --lr]"
    assert over.canonical_json() != cfg.canonical_json() != make_config({"method": "flasc"}).canonical_json()
    assert '"preset":"reference"' in cfg.canonical_json()
    assert config_from_dict(cfg.to_dict()).canonical_json() == cfg.canonical_json()  # stored, reloaded


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_every_reference_preset_builds_and_is_listed(method):
    cfg = make_config({"method": method, "preset": "reference", "clients": 10, "rounds": 10})
    assert cfg.preset == "reference"
    lines = describe(method)
    assert lines[0].startswith("  follows: ") and lines[1].startswith("  --preset reference: ")


def test_every_federated_lora_method_with_a_rule_has_a_reference():
    lora = {n for n, c in methods().items() if c.family == "federated-lora"} - {"lora-local", "full-ft"}
    assert lora == set(REFERENCES)


def test_bad_preset_and_method_without_reference_are_one_line_errors(capsys):
    from fedbench.cli import main
    with pytest.raises(ConfigError, match="no reference preset"):
        make_config({"method": "fedavg", "preset": "reference"})
    for args in (["run", "--method", "fedit", "--preset", "published"],
                 ["run", "--method", "fedavg", "--preset", "reference"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert e.value.code == 2 and len(err) == 1 and "preset" in err[0] and "Traceback" not in err[0], err


def test_preset_in_a_sweep_file():
    from fedbench.sweep import parse_sweep
    doc = {"base": {"dataset": "synthetic", "clients": 5, "preset": "reference", "lr": 0.1},
           "axes": {"method": ["flasc", "fedex-lora"]}}
    cfgs = {c.method: c for c in parse_sweep(doc, "t.toml").configs}
    assert cfgs["flasc"].optimizer == "sgd" and cfgs["flasc"].method_params["server_wd"] == 0.01
    assert cfgs["fedex-lora"].method_params["rank"] == 4 and cfgs["fedex-lora"].agg_weight == "uniform"
    assert cfgs["flasc"].lr == cfgs["fedex-lora"].lr == 0.1  # [base] options are given: they win
