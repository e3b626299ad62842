"""Errors that mean "the user gave us something wrong" (a config value, a path, bad data).

Entry points catch :class:`UserError` and print its message as one line, with no stack trace;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user. The message names the file, field or value and says what to do."""


def check_switch(value, name: str) -> None:
    """A true / false / 'auto' setting (gradient checkpointing, the compile switches): anything else, 1 and 'yes'
    included, is one line naming the field."""
    if not (value is True or value is False or value == "auto"):
        raise UserError(f"{name}={value!r} is not true, false or 'auto'")
