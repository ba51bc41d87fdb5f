"""Benchmark our DPO training step against Hugging Face TRL's DPOTrainer on the same work.

The same model shape as ../shared/bench/trl_dpo_bench.py (a GPT-2 of 6 layers, 6 heads, width
384, vocab 50257, context 256, random weights, a frozen reference), the same synthetic pairs
(imported from ../shared/bench/synth_prefs.py), batch 8, float32, CPU, one thread, 12 optimizer
steps of which the first 2 are warm-up. It prints one JSON line, counted as TRL's is: non-pad
tokens per second of the 2B rows, median seconds per optimizer step, peak RSS; and the model
FLOPs per token with the fraction of the machine's measured float32 matmul throughput they
reach (on a GPU this would be MFU; this benchmark runs on the CPU).

    python bench.py                                   # our step, the reference run every step
    python bench.py --ref-logps precompute            # reference log-probs computed beforehand
    python bench.py --shots 8                         # long prompts, short completions
    python bench.py --vs-trl /tmp/trl-venv/bin/python --rounds 2   # alternate with TRL, a table
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from data import collate
from model import GPT, GPTConfig
from train import (TrainConfig, forward_backward, frozen_copy, make_optimizer, optimizer_step,
                   reference_train_logps)

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shots", type=int, default=0, help="solved examples before each prompt")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the figures")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ref-logps", choices=("every-step", "precompute"), default="every-step")
    p.add_argument("--full-logits", action="store_true", help="logits at every position (a lever off)")
    p.add_argument("--unfused-adamw", action="store_true", help="torch's default AdamW (a lever off)")
    p.add_argument("--synth", default=os.path.join(HERE, "..", "shared", "bench"),
                   help="folder of synth_prefs.py (and trl_dpo_bench.py)")
    p.add_argument("--vs-trl", default="", help="python of a venv with TRL: alternate the two")
    p.add_argument("--rounds", type=int, default=1, help="with --vs-trl: runs of each side")
    return p.parse_args(argv)


def matmul_flops_per_s(n=1024, repeats=5):
    """The machine's float32 matmul throughput on this thread count: the best of a few n^3 GEMMs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def model_flops_per_step(config, pairs, ref_every_step):
    """The FLOPs a training step needs, counting matmuls: 6 per weight per token for the policy's
    forward and backward through the blocks, plus attention's 12 * L * T * C per token; the
    vocabulary head (V * C weights) only at completion tokens, the only logits the loss uses; and
    a third of all that again for the reference's forward when it runs every step."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    flops = 0
    for p, c, r in pairs:
        for n_completion in (len(c), len(r)):
            T = len(p) + n_completion
            flops += 6 * (12 * L * C * C * T + V * C * n_completion) + 12 * L * T * T * C
    return flops * (4 / 3 if ref_every_step else 1)


def run_ours(args):
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.synth)
    import synth_prefs
    torch.manual_seed(0)
    config = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50257)
    policy = GPT(config)
    ref = frozen_copy(policy)
    raw = synth_prefs.make_pairs(args.steps * args.batch, seed=0, digits=2, shots=args.shots)
    pairs = [tuple(t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
             for t in map(synth_prefs.tokenize_pair, raw)]
    cfg = TrainConfig(loss="dpo", beta=0.1, lr=1e-5, grad_clip=1.0, batch_size=args.batch,
                      full_logits=args.full_logits, out=tempfile.mkdtemp(prefix="dpop_bench_"))
    ctx, device = nullcontext(), torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = make_optimizer(policy, cfg, device, fused=not args.unfused_adamw)
    precompute_s = 0.0
    table = None
    if args.ref_logps == "precompute":
        t0 = time.perf_counter()
        pad = SimpleNamespace(eot_token=synth_prefs.PAD_ID)  # all that the pass needs of a tokenizer
        table = reference_train_logps(ref, pairs, cfg, pad, ctx, device)
        precompute_s = time.perf_counter() - t0
        ref = None  # freed: training needs only the table
    step_s, tokens = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        ids = list(range(step * args.batch, (step + 1) * args.batch))
        batch = collate([pairs[i] for i in ids], synth_prefs.PAD_ID)
        ref_logps = None if table is None else [table[ids].unbind(1)]
        stats = forward_backward(policy, ref, [batch], cfg, ctx, scaler, ref_logps)
        optimizer_step(policy, optimizer, scaler, cfg, stats["loss"])
        step_s.append(time.perf_counter() - t0)
        tokens.append(sum(2 * len(p) + len(c) + len(r) for p, c, r in (pairs[i] for i in ids)))
    steady_s, steady_tokens = sum(step_s[args.warmup:]), sum(tokens[args.warmup:])
    mean_len = statistics.mean(len(p) + len(c) for p, c, _ in pairs)
    tokens_per_s = steady_tokens / steady_s
    flops = model_flops_per_step(config, pairs, args.ref_logps == "every-step") / sum(tokens)
    peak = matmul_flops_per_s()
    return {"harness": "dpop bench.py", "shots": args.shots, "ref_logps": args.ref_logps,
            "full_logits": args.full_logits, "fused_adamw": not args.unfused_adamw, "threads": args.threads, "params": policy.num_params(),
            "seq_len_mean": round(mean_len, 1), "steady_tokens_per_s": round(tokens_per_s, 1),
            "steady_step_s_median": round(statistics.median(step_s[args.warmup:]), 4),
            "precompute_s": round(precompute_s, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "model_flops_per_token": round(flops), "matmul_gflops": round(peak / 1e9, 2),
            "fraction_of_matmul_peak": round(flops * tokens_per_s / peak, 3),
            "loss_last": round(stats["loss"], 4)}


def vs_trl(args):
    """Alternate TRL's harness and ours, each in a fresh process; print a Markdown table."""
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--threads", str(args.threads), "--shots", str(args.shots)]
    sides = {"TRL DPOTrainer": [args.vs_trl, os.path.join(args.synth, "trl_dpo_bench.py"), *common],
             "dpop, reference every step": [sys.executable, __file__, *common, "--synth", args.synth],
             "dpop, precomputed reference": [sys.executable, __file__, *common, "--synth", args.synth,
                                             "--ref-logps", "precompute"]}
    results = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, cmd in sides.items():
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            timing, memory = row.get("timing", row), row.get("memory", row)
            results[name].append((timing["steady_tokens_per_s"], timing["steady_step_s_median"],
                                  memory["peak_rss_mib"]))
    trl_tok, _, trl_rss = (statistics.median(r[i] for r in results["TRL DPOTrainer"]) for i in range(3))
    print(f"shots {args.shots}, batch {args.batch}, {args.threads} thread(s), {args.rounds} "
          f"round(s), medians")
    print("| harness | non-pad tokens/s | s per step | peak RSS (MiB) | tokens/s vs TRL | RSS vs TRL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        tok, step, rss = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"| {name} | {tok:.1f} | {step:.3f} | {rss:.0f} | {tok / trl_tok:.2f}x | {rss / trl_rss:.2f}x |")


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(os.path.join(args.synth, "synth_prefs.py")):
        sys.exit(f"error: {args.synth}: no synth_prefs.py there; pass --synth FOLDER")
    if args.vs_trl:
        vs_trl(args)
    else:
        print(json.dumps(run_ours(args)), flush=True)


if __name__ == "__main__":
    main()
