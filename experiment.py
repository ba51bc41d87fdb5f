"""The paper's finding, reproduced over seeds: DPO vs its two fixes, DPOP and RPO (with IPO and
continued SFT beside them), a learning-rate sweep, and per-pair predictors of DPO's failure.

    python experiment.py            # the full grid, 3 seeds, 47 runs: about 2 hours on 2 CPU cores
    python experiment.py --quick    # a smoke run of the same grid, tiny: about 3 minutes
    python experiment.py --lr-sweep # DPO, DPOP, RPO at 4 learning rates, 3 seeds (--quick: tiny)
    python experiment.py --plot     # redraw the figure from the finished runs (needs matplotlib)
    python experiment.py --plot-runs out/dpo-arith-seed1337 out/dpop-arith-seed1337   # your own runs
                                    # on one figure, runs.png (--figure): chosen and rejected change
                                    # and held-out accuracy vs step, from each folder's metrics.jsonl
    python experiment.py --demo-range   # the demo (SFT, then DPO and DPOP) at seeds 1-10, on each of
                                        # torch's CPU kernel paths: the range its figures take

For each seed, every run starts from the same SFT reference and reads its data in the same order:
  1. the SFT reference: `train.py --loss sft` from random weights (it stops at 50% held-out accuracy)
  2. arith, the low-edit-distance data (one intermediate result corrupted): DPO, DPOP, RPO, IPO,
     and continued SFT on the chosen completions, the baseline that ignores the rejected ones
  3. arith-hed, the high-edit-distance control (another problem's solution): DPO, DPOP, RPO, IPO.
     Continued SFT reads only the chosen completions, which are arith's, so arith's run serves.
  4. self: the rejected completion is the reference's own sampled solution whose final answer is
     wrong, the chosen the correct worked solution: DPO, DPOP, RPO, IPO, continued SFT
and, at the first seed, DPOP with lam 5 and 500 (lam 0 is DPO exactly, lam 50 is the DPOP run).
Each stage-2 run is `train.py --init <reference>` with 300 steps of batch 32 at lr 2e-4 (the demo
runs at 4e-4), continued SFT included, so every method gets the same budget.

Every run is a train.py run in its own folder under --out, with its train.log. A finished run
(one with summary.json) is skipped, so an interrupted experiment continues where it stopped (and
the time it prints is then that of the rest only).
The tables go to <out>/results.md and the figure to assets/experiment.png (--figure). For each
DPO run they include how well three per-pair quantities, computed under the reference, rank the
held-out pairs by the chosen log-prob they lose (Spearman): the normalised edit distance, Razin et
al.'s CHES score, and the index of the first differing token.

--lr-sweep reuses the grid's references and its lr 2e-4 runs (same --out), and writes
<out>/lr-sweep.md and assets/lr-sweep.png.
"""
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, redirect_stdout

import torch

import train
from extras.checkpoints import model_from_checkpoint
from extras.config import ArgumentParser, check_ranges
from extras.generation import complete
from data import DataError, answer_of, builtin_data, collate, edit_distance, load_tokenizer, tokenize_pairs
from extras.formats import parse_jsonl
from dpop import token_logps

SFT = ["--sft-check-every", "10"]  # the references: the demo's stop rule (near 50%)
STAGE2 = ["--steps", "300", "--batch-size", "32"]  # the preference defaults, for every method,
LR = 2e-4  # at half the demo's lr (4e-4): the grid and the sweep were measured at 2e-4
METHODS = dict.fromkeys(("arith", "arith-hed", "self"), ("dpo", "dpop", "rpo", "ipo", "sft"))  # per data
SWEEP_LRS = (2e-5, 5e-5, 1e-4, 2e-4)  # --lr-sweep: these rates, for these methods on these data
SWEEP = dict.fromkeys(("arith", "arith-hed"), ("dpo", "dpop", "rpo"))
LAMS = (5.0, 500.0)  # the extra lam values of the sensitivity row; 0 and 50 are the DPO and DPOP runs
N_SAMPLED = 10000  # training problems the reference answers for the self variant (one sample each)
QUICK = {"sft": ["--steps", "40", "--sft-target-acc", "0", "--n-layer", "2", "--n-embd", "64"],
         "stage2": ["--steps", "10", "--batch-size", "8", "--eval-every", "10"],
         "sampled": 256}
