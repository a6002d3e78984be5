"""Progress of a run as callbacks: ``on_plan(plan)``, ``on_start(total)``, ``on_task_done(result)``, ``on_end()``.

:func:`pipeline.execute.execute` calls each callback's ``on_plan`` (optional) with the run's plan, then
``on_start`` with the number of tasks it runs, ``on_task_done`` with each finished task's result dict, and
``on_end`` on every way out (finished, failed, interrupted).  :func:`progress_display` picks the display for a stream: :class:`TerminalProgress` (one
line rewritten with ``\\r``) on a terminal, :class:`LineProgress` (a whole line every few seconds) otherwise.
"""

from __future__ import annotations

import abc
import sys
import time

from .text import count


class Callback:
    """Does nothing; subclass it and override what you need (any object with these methods will do)."""

    def on_plan(self, plan) -> None:
        """Before ``on_start``: the run's :class:`pipeline.plan.Plan` (sizes, pairs); optional."""

    def on_start(self, total: int) -> None:
        """Before the first task is submitted: ``total`` tasks will run."""

    def on_task_done(self, result: dict) -> None:
        """A task finished: its result (``index``, ``rows``, ``seconds``, ``compute_seconds``, ``pid``)."""

    def on_end(self) -> None:
        """The run stopped (finished, failed or interrupted); called before any error propagates."""


class _Display(Callback, abc.ABC):
    """'tasks done/total (percent), pair rate, time left' for a stream, at most once per ``interval`` s.

    The rate is of pairs *covered* (N x M over the whole run, so a run with ``--tolerance`` compares with an
    exact one), with the pairs actually computed beside it when they differ.  The time left is estimated
    only from tasks that ran on an already warm worker: each worker's first task includes starting JAX and
    compiling, so until some worker has finished a second task the line says "estimating"."""

    interval = 1.0

    def __init__(self, pairs_per_task: float, stream=None, interval: float | None = None):
        self.pairs_per_task = pairs_per_task
        self.stream = stream if stream is not None else sys.stderr
        if interval is not None:
            self.interval = interval
        self.pairs_per_row = None  # M, from on_plan: a task covers rows x M pairs
        self.on_start(0)

    def on_plan(self, plan) -> None:
        self.pairs_per_row = plan.n_sources

    def on_start(self, total: int) -> None:
        self.total, self.done = total, 0
        self.started = time.perf_counter()
        self._last = float("-inf")
        self.covered = self.computed = 0.0
        self._workers: set = set()  # pids that finished a task: warm from then on
        self._warm_since = None  # when a warm worker first finished a task
        self._warm_done = 0  # tasks finished after _warm_since

    def on_task_done(self, result: dict) -> None:
        self.done += 1
        now = time.perf_counter()
        self._count_pairs(result)
        self._count_warm(result.get("pid"), now)
        if now - self._last < self.interval and self.done < self.total:
            return
        self._last = now
        self._show(self._line(now))

    def _count_pairs(self, result: dict) -> None:
        """Pairs covered (rows x M) and computed (a pruned task's own count) by one task."""
        if self.pairs_per_row is None or "rows" not in result:
            covered = self.pairs_per_task
        else:
            covered = result["rows"] * self.pairs_per_row
        self.covered += covered
        self.computed += result.get("pairs", covered)

    def _count_warm(self, pid, now: float) -> None:
        """Mark when a worker that had already finished a task (so had compiled) finishes another."""
        if pid in self._workers:
            if self._warm_since is None:
                self._warm_since = now
            else:
                self._warm_done += 1
        self._workers.add(pid)

    def time_left(self, now: float) -> float | None:
        """Seconds left from the rate of tasks finished on warm workers; None until there is one."""
        if self.done >= self.total:
            return 0.0
        if self._warm_since is None or self._warm_done < 1 or now <= self._warm_since:
            return None
        return (self.total - self.done) * (now - self._warm_since) / self._warm_done

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = f"{self.covered / elapsed / 1e9:.2f} G pairs/s"
        if self.computed < self.covered:
            rate += f" covered ({self.computed / elapsed / 1e9:.3g} G/s computed)"
        left = self.time_left(now)
        return (f"kgrad: {self.done}/{count(self.total, 'task')} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate}, " + ("estimating time left" if left is None else f"{left:.0f} s left"))

    @abc.abstractmethod
    def _show(self, line: str) -> None:
        """Put one progress line on the stream, each display in its own way."""


class TerminalProgress(_Display):
    """One line, rewritten in place (``\\r``) at most once a second; the line is ended (newline) when the
    last task is done or, if the run stops before that, by :meth:`on_end`, so that whatever is printed
    next starts on its own line."""

    interval = 1.0

    def __init__(self, pairs_per_task: float, stream=None, interval: float | None = None):
        super().__init__(pairs_per_task, stream, interval)
        self._open = False  # a progress line is on the terminal without its newline

    def _show(self, line: str) -> None:
        end = "\n" if self.done >= self.total else ""
        print(f"\r{line}   ", end=end, file=self.stream, flush=True)
        self._open = not end

    def on_end(self) -> None:
        if self._open:
            self._open = False
            print(file=self.stream, flush=True)


class LineProgress(_Display):
    """Whole lines (each ending in a newline) at most once per ``interval`` seconds (default 5), and one
    when the last task is done: for logs and pipes, where ``\\r`` would pile up on one line."""

    interval = 5.0

    def _show(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_display(pairs_per_task: float, stream=None) -> Callback:
    """The progress display for ``stream`` (default stderr): :class:`TerminalProgress` on a terminal,
    :class:`LineProgress` otherwise."""
    stream = stream if stream is not None else sys.stderr
    kind = TerminalProgress if _is_terminal(stream) else LineProgress
    return kind(pairs_per_task, stream)
