"""--overwrite and the pipeline replace only their own previous outputs (no Ray needed).

The library-level rules (kind, inputs) are in test_config_io.py; here the commands
that run without a cluster (synth, demo's --overwrite) and the pipeline's run-folder
bookkeeping, which decides what a config change may delete.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from forge_ray.cli import main
from forge_ray.config import load_config
from forge_ray.data.synth import SynthConfig
from forge_ray.distributed.pipeline import (PipelineConfig, _Run, claim_run_dir, remove_run_dir)
from forge_ray.errors import InputError
from forge_ray.io import write_manifest
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "pipeline.yaml"
SYNTH = ["branching=[4,4]", "level_scales=[1.0,0.5]", "--items", "200", "--dim", "4",
         "--users", "10", "--no-progress"]


def _tree(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _user_folder(path):
    """A user's folder with files (and a nested folder that looks like a stage output)."""
    (path / "synth").mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "synth" / "data.bin").write_bytes(b"\x00\x01")
    return path


def _one_error_line(capsys, name: str) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out + err, err
    assert name in lines[0]
    return lines[0]


def test_synth_overwrite_refuses_a_users_folder(tmp_path, capsys):
    user = _user_folder(tmp_path / "user")
    before = _tree(tmp_path)
    assert main(["synth", "--out", str(user), *SYNTH, "--overwrite"]) == 2
    line = _one_error_line(capsys, str(user))
    assert "replaces only a previous 'synthetic' output" in line
    assert _tree(tmp_path) == before
    # a previous synth output is replaced; another stage's output is not
    assert main(["synth", "--out", str(tmp_path / "s"), *SYNTH]) == 0
    assert main(["synth", "--out", str(tmp_path / "s"), *SYNTH, "--seed", "3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]["seed"] == 3
    write_manifest(user, "dataset")
    before = _tree(tmp_path)
    capsys.readouterr()
    assert main(["synth", "--out", str(user), *SYNTH, "--overwrite"]) == 2
    assert "holds a 'dataset' output" in _one_error_line(capsys, str(user))
    assert _tree(tmp_path) == before


def test_demo_overwrite_deletes_only_a_pipeline_run_folder(tmp_path, capsys):
    user = _user_folder(tmp_path / "user")
    before = _tree(tmp_path)
    assert main(["demo", "--out", str(user), "--overwrite"]) == 2
    assert "not one; left untouched" in _one_error_line(capsys, str(user))
    assert _tree(tmp_path) == before
    run = claim_run_dir(tmp_path / "run")
    (run / "synth").mkdir()
    remove_run_dir(run)
    assert not run.exists()
    remove_run_dir(run)  # nothing there: nothing to do
    # a run folder written before runs were marked: state.json + pipeline.json
    old = tmp_path / "old"
    (old / "synth").mkdir(parents=True)
    for name in ("state.json", "pipeline.json"):
        (old / name).write_text("{}")
    assert (claim_run_dir(old) / "manifest.json").is_file()  # continued, and marked now
    (old / "manifest.json").unlink()
    remove_run_dir(old)
    assert not old.exists()


def test_pipeline_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    user = _user_folder(tmp_path / "user")
    before = _tree(tmp_path)
    with pytest.raises(InputError, match="not a forge_ray pipeline run folder") as err:
        claim_run_dir(user)
    assert str(err.value).startswith(str(user)) and "\n" not in str(err.value)
    assert _tree(tmp_path) == before
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new", tmp_path / "new"):  # new, empty, own
        assert json.loads((claim_run_dir(folder) / "manifest.json").read_text())["kind"] == "pipeline"


def test_train_gr_run_folder_is_storage_slash_name(tmp_path):
    """``train_gr.run.storage_path=DIR``: the run is DIR/train_gr, never DIR itself."""
    cfg = load_config(PipelineConfig, TINY, [f"train_gr.run.storage_path={tmp_path / 'shared'}"])
    run = _Run(cfg, claim_run_dir(tmp_path / "run"))
    assert run.run_folder("train_gr", cfg.section("train_gr")[1]) == tmp_path / "shared" / "train_gr"
    default = _Run(load_config(PipelineConfig, TINY), tmp_path / "run")
    assert default.run_folder("train_gr", default.cfg.section("train_gr")[1]) == \
        tmp_path / "run" / "train_gr.runs" / "train_gr"
    _, sid_cfg = cfg.section("train_sid", {"run_name": "train_sid"})
    assert run.run_folder("train_sid", sid_cfg) == tmp_path / "run" / "runs" / "train_sid"


def test_config_change_deletes_only_run_folders_this_pipeline_made(tmp_path):
    """The stale-checkpoint cleanup of a re-run stage: its own recorded run folder
    goes; the rest of the shared storage folder, and a run folder it never made, stay."""
    storage = tmp_path / "shared"
    (storage / "other_run").mkdir(parents=True)
    (storage / "notes.txt").write_text("mine")
    run = _Run(load_config(PipelineConfig, TINY), claim_run_dir(tmp_path / "run"))
    ours, foreign = storage / "train_gr", storage / "users_run"
    (foreign / "checkpoint_0").mkdir(parents=True)
    seen = []

    def step(seed: int, folder):
        def action():
            seen.append(folder.exists())     # what a training stage would resume from
            (folder / f"checkpoint_{seed}").mkdir(parents=True, exist_ok=True)
            write_manifest(run.out("synth"), "synthetic")
            return {}
        return run.step("synth", {}, dataclasses.replace(SynthConfig(), seed=seed), action,
                        lambda m: {}, runs=(folder,))

    run.out("synth").mkdir()
    assert step(1, ours).status == "ran" and seen == [False]
    assert step(1, ours).status == "skipped"              # unchanged: nothing deleted or run
    assert step(2, ours).status == "ran" and seen == [False, False]  # changed: ours deleted first
    assert sorted(p.name for p in ours.iterdir()) == ["checkpoint_2"]
    assert step(3, foreign).status == "ran" and seen[-1] is True    # not made here: kept
    assert step(4, foreign).status == "ran" and seen[-1] is True    # ... and never adopted
    assert (foreign / "checkpoint_0").is_dir()
    assert (storage / "notes.txt").read_text() == "mine" and (storage / "other_run").is_dir()
    assert ours.is_dir()  # no longer this stage's run folder: left alone
