"""Progress of a run as callbacks: ``on_start(total)``, ``on_task_done(result)``, ``on_end()``.

:func:`pipeline.execute.execute` calls each callback's ``on_start`` with the number of tasks it runs,
``on_task_done`` with each finished task's result dict, and ``on_end`` on every way out (finished, failed,
interrupted).  :func:`progress_display` picks the display for a stream: :class:`TerminalProgress` (one
line rewritten with ``\\r``) on a terminal, :class:`LineProgress` (a whole line every few seconds) otherwise.
"""

from __future__ import annotations

import abc
import sys
import time

from .text import count


class Callback:
    """Does nothing; subclass it and override what you need (any object with these methods will do)."""

    def on_start(self, total: int) -> None:
        """Before the first task is submitted: ``total`` tasks will run."""

    def on_task_done(self, result: dict) -> None:
        """A task finished: its result (``index``, ``rows``, ``seconds``, ``compute_seconds``, ``pid``)."""

    def on_end(self) -> None:
        """The run stopped (finished, failed or interrupted); called before any error propagates."""


class _Display(Callback, abc.ABC):
    """'tasks done/total (percent), pair rate, time left' for a stream, at most once per ``interval`` s."""

    interval = 1.0

    def __init__(self, pairs_per_task: float, stream=None, interval: float | None = None):
        self.pairs_per_task = pairs_per_task
        self.stream = stream if stream is not None else sys.stderr
        if interval is not None:
            self.interval = interval
        self.total = self.done = 0
        self.started = time.perf_counter()
        self._last = float("-inf")

    def on_start(self, total: int) -> None:
        self.total, self.done = total, 0
        self.started = time.perf_counter()
        self._last = float("-inf")

    def on_task_done(self, result: dict) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self._last < self.interval and self.done < self.total:
            return
        self._last = now
        self._show(self._line(now))

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done * self.pairs_per_task / elapsed
        left = (self.total - self.done) * elapsed / max(self.done, 1)
        return (f"kgrad: {self.done}/{count(self.total, 'task')} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate / 1e9:.2f} G pairs/s, {left:.0f} s left")

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
