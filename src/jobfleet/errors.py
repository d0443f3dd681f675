"""The exceptions jobfleet raises; each docstring is its default message."""

from __future__ import annotations


class JobfleetError(Exception):
    """Something went wrong in jobfleet."""

    #: process exit status the CLI uses for this error
    exit_code = 1

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.hint = hint
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message}\n  → {self.hint}" if self.hint else self.message


class SpecError(JobfleetError):
    """A job file or job option is not valid."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.source, self.line, self.column = source, line, column
        where = source or ""
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f": column '{column}'" if where else f"column '{column}'"
        super().__init__(f"{where}: {message}" if where else message, hint=hint)


class ConfigError(JobfleetError):
    """A setting is not valid."""

    exit_code = 2


class NotFound(JobfleetError):
    """No run or job matches that id."""

    exit_code = 2


class StoreError(JobfleetError):
    """The store could not be opened or used."""
