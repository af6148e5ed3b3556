import math

import pytest

from fox_megatron.train.schedule import LRSchedule, apply_lr


def test_warmup_then_cosine():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, decay_style="cosine")
    assert s(1) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert s(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = LRSchedule(lr=2.0, min_lr=0.0, warmup_iters=0, decay_iters=100, decay_style="linear")
    assert lin(25) == pytest.approx(1.5)
    assert lin(100) == pytest.approx(0.0)
    const = LRSchedule(lr=2.0, min_lr=0.0, warmup_iters=4, decay_iters=100, decay_style="constant")
    assert const(2) == pytest.approx(1.0)
    assert [const(i) for i in (4, 50, 1000)] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "style,mid",
    [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5**0.5 - 1), ("minus_sqrt", 1 - 0.5**0.5)],
)
def test_wsd(style, mid):
    s = LRSchedule(lr=1.0, min_lr=0.0, warmup_iters=10, decay_iters=100, decay_style="WSD",
                   wsd_decay_iters=20, wsd_decay_style=style)
    assert s(10) == pytest.approx(1.0)
    assert s(50) == pytest.approx(1.0)  # stable phase
    assert s(80) == pytest.approx(1.0)  # last stable step
    assert s(90) == pytest.approx(mid)  # half-way through the anneal
    assert s(100) == pytest.approx(0.0)


def test_no_decay_window_keeps_lr():
    s = LRSchedule(lr=1.0, min_lr=0.0, warmup_iters=10, decay_iters=10, decay_style="cosine")
    assert s(10) == 1.0 and s(11) == 1.0


def test_invalid():
    with pytest.raises(ValueError):
        LRSchedule(lr=1.0, decay_style="step")
    with pytest.raises(ValueError):
        LRSchedule(lr=1.0, min_lr=2.0)


def test_apply_lr_multipliers():
    groups = [{"wd_mult": 1.0, "lr_mult": 1.0}, {"wd_mult": 0.0, "lr_mult": 0.5}, {}]
    apply_lr(groups, 0.01, 0.1)
    assert [g["lr"] for g in groups] == [0.01, 0.005, 0.01]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]