CPU = torch.device("cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = ("default", "avx2", "avx512")  # the values ATEN_CPU_CAPABILITY takes on x86 CPUs


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])  # a bad flag: one error line
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 1 2 3 (--demo-range: 1 to 10)")
    p.add_argument("--out", default="", help="folder of the runs and results.md (default: "
                   "out/experiment, or out/experiment-quick)")
    p.add_argument("--figure", default="", help="where the figure goes (default: assets/experiment.png "
                   "or assets/lr-sweep.png, in <out> with --quick; runs.png with --plot-runs)")
    p.add_argument("--quick", action="store_true", help="1 seed, tiny runs: a smoke test")
    p.add_argument("--plot", action="store_true", help="only redraw the figure from finished runs")
    p.add_argument("--plot-runs", nargs="+", metavar="FOLDER",
                   help="draw these train.py runs' metrics.jsonl on one figure, and nothing else")
    p.add_argument("--lr-sweep", action="store_true",
                   help="DPO, DPOP and RPO on arith and arith-hed at lr 2e-5, 5e-5, 1e-4 and 2e-4 from "
                        "the grid's SFT references (with --quick: tiny runs)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(SWEEP_LRS),
                   help="with --lr-sweep: these learning rates (default: 2e-5 5e-5 1e-4 2e-4)")
    p.add_argument("--demo-range", action="store_true",
                   help="the demo's figures over --seeds (default 1-10) and --kernels, in --out "
                        "(default out/demo-range)")
    p.add_argument("--kernels", nargs="+", default=["default", "avx2"],
                   help="with --demo-range: values of ATEN_CPU_CAPABILITY, torch's CPU kernel path")
    p.add_argument("--train-flags", default="", metavar="FLAGS",
                   help="with --demo-range: more train.py flags for each of its runs, in one string "
                        "(e.g. '--sft-check-every 10'); use another --out for another recipe")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="with --demo-range: runs at once, one thread each (default: the CPU count)")
    args = p.parse_args(argv)
    try:  # every flag up front, by its own name
        check_ranges({"jobs": args.jobs, "seeds": min(args.seeds or [0])}, {"jobs": "positive", "seeds": "in [0, 2**32)"})
        native = torch.backends.cpu.get_cpu_capability().lower()  # the widest path this CPU runs
        for kernel in args.kernels:
            if kernel not in KERNELS:
                raise DataError(f"--kernels {kernel}: not a kernel path of torch's; choose from {', '.join(KERNELS)}")
            if native in KERNELS and KERNELS.index(kernel) > KERNELS.index(native):
                raise DataError(f"--kernels {kernel}: this CPU's widest kernel path is {native}")
    except DataError as e:
        p.error(str(e))
    if args.plot_runs:
        args.figure = args.figure or "runs.png"
        return args
    if not all(0 < lr < 1 for lr in args.lrs):  # nan fails this too
        p.error(f"--lrs {' '.join(map(str, args.lrs))}: each learning rate must be in (0, 1)")
    args.lrs = sorted(set(args.lrs))
    if args.demo_range:
        try:  # a bad flag for train.py stops here, in one line, not in the first run's log
            given, default = train.parse_args(shlex.split(args.train_flags)), train.parse_args([])
            train.resolve(dataclasses.replace(given, loss="sft"))
        except (ValueError, DataError) as e:
            p.error(f"--train-flags {args.train_flags!r}: {e}")
        for name in ("loss", "init", "seed", "out", "resume"):
            if getattr(given, name) != getattr(default, name):
                p.error(f"--train-flags: --{name} is set by --demo-range for each run")
        args.seeds = args.seeds or list(range(1, 11))
        args.out = args.out or "out/demo-range"
        return args
    args.seeds = args.seeds or [1, 2, 3]
    if args.quick:
        args.seeds = args.seeds[:1]
    args.out = args.out or ("out/experiment-quick" if args.quick else "out/experiment")
    name = "lr-sweep.png" if args.lr_sweep else "experiment.png"
    args.figure = args.figure or (os.path.join(args.out, name) if args.quick else os.path.join("assets", name))
    return args


# ---------------------------------------------------------------------------------------------
# Runs: each one is train.py in its own folder

def run(folder, flags):
    """train.py with flags and --out folder, its output in folder/train.log; skipped when it has
    finished before. Returns its summary.json."""
    summary_path = os.path.join(folder, "summary.json")
    if not os.path.exists(summary_path):
        t0 = time.time()
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train.log"), "a") as log, redirect_stdout(log):
            resume = ["--resume"] if os.path.exists(os.path.join(folder, "ckpt.pt")) else []
            train.main(flags + ["--out", folder, *resume])  # --resume: continue a broken run
        print(f"  {folder}: {time.time() - t0:.0f}s", flush=True)
    with open(summary_path) as f:
        return json.load(f)


