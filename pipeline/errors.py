"""kgrad's own exceptions.

:class:`InputError` is what a user can fix before anything runs: the CLI prints its one line and exits 2.
The others end a run that has started (exit 1, one line naming the cause, the output and the next step);
:func:`task_failure` turns whatever a task failed with into that line.
"""


class InputError(ValueError):
    """A bad input, parameter or usage: the message says what is wrong, the value, and what is allowed."""


RESUME_STEP = "fix the cause, then finish it with 'kgrad run ... --resume'"
RESTART_STEP = "start it again with 'kgrad run ... --overwrite' once the inputs stop changing"
ENDED_STEP = ("this run's results there were dropped; see what it holds now with 'kgrad inspect' (replace it only "
              "if you mean to, with --overwrite)")


class RunFailed(RuntimeError):
    """A run that started could not finish; the message is the whole story in one line.  ``step``: what
    the user does next with the incomplete output (``--resume`` unless a retry cannot mend it)."""

    def __init__(self, message: str, step: str = RESUME_STEP):
        super().__init__(message)
        self.step = step


class RunEnded(RuntimeError):
    """A task whose run no longer owns the output (ended, interrupted, taken over): its results are dropped."""


class InputsChanged(RuntimeError):
    """An input's data differ from the data the run validated and fingerprinted (rewritten during the run,
    or not the same file on every machine)."""


class NonFiniteResultError(RuntimeError):
    """Finite inputs gave a non-finite (inf or NaN) gradient or kernel sum, e.g. a float32 overflow.

    Not an InputError: it is found only after computing.  The CLI exits 1 with its one-line message; the
    output stays incomplete (the task that found it does not mark itself done)."""


def user_fixable(exc: BaseException) -> bool:
    """Whether an error raised while reading a user's inputs or stores is theirs to fix (a path, a
    permission, credentials, a corrupt or foreign file: OSError, ValueError and the many types storage
    libraries raise), rather than exhausted resources or a bug in kgrad or a library, which must surface
    as themselves (exit 1), never as "bad input"."""
    return not isinstance(exc, (MemoryError, RecursionError, NameError, AttributeError, AssertionError,
                                SyntaxError, SystemError))


def task_failure(exc: BaseException) -> RunFailed:
    """One line for a task that failed on a worker: the cause, in the user's terms (the worker reports
    its deterministic failures with it, the runner the rest)."""
    if isinstance(exc, (InputsChanged, InputError)):
        return RunFailed(f"{exc}; the run stopped so as not to mix two versions of the data", RESTART_STEP)
    if isinstance(exc, RunEnded):
        return RunFailed(f"{exc} (another run took the output over?)", ENDED_STEP)
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return RunFailed(f"a task could not read or write its data: {what}{where}")
    if type(exc).__name__ == "KilledWorker":
        return RunFailed(f"workers kept dying while running a task ({exc}); out of memory? give workers more "
                         f"memory (--memory-limit) or run fewer at once")
    if type(exc).__name__ in ("CancelledError", "FutureCancelledError"):
        return RunFailed("the run's tasks were cancelled on the cluster (scheduler restarted or lost?)")
    return RunFailed(f"a task failed on a worker: {type(exc).__name__}: {exc}")
