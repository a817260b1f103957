"""User-facing errors. The CLI prints them as one line and exits non-zero; anything else is a bug."""

from __future__ import annotations


class DynrulesError(Exception):
    """An error caused by input or configuration, with a message meant for the user."""


class InputError(DynrulesError):
    """Bad input data, located by file and, where known, line and field."""

    def __init__(
        self, message: str, *, path=None, line: int | None = None, field: str | None = None
    ):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
