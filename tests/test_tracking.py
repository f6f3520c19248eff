"""The study's MLflow writer: queued writes, retried through outages, reported; failure reasons.

The writer is exercised with plain callables that fail the way MLflow's client fails when its
server is away; the real server outage is in tests/test_cluster.py.
"""

import threading
import time

import pytest

from orchestrate.tracking import TrackingError, Writer, failure_reason


class Server:
    """Refuses connections until ``up_at`` (monotonic seconds), then records writes in order."""

    def __init__(self, down_for: float):
        self.up_at = time.monotonic() + down_for
        self.written: list[int] = []
        self.threads: set[str] = set()

    def write(self, i: int) -> None:
        self.threads.add(threading.current_thread().name)
        if time.monotonic() < self.up_at:
            raise ConnectionError(
                "API request to endpoint /api/2.0/mlflow/runs/log-batch failed with exception "
                "HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded "
                "(Caused by NewConnectionError: Connection refused)"
            )
        self.written.append(i)


def test_an_outage_delays_no_caller_loses_nothing_and_is_reported():
    server, writer = Server(down_for=1.5), Writer(budget=30)
    started = time.monotonic()
    for i in range(20):
        writer.submit(f"write {i}", lambda i=i: server.write(i))
    assert time.monotonic() - started < 0.1  # the callers (Tune's loop) never waited
    writer.flush()
    assert server.written == list(range(20))  # all of them, in order
    assert server.threads == {"mlflow-writer"}
    summary = writer.summary()
    assert summary.startswith("MLflow was unreachable 1 time(s), ")
    assert "1 write(s) waited and were retried, none lost" in summary
    assert 1.2 < writer.outages[0] < 5


def test_an_outage_longer_than_the_budget_fails_with_a_clear_message():
    server, writer = Server(down_for=60), Writer(budget=0.6)
    for i in range(3):
        writer.submit(f"write {i}", lambda i=i: server.write(i))
    with pytest.raises(TrackingError, match=r"unreachable for more than 1 s .*gave up at write 0"):
        writer.flush()
    assert server.written == []
    assert len(writer.lost) == 1  # the one it was retrying; the rest were dropped unattempted


def test_a_write_that_can_never_succeed_is_dropped_and_counted_not_retried_forever():
    writer = Writer(budget=30)
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("INVALID_PARAMETER_VALUE: metric value must be finite")

    writer.submit("bad", bad)
    writer.submit("good", lambda: calls.append(2))
    writer.flush()
    assert calls == [1, 1, 1, 2]
    assert "1 write(s) failed and were dropped, first: bad: INVALID_PARAMETER" in writer.summary()


def test_a_synchronous_call_returns_its_value_after_retrying():
    server, writer = Server(down_for=0.8), Writer(budget=30)
    assert writer.call(lambda: server.write(7) or "done") == "done"
    assert server.written == [7] and writer.retried == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("orchestrate.trainable.TrialDiverged: training diverged: non-finite loss at epoch 3, "
         "step 12", "divergence"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of memory"),
        ("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory",
         "out of memory"),
        ("ValueError: backbone 'resnet18' takes attention='none' only", "exception"),
    ],
)  # fmt: skip
def test_failure_reasons(text, reason):
    assert failure_reason(text) == reason
