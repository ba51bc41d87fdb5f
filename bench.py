"""Benchmark our DPO training step against Hugging Face TRL's DPOTrainer on the same work.

The same model shape as ../shared/bench/trl_dpo_bench.py (a GPT-2 of 6 layers, 6 heads, width
384, vocab 50257, context 256, random weights, a frozen reference), the same synthetic pairs
(imported from ../shared/bench/synth_prefs.py), batch 8, float32, CPU, one thread, 12 optimizer
steps of which the first 2 are warm-up. It prints one JSON line, counted as TRL's is: non-pad
tokens per second of the 2B rows, median seconds per optimizer step, peak RSS; and the model
FLOPs per token with the fraction of the machine's measured matmul throughput they reach. On a
GPU (--device cuda) that fraction is the MFU against the card's measured bf16 matmul throughput,
and the peak GPU memory is printed too.

    python bench.py                                   # our step, the reference run every step
    python bench.py --ref-logps precompute            # reference log-probs computed beforehand
    python bench.py --shots 8                         # long prompts, short completions
    python bench.py --prompt-tokens 120               # prompts of exactly 120 tokens
    python bench.py --profile /tmp/prof.txt           # and a table of the top ops of 3 more steps
    python bench.py --share-prompt                    # one packed row per pair: prompts read once
    python bench.py --vs-trl /tmp/trl-venv/bin/python --rounds 2   # alternate with TRL, a table
    python bench.py --device cuda --dtype bfloat16 --model gpt2 --batch 32 --shots 8   # a GPU
    python bench.py --demo sft                        # the demo's SFT step: its model, data, batch
    python bench.py --demo dpop --profile /tmp/p.txt  # the demo's DPOP step, and where its time goes
    bash .ci/gpu_mfu.sh                               # GPT-2 shapes, rows of 512 and 1024 tokens

Rows of a chosen length: --prompt-tokens N puts enough solved examples before each question that
every prompt is longer than N, then cuts each prompt to its last N tokens (the cut may fall inside
an example: the weights are random, so only the shape matters). Rows (prompt + completion) are
then N + 4 or N + 5 tokens, and --share-prompt's packed rows N + 6 to N + 8. --profile FILE runs
3 more steps under torch.profiler after the timed ones and writes the 25 ops that took the most
self CUDA time (self CPU time on a CPU) to FILE, a text table.
"""
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

from data import DataError, batch_indices, collate, load_tokenizer, tokenize_splits
from extras import flops
from extras.config import (ArgumentParser, HelpFormatter, check_compiler, check_device, check_python,
                           check_ranges)
from extras.splits import run_splits
from extras.speedups import (collate_shared, manual_attention, reference_train_logps,
                             sparse_embedding_grad, to_device)
