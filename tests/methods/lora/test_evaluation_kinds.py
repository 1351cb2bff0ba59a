"""Which evaluation kinds each federated-LoRA method has, and that a client's score is what the client
holds: the model its last local training left, on the backbone as it last downloaded it. FLoRA used to
score its clients with the latest merged global model, merges they never downloaded included."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_lora_family import lora_sim

from fedbench.methods.lora.flora import FLoRA
from fedbench.methods.lora_family import EVALUATIONS, FederatedLoRA
from fedbench.registry import methods
from fedbench.report.tables import accuracy_table, global_accuracy_table

LORA = sorted(n for n, c in methods().items() if issubclass(c, FederatedLoRA))
KW = {"fl-tac": dict(partition="dirichlet", alpha=0.5, fltac_min_samples=150), "fedlease": dict(fedlease_warmup=1),
      "fedloru": dict(fedloru_period=1)}


def test_every_method_declares_its_evaluation_kinds():
    assert len(LORA) == 20  # 18 methods and the two references
    for name in LORA:
        cls = methods()[name]
        kinds = cls.evaluations
        assert kinds and set(kinds) <= set(EVALUATIONS), name
        assert ("global" in kinds) == (not cls.personalised), name  # a global model iff not personalised
    assert methods()["ce-lora"].evaluations == ("personalised",)
    assert methods()["flora"].evaluations == ("personalised", "global")


def test_list_methods_shows_the_evaluation_kinds(capsys):
    from fedbench.cli import main
    with pytest.raises(SystemExit):
        main(["list", "methods"])
    out = capsys.readouterr().out
    blocks = {b.strip().split(" ", 1)[0]: b for b in out.split("\n\n") if b.strip()}
    for name in LORA:
        line = next(ln for ln in blocks[name].splitlines() if ln.strip().startswith("evaluation:"))
        assert ("personalised (" in line) and (("global (" in line) == (not methods()[name].personalised)), line


MERGING = ("flora", "fedex-lora", "frlora", "fedloru")  # the shared backbone moves between a client's rounds


@pytest.mark.parametrize("method", [m if m in MERGING or m == "fedit" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in LORA if m != "lora-local"])
def test_a_client_is_scored_with_the_model_it_holds(method):
    """Right after its local round, a client's prediction is taken as the reference; after later rounds
    in which it did not download anything (merges into the shared backbone by others included), its
    prediction must be the same: nothing it holds has changed."""
    sim = lora_sim(method, rounds=3, fraction=0.4, **KW.get(method, {}))
    m = sim.method
    xs = {c.id: sim.data.transform.eval(sim.data.images[sim.data.index["test"][c.id][:6]]) for c in sim.clients}
    held, last = {}, {}
    orig = m.client_update

    def client_update(client, payload):
        up = orig(client, payload)
        with torch.no_grad():
            held[client.id] = m.predict(client, xs[client.id]).clone()
        last[client.id] = client.round
        return up

    m.client_update = client_update
    for t in range(1, 4):
        sim.run_round(t)
    stale = [cid for cid, t in last.items() if t < 3]
    assert stale, last  # some client sat out the last round(s)
    with torch.no_grad():
        for cid in held:
            torch.testing.assert_close(m.predict(sim.clients[cid], xs[cid]), held[cid], rtol=1e-4, atol=1e-4,
                                       msg=lambda msg, cid=cid: f"{method} client {cid} (last round {last[cid]}): {msg}")


def _frame(methods_: list[str]) -> pd.DataFrame:
    rows = []
    for m in methods_:
        for seed, acc in ((0, 0.6), (1, 0.62)):
            rows.append(dict(setting="s", variant=m, method=m, seed=seed, accuracy=acc, global_accuracy=acc - 0.2,
                             summary_text="round-end", summary="last", statistic="last", defined_min=20,
                             defined_max=20, population_min=20, population_max=20, never_min=0, never_max=0))
    return pd.DataFrame(rows)


def test_report_marks_a_client_score_that_is_the_global_model(monkeypatch):
    df = _frame(["flora", "fedit"])
    t = accuracy_table(df)
    assert [r[0].text for r in t.rows[1:]] == ["fedit", "flora"] and not any("global model" in n for n in t.notes)
    monkeypatch.setattr(FLoRA, "evaluations", ("global",))  # a method whose clients hold only the global model
    t = accuracy_table(df)
    assert [r[0].text for r in t.rows[1:]] == ["fedit", "flora (global model)"]
    assert any(n.startswith("(global model): the method has no personalised model") for n in t.notes)
    g = global_accuracy_table(df)  # the global table is the global model's by definition: no mark there
    assert [r[0].text for r in g.rows[1:]] == ["fedit", "flora"]
