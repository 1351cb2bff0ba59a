"""--data-order: ``reshuffle`` (the default: a new seeded permutation every epoch, the batches fedbench has
always drawn) or ``fixed`` (the partition's order at every epoch of every round, as HtFLlib's unshuffled
client loaders). Synthetic data, CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sim, small_config

from fedbench.seeding import torch_generator


def _epochs(sim, client, rnd: int, epochs: int, augment: bool = False, stream: int = 0):
    """The batches of one request (client, round, its stream), split by epoch."""
    client.round, client.streams = rnd, stream
    batches = list(sim.train_batches(client, epochs=epochs, augment=augment, shuffle=True))
    per = len(batches) // epochs
    return [batches[e * per:(e + 1) * per] for e in range(epochs)]


def _cat(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_fixed_order_is_the_partition_order_every_epoch_and_round():
    sim = make_sim(small_config(method="standalone", batch_size=16, data_order="fixed"))
    c = sim.clients[1]
    idx = sim.data.index["train"][c.id]
    labels = sim.data.labels[idx]  # the partition's order: ascending dataset index
    assert torch.equal(idx, torch.sort(idx).values)
    seen = _epochs(sim, c, 1, 3) + _epochs(sim, c, 2, 2, stream=4)
    first_x, first_y = _cat(seen[0])
    assert torch.equal(first_y, labels)
    for ep in seen[1:]:
        x, y = _cat(ep)
        assert torch.equal(y, labels) and torch.equal(x, first_x)
    sim.close()


def test_reshuffle_draws_the_batches_it_always_drew():
    """The default: epoch e of request (client, round, stream) is idx[randperm(n)] with the e-th permutation
    of generator (seed, "data", client, round, stream + 1), the same generator the augmentation then reads.
    Written out here from the engine's rule before the option existed."""
    cfg = small_config(method="standalone", batch_size=16)
    assert cfg.data_order == "reshuffle" and "data_order" not in cfg.canonical_json()  # run ids unchanged
    sim = make_sim(cfg)
    c = sim.clients[2]
    idx = sim.data.index["train"][c.id]
    got = _epochs(sim, c, 3, 2, augment=True, stream=1)
    g = torch_generator(torch.device("cpu"), cfg.seed, "data", c.id, 3, 2)
    for ep in got:
        order = idx[torch.randperm(len(idx), generator=g)]
        for s, (x, y) in zip(range(0, len(idx), cfg.batch_size), ep, strict=True):
            b = order[s:s + cfg.batch_size]
            assert torch.equal(y, sim.data.labels[b])
            assert torch.equal(x, sim.data.transform.train_gather(sim.data.images, b, cfg.augment, g))
    assert not torch.equal(_cat(got[0])[1], _cat(got[1])[1])  # a new order each epoch
    sim.close()


def test_data_order_is_named_in_the_config_only_when_fixed(capsys):
    fixed = small_config(method="fml", data_order="fixed")
    assert '"data_order":"fixed"' in fixed.canonical_json()
    assert fixed.run_hash("d") != small_config(method="fml").run_hash("d")
    from fedbench.cli import main
    with pytest.raises(SystemExit) as e:
        main(["run", "--dataset", "synthetic", "--method", "fml", "--data-order", "sorted"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--data-order" in err[0] and "reshuffle, fixed" in err[0]
