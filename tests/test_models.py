import pytest
import torch

from fedbench.models.cnn import cnn_spec, model_assignment

# spec A.2 table [computed]
PARAMS = {10: [2_621_558, 1_815_142, 1_320_558, 1_060_358, 670_058],
          100: [2_666_648, 1_860_232, 1_365_648, 1_105_448, 715_148]}


@pytest.mark.parametrize("K", [10, 100])
@pytest.mark.parametrize("i", range(5))
def test_parameter_counts_match_spec(K, i):
    m = cnn_spec(f"cnn{i + 1}", K).build()
    assert sum(p.numel() for p in m.parameters()) == PARAMS[K][i]


def test_forward_returns_logits_and_representation():
    m = cnn_spec("cnn2", 10).build()
    logits, h = m(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10) and h.shape == (3, 500)
    assert (h >= 0).all()


def test_assignment():
    assert model_assignment("hetero", 7) == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5", "cnn1", "cnn2"]
    assert model_assignment("cnn3", 2) == ["cnn3", "cnn3"]