def load_model(ckpt_path):
    return model_from_checkpoint(ckpt_path)[0].eval()


def sample_self_pairs(reference, records, enc, seed, path):
    """Write path, a JSONL file of the self variant: for each record, one solution sampled from the
    reference (temperature 1); where its final answer is wrong, a pair (prompt, the record's
    correct worked solution, the sample). Returns the number of pairs."""
    if os.path.exists(path):
        return sum(1 for _ in open(path))
    samples = complete(reference, enc, [r["prompt"] for r in records], nullcontext(), CPU,
                             temperature=1.0, generator=torch.Generator().manual_seed(seed))
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": sample}
             for r, sample in zip(records, samples)
             if sample and answer_of(sample) != answer_of(r["chosen"])]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    os.replace(tmp, path)
    return len(pairs)


# ---------------------------------------------------------------------------------------------
# Measurements on held-out pairs: log-prob changes, and the token-level view

def measure(model, pairs, enc):
    """What the tables need of a model on held-out pairs: the summed chosen and rejected
    log-probs, (N,) each, and the chosen completions' token log-probs (chosen_token_logps)."""
    chosen, rejected = train.all_pair_logps(model, pairs, enc, nullcontext(), CPU)
    return chosen, rejected, chosen_token_logps(model, pairs, enc)


def changes(policy, reference):
    """Mean change from the reference of the chosen and rejected log-probs (nats), the margin,
    and the reward accuracy (the fraction of pairs whose chosen rose more than the rejected).
    policy, reference: measure() of each on the same pairs."""
    (chosen, rejected, _), (ref_chosen, ref_rejected, _) = policy, reference
    d_chosen, d_rejected = chosen - ref_chosen, rejected - ref_rejected
    return {"chosen": d_chosen.mean().item(), "rejected": d_rejected.mean().item(),
            "margin": (d_chosen - d_rejected).mean().item(),
            "reward_acc": (d_chosen > d_rejected).float().mean().item()}


@torch.no_grad()
def chosen_token_logps(model, pairs, enc):
    """The log-prob of each chosen completion token: one (len(chosen),) tensor per pair."""
    idx, targets, mask = (t[:len(pairs)] for t in collate(pairs, enc.eot_token))  # chosen rows
    logps = token_logps(model(idx, logits_at=mask), targets[mask])
    return logps.split(mask.sum(1).tolist())


def token_view(policy, reference, pairs):
    """The paper's token-level argument, measured: the mean change (nats per token) of the chosen
    completion's tokens before the first token where chosen and rejected differ, at it, and after.
    policy, reference: measure() of each on pairs."""
    groups = {"before": [], "at": [], "after": []}
    for policy_logps, ref_logps, (_, c, r) in zip(policy[2], reference[2], pairs):
        first = first_difference(c, r)
        delta = (policy_logps - ref_logps).tolist()
        groups["before"] += delta[:first]
        groups["at"] += delta[first:first + 1]
        groups["after"] += delta[first + 1:]
    return {k: statistics.mean(v) for k, v in groups.items()}


def first_difference(chosen, rejected):
    """The index of the first completion token where chosen and rejected differ."""
    return next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))


# ---------------------------------------------------------------------------------------------
# Per-pair predictors of DPO's likelihood displacement (which pairs lose chosen log-prob)

@torch.no_grad()
def ches_scores(model, pairs, enc, batch_size=64):
    """Razin et al.'s (2024) CHES score of each pair under model: <hc, hr> - |hc|^2, where hc sums
    the last hidden state (after the final LayerNorm, what the vocabulary head reads) over the
    positions that predict the chosen completion's tokens, and hr the same over the rejected's.
    A high score: the two completions look alike to the model, and DPO's push down on the
    rejected also pushes the chosen down."""
    hidden = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, inputs, out: hidden.append(out))
    scores = []
    try:
        for i in range(0, len(pairs), batch_size):
            idx, _, mask = collate(pairs[i:i + batch_size], enc.eot_token)
            hidden.clear()
            model(idx, logits_at=mask)
            sums = (hidden[0] * mask[..., None]).sum(1)  # (2B, C): one sum per completion
            hc, hr = sums.chunk(2)
            scores += ((hc * hr).sum(-1) - (hc * hc).sum(-1)).tolist()
    finally:
        hook.remove()
    return scores


def predictors(reference, pairs, enc):
    """Three candidate predictors for each held-out pair, under the reference: the normalised edit
    distance of chosen and rejected, the CHES score, and the first differing token's index."""
    return {"edit distance": [edit_distance(c, r) / max(len(c), len(r)) for _, c, r in pairs],
            "CHES": ches_scores(reference, pairs, enc),
            "first difference": [first_difference(c, r) for _, c, r in pairs]}


