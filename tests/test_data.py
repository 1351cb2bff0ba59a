import numpy as np
import pytest
import torch

from fedbench.cli import main
from fedbench.data.sources import DATASETS, load_dataset, load_npz
from fedbench.data.transforms import BatchTransform, hflip, random_crop, random_erase


def test_npz_roundtrip(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    y = np.arange(20) % 10
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    a = load_dataset("cifar10", tmp_path)
    assert a.x_train.shape == (20, 32, 32, 3) and a.y_test.dtype == np.int64
    assert a.digest == load_npz(tmp_path / "cifar10.npz", DATASETS["cifar10"]).digest


def test_synthetic_is_fixed():
    assert load_dataset("synthetic").digest == load_dataset("synthetic").digest


def test_transforms_shapes_and_normalisation():
    t = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    x = torch.full((8, 32, 32, 3), 255 * 0.75, dtype=torch.uint8)
    out = t.eval(x)
    assert out.shape == (8, 3, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, (191 / 255 - 0.5) / 0.25), rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert t.train(x, "spec", g).shape == (8, 3, 32, 32)


def test_crop_pads_with_zero_and_shifts():
    g = torch.Generator().manual_seed(1)
    x = torch.ones(64, 32, 32, 1)
    out = random_crop(x, g, pad=4)
    # a shifted image shows a zero border (the channel mean after normalisation) unless unshifted
    zeros_per_img = (out == 0).flatten(1).sum(1)
    assert (zeros_per_img > 0).any() and (zeros_per_img <= 32 * 8 + 32 * 8).all()
    # content is preserved: a row of ones stays contiguous
    assert out.max() == 1


def test_flip_is_a_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(32.0).view(1, 1, 32, 1).expand(200, 32, 32, 1).contiguous()
    out = hflip(x, g)
    flipped = (out[:, 0, 0, 0] == 31)
    assert 0.3 < flipped.float().mean() < 0.7
    assert torch.equal(out[flipped], x[flipped].flip(2))


def test_erasing_area_in_range():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(500, 32, 32, 3)
    out = random_erase(x, g)
    frac = (out[..., 0] == 0).flatten(1).float().mean(1)
    erased = frac[frac > 0]
    assert 0.35 < len(erased) / 500 < 0.65  # p = 0.5
    assert erased.min() >= 0.03 and erased.max() <= 0.21


def test_data_partition_command(capsys, tmp_path):
    png = tmp_path / "heat.png"
    with pytest.raises(SystemExit) as e:
        main(["data", "partition", "--dataset", "synthetic", "--clients", "5", "--heatmap", str(png)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "client" in out and "total" in out and png.stat().st_size > 1000
