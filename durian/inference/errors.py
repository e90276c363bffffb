"""The one error type user input can raise at inference (CLI and app show its message as is)."""

from __future__ import annotations


class DurianInputError(ValueError):
    """A bad user input: the message is one line a user can act on (no traceback needed)."""

    def __init__(self, message: str) -> None:
        # One line, always: the CLI prints ``error: <message>`` and the app shows it verbatim.
        super().__init__(" ".join(str(message).split()))
