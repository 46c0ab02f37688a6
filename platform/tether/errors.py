"""Every user-facing error type, in one place at the bottom of the import graph.

Each names the key, file, row or value at fault, so a person can fix it without a traceback.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A job spec is invalid; ``problems`` lists every 'key: message (got value)'."""

    def __init__(self, problems: list[str], source: str = "job spec"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")


class DataError(ValueError):
    """The data does not fit the job spec (names the key, file, row and value)."""


class AnchorMismatch(RuntimeError):
    """A checkpoint was trained against a different θ* than the one rebuilt for resuming."""


class RunIdentityError(ValueError):
    """A run folder holds a different run than the spec describes (resume refused)."""


class ModelSourceError(ValueError):
    """A model directory or URI cannot be loaded or served (missing, incomplete, unknown)."""


class DeployError(RuntimeError):
    """A Serve application failed to deploy (the message carries Serve's reason)."""


def first_line(error: BaseException) -> str:
    """An exception's first line of text: what a one-line error message quotes."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
