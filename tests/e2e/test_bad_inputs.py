"""The bad-input corpus: every entry of tests/assets/bad/ (see its README) through the CLI.

Each entry runs as ``forge_ray.cli.main(argv)`` in this process, on the session's
Ray cluster (so no case pays for starting Ray), and must exit non-zero with exactly
one line on stderr naming the entry, no traceback and no output left behind. The
valid inputs a case is passed next to are built once per module by the builders of
tests/ray/, and only when some case needs them.
"""

from __future__ import annotations

import os
import shutil
import socket
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.ray.test_assign import tiny  # noqa: F401  (a fixture: {items} + {quantizer})

pytestmark = pytest.mark.ray

BAD = REPO / "tests" / "assets" / "bad"
TINY = REPO / "configs" / "ci"  # CI-sized stage configs
GR_ALGR = [f"--config={TINY / 'train_gr.yaml'}", "train.valid_beams=0",
           "train.early_stop_metric=valid_loss", "data.algr_sizes=[4,4,4]"]

# COMMAND.ROLE -> argv; {file} is the entry, {out} a fresh path, the rest companions
ROLES: dict[str, list[str]] = {
    "ingest.src": ["ingest", "{file}", "--out", "{out}", "progress=false"],
    "ingest.strict": ["ingest", "{file}", "--strict", "--out", "{out}", "progress=false"],
    "ingest.src2": ["ingest", "{npz}", "{file}", "--out", "{out}", "progress=false"],
    "ingest.config": ["ingest", "{npz}", "--config", "{file}", "--out", "{out}"],
    "ingest.out": ["ingest", "{npz}", "--out", "{file}", "progress=false"],
    "train-sid.config": ["train-sid", "--data", "{items}", "--config", "{file}", "--out", "{out}"],
    "assign.config": ["assign", "--model", "{quantizer}", "--data", "{items}", "--config", "{file}",
                      "--out", "{out}"],
    "assign.model": ["assign", "--model", "{file}", "--data", "{items}", "--out", "{out}"],
    "train-gr.config": ["train-gr", "--data", "{dataset}", "--sids", "{sids}", "--config", "{file}",
                        "--out", "{out}"],
    "train-gr.data": ["train-gr", "--data", "{file}", *GR_ALGR, "--out", "{out}"],
    "train-gr.sids": ["train-gr", "--data", "{dataset}", "--sids", "{file}",
                      f"--config={TINY / 'train_gr.yaml'}", "--out", "{out}"],
    "train-gr.deepspeed": ["train-gr", "--data", "{dataset}", "--sids", "{sids}",
                           f"--config={TINY / 'train_gr.yaml'}", "scale.deepspeed_config={file}",
                           "--out", "{out}"],
    "eval-gr.config": ["eval-gr", "--model", "{gr_model}", "--data", "{dataset}", "--sids", "{sids}",
                       "--config", "{file}", "--out", "{out}"],
    "eval-gr.data": ["eval-gr", "--model", "{gr_model}", "--data", "{file}", "--sids", "{sids}",
                     f"--config={TINY / 'eval_gr.yaml'}", "--out", "{out}"],
    "eval-gr.model": ["eval-gr", "--model", "{file}", "--data", "{dataset}", "--sids", "{sids}",
                      f"--config={TINY / 'eval_gr.yaml'}", "--out", "{out}"],
    "pipeline.config": ["pipeline", "--config", "{file}", "--out", "{out}"],
}


def entries() -> list[Path]:
    return sorted(p for p in BAD.iterdir() if not p.name.startswith(("README", ".")))


def role(entry: Path) -> str:
    return ".".join(entry.name.split(".")[:2])


