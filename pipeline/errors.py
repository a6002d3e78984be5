"""kgrad's own exceptions.

:class:`InputError` is what a user can fix before anything runs: the CLI prints its one line and exits 2.
The others end a run that has started (exit 1, one line naming the cause, the output and the next step).
"""


class InputError(ValueError):
    """A bad input, parameter or usage: the message says what is wrong, the value, and what is allowed."""


class RunFailed(RuntimeError):
    """A run that started could not finish; the message is the whole story in one line.  ``resumable``:
    whether ``--resume`` can finish it once the cause is fixed (not when its inputs changed)."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


class RunEnded(RuntimeError):
    """A task whose run no longer owns the output (ended, interrupted, taken over): its results are dropped."""


class InputsChanged(RuntimeError):
    """An input's data differ from the data the run validated and fingerprinted (rewritten during the run,
    or not the same file on every machine)."""
