"""GR benchmark: decoding queries/s and training tokens/s, each against a baseline in the same run.

Decoding (in this process, the code every eval-gr actor runs): the TIGER-shaped T5
(``--preset``) over random 3-level SIDs, queries of ``--history`` items.

1. forge_ray's trie-constrained, batched, KV-cached beam search (``generate_sids``);
2. Hugging Face ``generate`` with the same beams, unconstrained (FORGE's reference
   decoding), same batch;
3. forge_ray's beam search with batch size 1 (FORGE's reference predicts one query
   at a time).

Training: optimizer-step tokens/s of ``train-gr``'s Ray Train + DeepSpeed path
(``--workers`` gloo workers, streamed Ray Data shard) vs a plain single-process
AdamW loop over the same examples and model. The Ray figure includes Ray Data
streaming and the all-reduce; startup is excluded (timed from the worker's first to
last logged step, tokens per second as logged by rank 0).

    python bench/bench_gr.py                 # a few minutes on 2 cores
    python bench/bench_gr.py --quick
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


def train_bench(args) -> None:
    import ray

    from forge_ray.config import load_config
    from forge_ray.core.gr.data import ItemSIDTable, build_examples, collate_seq2seq
    from forge_ray.core.gr.models import build_model
    from forge_ray.core.gr.vocab import SIDVocab
    from forge_ray.distributed.train_gr import TrainGRConfig, train_gr
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "ray"))
    from test_train_gr import build_gr_data  # the tests' learnable toy data

    tmp = Path(tempfile.mkdtemp(prefix="bench_gr_"))
    try:
        ds, sids, items, codes, users, seqs = build_gr_data(tmp, n_items=48, n_users=args.users)
        cfg = load_config(TrainGRConfig, "configs/ci/train_gr.yaml", [
            f"model.preset={args.preset}", f"train.max_steps={args.steps}", "train.epochs=100",
            f"train.eval_every={args.steps}", "train.log_every=1", "train.valid_beams=0",
            "train.early_stop_metric=valid_loss", f"scale.num_workers={args.workers}",
            f"train.micro_batch={args.micro_batch}", f"scale.checkpoint_every={args.steps}"])
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        train_gr(ds, sids, tmp / "model", cfg)
        ray.shutdown()
        logged = [json.loads(x) for x in (tmp / "model.runs" / "train_gr" / "logs" / "metrics.jsonl")
                  .read_text().splitlines() if "train/tokens_per_s" in x]
        ray_rate = logged[-1]["train/tokens_per_s"]

        vocab = SIDVocab((4, 4, 4))
        ex, _ = build_examples(users, seqs, ItemSIDTable(items, codes), vocab, "train", 5)
        model = build_model(cfg.model, vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        mb = args.micro_batch * args.workers  # same global batch
        tokens, t0 = 0, time.perf_counter()
        for step in range(args.steps):
            idx = np.random.default_rng(step).integers(0, len(ex["labels"]), mb)
            b = collate_seq2seq([ex["input_ids"][i] for i in idx], [ex["labels"][i] for i in idx], vocab)
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            tokens += int(b["attention_mask"].sum())
        plain = tokens / (time.perf_counter() - t0)
        print(f"training T5 {args.preset}, global batch {mb}, {args.steps} steps")
        print(f"  Ray Train + DeepSpeed ({args.workers} workers): {ray_rate:10.0f} tokens/s "
              "(includes Ray Data streaming and stalls)")
        print(f"  plain single-process loop            : {plain:10.0f} tokens/s   "
              f"ratio Ray/plain = {ray_rate / plain:.2f}")
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
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="32 queries, 10 training steps")
    args = p.parse_args()
    if args.quick:
        args.queries, args.steps = 32, 10
    decode_bench(args)
    if not args.skip_train:
        train_bench(args)


if __name__ == "__main__":
    main()
