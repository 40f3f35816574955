"""The one error a client sees when its request cannot be served as sent."""

from __future__ import annotations


class InputError(ValueError):
    """A request the model cannot take. ``message`` is written for the client; ``status`` is the
    HTTP status to answer with (400, or 413 when something is too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