def ranks(values):
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x, y):
    """Spearman's rank correlation (Pearson's on the ranks); nan where either side is constant."""
    try:
        return statistics.correlation(ranks(list(x)), ranks(list(y)))
    except statistics.StatisticsError:
        return float("nan")


# ---------------------------------------------------------------------------------------------
# The grid

def reference_run(root, seed, quick):
    """The seed's SFT reference, trained once (or found finished): the path of its checkpoint."""
    sft_path = os.path.join(root, "sft", "ckpt.pt")
    run(os.path.dirname(sft_path), ["--loss", "sft", "--data", "arith", "--seed", str(seed), *quick["sft"]])
    return sft_path


def experiment(args):
    t0 = time.time()
    quick = QUICK if args.quick else {"sft": SFT, "stage2": STAGE2, "sampled": N_SAMPLED}
    enc = load_tokenizer("byte")
    arith = builtin_data("arith")
    held_out = {name: tokenize_pairs(builtin_data(name)["eval"], enc, 64)[0]
                for name in ("arith", "arith-hed")}
    results = []  # one dict per (seed, data, method)
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        root = os.path.join(args.out, f"seed{seed}")
        sft_path = reference_run(root, seed, quick)
        reference = load_model(sft_path)
        # the self variant's pairs: the reference's wrong answers to training and held-out problems
        self_train = os.path.join(root, "self-train.jsonl")
        n_self = sample_self_pairs(reference, arith["train"][:quick["sampled"]], enc, seed, self_train)
        self_eval = os.path.join(root, "self-eval.jsonl")
        sample_self_pairs(reference, arith["eval"], enc, seed + 1, self_eval)
        held_out["self"] = tokenize_pairs(parse_jsonl(self_eval)[0], enc, 64)[0]
        print(f"  self: {n_self} of {quick['sampled']} sampled solutions were wrong", flush=True)
        ref_measures = {data: measure(reference, held_out[data], enc) for data in METHODS}  # once a seed
        ref_predictors = {data: predictors(reference, held_out[data], enc) for data in METHODS}

        for data, methods in METHODS.items():
            data_flags = ["--data", data] if data != "self" else ["--data", self_train, "--eval-data", "arith"]
            for method in methods:
                runs = [(method, None)]
                if (data, method) == ("arith", "dpop") and seed == args.seeds[0]:
                    runs += [(f"dpop-lam{lam:g}", lam) for lam in LAMS]
                for name, lam in runs:
                    # continued SFT never reads the rejected completions: arith-hed's run is arith's
                    folder = os.path.join(root, "arith" if (data, method) == ("arith-hed", "sft") else data, name)
                    flags = ["--loss", method, "--init", sft_path, "--seed", str(seed), *data_flags,
                             *quick["stage2"], "--lr", str(LR), *([] if lam is None else ["--lam", str(lam)])]
                    summary = run(folder, flags)
                    measured = measure(load_model(os.path.join(folder, "ckpt.pt")), held_out[data], enc)
                    row = {"seed": seed, "data": data, "method": name, "lam": lam,
                           "accuracy": summary["trained"]["gen_accuracy"],
                           "reference_accuracy": summary["reference"]["gen_accuracy"],
                           **changes(measured, ref_measures[data])}
                    if data == "arith":
                        row["tokens"] = token_view(measured, ref_measures[data], held_out[data])
                    if name == "dpo":  # which pairs lost the most chosen log-prob under DPO?
                        displacement = (measured[0] - ref_measures[data][0]).tolist()
                        row["spearman"] = {k: spearman(v, displacement) for k, v in ref_predictors[data].items()}
                    results.append(row)
    minutes = (time.time() - t0) / 60
    save_results(args.out, "results", results, tables(results, args, minutes))
    print(f"{len(results)} runs in {minutes:.1f} minutes; tables in {args.out}/results.md")
    plot(args)


# ---------------------------------------------------------------------------------------------
# The learning-rate sweep: DPO, DPOP and RPO at four rates, from the experiment's references

