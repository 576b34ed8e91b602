"""The one exception type the CLI turns into a one-line message for bad user input."""
from __future__ import annotations


class FSCSError(Exception):
    """A user-facing error: the message names the file/key at fault and the fix, on one line."""
