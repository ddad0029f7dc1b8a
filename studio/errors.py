"""Errors users see.

Every problem with user input is raised as a :class:`HistostudioError` subclass whose
message names the file (or argument) and the problem in one line. The CLI prints that
line and exits non-zero instead of showing a traceback; library callers can catch the
base class.
"""

from __future__ import annotations

from pathlib import Path


class HistostudioError(Exception):
    """Base class of every error the studio raises on purpose."""


class InputError(HistostudioError, ValueError):
    """A file or argument the user gave cannot be used.

    Args:
        source: the path (or argument name) at fault; shown first in the message.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class OutputError(HistostudioError, OSError):
    """An output could not be written (unwritable folder, disk full, ...).

    Nothing partial is left behind: writers go through :func:`studio.io.atomic_path`.
    """

    def __init__(self, target: str | Path, problem: str):
        self.target = str(target)
        self.problem = problem
        super().__init__(f"{self.target}: {problem}")


class WeightsError(HistostudioError, ValueError):
    """A weights file or model folder is missing, corrupt, unsafe or does not match the model."""

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")