def lr_sweep(args):
    """Each method of SWEEP on each of its data at each rate of --lrs (SWEEP_LRS), for every seed,
    from that seed's SFT reference (shared with the grid, in the same --out; trained if missing).
    The grid's own runs are the lr 2e-4 cells. For each DPO run, the predictors' Spearman
    correlations with the held-out pairs' chosen change, as in the grid. Writes <out>/lr-sweep.json
    and lr-sweep.md, and the figure: held-out generation accuracy and chosen change against lr."""
    t0 = time.time()
    quick = QUICK if args.quick else {"sft": SFT, "stage2": STAGE2}
    enc = load_tokenizer("byte")
    held_out = {data: tokenize_pairs(builtin_data(data)["eval"], enc, 64)[0] for data in SWEEP}
    results = []
    for seed in args.seeds:
        root = os.path.join(args.out, f"seed{seed}")
        sft_path = reference_run(root, seed, quick)
        reference = load_model(sft_path)
        for data, methods in SWEEP.items():
            ref_chosen = train.all_pair_logps(reference, held_out[data], enc, nullcontext(), CPU)[0]
            ref_predictors = predictors(reference, held_out[data], enc)
            for method in methods:
                for lr in args.lrs:
                    name = method if lr == LR else f"{method}-lr{short(lr)}"  # LR: the grid's own run
                    folder = os.path.join(root, data, name)
                    summary = run(folder, ["--loss", method, "--init", sft_path, "--seed", str(seed),
                                           "--data", data, *quick["stage2"], "--lr", str(lr)])
                    row = {"seed": seed, "data": data, "method": method, "lr": lr,
                           "accuracy": summary["trained"]["gen_accuracy"],
                           "reference_accuracy": summary["reference"]["gen_accuracy"],
                           "chosen": summary["trained"]["logratio/chosen"]}
                    if method == "dpo":
                        policy = load_model(os.path.join(folder, "ckpt.pt"))
                        chosen = train.all_pair_logps(policy, held_out[data], enc, nullcontext(), CPU)[0]
                        displacement = (chosen - ref_chosen).tolist()
                        row["spearman"] = {k: spearman(v, displacement) for k, v in ref_predictors.items()}
                    results.append(row)
    minutes = (time.time() - t0) / 60
    lrs = args.lrs
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"Seeds {seeds}; mean ± sd over seeds; {minutes:.0f} minutes{' (--quick)' if args.quick else ''}. "
             f"Each cell: generation accuracy on the 200 test problems (greedy) / chosen log-prob change "
             f"from the SFT reference on the 256 held-out pairs (nats). The references' accuracy: "
             f"{mean_sd(list({r['seed']: 100 * r['reference_accuracy'] for r in results}.values()), '{:.1f}%')}.",
             "", "| data | method | " + " | ".join(f"lr {short(lr)}" for lr in lrs) + " |",
             "| --- | --- |" + " --- |" * len(lrs)]
    for data, methods in SWEEP.items():
        for method in methods:
            cells = []
            for lr in lrs:
                rows = [r for r in results if (r["data"], r["method"], r["lr"]) == (data, method, lr)]
                cells.append(mean_sd([100 * r["accuracy"] for r in rows], "{:.1f}%") + " / " +
                             mean_sd([r["chosen"] for r in rows], "{:+.2f}"))
            lines.append(f"| {data} | {NAMES[method]} | " + " | ".join(cells) + " |")
    names = ("edit distance", "CHES", "first difference")
    lines += ["", "Spearman correlation of each predictor (under the reference) with the held-out pair's "
              "chosen log-prob change under DPO, mean ± sd over seeds (negative: a larger value goes "
              "with a larger fall):", "", "| data | lr | " + " | ".join(names) + " |",
              "| --- | --- |" + " --- |" * len(names)]
    for data in SWEEP:
        for lr in lrs:
            rows = [r for r in results if (r["data"], r["method"], r["lr"]) == (data, "dpo", lr)]
            lines.append(f"| {data} | {short(lr)} | " + " | ".join(
                mean_sd([r["spearman"][k] for r in rows], "{:+.2f}") for k in names) + " |")
    save_results(args.out, "lr-sweep", results, "\n".join(lines) + "\n")
    print(f"{len(results)} cells in {minutes:.1f} minutes; table in {args.out}/lr-sweep.md")
    plot_sweep(results, lrs, args.figure)


def short(lr):
    """2e-4, not 0.0002."""
    return f"{lr:.0e}".replace("e-0", "e-")


