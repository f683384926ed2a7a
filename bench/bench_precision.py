"""Benchmark of ``scale.autocast=bf16``: a GR training step in float32 and under bfloat16
autocast, side by side in one process, plus the machine's float32 and bf16 matmul rates.

One step is forward + backward of the model train-gr builds (``--arch`` / ``--preset``,
the SID vocabulary of ``--sizes``) on a batch of ``--batch`` random sequences of
``--length`` tokens, the forward under ``torch.autocast`` when bf16 (as train-gr's
worker does; weights and gradients stay float32). The two precisions alternate for
``--rounds`` rounds of ``--steps`` steps; the medians of the rounds are compared. The
loss difference of the two on the same batch is printed too (same weights).

    python bench/bench_precision.py                    # Amazon causal decoder, 1 thread
    python bench/bench_precision.py --arch t5 --preset tiger --length 80

bf16 only pays where the CPU has bf16 matrix units (Intel AMX, Sapphire Rapids and
later; the flags ``amx_bf16``/``avx512_bf16`` in /proc/cpuinfo); elsewhere torch
emulates it and the ratio falls below 1.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from forge_ray.core.gr.models import GRModelConfig, build_model
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.distributed.train_common import autocast

from peak import matmul_gflops  # bench/peak.py: a script's own folder is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="qwen2")
    p.add_argument("--preset", default="small")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 256, 256, 8])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=81, help="tokens per sequence (Beauty: 20 items x 4 + eos)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = SIDVocab(tuple(args.sizes))
    model = build_model(GRModelConfig(arch=args.arch, preset=args.preset), vocab).train()
    ids = torch.randint(5, len(vocab), (args.batch, args.length))
    batch = ({"input_ids": ids, "decoder_input_ids": ids, "labels": ids} if args.arch == "t5"
             else {"input_ids": ids, "labels": ids})

    def step(mode: str) -> float:
        with autocast(mode):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    torch.manual_seed(1)
    loss32 = step("none")
    torch.manual_seed(1)  # the same dropout masks: the difference is the precision's
    loss16 = step("bf16")
    ms: dict[str, list[float]] = {"none": [], "bf16": []}
    for _ in range(args.rounds):
        for mode in ms:
            step(mode)  # one untimed step per round: kernel selection, caches
            start = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            ms[mode].append((time.perf_counter() - start) / args.steps * 1e3)
    f32, b16 = (float(np.median(ms[m])) for m in ("none", "bf16"))
    tokens = args.batch * args.length
    print(f"{args.arch} {args.preset}, batch {args.batch} x {args.length} tokens, {args.threads} thread(s), "
          f"median of {args.rounds} alternating rounds of {args.steps} steps")
    print(f"  matmul 1024^2: float32 {matmul_gflops(1024, 10, torch.float32):7.1f} GFLOP/s, "
          f"bfloat16 {matmul_gflops(1024, 10, torch.bfloat16):7.1f} GFLOP/s")
    print(f"  step, float32          : {f32:8.1f} ms  ({tokens / f32 * 1e3:9,.0f} tokens/s)")
    print(f"  step, bf16 autocast    : {b16:8.1f} ms  ({tokens / b16 * 1e3:9,.0f} tokens/s)  "
          f"speed-up {f32 / b16:.2f}x")
    print(f"  loss on one batch      : float32 {loss32:.5f}, bf16 {loss16:.5f} (diff {loss16 - loss32:+.5f})")


if __name__ == "__main__":
    main()
