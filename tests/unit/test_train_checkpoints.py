"""Which checkpoint a Ray Train stage resumes from: the newest complete one on disk,
also when Ray's own run snapshot names an older one (a run stopped before Ray's
controller recorded its last checkpoints)."""

from __future__ import annotations

import json

from forge_ray.distributed.train_common import DONE_FILE, newest_checkpoint


def checkpoint(run, stamp: str, step: int, done_ranks=(0, 1), world=2):
    folder = run / f"checkpoint_2026-12-01_{stamp}"
    folder.mkdir(parents=True)
    for rank in done_ranks:
        (folder / DONE_FILE.format(rank)).write_text(json.dumps({"world": world, "step": step}))
    return folder


def test_newest_complete_checkpoint_wins(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    old = checkpoint(tmp_path, "11-00-01.000001", 2)
    new = checkpoint(tmp_path, "11-00-09.000001", 6)
    checkpoint(tmp_path, "11-00-05.000001", 4)
    checkpoint(tmp_path, "11-00-12.000001", 8, done_ranks=(0,))  # rank 1 still uploading
    checkpoint(tmp_path, "11-00-13.000001", 10, done_ranks=(1,))
    # Ray's snapshot lags behind (it names the step-2 one): the disk decides
    assert newest_checkpoint(tmp_path) == new
    assert newest_checkpoint(tmp_path, registered=old) == new


def test_a_checkpoint_ray_recorded_counts_without_marks(tmp_path):
    """Ray records a checkpoint only once every rank reported it (e.g. one written
    before the marks existed)."""
    checkpoint(tmp_path, "11-00-01.000001", 2)
    recorded = tmp_path / "checkpoint_2026-12-01_11-00-07.000001"
    recorded.mkdir()
    assert newest_checkpoint(tmp_path, registered=recorded) == recorded
    single = checkpoint(tmp_path / "one", "11-00-03.000001", 3, done_ranks=(0,), world=1)
    assert newest_checkpoint(tmp_path / "one") == single
