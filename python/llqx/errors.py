"""The one exception type llqx raises for bad input, with a message meant for a single line."""


class LlqxError(Exception):
    """A user-facing error: bad input, a refused operation, a failed llama.cpp call."""
