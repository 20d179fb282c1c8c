"""The one error type users see: a message that says what is wrong and how to fix it."""


class OpenDiTError(ValueError):
    """Bad input or an impossible request. Subclasses ValueError so callers may catch either."""
