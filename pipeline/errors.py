"""Errors a user can fix.  The CLI turns them into one line on stderr and exit code 2."""


class InputError(ValueError):
    """A bad input, parameter or usage: the message says what is wrong, the value, and what is allowed."""
