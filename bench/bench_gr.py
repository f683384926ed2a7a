"""GR benchmark: decoding queries/s and training tokens/s, each against a baseline in the same run.

Decoding (in this process, the code every eval-gr actor runs): the TIGER-shaped T5
(``--preset``) over random 3-level SIDs, queries of ``--history`` items.

1. forge_ray's trie-constrained, batched, KV-cached beam search (``generate_sids``);
2. Hugging Face ``generate`` with the same beams, unconstrained (FORGE's reference
   decoding), same batch;
3. forge_ray's beam search with batch size 1 (FORGE's reference predicts one query
   at a time).

Training: optimizer-step tokens/s of ``train-gr``'s Ray Train + DeepSpeed path, one
run per ``--layouts`` entry (workers x torch threads per worker, DeepSpeed JSON), vs a
plain single-process AdamW loop (gradient clipping as DeepSpeed's) over the same
examples, model and global batch. Both sides are the median of per-step rates after
the first ``--warmup`` steps (the Ray side: the windows rank 0 logs with
``train.log_every=1``, Ray Data streaming and the all-reduces included; cluster and
worker start-up, the first batches and the final checkpoint are not), and, beside
it, the share of those steps rank 0 spent waiting for its data (``train/data_wait``).

    python bench/bench_gr.py                 # a few minutes on 2 cores
    python bench/bench_gr.py --quick
    python bench/bench_gr.py --skip-decode --steps 120 --layouts 2x1:zero2.json 2x1:zero1.json 1x2:zero1.json
No GPU on the development machine: all numbers are CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def decode_bench(args) -> None:
    from forge_ray.core.gr.data import history_input_ids
    from forge_ray.core.gr.decoding import generate_sids, hf_generate_unconstrained
    from forge_ray.core.gr.models import GRModelConfig, build_model
    from forge_ray.core.gr.trie import SIDTrie
    from forge_ray.core.gr.vocab import SIDVocab

    rng = np.random.default_rng(0)
    sizes = (256, 256, 256)
    vocab = SIDVocab(sizes)
    codes = rng.integers(0, 256, size=(args.items, 3))
    trie = SIDTrie(codes, np.arange(args.items), sizes)
    torch.manual_seed(0)
    model = build_model(GRModelConfig("t5", args.preset), vocab).eval()
    hist = [codes[rng.integers(0, args.items, args.history)] for _ in range(args.queries)]
    prompts = list(history_input_ids(hist, vocab))

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return args.queries / (time.perf_counter() - t0)

    b = args.batch
    ours = timed(lambda: [generate_sids(model, vocab, trie, prompts[i: i + b], args.beams)
                          for i in range(0, args.queries, b)])
    hf = timed(lambda: [hf_generate_unconstrained(model, vocab, prompts[i: i + b], args.beams)
                        for i in range(0, args.queries, b)])
    one = timed(lambda: [generate_sids(model, vocab, trie, prompts[i: i + 1], args.beams)
                         for i in range(args.queries)])
    print(f"decoding {args.queries} queries, {args.beams} beams, batch {b}, T5 {args.preset}, "
          f"{args.items:,} items, {torch.get_num_threads()} torch threads")
    print(f"  constrained batched : {ours:8.1f} queries/s")
    print(f"  HF generate (no trie): {hf:8.1f} queries/s   ratio ours/HF = {ours / hf:.2f}")
    print(f"  constrained batch 1 : {one:8.1f} queries/s   ratio batched/batch-1 = {ours / one:.2f}")


def ray_train_rate(ds, sids, tmp: Path, args, layout: str) -> tuple[float, float]:
    """(median tokens/s, median data-wait share) of ``train_gr``'s steps after the first
    ``args.warmup`` for ``layout`` = WORKERSxTHREADS:DEEPSPEED_JSON, as rank 0 logs them."""
    import ray

    from forge_ray.config import load_config
    from forge_ray.distributed.train_gr import TrainGRConfig, train_gr

    shape, ds_json = layout.split(":")
    workers, threads = (int(v) for v in shape.split("x"))
    cfg = load_config(TrainGRConfig, "configs/ci/train_gr.yaml", [
        f"model.preset={args.preset}", f"train.max_steps={args.steps}", "train.epochs=100",
        f"train.eval_every={args.steps}", "train.log_every=1", "train.valid_beams=0",
        "train.early_stop_metric=valid_loss", f"scale.num_workers={workers}",
        f"train.micro_batch={args.global_batch // workers}", f"scale.checkpoint_every={args.steps}",
        f"scale.deepspeed_config={ds_json}", f"scale.torch_threads={threads}",
        f"scale.cpus_per_worker={min(1.0, 1.0 / workers)}"])
    out = tmp / layout.replace(":", "_")
    ray.init(address="local", num_cpus=2 * max(2, workers), include_dashboard=False)
    try:
        train_gr(ds, sids, out, cfg)
    finally:
        ray.shutdown()
    logged = [json.loads(x) for x in (Path(f"{out}.runs") / "train_gr" / "logs" / "metrics.jsonl")
              .read_text().splitlines() if "train/tokens_per_s" in x][args.warmup:]
    return (float(np.median([r["train/tokens_per_s"] for r in logged])),
            float(np.median([r["train/data_wait"] for r in logged])))


def train_bench(args) -> None:
    from forge_ray.config import load_config
    from forge_ray.core.gr.data import ItemSIDTable, build_examples, collate_seq2seq
    from forge_ray.core.gr.models import build_model
    from forge_ray.core.gr.vocab import SIDVocab
    from forge_ray.distributed.train_gr import TrainGRConfig
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ray"))
    from test_train_gr import build_gr_data  # the tests' learnable toy data

    tmp = Path(tempfile.mkdtemp(prefix="bench_gr_"))
    try:
        ds, sids, items, codes, users, seqs = build_gr_data(tmp, n_items=48, n_users=args.users)
        rates = {layout: ray_train_rate(ds, sids, tmp, args, layout) for layout in args.layouts}

        cfg = load_config(TrainGRConfig, "configs/ci/train_gr.yaml", [f"model.preset={args.preset}"])
        vocab = SIDVocab((4, 4, 4))
        ex, _ = build_examples(users, seqs, ItemSIDTable(items, codes), vocab, "train", 5)
        model = build_model(cfg.model, vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        per_step = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            idx = np.random.default_rng(step).integers(0, len(ex["labels"]), args.global_batch)
            b = collate_seq2seq([ex["input_ids"][i] for i in idx], [ex["labels"][i] for i in idx], vocab)
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as DeepSpeed's gradient_clipping
            opt.step()
            per_step.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t0))
        plain = float(np.median(per_step[args.warmup:]))
        print(f"training T5 {args.preset}, global batch {args.global_batch}, {args.steps} steps, "
              f"median of the steps after the first {args.warmup}")
        print(f"  plain single-process loop ({torch.get_num_threads()} threads): {plain:10.0f} tokens/s")
        for layout, (rate, wait) in rates.items():
            print(f"  Ray Train + DeepSpeed {layout:18s}: {rate:10.0f} tokens/s   ratio Ray/plain = "
                  f"{rate / plain:.2f}   waiting for data {wait:.0%} (WORKERSxTHREADS:JSON)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiger")
    p.add_argument("--items", type=int, default=12_000)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--queries", type=int, default=128)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--global-batch", type=int, default=64, help="examples per optimizer step")
    p.add_argument("--warmup", type=int, default=5, help="training steps left out of the medians")
    p.add_argument("--layouts", nargs="+", default=["2x1:zero2.json"],
                   help="Ray Train layouts WORKERSxTHREADS:DEEPSPEED_JSON (cluster/deepspeed/), e.g. "
                        "2x1:zero2.json 2x1:zero1.json 1x2:zero1.json")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="32 queries, 10 training steps")
    args = p.parse_args()
    if args.quick:
        args.queries, args.steps = 32, 10
    if not args.skip_decode:
        decode_bench(args)
    if not args.skip_train:
        train_bench(args)


if __name__ == "__main__":
    main()
