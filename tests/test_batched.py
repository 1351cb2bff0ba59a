"""All participants of a round in one batched pass (fedbench/lora/batched.py, ``--client-batching``): the
same training as client by client. Pinned here:

* the generic joint trainer against torch's own optimisers run client by client, on a tiny causal
  transformer (the language tier's stand-in until that tier lands: a backbone with adapted q/v layers,
  a per-client LM head, a token loss), float64, mixed ranks 2/4/8, unequal batch counts (clients drop
  out), AdamW and SGD (momentum, weight decay), an active gradient clip;
* zero-padding to r_max is inert: the padded rows/columns stay exactly zero and a padded client trains
  exactly as it does alone at its own rank;
* the engine (vision tier): batched rounds against one-by-one rounds on the ViT (attn, attn-mlp) and
  ResNet-8 (conv targets), heterogeneous ranks, unequal client sizes, shared/local/frozen heads: every
  client's and the server's tensors equal within float tolerance, every per-client row (train MACs,
  bytes up and down, samples) identical;
* opting out (a method that overrides ``train``) and the switch's bad values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_trained_alike, small_config
from torch import nn

from fedbench.engine.simulation import Simulation, resolve_client_batching
from fedbench.errors import ConfigError
from fedbench.lora.batched import JointTrainer, Member, OptimSettings
from fedbench.lora.layers import AdapterSet, activate, find_targets, inject
from fedbench.runner import prepare

# --- a tiny causal transformer: the language tier's stand-in -------------------------------------------


class TinyCausalLM(nn.Module):
    """Token embedding, one pre-norm causal self-attention block (q/k/v/o) and an MLP; ``features`` gives
    (n, T, dim) hidden states for an LM head."""

    def __init__(self, vocab=17, dim=16, heads=2, T=6):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, T, dim) * 0.1)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def features(self, tokens):
        x = self.embed(tokens) + self.pos[:, :tokens.shape[1]]
        h = self.norm1(x)
        n, T, D = h.shape
        split = lambda t: t.view(n, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, T, D)
        x = x + self.o_proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _lm_setup(ranks, targets="q_proj,v_proj"):
    torch.manual_seed(0)
    lm = TinyCausalLM().double().eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    tg = find_targets(lm, targets)
    layers = inject(lm, tg)
    adapters, heads = [], []
    for r in ranks:
        ad = AdapterSet(tuple(tg), r, 16.0, False).double()
        with torch.no_grad():
            for b in ad.lora_B.values():  # non-zero B: A gets gradients from the first step on
                b.weight.normal_(0, 0.1)
        adapters.append(ad)
        heads.append(nn.Linear(16, 17).double())
    return lm, layers, adapters, heads


def _token_batches(seed, n_batches, bs=4, T=6, last=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        n = last if i == n_batches - 1 else bs  # an uneven last batch, as at the end of an epoch
        tok = torch.randint(0, 17, (n, T + 1), generator=g)
        out.append((tok[:, :-1], tok[:, 1:]))
    return out


def _one_by_one(lm, layers, ad, head, batches, make_opt, clip, trains=("A", "B")):
    params = [*(ad.lora_A.parameters() if "A" in trains else ()),
              *(ad.lora_B.parameters() if "B" in trains else ()), *head.parameters()]
    opt = make_opt(params)
    activate(layers, ad)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        lm_loss(head(lm.features(x)), y).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    activate(layers, None)


def _members(adapters, heads, batches):
    return [Member({k: (ad.lora_A[k].weight.detach(), ad.lora_B[k].weight.detach()) for k in ad.lora_A},
                   ad.scaling, bs, len(bs), (h.weight.detach(), h.bias.detach()))
            for ad, h, bs in zip(adapters, heads, batches, strict=True)]


OPTIMS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("targets", ["q_proj,v_proj", "q_proj,v_proj,fc1,fc2"])
def test_joint_trainer_equals_torch_optimisers_client_by_client_language_stand_in(opt, targets):
    ranks = [2, 8, 4, 8, 2]
    steps = [3, 5, 1, 4, 5]  # unequal: clients drop out of the batch as they finish
    clip = 0.5               # active: the first steps' norms are above it
    lm, layers, adapters, heads = _lm_setup(ranks, targets)
    batches = [_token_batches(10 + i, s) for i, s in enumerate(steps)]
    ref_ad = [AdapterSet(tuple(layers[k].target for k in layers), r, 16.0, False).double() for r in ranks]
    ref_h = [nn.Linear(16, 17).double() for _ in ranks]
    for a, b in zip(ref_ad + ref_h, adapters + heads, strict=True):
        a.load_state_dict(b.state_dict())
    start = [ad.lora_A[k].weight.clone() for ad in adapters for k in ad.lora_A]

    settings = OptimSettings.of(OPTIMS[opt]([torch.zeros(1, requires_grad=True)]), clip)
    JointTrainer(layers, lm.features, _members(adapters, heads, batches), settings, loss=lm_loss).run()
    for ad, h, bs in zip(ref_ad, ref_h, batches, strict=True):
        _one_by_one(lm, layers, ad, h, bs, OPTIMS[opt], clip)

    moved = max((ad.lora_A[k].weight - s).abs().max().item()
                for s, (ad, k) in zip(start, [(ad, k) for ad in adapters for k in ad.lora_A], strict=True))
    assert moved > 1e-3  # it trained (the comparison below is not of two untouched copies)
    for a, b in zip(adapters + heads, ref_ad + ref_h, strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_zero_padding_is_inert(opt):
    """A rank-2 client stacked with a rank-8 one: its padded rows of A and columns of B stay exactly zero
    through AdamW (decoupled decay) and SGD (momentum, decay), and it trains exactly as alone."""
    lm, layers, adapters, heads = _lm_setup([2, 8])
    batches = [_token_batches(1, 4), _token_batches(2, 4)]
    solo_ad = AdapterSet(tuple(layers[k].target for k in layers), 2, 16.0, False).double()
    solo_h = nn.Linear(16, 17).double()
    solo_ad.load_state_dict(adapters[0].state_dict())
    solo_h.load_state_dict(heads[0].state_dict())
    settings = OptimSettings.of(OPTIMS[opt]([torch.zeros(1, requires_grad=True)]), 0.0)
    joint = JointTrainer(layers, lm.features, _members(adapters, heads, batches), settings, loss=lm_loss)
    joint.run()
    JointTrainer(layers, lm.features, _members([solo_ad], [solo_h], batches[:1]), settings, loss=lm_loss).run()
    c = joint.order.index(0)
    for k in layers:
        assert joint.A[k].shape[1] == 8
        assert torch.count_nonzero(joint.A[k][c, 2:]) == 0 and torch.count_nonzero(joint.B[k][c, :, 2:]) == 0
        assert torch.count_nonzero(joint.A[k][1 - c, 2:]) > 0  # the rank-8 client does use those rows
        torch.testing.assert_close(adapters[0].lora_A[k].weight, solo_ad.lora_A[k].weight, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(adapters[0].lora_B[k].weight, solo_ad.lora_B[k].weight, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(heads[0].weight, solo_h.weight, rtol=1e-12, atol=1e-13)


def test_unsupported_optimiser_settings_are_refused_not_approximated():
    p = [torch.zeros(1, requires_grad=True)]
    assert OptimSettings.of(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 0) is None
    assert OptimSettings.of(torch.optim.AdamW(p, lr=0.1, amsgrad=True), 0) is None
    assert OptimSettings.of(torch.optim.Adam(p, lr=0.1), 0) is None
    assert OptimSettings.of(torch.optim.AdamW(p, lr=0.1), 1.0).kind == "adamw"


# --- the engine, vision tier ----------------------------------------------------------------------------

def _sim(batching, **kw):
    base = dict(method="hetlora", backbone_init="random", local_steps=0, epochs=1, batch_size=32,
                optimizer="adamw", lr=1e-3, eval_every=1, ranks="cycle:2,4,8", rounds=2, clients=10,
                fraction=0.4, partition="dirichlet", alpha=0.5)
    base.update(kw)
    cfg = small_config(**base)
    p = prepare(cfg, None, "cpu")
    return Simulation(cfg, p.data, p.device, prefetch=False, backbone=p.backbone, client_batching=batching)


CASES = {
    "vit-attn-adamw": dict(),
    "vit-attnmlp-sgd-clip-localhead": dict(targets="attn-mlp", optimizer="sgd", lr=0.02, clip=0.5, head="local"),
    "resnet-conv-sgd": dict(backbone="resnet", targets="conv", optimizer="sgd", lr=0.02),
    "ffa-frozen-head": dict(method="ffa-lora", ranks="", rank=4, head="frozen", lr=1e-2),
}
SLOW_CASES = {"vit-attnmlp-sgd-clip-localhead", "resnet-conv-sgd", "ffa-frozen-head"}  # nox -s nightly


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_engine_batched_round_equals_one_by_one(case):
    a, b = _sim("off", **CASES[case]), _sim("on", **CASES[case])
    assert a.client_batching == "off" and b.client_batching == "on" and b._joint([0, 1])
    start = {k: [t.clone() for t in ts] for k, ts in b.state.tensors.items()}
    for t in (1, 2):
        ra, rb = a.run_round(t), b.run_round(t)
        sel = [r.client for r in rb.rows if r.selected]
        assert [r.client for r in ra.rows if r.selected] == sel and len(sel) == 4
        assert len({math.ceil(r.train_samples / 32) for r in rb.rows if r.selected}) > 1  # unequal steps
        for r1, r2 in zip(ra.rows, rb.rows, strict=True):
            assert (r1.train_macs, r1.eval_macs, r1.bytes_up, r1.bytes_down, r1.train_samples, r1.total) == \
                   (r2.train_macs, r2.eval_macs, r2.bytes_up, r2.bytes_down, r2.train_samples, r2.total), (t, r1.client)
            assert r1.correct is not None and abs(r1.correct - r2.correct) <= 1  # evaluated every round (and
            # the adapters' slots then hold a client's AdapterSet before the next joint pass)
        assert ra.server_macs == rb.server_macs
        for k in ("agg_deviation", "agg_deviation_abs"):
            if k in ra.metrics:
                assert math.isclose(ra.metrics[k], rb.metrics[k], rel_tol=1e-3, abs_tol=1e-6)
        moved = assert_trained_alike(a, b, start)
    assert moved > 1e-3


def test_methods_that_train_their_own_way_opt_out():
    full = _sim("on", method="full-ft", ranks="", rounds=1, fraction=0.2)
    assert not full.method.batchable() and not full._joint([0, 1])
    res = full.run_round(1)  # runs client by client, rows as always
    assert all(r.train_macs > 0 for r in res.rows if r.selected)


def test_client_batching_switch_values(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_client_batching("on", cpu) == "on" and resolve_client_batching(" OFF", cpu) == "off"
    monkeypatch.setenv("FEDBENCH_CLIENT_BATCHING", "off")
    assert resolve_client_batching(None, cpu) == "off"
    monkeypatch.delenv("FEDBENCH_CLIENT_BATCHING")
    assert resolve_client_batching(None, cpu) == "auto"
    with pytest.raises(ConfigError, match="'sometimes'.*auto, on, off"):
        resolve_client_batching("sometimes", cpu)


def test_auto_batches_linear_adapters_only():
    vit = _sim("auto", rounds=1)
    resnet = _sim("auto", rounds=1, backbone="resnet", targets="conv", method="fedit", ranks="")
    assert vit._joint([0, 1]) and not resnet._joint([0, 1])
    assert _sim("on", rounds=1, backbone="resnet", targets="conv", method="fedit", ranks="")._joint([0, 1])


def test_auto_does_not_batch_smollm2():
    """SmolLM2's joint pass was measured slower on the CPU (0.61x): auto leaves it one by one."""
    from types import SimpleNamespace

    from fedbench.lm.models import CharLM, HFCausalLM
    from fedbench.methods.lora_family import FederatedLoRA
    pays = FederatedLoRA.batching_pays.fget
    linear = [SimpleNamespace(kind="linear")]

    def method(targets, backbone):
        return SimpleNamespace(targets=targets, server=SimpleNamespace(backbone=backbone))
    assert not pays(method(linear, HFCausalLM.__new__(HFCausalLM)))
    assert pays(method(linear, CharLM.__new__(CharLM)))
    assert not pays(method([SimpleNamespace(kind="conv")], CharLM.__new__(CharLM)))
