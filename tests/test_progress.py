"""Progress through callbacks (pipeline.progress): the one-line display on a terminal, plain lines
elsewhere, and the progress line ended before a failing run's one-line error (a real run on a pty)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.progress import Callback, LineProgress, TerminalProgress, progress_display


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_display_follows_the_stream():
    assert isinstance(progress_display(1.0, _Tty()), TerminalProgress)
    assert isinstance(progress_display(1.0, io.StringIO()), LineProgress)
    closed = io.StringIO()
    closed.close()
    assert isinstance(progress_display(1.0, closed), LineProgress)


def test_terminal_progress_rewrites_one_line_and_ends_it():
    stream = _Tty()
    bar = TerminalProgress(1e9, stream)
    bar.on_start(3)
    bar.on_task_done({})
    assert stream.getvalue().startswith("\rkgrad: 1/3 tasks (33%), ") and not stream.getvalue().endswith("\n")
    bar.on_task_done({})  # within the second: not shown
    bar.on_task_done({})  # the last: shown and ended
    assert "3/3 tasks (100%)" in stream.getvalue() and "s left" in stream.getvalue()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1
    bar.on_end()
    assert stream.getvalue().count("\n") == 1, "a line that is already ended is not ended twice"


def test_terminal_progress_ends_its_line_when_the_run_stops_early():
    stream = _Tty()
    bar = TerminalProgress(1e9, stream)
    bar.on_start(3)
    bar.on_task_done({})
    bar.on_end()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


def test_nothing_shown_nothing_ended():
    for kind in (TerminalProgress, LineProgress):
        stream = _Tty()
        bar = kind(1e9, stream)
        bar.on_start(0)
        bar.on_end()
        assert stream.getvalue() == ""


def test_line_progress_prints_whole_lines_now_and_then():
    stream = io.StringIO()
    bar = LineProgress(1e9, stream, interval=0.2)
    bar.on_start(5)
    for _ in range(3):
        bar.on_task_done({})
    time.sleep(0.25)
    bar.on_task_done({})
    bar.on_task_done({})
    bar.on_end()
    lines = stream.getvalue().splitlines(keepends=True)
    assert "\r" not in stream.getvalue()
    assert [line.split(" (")[0] for line in lines] == ["kgrad: 1/5 tasks", "kgrad: 4/5 tasks", "kgrad: 5/5 tasks"]
    assert lines[0].endswith("estimating time left\n"), lines  # the first task included compiling
    assert all(line.endswith("s left\n") for line in lines[1:]), lines


class _Clock:
    """A stand-in for time.perf_counter that the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_left_ignores_each_workers_first_task(monkeypatch):
    """Two workers whose first tasks take 20 s (compiling), then a task every 1 s each (staggered by 0.5 s):
    the line says 'estimating' until a warm worker has finished tasks, then follows the warm rate (2 tasks a
    second), not the 20 s of the first tasks."""
    clock = _Clock()
    monkeypatch.setattr("pipeline.progress.time.perf_counter", clock)
    stream = io.StringIO()
    bar = LineProgress(1e9, stream, interval=0)
    bar.on_start(42)
    for now, pid in ((20.0, 1), (20.5, 2), (21.0, 1)):  # two first tasks, then the first warm one
        clock.now = now
        bar.on_task_done({"pid": pid})
        assert stream.getvalue().splitlines()[-1].endswith("estimating time left"), stream.getvalue()
    for now, pid in ((21.5, 2), (22.0, 1), (22.5, 2)):
        clock.now = now
        bar.on_task_done({"pid": pid})
    # 36 tasks left at 2 per second (3 warm tasks in the 1.5 s since the first warm one)
    assert bar.time_left(clock.now) == 18.0
    assert stream.getvalue().splitlines()[-1].endswith(", 18 s left"), stream.getvalue()
    # the old estimate (elapsed per task so far) said 36 * 22.5 / 6 = 135 s
    assert "135 s left" not in stream.getvalue()


class _Plan:
    n_sources = 1000


def test_rate_counts_pairs_covered_with_computed_beside(monkeypatch):
    """A pruned run: each task covers rows x M pairs but computes few; the line shows pairs covered per
    second (comparable with an exact run) and the computed pairs beside it."""
    clock = _Clock()
    monkeypatch.setattr("pipeline.progress.time.perf_counter", clock)
    stream = io.StringIO()
    bar = LineProgress(1.0, stream, interval=0)
    bar.on_plan(_Plan())
    bar.on_start(2)
    clock.now = 1.0
    bar.on_task_done({"pid": 1, "rows": 2_000_000, "pairs": 10_000_000})
    line = stream.getvalue().splitlines()[-1]
    assert "2.00 G pairs/s covered (0.01 G/s computed)" in line, line
    exact = io.StringIO()
    bar = LineProgress(1.0, exact, interval=0)
    bar.on_plan(_Plan())
    bar.on_start(2)
    bar.on_task_done({"pid": 1, "rows": 2_000_000})
    assert "G pairs/s," in exact.getvalue() and "computed" not in exact.getvalue(), exact.getvalue()


def test_base_callback_does_nothing():
    callback = Callback()
    callback.on_start(2)
    callback.on_task_done({"index": 0})
    callback.on_end()


@pytest.mark.slow
def test_failed_run_on_a_terminal_puts_its_error_on_a_line_of_its_own(tmp_path):
    """Finite tasks first (progress shown with '\\r'), then one whose float32 result overflows: the error
    line starts a line of its own instead of trailing the progress line."""
    pty = pytest.importorskip("pty")
    rows = 100
    points = np.concatenate([np.zeros((4 * rows, 3)), np.full((rows, 3), 100.0)])
    np.save(tmp_path / "points.npy", points)
    np.save(tmp_path / "sources.npy", np.full((50, 3), 100.0))
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--points", "points.npy",
                                 "--sources", "sources.npy", "--kernel", "polynomial", "--param", "degree=9",
                                 "--out", "out.zarr", "--rows-per-task", str(rows), "--workers", "1"],
                                cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                                start_new_session=True)
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 1
    text = b"".join(chunks).decode(errors="replace")
    at = text.find("kgrad: failed:")
    assert at > 0, text
    assert "\rkgrad: " in text[:at], f"progress was shown before the failure:\n{text!r}"
    assert text[:at].endswith("\n"), f"the error trails the progress line:\n{text!r}"
