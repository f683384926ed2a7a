"""``python -m jobs.beauty_benchmark CONFIG.yaml``: the whole pipeline on Amazon Beauty.

item text -> MiniLM embeddings (``embed``) -> SID quantizer (``train-sid``) -> SIDs
(``assign``) -> GR model (``train-gr``) -> Recall/NDCG@5/10 full ranking on the last
item of each user (``eval-gr``), printed next to TIGER's published numbers
(FORGE.md) and the most-popular and content-kNN baselines on the same queries. Every stage runs through its ``forge-ray`` entry point in this process
and joins the same Ray cluster; a finished stage's output is reused, so a stopped job
continues where it was (train-gr also resumes from its Ray Train checkpoint).

CONFIG (configs/amazon/beauty_cpu.yaml, beauty_tiger_gpu.yaml)::

    source: ../shared/data/amazon/Beauty   # user_sequence.txt + item_text.txt
    work_dir: runs/beauty_cpu
    stages:                                 # per stage: config file + overrides
      train_sid: {config: ..., overrides: [...]}
      assign: ...; train_gr: ...; eval_gr: ...
    refit: true                             # see below
    ensemble: 2                             # see below

``refit``: once train-gr has chosen its step on the validation split, a second train-gr
(``gr_model_refit``) trains the same config on the validation items too
(``data.train_holdout=1``) for exactly the chosen number of optimizer steps, its decay
ending there, and eval-gr scores that model on test: the test target then lies one item
past the training data, as the validation target did when the step was chosen.

``ensemble``: how many models eval-gr decodes as one (the mean of their next-token
probabilities). The scored model's train-gr (the refit, or train-gr itself without
one) runs again with ``train.seed=1, 2, ...`` into ``<model>_seed<i>``; each member
costs one more train-gr and one more decoding pass.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from forge_ray.config import load_config, require

TIGER_BEAUTY = {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}
STAGES = ("train_sid", "assign", "train_gr", "eval_gr")


@dataclass
class StageConfig:
    config: str | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class BeautyJobConfig:
    source: str = "../shared/data/amazon/Beauty"
    work_dir: str = "runs/beauty_cpu"
    embed_batch_size: int = 64
    embed_actors: int = 1
    refit: bool = False
    ensemble: int = 1
    stages: dict[str, StageConfig] = field(default_factory=dict)

    def __post_init__(self):
        require(self.ensemble >= 1, f"ensemble must be >= 1 (models decoded together), got {self.ensemble}")
        unknown = set(self.stages) - set(STAGES)
        require(not unknown, f"unknown stage(s) {sorted(unknown)}; known: {list(STAGES)}")
        self.stages = {k: v if isinstance(v, StageConfig) else StageConfig(**v) for k, v in self.stages.items()}


def _stage(name: str, args: list[str], output: Path) -> None:
    from forge_ray.cli import main

    if (output / "manifest.json").is_file():
        print(f"[beauty] {name}: reusing {output}", flush=True)
        return
    t0 = time.perf_counter()
    code = main([name, *args])
    if code:
        raise SystemExit(f"[beauty] {name} failed with exit code {code}")
    print(f"[beauty] {name}: {time.perf_counter() - t0:.0f} s", flush=True)


def _with_config(cfg: BeautyJobConfig, stage: str) -> list[str]:
    s = cfg.stages.get(stage, StageConfig())
    return ([f"--config={s.config}"] if s.config else []) + list(s.overrides)


def run(cfg: BeautyJobConfig) -> dict:
    work = Path(cfg.work_dir)
    raw, emb, quant, sids = work / "raw", work / "dataset", work / "quantizer", work / "sids"
    model, evald = work / "gr_model", work / "eval"
    train = _with_config(cfg, "train_gr")
    _stage("ingest", [cfg.source, "--out", str(raw)], raw)
    _stage("embed", ["--data", str(raw), "--out", str(emb), "--batch-size", str(cfg.embed_batch_size),
                     "--actors", str(cfg.embed_actors)], emb)
    _stage("train-sid", ["--data", str(emb), "--out", str(quant), *_with_config(cfg, "train_sid")], quant)
    _stage("assign", ["--model", str(quant), "--data", str(emb), "--out", str(sids),
                      *_with_config(cfg, "assign")], sids)
    _stage("train-gr", ["--data", str(emb), "--sids", str(sids), "--out", str(model), *train], model)
    if cfg.refit:
        chosen = json.loads((model / "metrics.json").read_text())["selected"]
        print(f"[beauty] refit: {chosen['step']} steps, the step train-gr kept ({chosen['why']})", flush=True)
        model = work / "gr_model_refit"
        train += ["data.train_holdout=1", f"train.max_steps={chosen['step']}"]
        _stage("train-gr", ["--data", str(emb), "--sids", str(sids), "--out", str(model), *train], model)
    members = [model] + [model.with_name(f"{model.name}_seed{i}") for i in range(1, cfg.ensemble)]
    for i, member in enumerate(members[1:], start=1):
        _stage("train-gr", ["--data", str(emb), "--sids", str(sids), "--out", str(member), *train,
                            f"train.seed={i}"], member)
    _stage("eval-gr", ["--model", *map(str, members), "--data", str(emb), "--sids", str(sids),
                       "--out", str(evald), *_with_config(cfg, "eval_gr")], evald)
    metrics = json.loads((evald / "metrics.json").read_text())
    knn = metrics.get("content_knn", {})
    print(f"{'metric':<10} {'forge_ray':>10} {'TIGER':>8} {'popularity':>11} {'kNN last':>9} {'kNN mean':>9}")
    for key, ref in TIGER_BEAUTY.items():
        row = [knn.get(name, {}).get(key, float("nan")) for name in ("last_item", "history_mean")]
        print(f"{key:<10} {metrics[key]:>10.4f} {ref:>8.4f} {metrics['popularity'][key]:>11.4f} "
              f"{row[0]:>9.4f} {row[1]:>9.4f}")
    return metrics


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m jobs.beauty_benchmark CONFIG.yaml [key=value ...]")
    run(load_config(BeautyJobConfig, sys.argv[1], sys.argv[2:]))
