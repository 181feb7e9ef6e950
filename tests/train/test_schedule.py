"""Learning-rate schedule: a pure function of the step (so resuming needs no scheduler state)."""

import math

import pytest

from trace_core.train.schedule import learning_rate


def test_warmup_is_linear_from_lr_over_warmup():
    lrs = [learning_rate(s, lr=1.0, steps=10, warmup_steps=4) for s in range(6)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_lr_to_the_floor():
    kw = dict(lr=2.0, steps=11, schedule="cosine", warmup_steps=1, min_lr_ratio=0.1)
    assert learning_rate(1, **kw) == pytest.approx(2.0)  # first step after warm-up: the full rate
    assert learning_rate(6, **kw) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half-way: cos(pi/2) = 0
    assert learning_rate(11, **kw) == pytest.approx(0.2)  # the end: the floor
    lrs = [learning_rate(s, **kw) for s in range(1, 12)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing after warm-up
    assert learning_rate(30, **kw) == pytest.approx(0.2)  # past the horizon it stays at the floor


def test_linear_and_constant():
    assert [learning_rate(s, lr=1.0, steps=4, schedule="linear") for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert {learning_rate(s, lr=3e-3, steps=4) for s in range(4)} == {3e-3}
    assert learning_rate(2, lr=1.0, steps=4, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match=r"lr_schedule: unknown schedule 'step'"):
        learning_rate(0, lr=1.0, steps=4, schedule="step")
