"""Errors that mean "the user gave us something wrong" (a config value, a path, bad data).

Entry points catch :class:`UserError` and print its message as one line, with no stack trace;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user. The message names the file, field or value and says what to do."""
