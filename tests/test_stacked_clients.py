"""A round's same-CNN participants trained in one stacked pass (fedbench/engine/stacked.py, the MHPFL
family's ``--client-batching``): the same training as client by client. Pinned here:

* the stacked trainer against torch's own optimisers run client by client on models/cnn.py's CNN, in
  float64: unequal batch counts (a client drops out) and unequal last batches (the per-segment path),
  SGD with momentum and weight decay, fused SGD, AdamW, an active per-client gradient clip;
* the engine, per opted-in method (standalone, FedAvg, LG-FedAvg, FedGH): batched rounds against
  one-by-one rounds, every state tensor within float tolerance and every per-client row (bytes up and
  down, train and eval MACs, samples, correct/total) identical;
* evaluation in the same shape: every same-CNN client evaluated in one pass (standalone, LG-FedAvg,
  FedGH: correct, total, eval MACs and the yi batch-mean accuracy as client by client);
* the methods whose training is not the standard one opt out, and ``auto`` keeps the CPU client by client.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_trained_alike, small_config

from fedbench.engine.simulation import Simulation
from fedbench.engine.stacked import Member, StackedTrainer
from fedbench.models.cnn import CNN, CNN_WIDTHS
from fedbench.runner import prepare


def _clip(params, max_norm):
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def _one_by_one(model, batches, make_opt, clip):
    opt = make_opt(list(model.parameters()))
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[0], y).backward()
        if clip > 0:
            _clip(list(model.parameters()), clip)
        opt.step()


OPTIMS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
}


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_stacked_trainer_equals_torch_client_by_client(optim):
    """Three CNN-2 clients in float64: 3, 2 and 3 batches (client 1 drops out after its second step), the
    last batches of unequal size (a step through the per-segment path); a clip of 0.5 that acts."""
    torch.manual_seed(0)
    make_opt = OPTIMS[optim]
    sizes = [[4, 4, 3], [4, 2], [4, 4, 4]]
    data = [[(torch.randn(n, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (n,))) for n in s]
            for s in sizes]
    models = [CNN(*CNN_WIDTHS["cnn2"], num_classes=10).double() for _ in sizes]
    alone = [CNN(*CNN_WIDTHS["cnn2"], num_classes=10).double() for _ in sizes]
    for a, m in zip(alone, models, strict=True):
        a.load_state_dict(m.state_dict())
    start = [p.detach().clone() for p in alone[1].parameters()]
    for a, d in zip(alone, data, strict=True):
        _one_by_one(a, d, make_opt, clip=0.5)
    members = [Member({n: p.detach() for n, p in m.named_parameters()}, d, len(d)) for m, d in zip(models, data,
                                                                                                 strict=True)]
    probe = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    StackedTrainer(members, make_opt([probe]), 0.5).run()
    for a, m in zip(alone, models, strict=True):
        for (n, pa), pm in zip(a.named_parameters(), m.parameters(), strict=True):
            torch.testing.assert_close(pm, pa, rtol=1e-9, atol=1e-11, msg=lambda s, n=n: f"{optim} {n}: {s}")
    moved = max((p - s).abs().max().item() for p, s in zip(alone[1].parameters(), start, strict=True))
    assert moved > 1e-4  # training moved the client that dropped out: the comparison is not of untouched tensors


def test_stacked_trainer_clip_acts_per_client():
    """The clip is each client's own: a client with a huge gradient is scaled, its neighbour is not."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    x[1] *= 1e3  # client 1's gradient norm is far above the clip
    y = torch.randint(0, 10, (2, 4))
    models = [CNN(*CNN_WIDTHS["cnn5"], num_classes=10).double() for _ in range(2)]
    alone = [CNN(*CNN_WIDTHS["cnn5"], num_classes=10).double() for _ in range(2)]
    for a, m in zip(alone, models, strict=True):
        a.load_state_dict(m.state_dict())
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    for c in range(2):
        _one_by_one(alone[c], [(x[c], y[c])], sgd, clip=1.0)
    members = [Member({n: p.detach() for n, p in models[c].named_parameters()}, [(x[c], y[c])], 1)
               for c in range(2)]
    StackedTrainer(members, sgd([torch.zeros(1, requires_grad=True)]), 1.0).run()
    for c in range(2):
        for pa, pm in zip(alone[c].parameters(), models[c].parameters(), strict=True):
            torch.testing.assert_close(pm, pa, rtol=1e-9, atol=1e-12)