from model import GPT, GPTConfig
from train import TrainConfig, all_pair_logps, batch_loss, frozen_copy, make_optimizer, optimizer_step

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    usage = __doc__.split("\n\nRows of")[0]  # the first paragraphs and the examples
    p = ArgumentParser(description=usage, formatter_class=HelpFormatter)  # a bad flag: one error line
    work = p.add_argument_group("the work: what one timed step trains")
    work.add_argument("--model", default="bench", choices=("bench", "gpt2"),
                      help="bench: the TRL harness's 6x6x384 shape; gpt2: GPT-2 124M's 12x12x768")
    work.add_argument("--demo", choices=("sft", "dpop"), default="",
                      help="instead: the demo's model (train.py's defaults, random weights), its data in its "
                           "order and its batch, training its SFT step or its DPOP step (DPO's costs the same)")
    work.add_argument("--batch", type=int, default=None, help="pairs per optimizer step (default: 8; --demo: "
                                                              "the stage's, 64 or 32)")
    work.add_argument("--shots", type=int, default=0, help="solved examples before each prompt (long prompts)")
    work.add_argument("--prompt-tokens", type=int, default=0, metavar="N",
                      help="instead of --shots: prompts of exactly N tokens (enough solved examples, "
                           "then each prompt cut to its last N tokens), rows of N + 4 or N + 5")
    work.add_argument("--steps", type=int, default=12, help="optimizer steps, the warm-up ones included")
    work.add_argument("--warmup", type=int, default=2, help="leading steps left out of the figures")
    work.add_argument("--synth", default=os.path.join(HERE, "..", "shared", "bench"),
                      help="folder of the harness's synth_prefs.py (and trl_dpo_bench.py)")
    levers = p.add_argument_group("speed levers: each computes the same step, one on or off")
    levers.add_argument("--ref-logps", choices=("every-step", "precompute"), default="every-step",
                        help="the reference's log-probs: a forward pass every step, or computed beforehand")
    levers.add_argument("--share-prompt", action="store_true", help="one packed row per pair (a lever on)")
    levers.add_argument("--full-logits", action="store_true", help="logits at every position (a lever off)")
    levers.add_argument("--unfused-adamw", action="store_true", help="torch's default AdamW (a lever off)")
    levers.add_argument("--manual-attention", action="store_true",
                        help="textbook attention instead of torch's SDPA (a lever off)")
    levers.add_argument("--dense-embedding-grad", action="store_true",
                        help="wte's lookup gradient dense, not sparse (a lever off)")
    levers.add_argument("--compile", action="store_true", help="torch.compile the policy")
    machine = p.add_argument_group("the machine")
    machine.add_argument("--device", default="cpu", help="cpu or cuda")
    machine.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                         help="autocast dtype (float16 adds a GradScaler)")
    machine.add_argument("--threads", type=int, default=None,
                         help="CPU threads (torch.set_num_threads; default 1, --demo: torch's default, as train.py)")
    compare = p.add_argument_group("against TRL, and a profile")
    compare.add_argument("--vs-trl", default="", metavar="PYTHON",
                         help="the python of a virtual environment with TRL: alternate our step and "
                              "TRL's on the same work, and print a table (docs/performance.md)")
    compare.add_argument("--rounds", type=int, default=1, help="with --vs-trl: runs of each side")
    compare.add_argument("--profile", default="", metavar="FILE",
                         help="after the timed steps, profile 3 more (the first 3 batches again) with "
                              "torch.profiler; write the top 25 ops by self CUDA time (self CPU time on "
                              "a CPU) to FILE")
    args = p.parse_args(argv)
    if args.prompt_tokens and args.shots:
        p.error("--prompt-tokens chooses the number of shots: pass one of the two")
    if args.prompt_tokens and args.vs_trl:
        p.error("--prompt-tokens: TRL's harness takes only --shots")
    if args.demo and (args.vs_trl or args.shots or args.prompt_tokens or args.model != "bench"):
        p.error("--demo trains the demo's own model and data: drop --vs-trl, --shots, --prompt-tokens and --model")
    if args.threads is None:
        args.threads = torch.get_num_threads() if args.demo else 1
    if args.batch is None and not args.demo:  # --demo takes its stage's batch from train.py
        args.batch = 8
    try:  # every flag up front, by its own name: not after a run, nor as a traceback
        check_ranges(vars(args), {"batch": "positive", "shots": "zero or positive", "prompt_tokens": "zero or positive",
                                  "steps": "positive", "warmup": "zero or positive", "threads": "positive",
                                  "rounds": "positive"})
        if args.warmup >= args.steps:
            raise DataError(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}; "
                            f"give --steps more than --warmup")
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            raise DataError(f"--device {args.device}: choose cpu or cuda")
        check_device(args.device)
        if args.compile:
            check_compiler()
        if args.vs_trl:
            check_python(args.vs_trl, "--vs-trl")
    except DataError as e:
        p.error(str(e))
    return args


SHOT_MIN_TOKENS = 16  # the shortest solved example, "Q: 12+34= A: 46\n", in byte tokens


