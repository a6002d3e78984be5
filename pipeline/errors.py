"""Errors a user can fix.  The CLI turns them into one line on stderr and exit code 2."""


class InputError(ValueError):
    """A bad input, parameter or usage: the message says what is wrong, the value, and what is allowed."""


class NonFiniteResultError(RuntimeError):
    """Finite inputs gave a non-finite (inf or NaN) gradient or kernel sum, e.g. a float32 overflow.

    Not an InputError: it is found only after computing.  The CLI exits 1 with its one-line message; the
    output stays incomplete (the task that found it does not mark itself done)."""
