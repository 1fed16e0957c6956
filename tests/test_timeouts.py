"""The per-sample time limit: results and errors pass through, a hang becomes SampleTimeout, and
the limiter keeps working after a hang, after pickling and in a forked child."""
from __future__ import annotations

import os
import pickle
import time

import pytest

from curate.core.timeouts import SampleTimeout, TimeLimiter


def test_results_errors_and_hangs():
    lim = TimeLimiter(0.5)
    assert lim.call(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        lim.call(lambda: 1 / 0)
    t0 = time.perf_counter()
    with pytest.raises(SampleTimeout):
        lim.call(time.sleep, 3600)
    assert time.perf_counter() - t0 < 5
    assert lim.abandoned == 1
    assert lim.call(str.upper, "next sample") == "NEXT SAMPLE"  # a fresh helper took over
    assert TimeLimiter(None).call(lambda: "inline") == "inline"


def test_after_pickle_and_in_a_forked_child():
    lim = TimeLimiter(2.0)
    assert lim.call(len, "abc") == 3  # the parent's helper thread is running
    assert pickle.loads(pickle.dumps(lim)).call(len, "abcd") == 4
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the inherited queue has no thread behind it
        try:
            os.write(w, b"ok" if lim.call(len, "ab") == 2 else b"no")
        except BaseException:
            os.write(w, b"er")
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 2) == b"ok"