def plot_sweep(results, lrs, path):
    """Accuracy (top) and chosen change (bottom) against lr, one line per method (mean over seeds,
    bars: min to max), one column per data variant."""
    plt = pyplot("python experiment.py --lr-sweep")
    if plt is None:
        return
    fig, axes = plt.subplots(2, len(SWEEP), figsize=(11, 7), sharex=True)
    for col, (data, methods) in enumerate(SWEEP.items()):
        for method, colour in zip(methods, ("tab:red", "tab:blue", "tab:green")):
            for row, key, scale in ((0, "accuracy", 100), (1, "chosen", 1)):
                values = [[scale * r[key] for r in results if (r["data"], r["method"], r["lr"]) == (data, method, lr)]
                          for lr in lrs]
                mean = [statistics.mean(v) for v in values]
                axes[row, col].errorbar(lrs, mean, yerr=[[m - min(v) for m, v in zip(mean, values)],
                                                               [max(v) - m for m, v in zip(mean, values)]],
                                        color=colour, marker="o", capsize=3, label=NAMES[method])
        axes[0, col].set_title(DATA_NAMES[data])
        axes[1, col].axhline(0, color="grey", linewidth=0.5)
        axes[1, col].set_xlabel("peak learning rate (300 steps)")
        axes[1, col].set_xscale("log")
        axes[1, col].set_xticks(lrs, [short(lr) for lr in lrs])  # the swept rates, no minor labels
        axes[1, col].minorticks_off()
    axes[0, 0].set_ylabel("generation accuracy (%),\ntest problems")
    axes[1, 0].set_ylabel("chosen log-prob change (nats),\nheld-out pairs")
    axes[0, 0].legend()
    seeds = sorted({r["seed"] for r in results})
    fig.suptitle(f"DPO, DPOP and RPO across learning rates, mean over seeds {', '.join(map(str, seeds))} "
                 f"(bars: min to max)")
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Reporting: Markdown tables (mean ± sd over seeds) and the figure

def save_results(folder, name, results, report):
    """<folder>/<name>.json (one dict per run) and <name>.md (the tables); print the tables."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(report)
    print(report)


def mean_sd(values, fmt):
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values)).lstrip('+')}"


NAMES = {"dpo": "DPO", "dpop": "DPOP (lam 50)", "rpo": "RPO (alpha 1)", "ipo": "IPO", "sft": "continued SFT"}
DATA_NAMES = {"arith": "arith (low edit distance)", "arith-hed": "arith-hed (high edit distance)",
              "self": "self (the reference's own wrong answers)"}


def tables(results, args, minutes):
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± sd over seeds. Held-out: generation accuracy on "
             f"the 200 test problems (greedy); log-prob changes from the SFT reference (nats, summed "
             f"over the completion) on the held-out pairs of each data variant. "
             f"{minutes:.0f} minutes{' (--quick)' if args.quick else ''}.", "",
             "| data | method | generation accuracy | chosen change | rejected change | margin | reward accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    ref = {r["seed"]: r["reference_accuracy"] for r in results}
    lines.append(f"| all | SFT reference (the start) | {mean_sd([100 * ref[s] for s in seeds], '{:.1f}%')} "
                 f"| 0 | 0 | 0 | – |")
    for data, methods in METHODS.items():
        for method in methods:
            rows = [r for r in results if r["data"] == data and r["method"] == method]
            lines.append(f"| {data} | {NAMES[method]} | " + " | ".join([
                mean_sd([100 * r["accuracy"] for r in rows], "{:.1f}%"),
                mean_sd([r["chosen"] for r in rows], "{:+.2f}"),
                mean_sd([r["rejected"] for r in rows], "{:+.2f}"),
                mean_sd([r["margin"] for r in rows], "{:+.2f}"),
                mean_sd([100 * r["reward_acc"] for r in rows], "{:.1f}%")]) + " |")
    first = seeds[0]
    lam_rows = [(0.0, "dpo"), (50.0, "dpop")] + [(r["lam"], r["method"]) for r in results
                                                 if r["lam"] is not None]
    lines += ["", f"lam sensitivity, arith, seed {first} (lam 0 is DPO exactly):", "",
              "| lam | generation accuracy | chosen change | rejected change | margin | reward accuracy |",
              "| --- | --- | --- | --- | --- | --- |"]
    for lam, method in sorted(lam_rows):
        r = next(r for r in results if r["seed"] == first and r["data"] == "arith" and r["method"] == method)
        lines.append(f"| {lam:g} | {100 * r['accuracy']:.1f}% | {r['chosen']:+.2f} | {r['rejected']:+.2f} "
                     f"| {r['margin']:+.2f} | {100 * r['reward_acc']:.1f}% |")
    lines += ["", "Token-level view, arith held-out pairs: mean change of the chosen completion's token "
              "log-probs (nats per token) before the first token where chosen and rejected differ, at "
              "it, and after it:", "",
              "| method | before | at the first difference | after |", "| --- | --- | --- | --- |"]
    for method in METHODS["arith"]:
        rows = [r for r in results if r["data"] == "arith" and r["method"] == method]
        lines.append(f"| {NAMES[method]} | " + " | ".join(
            mean_sd([r["tokens"][k] for r in rows], "{:+.3f}") for k in ("before", "at", "after")) + " |")
    names = list(next(r for r in results if "spearman" in r)["spearman"])
    lines += ["", "Which held-out pairs lose chosen log-prob under DPO? Spearman correlation of each "
              "predictor, computed under the reference, with the pair's chosen log-prob change under "
              "DPO (negative: a larger value goes with a larger fall):", "",
              "| data | seed | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for data in METHODS:
        rows = [r for r in results if r["data"] == data and r["method"] == "dpo"]
        for r in rows:
            lines.append(f"| {data} | {r['seed']} | " + " | ".join(f"{r['spearman'][k]:+.2f}" for k in names) + " |")
        if len(rows) > 1:
            lines.append(f"| {data} | mean ± sd | " + " | ".join(
                mean_sd([r["spearman"][k] for r in rows], "{:+.2f}") for k in names) + " |")
    return "\n".join(lines) + "\n"


def pyplot(command):
    """matplotlib.pyplot, drawing into files (no window); or None, after saying how to install
    matplotlib (an optional extra) and then run command again."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"the figure needs matplotlib, an optional extra: pip install matplotlib; then {command}")
        return None
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def plot(args):
    """The figure: the mean change of the chosen (top) and rejected (bottom) log-prob on the
    training batches vs step, DPO vs DPOP, one column per data variant, the seeds' range shaded."""
    plt = pyplot("python experiment.py --plot")
    if plt is None:
        return
    seeds = sorted(int(d[4:]) for d in os.listdir(args.out) if d.startswith("seed"))
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    for col, data in enumerate(METHODS):
        for method, colour in (("dpo", "tab:red"), ("dpop", "tab:blue"), ("rpo", "tab:green")):
            curves = []
            for seed in seeds:
                path = os.path.join(args.out, f"seed{seed}", data, method, "metrics.jsonl")
                if os.path.exists(path):
                    rows = [json.loads(line) for line in open(path)]
                    curves.append([r for r in rows if "loss" in r])
            if not curves:
                continue
            steps = [r["step"] for r in curves[0]]
            for row, key in enumerate(("logratio/chosen", "logratio/rejected")):
                values = torch.tensor([[r[key] for r in c[:len(steps)]] for c in curves])
                ax = axes[row, col]
                ax.plot(steps, values.mean(0), color=colour, label=NAMES[method])
                ax.fill_between(steps, values.min(0).values, values.max(0).values, color=colour, alpha=0.2)
                ax.axhline(0, color="grey", linewidth=0.5)
        axes[0, col].set_title(DATA_NAMES[data])
        axes[1, col].set_xlabel("step")
    axes[0, 0].set_ylabel("chosen log-prob change (nats)")
    axes[1, 0].set_ylabel("rejected log-prob change (nats)")
    axes[0, 0].legend()
    fig.suptitle(f"DPO, DPOP and RPO from the same SFT reference: mean over seeds {', '.join(map(str, seeds))} "
                 f"(shaded: min to max), training batches")
    save_figure(fig, args.figure)


