"""``forge-ray pipeline``: every stage from one config, in one Ray session, resumable.

Stages, in order (each writes ``RUN_DIR/<stage>/`` with its own ``manifest.json``)::

    synth -> ingest -> embed -> train_sid -> assign -> sid_metrics -> train_gr -> eval_gr

``synth`` runs only when the config has a ``synth`` section (built-in synthetic data;
ingest then reads its files); ``embed`` runs only when the ingested items have text
but no embedding. A stage reads its inputs from the upstream stages' folders: nobody
copies paths.

Skip / resume: ``RUN_DIR/state.json`` records, per stage, a fingerprint (SHA-256 of
the stage's typed config, its inputs, and each upstream stage's fingerprint and
manifest creation time), its status, seconds and key metrics. A stage is skipped when
its folder has a manifest, its record says ``done`` and the fingerprint matches; so a
run stopped mid-way (Ctrl-C, crash, ``after_stage`` hook) continues with the first
unfinished stage, and changing one stage's config re-runs that stage and everything
downstream of it, nothing upstream. Training stages interrupted mid-run continue from
their Ray Train checkpoint; a training stage re-run because its config changed first
deletes its stale checkpoints: only the Ray Train run folder
(``storage_path/<run name>``) that ``state.json`` records this run created, never
anything else under ``storage_path``.

Output safety: RUN_DIR holds ``manifest.json`` of kind ``pipeline``; an existing,
non-empty folder without it (a user's folder) is refused, and a stage replaces its
folder only when that folder's manifest names the stage's own kind.

Memory: the pipeline driver holds only configs and manifests; each stage streams
(see the stage modules for their own bounds).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

from forge_ray.config import from_dict, merge, read_yaml, require, to_dict
from forge_ray.errors import ConfigError, InputError
from forge_ray.io import MANIFEST, manifest_kind, read_manifest, write_manifest

STAGES = ("synth", "ingest", "embed", "train_sid", "assign", "sid_metrics", "train_gr", "eval_gr")
StageName = Literal["synth", "ingest", "embed", "train_sid", "assign", "sid_metrics", "train_gr",
                    "eval_gr"]
STATE_FILE = "state.json"
REPO = Path(__file__).resolve().parents[2]  # where configs/ ships
KIND = "pipeline"  # manifest kind of RUN_DIR itself
log = logging.getLogger(__name__)
# keys of a stage section that are the stage's inputs, not fields of its config class
INPUT_KEYS = {"ingest": {"sources"}, "sid_metrics": {"with_data"}}
# upstream stages whose outputs each stage reads ("data" = embed if it ran, else ingest)
DEPS = {"synth": (), "ingest": ("synth",), "embed": ("ingest",), "train_sid": ("data",),
        "assign": ("train_sid", "data"), "sid_metrics": ("assign", "data"),
        "train_gr": ("assign", "data"), "eval_gr": ("train_gr", "assign", "data")}


def stage_class(stage: str) -> type:
    """The typed config dataclass of a stage (imported lazily: each pulls in its stack)."""
    if stage == "synth":
        from forge_ray.data.synth import SynthConfig as cls
    elif stage == "ingest":
        from forge_ray.distributed.ingest import IngestConfig as cls
    elif stage == "embed":
        from forge_ray.distributed.embed import EmbedConfig as cls
    elif stage == "train_sid":
        from forge_ray.distributed.train_quantizer import TrainSidConfig as cls
    elif stage == "assign":
        from forge_ray.distributed.assign import AssignConfig as cls
    elif stage == "sid_metrics":
        from forge_ray.distributed.sid_metrics import SidMetricsStageConfig as cls
    elif stage == "train_gr":
        from forge_ray.distributed.train_gr import TrainGRConfig as cls
    elif stage == "eval_gr":
        from forge_ray.distributed.evaluate import EvalGRConfig as cls
    else:
        raise ConfigError(stage, f"unknown pipeline stage (stages: {', '.join(STAGES)})")
    return cls


@dataclasses.dataclass
class PipelineConfig:
    """One section per stage: that stage's config fields (as in its own YAML) plus
    its inputs (``ingest.sources``: files/folders to ingest, default the synth output;
    ``sid_metrics.with_data``: add reconstruction MSE and Embedding HitRate). A
    section's ``config: FILE.yaml`` starts it from that stage YAML (relative to the
    working directory, like ``--config``, else to the repository for the shipped
    configs/ files), the section's other keys overriding the
    file's: the pipeline reuses the stage configs instead of copying them.
    ``synth`` absent/null: no synthetic data. ``until``: last stage to run.
    ``train_sid.rqvae.in_dim`` defaults to the dataset's embedding width."""

    synth: dict[str, Any] | None = None
    ingest: dict[str, Any] = dataclasses.field(default_factory=dict)
    embed: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_sid: dict[str, Any] = dataclasses.field(default_factory=dict)
    assign: dict[str, Any] = dataclasses.field(default_factory=dict)
    sid_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_gr: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_gr: dict[str, Any] = dataclasses.field(default_factory=dict)
    until: StageName = "eval_gr"

    def __post_init__(self):
        for stage in STAGES:  # unknown keys / bad values fail here, before any stage runs
            if stage != "synth" or self.synth is not None:
                self.section(stage)
        require(bool(self.ingest.get("sources")) or self.synth is not None,
                "ingest.sources is empty and there is no synth section: nothing to ingest")
        sources = self.ingest.get("sources", [])
        require(isinstance(sources, list) and all(isinstance(s, str) for s in sources),
                "ingest.sources must be a list of paths")
        require(isinstance(self.sid_metrics.get("with_data", True), bool),
                "sid_metrics.with_data must be true or false")

    def section(self, stage: str, overrides: dict[str, Any] | None = None) -> tuple[dict, Any]:
        """(inputs, typed config) of ``stage``; ``overrides`` fill keys the section lacks."""
        raw = copy.deepcopy((self.synth or {}) if stage == "synth" else getattr(self, stage))
        if "config" in raw:
            path = raw.pop("config")
            require(isinstance(path, str), f"{stage}.config must be a path to the stage's YAML")
            shipped = REPO / path  # a shipped pipeline run from elsewhere (forge-ray demo)
            if not Path(path).is_absolute() and not Path(path).exists() and shipped.is_file():
                path = os.fspath(shipped)
            raw = merge(read_yaml(path), raw)
        inputs = {k: raw.pop(k) for k in INPUT_KEYS.get(stage, ()) if k in raw}
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            node = raw
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
            node.setdefault(leaf, value)
        return inputs, from_dict(stage_class(stage), raw, "pipeline config", prefix=f"{stage}.")


