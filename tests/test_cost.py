"""What a model costs, measured: parameters and FLOPs against hand counts, latency as the median
of timed runs after a warm-up (a deliberately slowed model sees the difference; slow warm-up
calls and one slow outlier do not), and one measurement per architecture and device."""

import time

import pytest
import torch
from torch import nn

from fermodel.cost import BATCH, WARMUP, model_cost


class Sleepy(nn.Module):
    """A small convolution that sleeps ``delay`` seconds per call; calls listed in ``slow``
    (0-based) sleep ``slow_delay`` instead."""

    def __init__(self, delay: float = 0.0, slow: tuple = (), slow_delay: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.delay, self.slow, self.slow_delay, self.calls = delay, slow, slow_delay, 0

    def forward(self, x):
        time.sleep(self.slow_delay if self.calls in self.slow else self.delay)
        self.calls += 1
        return self.conv(x)


def test_params_and_flops_are_the_hand_counts_with_groups():
    cost = model_cost(Sleepy(), (4, 6, 6), "cpu")
    assert cost["params"] == 8 * 2 * 3 * 3 + 8  # grouped weight (in/groups = 2) and bias
    # a multiply-add is 2 FLOPs: each of 8 x 6 x 6 outputs sums 2 x 3 x 3 products
    assert cost["gflops"] * 1e9 == pytest.approx(2 * (8 * 6 * 6) * (2 * 3 * 3))
    assert cost["latency_threads"] == torch.get_num_threads()


def test_a_slowed_model_is_slower_and_warmup_and_outliers_do_not_count():
    fast = model_cost(Sleepy(), (4, 6, 6), "cpu")
    slowed = model_cost(Sleepy(delay=0.02), (4, 6, 6), "cpu")
    assert slowed["latency_ms"] - fast["latency_ms"] > 15  # 20 ms a call
    assert slowed["throughput"] < BATCH / 0.02 < fast["throughput"]
    # the warm-up calls and one timed call sleep 0.3 s: the median sees none of them
    odd = model_cost(Sleepy(slow=(*range(WARMUP), WARMUP + 2)), (4, 6, 6), "cpu")
    assert odd["latency_ms"] < 100


def test_figures_are_measured_once_per_key_and_the_model_keeps_its_mode():
    net = Sleepy()
    net.train()
    first = model_cost(net, (4, 6, 6), "cpu", key=("sleepy", "cpu"))
    calls = net.calls
    assert calls > WARMUP and net.training
    again = model_cost(Sleepy(delay=0.05), (4, 6, 6), "cpu", key=("sleepy", "cpu"))
    assert again == first and net.calls == calls  # the same architecture: not run again
