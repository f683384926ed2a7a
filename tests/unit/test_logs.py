"""-v / -q: on every subcommand, and what each level lets through (no Ray started)."""

from __future__ import annotations

import logging
import os

import pytest

from forge_ray import logs
from forge_ray.cli import COMMANDS, command_parser


@pytest.fixture
def verbosity(monkeypatch):
    """Calls logs.setup; the environment and the default verbosity come back after."""
    for var in ("RAY_DATA_LOG_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    yield logs.setup
    logs.setup(logs.DEFAULT)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_takes_v_and_q(name):
    options = {o for a in command_parser(name)._actions for o in a.option_strings}
    assert {"-v", "--verbose", "-q", "--quiet"} <= options


def test_v_and_q_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        command_parser("synth").parse_intermixed_args(["--out", "out", "-v", "-q"])
    assert "not allowed with" in capsys.readouterr().err


def test_levels(verbosity, capsys, monkeypatch):
    log = logging.getLogger("forge_ray.test")
    verbosity(logs.DEFAULT)
    log.info("progress")
    log.warning("careful")
    out, err = capsys.readouterr()
    assert (out, err) == ("progress\n", "careful\n")  # a failed command's stderr: its error only
    assert logs.ray_init_kwargs() == {"logging_level": logging.WARNING, "log_to_driver": True}
    assert logs.worker_levels() == {"forge_ray": logging.INFO, "ray": logging.WARNING}
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"

    verbosity(logs.QUIET)
    log.info("progress")
    log.warning("careful")
    log.error("broken")
    assert capsys.readouterr() == ("", "broken\n")
    assert logs.ray_init_kwargs()["log_to_driver"] is False  # workers' output not echoed
    assert not logs.bars()

    monkeypatch.delenv("RAY_DATA_LOG_LEVEL")
    verbosity(logs.VERBOSE)
    assert logs.ray_init_kwargs()["logging_level"] == logging.INFO
    assert "RAY_DATA_LOG_LEVEL" not in os.environ  # Ray Data's own default (INFO)


def test_ray_train_worker_modules_do_not_import_faiss():
    """A Ray Train worker imports its loop's modules with its root logger at INFO (Ray
    Train's setting), before ``setup_worker`` runs; faiss's loader logs a dozen lines
    on import, so the workers' modules leave faiss to the functions that use it."""
    import subprocess
    import sys

    code = ("import sys, forge_ray.distributed.rqvae_worker, forge_ray.distributed.train_gr; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'faiss'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