# ----------------------------------------------------------------------------- state

def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"corrupt pipeline state: {e}") from None


def save_state(run_dir: Path, state: dict) -> None:
    """Atomic write (temp file + rename): a kill never leaves half a state file."""
    tmp = run_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, run_dir / STATE_FILE)


@dataclasses.dataclass
class StageResult:
    stage: str
    status: str          # ran | skipped | not needed
    seconds: float
    metrics: dict


# ----------------------------------------------------------------------------- stages

class _Run:
    """One pipeline run over RUN_DIR: decides, runs and records each stage."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path):
        self.cfg, self.dir = cfg, run_dir
        self.state = load_state(run_dir)
        self.data = run_dir / "ingest"   # becomes run_dir / "embed" when embed runs

    def out(self, stage: str) -> Path:
        return self.dir / stage

    def upstream(self, stage: str) -> dict:
        """Fingerprint and manifest time of each stage this one reads."""
        ups = {}
        for dep in DEPS[stage]:
            name = self.data.name if dep == "data" else dep
            if name == "synth" and self.cfg.synth is None:
                continue
            ups[name] = [self.state.get(name, {}).get("fingerprint"),
                         read_manifest(self.out(name)).get("created")]
        return ups

    def step(self, stage: str, inputs: dict, cfg, action: Callable[[], dict],
             key_metrics: Callable[[dict], dict], runs: tuple[Path, ...] = ()) -> StageResult:
        """Skip ``stage`` when complete and unchanged, else run ``action`` (which
        returns the stage's manifest/metrics) and record it. ``runs``: the Ray Train
        run folders the stage writes (recorded, so a later config change deletes
        only folders this pipeline made)."""
        fp = fingerprint({"stage": stage, "config": to_dict(cfg), "inputs": inputs,
                          "upstream": self.upstream(stage)})
        rec = self.state.get(stage, {})
        out = self.out(stage)
        if rec.get("status") == "done" and rec.get("fingerprint") == fp and (out / MANIFEST).is_file():
            return StageResult(stage, "skipped", rec.get("seconds", 0.0), rec.get("metrics", {}))
        # ours: recorded by an earlier run of this stage, or about to be created by it
        # (a folder that already exists unrecorded is someone else's: never ours)
        made = rec.get("runs", ())
        mine = [p for p in (os.fspath(r.resolve()) for r in runs) if p in made or not os.path.exists(p)]
        if rec.get("fingerprint") != fp:  # config changed: stale checkpoints must not be resumed
            for path in mine:
                if path in made:
                    shutil.rmtree(path, ignore_errors=True)
        self.state[stage] = {"fingerprint": fp, "status": "running", "runs": mine}
        save_state(self.dir, self.state)
        log.info(f"[pipeline] {stage} -> {out}")
        t0 = time.perf_counter()
        result = action()
        seconds = round(time.perf_counter() - t0, 2)
        metrics = key_metrics(result)
        self.state[stage] = {"fingerprint": fp, "status": "done", "seconds": seconds,
                             "metrics": metrics, "runs": mine}
        save_state(self.dir, self.state)
        return StageResult(stage, "ran", seconds, metrics)

    # each method runs one stage through its library function, writing out(stage)
    def synth(self) -> StageResult:
        from forge_ray.data.synth import synth

        _, cfg = self.cfg.section("synth")
        return self.step("synth", {}, cfg,
                         lambda: synth(self.out("synth"), cfg, overwrite=True, progress=False),
                         lambda m: dict(m["counts"]))

    def ingest(self) -> StageResult:
        from forge_ray.data import synth
        from forge_ray.distributed.ingest import ingest

        inputs, cfg = self.cfg.section("ingest")
        raw = self.out("synth")
        sources = [os.path.abspath(s) for s in inputs.get("sources") or
                   [raw / synth.CONTRASTIVE_FILE, raw / synth.RECONSTRUCT_FILE, raw / synth.INTERACTIONS_DIR]]
        return self.step("ingest", {"sources": sources}, cfg,
                         lambda: ingest(sources, self.out("ingest"), cfg, overwrite=True),
                         lambda m: {k: v for k, v in m["counts"].items() if k in ("items", "pairs", "sequences")})

    def embed(self) -> StageResult:
        from forge_ray.distributed.embed import embed

        manifest = read_manifest(self.out("ingest"))
        if manifest.get("embedding_dim") or "text" not in manifest.get("item_columns", []):
            self.state.pop("embed", None)
            return StageResult("embed", "not needed", 0.0, {})
        _, cfg = self.cfg.section("embed")
        self.data = self.out("embed")
        return self.step("embed", {}, cfg,
                         lambda: embed(self.out("ingest"), self.data, cfg, overwrite=True),
                         lambda m: {"embedding_dim": m["embedding_dim"]})

    def run_folder(self, stage: str, cfg) -> Path:
        """The Ray Train run folder (``storage_path/<run name>``) a training stage's
        config writes: what a config change may delete, never ``storage_path`` itself."""
        if stage == "train_sid":
            from forge_ray.distributed.train_quantizer import run_location

            storage, name = run_location(self.out(stage), cfg)
            return storage / name
        return cfg.run.storage(self.out(stage)) / cfg.run.name

    def train_sid(self) -> StageResult:
        from forge_ray.distributed.train_quantizer import train_sid

        dim = read_manifest(self.data).get("embedding_dim")
        _, cfg = self.cfg.section("train_sid", {"rqvae.in_dim": dim, "run_name": "train_sid"})
        out, run = self.out("train_sid"), self.run_folder("train_sid", cfg)
        return self.step(
            "train_sid", {}, cfg,
            lambda: train_sid(self.data, out, cfg, overwrite=True, resume=run.is_dir()),
            lambda m: {"quantizer": m["quantizer"], "sizes": m["sizes"],
                       "utilization": [round(u, 3) for u in m["utilization"]]},
            runs=(run,))

    def assign(self) -> StageResult:
        from forge_ray.distributed.assign import assign

        _, cfg = self.cfg.section("assign")
        return self.step(
            "assign", {}, cfg,
            lambda: assign(self.out("train_sid"), self.data, self.out("assign"), cfg, overwrite=True),
            lambda m: {"strategy": m["strategy"], "sizes": m["sizes"],
                       "raw_collision_rate": round(m["collision_stats"]["before"]["collision_rate"], 4)})

    def sid_metrics(self) -> StageResult:
        from forge_ray.distributed.sid_metrics import sid_metrics

        inputs, cfg = self.cfg.section("sid_metrics")
        with_data = inputs.get("with_data", True)
        return self.step(
            "sid_metrics", {"with_data": with_data}, cfg,
            lambda: sid_metrics(self.out("assign"), self.data if with_data else None,
                                self.out("sid_metrics"), cfg, overwrite=True),
            lambda m: _sid_key_metrics(m, cfg.hitrate.topk))

    def train_gr(self) -> StageResult:
        from forge_ray.distributed.train_gr import train_gr

        _, cfg = self.cfg.section("train_gr")
        return self.step(
            "train_gr", {}, cfg,
            lambda: train_gr(self.data, self.out("assign"), self.out("train_gr"), cfg, overwrite=True),
            lambda m: {"steps": m["steps"], **{f"best {k}": v for k, v in m["best"].items()}},
            runs=(self.run_folder("train_gr", cfg),))

    def eval_gr(self) -> StageResult:
        from forge_ray.distributed.evaluate import evaluate

        _, cfg = self.cfg.section("eval_gr")
        return self.step(
            "eval_gr", {}, cfg,
            lambda: evaluate(self.out("train_gr"), self.out("eval_gr"), cfg, data=self.data,
                             sids=self.out("assign"), overwrite=True),
            _eval_key_metrics)


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _sid_key_metrics(m: dict, topk: int) -> dict:
    """Raw-code collision rate beside the final SIDs' spread, reconstruction and HitRate@K."""
    from forge_ray.core.sid.metrics import hitrate_key

    keys = ("raw_collision_rate", "gini", "unique_sid_ratio", "reconstruction_mse")
    out = _rounded({k: m[k] for k in keys if m.get(k) is not None})
    if m.get(hitrate_key(topk)):
        out[hitrate_key(topk)] = round(m[hitrate_key(topk)]["hitrate"], 4)
    return out


def _eval_key_metrics(m: dict) -> dict:
    out = _rounded({k: m[k] for k in ("recall@10", "ndcg@10", "recall@5") if k in m})
    for k, v in (m.get("popularity") or {}).items():
        if k in ("recall@10", "ndcg@10"):
            out[f"popularity {k}"] = round(v, 4)
    return out


def run_pipeline(run_dir: str | os.PathLike, cfg: PipelineConfig, *,
                 after_stage: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run (or continue) the pipeline in ``run_dir``; returns one result per stage
    considered. ``after_stage`` is called after each stage (progress reporting;
    tests raise from it to simulate an interruption). Needs a Ray connection."""
    run_dir = claim_run_dir(run_dir)
    (run_dir / "pipeline.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    run = _Run(cfg, run_dir)
    results = []
    for stage in STAGES[STAGES.index("synth" if cfg.synth is not None else "ingest"):
                        STAGES.index(cfg.until) + 1]:
        result = getattr(run, stage)()
        results.append(result)
        if after_stage is not None:
            after_stage(result)
    return results


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a pipeline run folder: marked (``manifest.json`` of kind
    ``pipeline``), or written before runs were marked (its ``state.json`` and
    ``pipeline.json``, the two files only the pipeline writes there)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return manifest_kind(path) == KIND or (
        not (path / MANIFEST).exists() and (path / STATE_FILE).is_file()
        and (path / "pipeline.json").is_file())


def claim_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` resolved, created and marked as a pipeline run (``manifest.json`` of
    kind ``pipeline``). An existing non-empty folder that is not a run folder
    (:func:`is_run_dir`) is refused (one line, untouched): the pipeline writes and
    replaces files in it."""
    path = Path(run_dir).resolve()
    if path.exists() and not is_run_dir(path):
        if not path.is_dir() or any(path.iterdir()):
            raise InputError(run_dir, "not a forge_ray pipeline run folder (no manifest.json of "
                                      f"kind {KIND!r}) and not empty; left untouched (choose a new "
                                      "or empty --out)")
    path.mkdir(parents=True, exist_ok=True)
    if manifest_kind(path) != KIND:
        write_manifest(path, KIND)
    return path


def remove_run_dir(run_dir: str | os.PathLike) -> None:
    """Delete a previous pipeline run folder (``demo --overwrite``); anything else
    that exists there is refused with one line and left untouched."""
    path = Path(run_dir)
    if not (path.exists() or path.is_symlink()):
        return
    if not is_run_dir(path):
        raise InputError(run_dir, "--overwrite deletes only a previous forge_ray pipeline run "
                                  f"folder (manifest.json of kind {KIND!r}) and this is not one; "
                                  "left untouched (choose another --out or remove it yourself)")
    shutil.rmtree(path)


def summary_table(results: list[StageResult]) -> str:
    """The final table: stage, ran/skipped, seconds, key metrics."""
    rows = [("stage", "status", "seconds", "key metrics")]
    for r in results:
        metrics = ", ".join(f"{k} {v}" for k, v in r.metrics.items())
        rows.append((r.stage, r.status, f"{r.seconds:.1f}", metrics))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