class Companions:
    """The valid inputs of the README's table, each built on first use."""

    def __init__(self, request: pytest.FixtureRequest, root: Path):
        self.request, self.root, self.built = request, root, {}

    def __getitem__(self, name: str) -> str:
        if name not in self.built:
            build = {"npz": self._npz, "items": self._items, "quantizer": self._items,
                     "dataset": self._gr, "sids": self._gr, "gr_model": self._gr}.get(name)
            assert build, f"unknown companion {{{name}}} (see tests/assets/bad/README.md)"
            self.built.update(build())
        return str(self.built[name])

    def _npz(self) -> dict:
        from tests.ray.test_ingest import contrastive

        rng = np.random.default_rng(0)
        path = contrastive(self.root / "good.npz", np.arange(64), rng.standard_normal((64, 8)).astype(
            np.float32), rng.integers(0, 64, (100, 2)))
        return {"npz": path}

    def _items(self) -> dict:
        data, model, _, _ = self.request.getfixturevalue("tiny")
        return {"items": data, "quantizer": model}

    def _gr(self) -> dict:
        from tests.ray.test_eval_gr import saved_model
        from tests.ray.test_train_gr import build_gr_data

        ds, sids, *_ = build_gr_data(self.root / "gr")
        saved_model(self.root / "gr" / "model")
        return {"dataset": ds, "sids": sids, "gr_model": self.root / "gr" / "model"}


@pytest.fixture(scope="module")
def companions(request, tmp_path_factory, ray_cluster) -> Companions:
    return Companions(request, tmp_path_factory.mktemp("companions"))


def argv_of(entry: Path, work: Path, companions: Companions, address: str) -> list[str]:
    template = ROLES.get(role(entry))
    assert template, (f"{entry.name}: unknown COMMAND.ROLE {role(entry)!r}; known: "
                      f"{', '.join(ROLES)} (tests/assets/bad/README.md)")
    values = {"file": str(entry), "out": str(work / "out")}
    if role(entry).endswith(".out"):  # an existing output: a copy, so the corpus stays intact
        values["file"] = str(work / entry.name)
        shutil.copy(entry, values["file"])
    argv = []
    for arg in template:
        names = {f for _, f, _, _ in string.Formatter().parse(arg) if f}
        argv.append(arg.format(**{n: values[n] if n in values else companions[n] for n in names}))
    return [argv[0], "--address", address, *argv[1:]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("entry", entries(), ids=lambda p: p.name)
def test_bad_input_is_one_line_and_leaves_nothing(entry, companions, ray_cluster, tmp_path, capsys):
    from forge_ray.cli import main

    work = tmp_path / "work"
    work.mkdir()
    argv = argv_of(entry, work, companions, ray_cluster.address)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refusing the command line
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code not in (0, None), f"accepted: {out}"
    assert len(lines) == 1, err
    assert lines[0].startswith(f"forge-ray {argv[0]}: error: "), err
    assert entry.name in lines[0], err
    assert "Traceback" not in out + err
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before


def test_unreachable_address_is_one_line_and_quick(tmp_path):
    """``--address`` naming a port nobody listens on: refused at once, naming it (a real
    subprocess, so the check runs before any Ray connection)."""
    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = tmp_path / "a.tsv"
    src.write_text("id\tsystem\tuser\tanswer\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "forge_ray", "ingest", str(src), "--out",
                        str(tmp_path / "ds"), "--address", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, env=env, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv"]


@pytest.mark.timeout(300)
def test_algr_row_past_the_first_block(ray_cluster, tmp_path, capsys):
    """A malformed row beyond what the driver's header check reads (64 KiB) is found by
    Ray Data's read tasks: still one line naming the file."""
    from forge_ray.cli import main

    path = tmp_path / "late.tsv"
    rows = "".join(f"u{i}\ts\tC1C5C9C2C6C10\tC3C7C11\n" for i in range(3000))  # ~90 KB
    path.write_text("id\tsystem\tuser\tanswer\n" + rows + "bad\trow\n")
    code = main(["train-gr", "--data", str(path), *GR_ALGR, "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "late.tsv: malformed AL-GR row" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.tsv"]
