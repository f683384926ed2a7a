"""How much ``forge-ray`` prints: ``-q``, the default, or ``-v``.

=========  ==============================================================================
``-q``     results (stdout) and errors only
default    also our progress lines (``[pipeline] ...``, ``[train-gr] step ...``) and warnings
``-v``     also Ray's, Ray Data's, Ray Train's and DeepSpeed's own info logs
=========  ==============================================================================

Our progress lines go through the ``forge_ray`` logger to stdout (its warnings to
stderr); the commands print their results to stdout. The CLI calls :func:`setup`
once, before a stage starts Ray; library users that never call it get the default.

Ray worker processes are separate interpreters. A cluster started by
:func:`forge_ray.distributed.session.ray_session` gets the environment variables set
here (its workers inherit the driver's environment); Ray Train workers additionally
get :func:`worker_levels` in their loop config and call :func:`setup_worker` first,
so the same levels hold on a cluster that was joined.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

QUIET, DEFAULT, VERBOSE = -1, 0, 1

_verbosity = DEFAULT
_handler: logging.Handler | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v`` / ``-q`` on a subcommand's parser (they exclude each other)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=VERBOSE,
                       default=DEFAULT, help="also show Ray's and DeepSpeed's info logs")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=QUIET,
                       help="print results and errors only")


def verbosity() -> int:
    """The level :func:`setup` chose: ``QUIET``, ``DEFAULT`` or ``VERBOSE``."""
    return _verbosity


def our_level(level: int | None = None) -> int:
    """The ``forge_ray`` logger's level at verbosity ``level`` (default: the current one)."""
    return logging.ERROR if (_verbosity if level is None else level) == QUIET else logging.INFO


def ray_level(level: int | None = None) -> int:
    """The level of Ray's, Ray Data's, Ray Train's and DeepSpeed's own loggers."""
    v = _verbosity if level is None else level
    return {QUIET: logging.ERROR, DEFAULT: logging.WARNING}.get(v, logging.INFO)


class _ConsoleHandler(logging.StreamHandler):
    """Progress lines to stdout, warnings and errors to stderr (so a failed command's
    stderr is its one-line error), each to the stream current when the line is
    logged: a caller (or a test) may have replaced it since."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


def setup(level: int = DEFAULT) -> None:
    """Set the verbosity of this process, and of the workers of a cluster it starts.

    Call before Ray is started: Ray Data reads ``RAY_DATA_LOG_LEVEL`` when it is
    imported, and workers copy the environment when the cluster starts. Variables the
    user set are left alone.
    """
    global _verbosity, _handler
    _verbosity = level
    logger = logging.getLogger("forge_ray")
    if _handler is None:
        _handler = _ConsoleHandler()
        _handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(_handler)
        logger.propagate = False  # one line per message, whatever the root logger has
    logger.setLevel(our_level())
    if level < VERBOSE:
        # Ray Data's console logs (execution plans, per-operator progress lines off a
        # terminal) are INFO; its warnings stay visible at the default verbosity.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", logging.getLevelName(ray_level()))
        # transformers / huggingface_hub draw a bar per model load and save.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def bars() -> bool:
    """Whether our own tqdm bars are drawn: on a terminal only, and not with ``-q``.

    Off a terminal (a pipe, a job log) a bar's redraws pile up into one long line.
    """
    return _verbosity > QUIET and sys.stderr.isatty()


def ray_init_kwargs() -> dict:
    """``ray.init`` arguments for the current verbosity.

    ``-q`` drops the workers' output entirely (errors still reach the driver as
    exceptions); otherwise it is echoed, so our progress lines from Ray Train workers
    and every warning show.
    """
    return {"logging_level": ray_level(), "log_to_driver": _verbosity > QUIET}


def configure_ray_data() -> None:
    """Ray Data progress: bars on a terminal only, never drawn from inside workers.

    Off a terminal Ray Data logs progress instead of drawing bars, at INFO (shown
    with ``-v``). ``use_ray_tqdm`` off makes executions inside actors (Ray Train's
    dataset split coordinator) log the same way instead of drawing bars that the
    driver echoes line by line.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.use_ray_tqdm = False
    if _verbosity == QUIET:
        ctx.enable_progress_bars = False


def worker_levels() -> dict[str, int]:
    """What a Ray Train worker needs to log like the driver (for :func:`setup_worker`)."""
    return {"forge_ray": our_level(), "ray": ray_level()}


def setup_worker(levels: dict[str, int]) -> None:
    """First thing in a Ray Train worker: our and DeepSpeed's levels as on the driver
    (``levels`` from :func:`worker_levels`).

    Ray Train routes a worker's root logger to its console (echoed to the driver),
    so the ``forge_ray`` logger propagates there instead of adding a handler. The
    root logger's own level, which other libraries' loggers inherit, is Ray's level:
    some Ray Train loggers are not under ``ray.train`` (one is named by its file
    path) and log every checkpoint report at INFO.
    """
    logging.getLogger("forge_ray").setLevel(levels["forge_ray"])
    logging.getLogger().setLevel(levels["ray"])
    if levels["ray"] <= logging.INFO:
        # DeepSpeed's logger has its own handler, both at WARNING from its import on
        from deepspeed.utils import logger as ds_logger

        for target in (ds_logger, *ds_logger.handlers):
            target.setLevel(levels["ray"])
    else:
        # Deprecation notices raised inside DeepSpeed and torch.distributed (e.g.
        # all_gather_into_tensor) are for their developers, not for a training run.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
