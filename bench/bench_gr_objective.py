"""Whole-sequence vs sliding-window training of a decoder-only GR model: targets/s, same run.

Both arms train the same Qwen2 model (``--hidden``/``--layers``) from the same
initial weights on the same users for the same wall-clock budget, in this process:

1. sliding windows (``data.train_examples: windows``): one example per target, the
   prompt is the target's history, the loss is on the target's L SID tokens;
2. whole sequences (``data.train_examples: sequences``): one example per chunk of up
   to ``max_history + 1`` items, the loss on every item after the first.

It prints the targets (items predicted, with loss) per second of each and the ratio.
The data are synthetic users shaped like Amazon Beauty (5-25 items, most short) over
a 4-level SID vocabulary (3 x 256 + a suffix of 12).

    python bench/bench_gr_objective.py               # about 2 minutes on 2 cores
    python bench/bench_gr_objective.py --seconds 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    from forge_ray.core.gr.data import (IGNORE, ItemSIDTable, build_examples, build_sequence_examples,
                                        collate_causal, collate_sequences, prompt_eos)
    from forge_ray.core.gr.models import GRModelConfig, build_model
    from forge_ray.core.gr.vocab import SIDVocab

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--items", type=int, default=12_000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="examples per step, each arm")
    p.add_argument("--seconds", type=float, default=45.0, help="training time per arm")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    vocab = SIDVocab((256, 256, 256, 12))
    table = ItemSIDTable(np.arange(args.items), np.stack(
        [rng.integers(0, 256, args.items), rng.integers(0, 256, args.items),
         rng.integers(0, 256, args.items), rng.integers(0, 12, args.items)], 1))
    lengths = np.minimum(5 + rng.geometric(0.2, args.users), 25)  # Beauty: mean ~9, >= 5
    users = np.arange(args.users)
    seqs = [rng.integers(0, args.items, n) for n in lengths]
    windows, _ = build_examples(users, seqs, table, vocab, "train", 20, add_eos=prompt_eos(False))
    chunks, _ = build_sequence_examples(users, seqs, table, vocab, 20)
    arms = {"sliding windows": (windows, collate_causal), "whole sequences": (chunks, collate_sequences)}
    cfg = GRModelConfig("qwen2", "tiny", overrides=dict(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4))
    print(f"{args.users:,} users: {len(windows['labels']):,} windows, {len(chunks['labels']):,} chunks; "
          f"Qwen2 hidden {args.hidden} x {args.layers} layers, batch {args.batch}, "
          f"{args.seconds:.0f} s per arm, {torch.get_num_threads()} torch threads")
    rates = {}
    for name, (ex, collate) in arms.items():
        torch.manual_seed(0)
        model = build_model(cfg, vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        order = np.random.default_rng(1).permutation(len(ex["labels"]))
        targets, steps, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            idx = order[(steps * args.batch) % len(order):][: args.batch]
            b = collate([ex["input_ids"][i] for i in idx], [ex["labels"][i] for i in idx], vocab)
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            targets += int((b["labels"] != IGNORE).sum()) // vocab.n_levels
            steps += 1
        rates[name] = targets / (time.perf_counter() - t0)
        print(f"  {name:16s}: {rates[name]:9.0f} targets/s ({steps} steps, last loss {float(loss):.3f})")
    ratio = rates["whole sequences"] / rates["sliding windows"]
    print(f"  ratio whole sequences / sliding windows = {ratio:.2f}")


if __name__ == "__main__":
    main()