# --- the engine --------------------------------------------------------------------------------------------

def _sim(batching, **kw):
    base = dict(method="standalone", clients=10, fraction=1.0, rounds=2, epochs=1, batch_size=24, eval_every=1,
                partition="dirichlet", alpha=0.5, clip=2.0, eval_protocol="round-end")
    base.update(kw)
    cfg = small_config(**base)
    p = prepare(cfg, None, "cpu")
    return Simulation(cfg, p.data, p.device, prefetch=False, client_batching=batching)


OPTED_IN = {  # standalone: CNN-1..5, two clients each; the others one CNN (a group of five) to stay quick
    "standalone": dict(),
    "fedavg": dict(method="fedavg", models="cnn5", clients=5),
    "lg-fedavg": dict(method="lg-fedavg", models="cnn5", clients=5, optimizer="adamw", lr=1e-3),
    "fedgh": dict(method="fedgh", models="cnn5", clients=5, eval_protocol="yi", eval_batch_size=16),
}


SLOW = {"lg-fedavg", "fedgh"}  # nox -s nightly


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in OPTED_IN])
def test_engine_stacked_round_equals_one_by_one(case):
    a, b = _sim("off", **OPTED_IN[case]), _sim("on", **OPTED_IN[case])
    assert b.method.batchable() and b._joint([0, 1]) and not a._joint([0, 1])
    # evaluation in the same shape, where predict is the client's own CNN (FedAvg's is the global model)
    assert b._stacked_eval(b.protocol) == (case != "fedavg") and not a._stacked_eval(a.protocol)
    start = {k: [t.clone() for t in ts] for k, ts in b.state.tensors.items()}
    for t in (1, 2):
        ra, rb = a.run_round(t), b.run_round(t)
        sel = [r for r in rb.rows if r.selected]
        assert [r.client for r in ra.rows if r.selected] == [r.client for r in sel]
        steps = {-(-r.train_samples // 24) for r in sel}
        assert len(steps) > 1  # unequal step counts: clients drop out of the stack
        for r1, r2 in zip(ra.rows, rb.rows, strict=True):
            assert (r1.train_macs, r1.eval_macs, r1.bytes_up, r1.bytes_down, r1.train_samples, r1.total,
                    r1.correct) == (r2.train_macs, r2.eval_macs, r2.bytes_up, r2.bytes_down, r2.train_samples,
                                    r2.total, r2.correct), (case, t, r1.client)
            assert r1.metrics.keys() == r2.metrics.keys()  # yi: the batch-mean accuracy, evaluated stacked too
            for k, v in r1.metrics.items():
                assert v == pytest.approx(r2.metrics[k], rel=1e-6), (case, t, r1.client, k)
        assert any(r.train_macs > 0 for r in sel) and ra.server_macs == rb.server_macs
        moved = assert_trained_alike(a, b, start)
    assert moved > 1e-3


@pytest.mark.parametrize("method", ["fedlora", "fd", "fedproto", "fml", "fedkd"])
def test_methods_with_their_own_training_opt_out(method):
    sim = _sim("on", method=method, rounds=1)
    assert not sim.method.batchable() and not sim._joint([0, 1])


def test_auto_is_client_by_client_on_the_cpu_and_stacked_on_cuda():
    sim = _sim("auto", rounds=1)
    assert not sim._joint([0, 1])
    assert sim.method.batching_pays_on(torch.device("cuda")) and not sim.method.batching_pays_on(torch.device("cpu"))
