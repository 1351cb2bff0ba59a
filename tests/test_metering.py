import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedbench.metering.comm import class_id_dtype, payload_bytes, payload_numel
from fedbench.metering.flops import FlopMeter
from fedbench.models.cnn import cnn_spec

# spec A.2 forward MACs per image, K = 10 [computed]
FWD_MACS = [4.83e6, 3.39e6, 3.53e6, 3.27e6, 2.88e6]


def test_payload_bytes_exact():
    p = {"a": torch.zeros(3, 4), "b": {"c": torch.zeros(5, dtype=torch.int64)}, "d": [torch.zeros(2, dtype=torch.float16)]}
    assert payload_bytes(p) == 3 * 4 * 4 + 5 * 8 + 2 * 2
    assert payload_numel(p) == 12 + 5 + 2
    assert payload_bytes(None) == 0 and payload_bytes({}) == 0
    with pytest.raises(TypeError):
        payload_bytes({"x": 3.0})


def test_class_id_dtype_is_the_smallest_that_holds_every_id():
    cases = [(1, torch.uint8), (10, torch.uint8), (100, torch.uint8), (256, torch.uint8), (257, torch.int16),
             (2**15, torch.int16), (2**15 + 1, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64)]
    for k, dt in cases:
        assert class_id_dtype(k) == dt, k
        info = torch.iinfo(dt)
        assert info.max >= k - 1  # holds the largest id ...
        smaller = [d for d in (torch.uint8, torch.int16, torch.int32) if torch.iinfo(d).bits < info.bits]
        assert all(torch.iinfo(d).max < k - 1 for d in smaller)  # ... and no smaller type does
    assert torch.tensor([255]).to(class_id_dtype(256)).long().item() == 255  # round trip of the top id
    with pytest.raises(ValueError):
        class_id_dtype(0)


@pytest.mark.parametrize("i", range(5))
def test_forward_macs_match_spec(i):
    m = cnn_spec(f"cnn{i + 1}", 10).build()
    meter = FlopMeter()
    meter.attach(m)
    with torch.no_grad(), meter.scope("c", "eval"):
        m(torch.randn(4, 3, 32, 32))
    assert meter.take()[("c", "eval")] / 4 == pytest.approx(FWD_MACS[i], rel=0.01)


@pytest.mark.parametrize("i", range(5))
def test_training_step_flops_cross_check(i):
    """The meter's training FLOPs (2 x MACs) agree with torch's FlopCounterMode within 10%."""
    m = cnn_spec(f"cnn{i + 1}", 10).build()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    meter = FlopMeter()
    meter.attach(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with meter.scope("c", "train"):
        loss = F.cross_entropy(m(x)[0], y)
        loss.backward()
        opt.step()
    ours = 2 * meter.take()[("c", "train")]
    opt.zero_grad()
    with FlopCounterMode(display=False) as fc:
        loss = F.cross_entropy(m(x)[0], y)
        loss.backward()
        opt.step()
    theirs = fc.get_total_flops()
    assert ours == pytest.approx(theirs, rel=0.10)
    # and the convention: 3x forward, less conv1's input gradient (940,800 MACs per image)
    assert ours / (2 * 16) == pytest.approx(3 * FWD_MACS[i] - 940_800, rel=0.01)


def test_frozen_model_counts_forward_only():
    m = cnn_spec("cnn5", 10).build()
    meter = FlopMeter()
    meter.attach(m)
    with meter.scope("c", "train"), torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    assert meter.take()[("c", "train")] == pytest.approx(2 * FWD_MACS[4], rel=0.01)


def test_deep_copy_of_metered_module_runs_and_counts_as_itself():
    import copy

    m = cnn_spec("cnn5", 10).build()
    meter = FlopMeter()
    meter.attach(m)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.fc3.weight.zero_()
        twin.fc3.bias.zero_()
        x = torch.randn(3, 3, 32, 32)
        with meter.scope("orig", "eval"):
            y = m(x)[0]
        with meter.scope("twin", "eval"):
            y_twin = m(x)[0] * 0 + twin(x)[0]
    assert torch.count_nonzero(y) > 0 and torch.count_nonzero(y_twin) == 0  # the copy used its own weights
    macs = meter.take()
    assert macs[("twin", "eval")] == 2 * macs[("orig", "eval")]  # m (once more) and the copy, both metered
    assert twin.fc3.forward.module is twin.fc3 and m.fc3.forward.module is m.fc3