def synthetic_pairs(synth_prefs, n, shots, prompt_tokens):
    """n tokenized (prompt, chosen, rejected) pairs from synth_prefs, with shots solved examples
    before each question; with prompt_tokens, enough of them that every prompt is longer, and
    then each prompt cut to its last prompt_tokens tokens. Returns (pairs, shots)."""
    if prompt_tokens:
        shots = -(-prompt_tokens // SHOT_MIN_TOKENS)  # rounded up; the question adds a dozen more
    raw = synth_prefs.make_pairs(n, seed=0, digits=2, shots=shots)
    pairs = [tuple(t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
             for t in map(synth_prefs.tokenize_pair, raw)]
    if prompt_tokens:
        pairs = [(p[-prompt_tokens:], c, r) for p, c, r in pairs]
    return pairs, shots


def profile_steps(path, title, device, step, n=3):
    """Run step(i) for i < n under torch.profiler and write the 25 ops with the most self CUDA
    time (self CPU time on a CPU) to path, as key_averages' text table under a title line."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(n):
            step(i)
        flops.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"{title}; {n} steps, sorted by {key}\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")


def harness_work(args):
    """TRL's harness: its model shape (or GPT-2's), its synthetic pairs, DPO at batch args.batch.
    Returns (GPTConfig, pairs in step order, shots, pad id, TrainConfig)."""
    sys.path.insert(0, args.synth)
    import synth_prefs
    shape = dict(n_layer=6, n_head=6, n_embd=384, block_size=256) if args.model == "bench" else \
        dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    pairs, shots = synthetic_pairs(synth_prefs, args.steps * args.batch, args.shots, args.prompt_tokens)
    cfg = TrainConfig(loss="dpo", beta=0.1, lr=1e-5, grad_clip=1.0, batch_size=args.batch,
                      full_logits=args.full_logits, out=tempfile.mkdtemp(prefix="dpop_bench_"))
    return GPTConfig(vocab_size=50257, **shape), pairs, shots, synth_prefs.PAD_ID, cfg


def demo_work(args):
    """The demo's stage: train.py's default model, the built-in pairs in the order its run reads
    them (seed 1337), its batch and loss. Random weights: the shape is what costs."""
    import train
    cfg = train.resolve(TrainConfig(loss=args.demo, batch_size=args.batch, full_logits=args.full_logits,
                                    out=tempfile.mkdtemp(prefix="dpop_bench_")))
    enc = load_tokenizer(cfg.tokenizer)
    train_pairs = tokenize_splits(run_splits(cfg.data, ""), enc, cfg.block_size, cfg.data)[0]
    order = [i for step in range(args.steps) for i in batch_indices(len(train_pairs), cfg.batch_size, step, cfg.seed)]
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd)
    return config, [train_pairs[i] for i in order], 0, enc.eot_token, cfg


def run_ours(args):
    torch.set_num_threads(args.threads)
    if args.manual_attention:
        torch.nn.functional.scaled_dot_product_attention = manual_attention  # this process only
    torch.manual_seed(0)
    config, pairs, shots, pad_id, cfg = demo_work(args) if args.demo else harness_work(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    policy = GPT(config).to(device)
    ref = frozen_copy(policy) if cfg.loss != "sft" else None
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = make_optimizer(policy, cfg, device, fused=not args.unfused_adamw)
    if not args.dense_embedding_grad:
        sparse_embedding_grad(policy, device, world=1)
    train_policy = torch.compile(policy) if args.compile else policy
    precompute_s = 0.0
    table = None
    if args.ref_logps == "precompute" and ref is not None:
        t0 = time.perf_counter()
        pad = SimpleNamespace(eot_token=pad_id)  # all that the pass needs of a tokenizer
        table = reference_train_logps(ref, pairs, cfg.out,
                                      lambda m, some: all_pair_logps(m, some, pad, ctx, device))
        flops.synchronize(device)
        precompute_s = time.perf_counter() - t0
        ref = None  # freed: training needs only the table

    def train_step(step):  # the loop's step with one micro-batch: forward, backward, update
        ids = list(range(step * cfg.batch_size, (step + 1) * cfg.batch_size))
        batch = to_device((collate_shared if args.share_prompt else collate)(
            [pairs[i] for i in ids], pad_id), device)
        ref_logps = None if table is None else table[ids].to(device).unbind(1)
        with ctx:
            loss, stats = batch_loss(train_policy, ref, batch, cfg, ref_logps)
        scaler.scale(loss).backward()
        optimizer_step(policy, optimizer, scaler, cfg.grad_clip, stats["loss"])
        return stats, ids

    step_s = []
    meter = flops.Meter(config, pairs, cfg, device, dtype, ref is not None, args.share_prompt)
    for step in range(args.steps):
        flops.synchronize(device)
        t0 = time.perf_counter()
        stats, ids = train_step(step)
        flops.synchronize(device)
        step_s.append(time.perf_counter() - t0)
        meter.add(pairs[i] for i in ids)
        if step < args.warmup:
            meter.reset()  # the warm-up steps are left out of the figures
    steady_s = sum(step_s[args.warmup:])
    mean_len = statistics.mean(len(p) + len(c) for p, c, _ in pairs)
    model_flops_per_token = meter.flops / meter.tokens
    rates = meter.rates(steady_s)
    gpu = {} if device.type != "cuda" else {
        "gpu": torch.cuda.get_device_name(), "peak_gpu_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20)}
    result = {
        "harness": "dpop bench.py", "shots": shots, "prompt_tokens": args.prompt_tokens,
        "ref_logps": args.ref_logps, "full_logits": args.full_logits, "share_prompt": args.share_prompt,
        "fused_adamw": not args.unfused_adamw, "sdpa": not args.manual_attention,
        "sparse_embedding_grad": policy.transformer.wte.sparse,
        "threads": args.threads, "device": args.device, "dtype": args.dtype, "compile": args.compile,
        "model": f"demo {args.demo}" if args.demo else args.model, "batch": cfg.batch_size,
        "params": policy.num_params(), **gpu,
        "seq_len_mean": round(mean_len, 1), "steady_tokens_per_s": round(rates["tokens_per_s"], 1),
        "steady_step_s_median": round(statistics.median(step_s[args.warmup:]), 4),
        "precompute_s": round(precompute_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_flops_per_token": round(model_flops_per_token), "matmul_gflops": round(meter.peak / 1e9, 2),
        "fraction_of_matmul_peak": round(rates["util"], 3),
        "loss_last": round(stats["loss"], 4)}
    if args.profile:
        title = (f"bench.py: {args.demo and 'demo ' + args.demo or args.model}, {args.device}, {args.dtype}, "
                 f"{args.threads} thread(s), batch {cfg.batch_size}, rows of "
                 f"{mean_len:.0f} tokens, ref_logps {args.ref_logps}, share_prompt "
                 f"{args.share_prompt}, compile {args.compile}")
        profile_steps(args.profile, title, device, lambda i: train_step(i % args.steps))
    return result


def vs_trl(args):
    """Alternate TRL's harness and ours, each in a fresh process; print a Markdown table."""
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--threads", str(args.threads), "--shots", str(args.shots)]
    ours = [sys.executable, __file__, *common, "--synth", args.synth]
    precompute, share = ["--ref-logps", "precompute"], ["--share-prompt"]
    sides = {"TRL DPOTrainer": [args.vs_trl, os.path.join(args.synth, "trl_dpo_bench.py"), *common],
             "dpop, reference every step": ours,
             "dpop, precomputed reference": ours + precompute,
             "dpop --share-prompt, reference every step": ours + share,
             "dpop --share-prompt, precomputed reference": ours + share + precompute}
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
    if not args.demo and not os.path.exists(os.path.join(args.synth, "synth_prefs.py")):
        sys.exit(f"error: {args.synth}: no synth_prefs.py there; pass --synth FOLDER")
    if args.vs_trl:
        vs_trl(args)
    else:
        print(json.dumps(run_ours(args)), flush=True)


if __name__ == "__main__":
    main()
