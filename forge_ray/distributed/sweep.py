"""``forge-ray sweep``: Ray Tune over codebook settings, then (optionally) GR on the best.

1. The driver streams a bounded sample of the dataset (the first ``max_items`` items
   in file order, the contrastive pairs among them, the first ``max_sequences``
   sequences restricted to them) and puts it in the object store once. Driver and
   each trial hold at most that sample: N x D x 4 bytes of embeddings plus pairs and
   sequences.
2. Each Tune trial (a Ray actor with ``cpus_per_trial`` CPUs) runs
   :func:`~forge_ray.distributed.sweep_trial.quantizer_trial`: quantizer training
   with per-epoch ``raw_recon_mse`` reports (ASHA stops the worst early), SID assignment
   with the trial's collision strategy, and the SID metrics. A trial whose config
   point fails is recorded as failed and the sweep goes on (no fail-fast); one ASHA
   stops is recorded as ``stopped early`` with the metrics of its last epoch
   (:func:`trial_row`).
3. With ``gr.top_k > 0`` the best finished trials by ``select_metric`` each train a
   tiny GR model (Ray tasks, in parallel) and get Recall/NDCG@5/10.
4. The report: results table (CSV + Parquet), best config (YAML), Spearman
   correlation of each SID metric with GR recall@10 across trials (JSON + Markdown)
   and one scatter PNG per metric: our own test of FORGE's claim that Gini and
   Embedding HitRate predict GR quality.

Resume: the Tune experiment lives in ``OUT/tune``; ``resume`` continues it with
``Tuner.restore`` (finished and stopped-early trials are kept, unfinished ones
continue from their last epoch checkpoint, failed ones are not retried).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from forge_ray.config import from_dict, require, to_dict
from forge_ray.distributed.sweep_trial import (COMPLETE, Sample, SweepGRConfig, TrialParams, gr_trial,
                                              quantizer_trial)
from forge_ray.errors import ConfigError, InputError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
GR_TARGET = "gr_recall@10"


@dataclasses.dataclass
class SweepConfig:
    """What a sweep explores (see configs/sweep/*.yaml).

    base: fixed trial settings (:class:`TrialParams` fields). space: key ->
    ``{grid: [...]}`` | ``{choice: [...]}`` | ``{uniform: [lo, hi]}`` |
    ``{loguniform: [lo, hi]}`` | ``{randint: [lo, hi]}``, keys from TrialParams.
    num_samples: repeats of the grid (each draws the random keys anew).
    """

    data: str = ""
    base: TrialParams = dataclasses.field(default_factory=TrialParams)
    space: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_samples: int = 1
    max_concurrent: int = 2
    cpus_per_trial: float = 0.5
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    select_metric: str = "raw_embedding_hitrate@10"  # one of sid_metric_names(hitrate_topk)
    select_mode: Literal["max", "min"] = "max"
    max_items: int = 50_000
    max_sequences: int = 20_000
    hitrate_topk: int = 10
    gr: SweepGRConfig = dataclasses.field(default_factory=SweepGRConfig)
    name: str = "sweep"

    def __post_init__(self):
        require(self.num_samples >= 1 and self.max_concurrent >= 1, "num_samples, max_concurrent must be >= 1")
        require(self.cpus_per_trial > 0, "cpus_per_trial must be > 0")
        require(self.grace_period >= 1 and self.reduction_factor >= 2, "grace_period >= 1, reduction_factor >= 2")
        require(self.select_metric in self.sid_metrics,
                f"select_metric must be one of {', '.join(self.sid_metrics)}")
        require(self.max_items >= 2 and self.max_sequences >= 1 and self.hitrate_topk >= 1,
                "max_items >= 2, max_sequences >= 1, hitrate_topk >= 1")
        validate_space(self.space, self.base)

    @property
    def sid_metrics(self) -> tuple[str, ...]:
        return sid_metric_names(self.hitrate_topk)

    @property
    def trial_metrics(self) -> tuple[str, ...]:
        """What a results row keeps of a trial's last report."""
        return ("epoch", *self.sid_metrics, "final_unique_sid_ratio", "moved", "fallback")


def sid_metric_names(hitrate_topk: int) -> tuple[str, ...]:
    """The SID metrics a finished trial reports, all of its raw codes (before collision
    handling: the quantizer's own spread, which a suffix level would hide);
    ``raw_utilization`` is the mean over the levels."""
    from forge_ray.core.sid.metrics import hitrate_key

    return ("raw_collision_rate", "raw_gini", "raw_unique_sid_ratio", "raw_utilization", "raw_recon_mse",
            "raw_" + hitrate_key(hitrate_topk), "raw_max_items_per_sid")


def validate_space(space: dict, base: TrialParams) -> None:
    """Refuse unknown keys, bad distribution specs and invalid values (each grid /
    choice value and both ends of each range are checked through TrialParams)."""
    fields = {f.name for f in dataclasses.fields(TrialParams)}
    for key, spec in space.items():
        if key not in fields:
            raise ConfigError("space", f"unknown search-space key {key!r}; known: {', '.join(sorted(fields))}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError("space", f"{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError("space", f"{key}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise ConfigError("space", f"{key}.{kind}: expected [low, high] with low < high, got {values}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError("space", f"{key}.loguniform: bounds must be > 0")
        for value in values:
            try:
                from_dict(TrialParams, {**to_dict(base), key: value}, "space")
            except ConfigError as e:
                raise ConfigError("space", f"{key}={value!r}: {e.problem}") from None


def tune_space(space: dict) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


# ----------------------------------------------------------------------------- data

def load_sample(dataset: str | os.PathLike, cfg: SweepConfig) -> Sample:
    """Stream the bounded sample described in the module doc (Ray Data reads)."""
    from forge_ray.data.schema import embeddings_to_numpy
    from forge_ray.distributed.dataset import dataset_manifest, read_items, read_pairs, read_sequences

    manifest = dataset_manifest(dataset)
    if not manifest.get("embedding_dim"):
        raise InputError(dataset, "items have no embeddings (run forge-ray embed first)")
    ids, xs = [], []
    for b in read_items(dataset, columns=["item_id", "embedding"]).limit(cfg.max_items).iter_batches(
            batch_format="pyarrow", batch_size=8192):
        ids.append(b["item_id"].to_numpy())
        xs.append(embeddings_to_numpy(b["embedding"]))
    item_ids, x = np.concatenate(ids).astype(np.int64), np.concatenate(xs).astype(np.float32)
    order = np.argsort(item_ids)
    item_ids, x = item_ids[order], x[order]
    pairs = np.zeros((0, 2), np.int64)
    if (Path(dataset) / "pairs").is_dir():
        parts = []
        for b in read_pairs(dataset).iter_batches(batch_format="numpy", batch_size=65536):
            ab = np.stack([b["item_a"], b["item_b"]], 1).astype(np.int64)
            rows = np.clip(np.searchsorted(item_ids, ab), 0, len(item_ids) - 1)
            parts.append(rows[(item_ids[rows] == ab).all(1)])
        pairs = np.concatenate(parts) if parts else pairs
    users, seqs = [], []
    if (Path(dataset) / "sequences").is_dir():
        for b in read_sequences(dataset, columns=["user_id", "item_ids"]).limit(
                cfg.max_sequences).iter_batches(batch_format="pyarrow", batch_size=8192):
            for u, seq in zip(b["user_id"].to_pylist(), b["item_ids"].to_pylist()):
                seq = np.asarray(seq, np.int64)
                keep = seq[np.isin(seq, item_ids)]
                if len(keep) >= 2:
                    users.append(u)
                    seqs.append(keep)
    return Sample(item_ids, x, pairs, np.asarray(users, np.int64), seqs)


# ----------------------------------------------------------------------------- run

def sweep(data: str | os.PathLike | None, out: str | os.PathLike, cfg: SweepConfig | None = None, *,
          resume: bool = False) -> dict:
    """Run (or resume) the sweep over dataset ``data`` (None: the config's ``data``) into
    ``out``; returns the report dict. Needs Ray."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = cfg or SweepConfig()
    if data is not None:
        cfg = dataclasses.replace(cfg, data=os.fspath(data))
    out = Path(out).resolve()
    if not cfg.data:
        raise ConfigError("data", "no dataset given (--data or data: in the config)")
    tune_dir = out / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir / cfg.name)):
        raise InputError(tune_dir / cfg.name, "no sweep to resume here")
    if not resume and (tune_dir / cfg.name).exists():
        raise InputError(out, "sweep already exists (pass --resume to continue it)")
    sample = load_sample(cfg.data, cfg)
    if len(sample.seqs) == 0:
        raise InputError(cfg.data, "no sequences with >= 2 sampled items: SID HitRate and GR need them")
    ref = [ray.put(sample)]  # in a list so Tune does not resolve it into every config
    trainable = tune.with_resources(
        tune.with_parameters(quantizer_trial, sample_ref=ref, base=to_dict(cfg.base),
                             hitrate_topk=cfg.hitrate_topk),
        {"cpu": cfg.cpus_per_trial})
    scheduler = (ASHAScheduler(time_attr="epoch", metric="raw_recon_mse", mode="min",
                               max_t=max(cfg.base.epochs, 1), grace_period=cfg.grace_period,
                               reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    if resume:
        tuner = tune.Tuner.restore(str(tune_dir / cfg.name), trainable, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable, param_space=tune_space(cfg.space),
            tune_config=tune.TuneConfig(num_samples=cfg.num_samples, scheduler=scheduler,
                                        max_concurrent_trials=cfg.max_concurrent),
            run_config=tune.RunConfig(name=cfg.name, storage_path=str(tune_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    grid = tuner.fit()
    rows = []
    for i, r in enumerate(grid):
        params = r.config
        if not params and r.path and (Path(r.path) / "params.json").is_file():
            params = json.loads((Path(r.path) / "params.json").read_text())  # errored trials
        name = Path(r.path).name if r.path else f"trial_{i}"
        rows.append(trial_row(name, {**to_dict(cfg.base), **(params or {})}, r.metrics, r.error,
                              r.checkpoint.path if r.checkpoint else None, cfg.trial_metrics))
    if any(r["status"] == "unfinished" for r in rows):
        # Ctrl+C: Tune saved its state and returned early (trials not yet generated are not
        # even in the grid); a report now would be partial.
        raise InputError(tune_dir / cfg.name, "sweep interrupted before it ended; rerun with --resume "
                                              "to continue it")
    _gr_stage(rows, sample, cfg)
    return write_report(rows, cfg, out)


def trial_row(name: str, params: dict, metrics: dict | None, error: BaseException | None,
              checkpoint: str | None, keys: tuple[str, ...]) -> dict:
    """One results-table row from what Tune kept of a trial (plain values, no Ray):
    its ``params`` and the ``keys`` (:attr:`SweepConfig.trial_metrics`) of its last report.

    ``status`` is one of: ``ok`` (ran to its end: its last report has the SID metrics,
    marked :data:`COMPLETE`, and its checkpoint the SIDs, kept as ``_sids``);
    ``stopped early`` (the scheduler ended it: the metrics of its last report, e.g.
    ``epoch`` and ``raw_recon_mse``, the others None); ``failed`` (``error``, no metrics);
    ``unfinished`` (neither: the sweep was interrupted before Tune ended it).
    """
    row = {"trial": name, **params}
    if error is not None:
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        return {**row, "status": "failed", "error": lines[-1][:300] if lines else type(error).__name__}
    m = metrics or {}
    complete = bool(m.get(COMPLETE))
    # Tune sets "done" on every trial it ends (finished or stopped by the scheduler).
    status = "ok" if complete else "stopped early" if m.get("done") else "unfinished"
    sids = os.path.join(checkpoint, "sids.npz") if complete and checkpoint else None
    return {**row, **{k: m.get(k) for k in keys}, "status": status, "_sids": sids}


def gr_candidates(rows: list[dict], cfg: SweepConfig) -> list[dict]:
    """The ``gr.top_k`` finished trials with saved SIDs, best ``select_metric`` first;
    a trial without a (finite) value of that metric is never ranked."""
    def ranked(r: dict) -> bool:
        v = r.get(cfg.select_metric)
        return r["status"] == "ok" and bool(r.get("_sids")) and v is not None and math.isfinite(v)

    done = sorted(filter(ranked, rows), key=lambda r: r[cfg.select_metric], reverse=cfg.select_mode == "max")
    return done[: cfg.gr.top_k]


def _gr_stage(rows: list[dict], sample: Sample, cfg: SweepConfig) -> None:
    """Train + evaluate a tiny GR model on :func:`gr_candidates` (Ray tasks)."""
    import ray

    picked = gr_candidates(rows, cfg)
    if not picked:
        return
    task = ray.remote(num_cpus=cfg.gr.cpus)(gr_trial)
    ref = ray.put(sample)
    results = ray.get([task.remote(r["_sids"], ref, cfg.gr, r.get("seed", 0)) for r in picked])
    for r, m in zip(picked, results):
        r.update(m)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (average ranks for ties); None if undefined."""
    import pandas as pd

    if len(a) < 3:
        return None
    rho = pd.Series(a).corr(pd.Series(b), method="spearman")
    return None if rho is None or math.isnan(rho) else float(rho)


def write_report(rows: list[dict], cfg: SweepConfig, out: Path) -> dict:
    """results.{csv,parquet}, best_config.yaml, report.{json,md}, scatter_<metric>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    # A metric no trial reached (e.g. every trial stopped early) is a NaN column, not text.
    df = df.astype({c: float for c in df.columns if df[c].dtype == object and df[c].isna().all()})
    df.to_csv(out / "results.csv", index=False)
    df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(out / "results.parquet")
    ok = df[df["status"] == "ok"] if "status" in df else df.iloc[:0]
    report: dict[str, Any] = {"trials": len(df), "finished": int(len(ok)),
                              "stopped_early": int((df["status"] == "stopped early").sum()),
                              # (no trial failed: the table has no error column)
                              "failed": df[df["status"] == "failed"].reindex(
                                  columns=["trial", "error"]).to_dict("records"),
                              "select_metric": cfg.select_metric, "gr_target": GR_TARGET,
                              "spearman": {}, "plots": []}
    ranked = ok[ok[cfg.select_metric].notna()] if cfg.select_metric in ok else ok.iloc[:0]
    if len(ranked):
        best = ranked.sort_values(cfg.select_metric, ascending=cfg.select_mode == "min").iloc[0]
        params = {f.name: _plain(best[f.name]) for f in dataclasses.fields(TrialParams)}
        (out / "best_config.yaml").write_text(
            f"# best trial {best['trial']} by {cfg.select_metric} ({cfg.select_mode})\n"
            + yaml.safe_dump({"base": params}, sort_keys=False))
        report["best"] = {"trial": best["trial"], cfg.select_metric: _plain(best[cfg.select_metric]),
                          "params": params}
    scored = ok[ok[GR_TARGET].notna()] if GR_TARGET in ok else ok.iloc[:0]
    for metric in cfg.sid_metrics:
        if not len(scored):
            break
        x, y = scored[metric].astype(float).to_numpy(), scored[GR_TARGET].astype(float).to_numpy()
        report["spearman"][metric] = spearman(x, y)
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.scatter(x, y)
        rho = report["spearman"][metric]
        ax.set(xlabel=metric, ylabel=GR_TARGET,
               title=f"Spearman {rho:+.2f} (n={len(x)})" if rho is not None else f"n={len(x)}")
        fig.tight_layout()
        fig.savefig(out / f"scatter_{metric}.png", dpi=80)
        plt.close(fig)
        report["plots"].append(f"scatter_{metric}.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    (out / "report.md").write_text(_markdown(report, df, cfg.sid_metrics))
    return report


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _cell(v) -> str:
    """A Markdown table cell: a metric the trial never reached (NaN) shows as '-'."""
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _markdown(report: dict, df, sid_metrics: tuple[str, ...]) -> str:
    lines = ["# Sweep report\n", f"{report['trials']} trials: {report['finished']} finished, "
             f"{report['stopped_early']} stopped early by the scheduler (metrics of their last "
             f"epoch), {len(report['failed'])} failed.\n"]
    if report.get("best"):
        lines.append(f"Best by {report['select_metric']}: {report['best']['trial']} "
                     f"({report['best'][report['select_metric']]:.4f}).\n")
    if report["spearman"]:
        lines += [f"## Spearman correlation with {report['gr_target']}\n", "| SID metric | rho |", "|---|---|"]
        lines += [f"| {m} | {'n/a' if r is None else f'{r:+.3f}'} |" for m, r in report["spearman"].items()]
        lines.append("")
    if report["failed"]:
        lines += ["## Failed trials\n"] + [f"- {f['trial']}: {f['error']}" for f in report["failed"]] + [""]
    cols = [c for c in ("trial", "status", "quantizer", "codebook_size", "collision", *sid_metrics,
                        GR_TARGET, "pop_recall@10") if c in df]
    lines += ["## Trials\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"
