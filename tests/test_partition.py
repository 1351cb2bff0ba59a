import numpy as np
import pytest

from fedbench.data.partition import make_partition
from fedbench.data.partitioners.pathological import pathological_shares
from fedbench.errors import ConfigError


def labels(n_per_class=100, K=10, seed=0):
    y = np.repeat(np.arange(K), n_per_class)
    np.random.default_rng(seed).shuffle(y)
    return y


def splits(K=10):
    return {"train": labels(400, K, 1), "val": labels(100, K, 2), "test": labels(100, K, 3)}


def part(kind="pathological", N=10, seed=0, K=10, **kw):
    return make_partition(kind, splits(K), K, N, np.random.default_rng(seed), **kw)


@pytest.mark.parametrize("kind", ["pathological", "dirichlet", "iid"])
def test_no_sample_twice_and_deterministic(kind):
    p = part(kind, alpha=0.5)
    for split in ("train", "val", "test"):
        allix = np.concatenate(p.indices[split])
        assert len(allix) == len(np.unique(allix)), "a sample went to two clients"
    q = part(kind, alpha=0.5)
    assert p.digest() == q.digest()
    assert part(kind, seed=1, alpha=0.5).digest() != p.digest()


def test_pathological_classes_and_shares():
    s = splits()
    p = part("pathological", N=10, classes_per_client=2)
    counts = p.class_counts(s["train"], "train")
    assert ((counts > 0).sum(axis=1) == 2).all(), "every client holds exactly m classes"
    # every class goes to m*N/K = 2 clients; shares from U(0.4, 0.6) normalised -> in [0.4, 0.6]
    assert ((counts > 0).sum(axis=0) == 2).all()
    frac = counts / 400
    nz = frac[frac > 0]
    assert nz.min() >= 0.4 - 1e-2 and nz.max() <= 0.6 + 1e-2
    # same class map on the test split, same proportions
    test_counts = p.class_counts(s["test"], "test")
    assert ((test_counts > 0) == (counts > 0)).all()
    np.testing.assert_allclose(test_counts / 100, frac, atol=0.011)


def test_pathological_shares_rows():
    sh = pathological_shares(10, 50, 2, np.random.default_rng(3))
    assert ((sh > 0).sum(1) == 2).all()
    np.testing.assert_allclose(sh.sum(0), 1.0)


def test_pathological_cifar100_style():
    K = 100
    y = {"train": np.repeat(np.arange(K), 40), "val": np.repeat(np.arange(K), 10), "test": np.repeat(np.arange(K), 10)}
    p = make_partition("pathological", y, K, 20, np.random.default_rng(0), classes_per_client=10)
    counts = p.class_counts(y["train"])
    assert ((counts > 0).sum(1) == 10).all()


def test_pathological_impossible_is_clear():
    with pytest.raises(ConfigError, match="not a multiple of 10"):
        part("pathological", N=7, classes_per_client=3)
    with pytest.raises(ConfigError, match="classes-per-client"):
        part("pathological", N=10, classes_per_client=11)


def test_dirichlet_min_size_and_failure():
    p = part("dirichlet", N=10, alpha=0.3, min_size=50)
    assert p.sizes("train").min() >= 50
    with pytest.raises(ConfigError, match=r"alpha=0.01, clients=40, min-size=300"):
        part("dirichlet", N=40, alpha=0.01, min_size=300)


def test_dirichlet_test_follows_train_proportions():
    s = splits()
    p = part("dirichlet", N=5, alpha=1.0)
    tr = p.class_counts(s["train"], "train") / 400
    te = p.class_counts(s["test"], "test") / 100
    np.testing.assert_allclose(te, tr, atol=0.011)


def test_iid_balanced():
    p = part("iid", N=8)
    sizes = p.sizes("train")
    assert sizes.max() - sizes.min() <= 1


def test_too_many_clients():
    with pytest.raises(ConfigError, match="exceeds"):
        part("iid", N=5000)


@pytest.mark.parametrize("kind,kw", [("pathological", {}), ("dirichlet", {"alpha": 0.5}), ("iid", {})])
def test_seed_changes_client_by_class_counts(kind, kw):
    """Not only the digest: a partitioner drawing its shares from a fixed generator still shuffles the
    indices with the run's, so only the client-by-class counts show it."""
    s = splits()
    counts = {seed: part(kind, seed=seed, **kw).class_counts(s["train"]) for seed in (0, 1)}
    assert (counts[0] == part(kind, seed=0, **kw).class_counts(s["train"])).all()
    assert (counts[0] != counts[1]).any()
    for split in ("val", "test"):
        assert (part(kind, seed=0, **kw).class_counts(s[split], split)
                != part(kind, seed=1, **kw).class_counts(s[split], split)).any()


def test_every_registered_partitioner_is_named_with_its_parameters():
    from fedbench.data.partition import PARTITIONERS, partitioner_class
    assert set(PARTITIONERS) >= {"pathological", "dirichlet", "iid", "natural"}
    assert partitioner_class("pathological").parameters() == ("classes_per_client", "share_low", "share_high")
    assert partitioner_class("dirichlet").parameters() == ("alpha", "min_size")
    with pytest.raises(ConfigError, match="unknown partition 'shards'; choose from: "):
        partitioner_class("shards")