def plot_runs(args):
    """Your own runs on one figure, one line each, labelled by its folder's name: the chosen and
    the rejected log-prob change from the reference on the training batches (the log's dchosen and
    drejected), and the greedy generation accuracy on the eval problems (when the data has them),
    against step, from each folder's metrics.jsonl."""
    plt = pyplot("python experiment.py --plot-runs " + " ".join(args.plot_runs))
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharex=True)
    for i, folder in enumerate(args.plot_runs):
        path = os.path.join(folder, "metrics.jsonl")
        if not os.path.exists(path):
            sys.exit(f"error: {path}: not found (--plot-runs takes the folders that train.py wrote)")
        # whole lines only: a run that is still going may be half-way through writing its last
        rows = [json.loads(line) for line in open(path) if line.endswith("\n")]
        name = os.path.basename(os.path.normpath(folder))
        for ax, key in zip(axes, ("logratio/chosen", "logratio/rejected", "eval/gen_accuracy")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:  # colour C<i>: a run has the same colour in every panel
                ax.plot(*zip(*points), color=f"C{i}", label=name, marker="o" if key.startswith("eval") else ".")
    for ax, title in zip(axes, ("chosen log-prob change (nats), training batches",
                                "rejected log-prob change (nats), training batches",
                                "generation accuracy, held-out eval problems")):
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in axes[:2]:
        ax.axhline(0, color="grey", linewidth=0.5)  # the reference
    axes[2].set_ylim(-0.02, 1.02)
    save_figure(fig, args.figure)


# ---------------------------------------------------------------------------------------------
# The demo's range: its figures over seeds and CPU kernel paths

def demo_job(args, kernel, seed):
    """One seed of the demo on one kernel path: the SFT reference, then DPO and DPOP from it,
    each train.py in its own process (ATEN_CPU_CAPABILITY is read when torch loads) with one
    thread. A finished run is skipped. Returns {name: summary} and the eval rows of each run."""
    root = os.path.join(args.out, kernel, f"seed{seed}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": "1"}
    sft = os.path.join(root, "sft", "ckpt.pt")
    result = {}
    for name, flags in (("sft", ["--loss", "sft"]), ("dpo", ["--loss", "dpo", "--init", sft]),
                        ("dpop", ["--loss", "dpop", "--init", sft])):
        folder = os.path.join(root, name)
        if not os.path.exists(os.path.join(folder, "summary.json")):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "train.log"), "w") as log:
                cmd = [sys.executable, os.path.join(HERE, "train.py"), *shlex.split(args.train_flags),
                       *flags, "--seed", str(seed), "--out", folder]  # the range's own flags come last
                if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                    sys.exit(f"error: {' '.join(cmd[1:])} failed; its output is in {log.name}")
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        result[name] = {"summary": json.load(open(os.path.join(folder, "summary.json"))),
                        "eval": [r for r in rows if "eval/gen_accuracy" in r]}
    print(f"  {kernel} seed {seed}: done", flush=True)
    return kernel, seed, result


