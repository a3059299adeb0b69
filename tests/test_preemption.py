"""The stop check of one process (trainer/preemption.py) and the judge wait that a stop cuts short. The
multi-process agreement (JAX's preemption sync point) is tested on two real processes in
tests/test_multihost.py."""
import concurrent.futures
import signal
import threading
import time

import pytest

from ruscarl_jax.trainer.preemption import StopSignal, wait_for


def test_sigterm_sets_the_stop_that_the_next_poll_reads():
    stop = StopSignal(grace_s=5)
    stop.install()
    try:
        assert not stop.poll() and not stop.poll()
        signal.raise_signal(signal.SIGTERM)  # the handler only records it
        assert stop.signal == signal.SIGTERM and stop.poll() and stop.poll()  # stays stopped
        assert 0 <= stop.report("test") < 5
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_wait_for_returns_the_result_or_none_when_stopped_mid_wait():
    stop = StopSignal(grace_s=5)
    done = concurrent.futures.Future()
    done.set_result([1, 2])
    assert wait_for(done, stop) == [1, 2]
    hanging = concurrent.futures.Future()  # a judge that does not answer
    threading.Timer(0.3, lambda: stop._handle(signal.SIGTERM, None)).start()
    start = time.monotonic()
    assert wait_for(hanging, stop, tick=0.05) is None
    assert time.monotonic() - start < 2 and hanging.cancelled()


def test_a_grading_error_is_raised_by_the_wait():
    failed = concurrent.futures.Future()
    failed.set_exception(RuntimeError("judge broke"))
    with pytest.raises(RuntimeError, match="judge broke"):
        wait_for(failed, StopSignal())
