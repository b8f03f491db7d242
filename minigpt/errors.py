"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MiniGPTError(Exception):
    """A user-facing error: bad input, refused operation. Its message is one line."""