def demo_range(args):
    """Run demo_job for every kernel and seed, --jobs at a time; write <out>/demo-range.json and
    print the table: held-out generation accuracy on the 200 test problems and the chosen
    log-prob's change on the 256 eval pairs, and whether the demo's story holds (DPO at least 20
    points below its reference with the chosen falling, DPOP at least 20 above with it rising)."""
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda ks: demo_job(args, *ks),
                                [(k, s) for k in args.kernels for s in args.seeds]))
    rows = []
    for kernel, seed, r in results:
        ref = r["dpo"]["summary"]["reference"]["gen_accuracy"]
        dpo, dpop = (r[m]["summary"]["trained"] for m in ("dpo", "dpop"))
        points = lambda acc: round(1000 * acc)  # tenths of a point: 78.5% + 20 points is 98.5%, not 98.50000001%
        holds = (points(dpo["gen_accuracy"]) <= points(ref) - 200 and dpo["logratio/chosen"] < 0
                 and points(dpop["gen_accuracy"]) >= points(ref) + 200 and dpop["logratio/chosen"] > 0)
        rows.append({"kernel": kernel, "seed": seed, "reference": ref, "dpo": dpo["gen_accuracy"],
                     "dpo_chosen": dpo["logratio/chosen"], "dpop": dpop["gen_accuracy"],
                     "dpop_chosen": dpop["logratio/chosen"], "holds": holds,
                     "sft_steps": r["sft"]["eval"][-1]["step"],
                     "eval": {m: [(e["step"], e["eval/gen_accuracy"]) for e in r[m]["eval"]] for m in r}})
    with open(os.path.join(args.out, "demo-range.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| kernels | seed | SFT steps | reference | DPO | DPO chosen change | DPOP | DPOP chosen change | story holds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r['seed']} | {r['sft_steps']} | {r['reference']:.1%} | {r['dpo']:.1%} | "
              f"{r['dpo_chosen']:+.2f} | {r['dpop']:.1%} | {r['dpop_chosen']:+.2f} | {'yes' if r['holds'] else 'NO'} |")
    worst_dpo = max(rows, key=lambda r: r["dpo"] - r["reference"])
    worst_dpop = min(rows, key=lambda r: r["dpop"] - r["reference"])
    print(f"worst DPO: {worst_dpo['dpo'] - worst_dpo['reference']:+.1%} (seed {worst_dpo['seed']}, "
          f"{worst_dpo['kernel']}); worst DPOP: {worst_dpop['dpop'] - worst_dpop['reference']:+.1%} "
          f"(seed {worst_dpop['seed']}, {worst_dpop['kernel']}); the story holds in "
          f"{sum(r['holds'] for r in rows)} of {len(rows)}; {(time.time() - t0) / 60:.0f} minutes")


def main(argv=None):
    args = parse_args(argv)
    if args.plot_runs:
        plot_runs(args)
    elif args.demo_range:
        demo_range(args)
    elif args.lr_sweep:
        lr_sweep(args)
    elif args.plot:
        plot(args)
    else:
        experiment(args)


if __name__ == "__main__":
    main()
