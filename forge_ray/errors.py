"""Errors a user can act on.

Every problem with a user's input is raised as :class:`InputError`, which the CLI
prints as one line (``forge-ray: error: FILE: PROBLEM``) before exiting non-zero.
"""

from __future__ import annotations

import os


class ForgeRayError(Exception):
    """Base class of the errors forge_ray reports to users as one line."""


class InputError(ForgeRayError):
    """Bad input: names the offending file (or option) and the problem.

    Args:
        source: the file, folder or option at fault (a path is shown as given).
        problem: what is wrong with it, one sentence, no trailing period needed.
    """

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        msg = problem if self.source is None else f"{self.source}: {problem}"
        super().__init__(" ".join(msg.split()))  # keep it on one line

    def __reduce__(self):
        # Rebuild from (source, problem) so the error survives crossing a Ray task.
        return (type(self), (self.source, self.problem))


class ConfigError(InputError):
    """A configuration value or key is invalid."""
