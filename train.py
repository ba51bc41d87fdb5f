"""Train a GPT with a preference loss (DPO, DPOP, RPO, SimPO, ...: dpop.LOSSES) or plain SFT.

    python train.py --loss dpop               # the demo: an SFT model (trained or reused), then DPOP
    python train.py --loss dpo                # the same with DPO: watch dchosen go negative
    python train.py --loss sft                # only the SFT stage
    python train.py --loss dpop --init out/sft-arith-seed1337/ckpt.pt --data pairs.jsonl
    torchrun --standalone --nproc_per_node=2 train.py --loss dpop ...    # several processes

Without --init, a preference run first trains an SFT model on the chosen completions of the same
data (or reuses out/sft-<data>-seed<seed>/ckpt.pt), then trains the policy starting from it,
against it frozen (the reference) for a loss that has one; the summary compares the starting
model with the trained one on held-out data.

Read it top to bottom: the knobs, the set-up, one batch's loss, evaluation, then train(), whose
while loop is the lesson. The maths lives in dpop.py, the data in data.py, the model in model.py;
what a real tool needs and a lesson does not lives in extras/, and each call into it says what
it does.
"""
import copy
import dataclasses
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from data import answer_of, batch_indices, collate, load_tokenizer, tokenize_splits
from dpop import LOSSES, PairLogps, completion_logps, preference_loss, preference_metrics, sequence_logps
from extras import checkpoints, config, distributed, files, flops, report, speedups, stopping
from extras.splits import run_splits
from extras.generation import complete
from extras.hf_gpt2 import save_hf_gpt2
from model import GPT, GPTConfig


# ---------------------------------------------------------------------------------------------
# Every knob, with its default and its --help text; flags are generated from it (--batch-size).
# A knob also says the values it takes (range=), and whether --resume may change it, a reused SFT
# reference may differ in it, and the SFT reference inherits it (extras/config.py reads these).

knob = config.knob
RESUME, INHERIT = dict(resume_may_change=True), dict(sft_inherits=True)
WATCH = dict(resume_may_change=True, reference_may_differ=True)  # how a run is watched and kept

# a flag left unset (None) takes its stage's default: SFT, or a preference loss
STAGE_DEFAULTS = {"sft": dict(steps=600, batch_size=64, lr=1e-3),
                  "preference": dict(steps=300, batch_size=32, lr=4e-4)}


def stage_default(name):  # for --help: "sft 600, a preference loss 300"
    return config.stage_help(STAGE_DEFAULTS, name)


@dataclass
class TrainConfig:
    loss: str = knob("dpop", f"sft, or a preference loss: {', '.join(LOSSES)}", choices=("sft", *LOSSES),
                     group="what to train, on what, from what; where the results go")
    data: str = knob("arith", "arith (built-in), arith-hed (its high-edit-distance control) or a .jsonl file",
                     **INHERIT)
    eval_data: str = knob("", "evaluate on this data's held-out set instead; all of --data trains", **INHERIT)
    tokenizer: str = knob("byte", "byte (built-in), a tiktoken name (gpt2, ...) or a .tiktoken file", **INHERIT)
    init: str = knob("", "the starting model: a checkpoint or GPT-2 weights (default: random weights for "
                         "--loss sft; for a preference loss, the SFT model, trained first or reused)")
    out: str = knob("", "output folder (default: out/<loss>-<data>-seed<seed>)", **WATCH)
    resume: bool = knob(False, "continue from <out>/ckpt.pt", **WATCH)
    export_hf: str = knob("", "after training, also write a Hugging Face GPT-2 checkpoint to this folder", **WATCH)
    steps: int = knob(None, f"optimizer steps (default: {stage_default('steps')})", range="positive", **RESUME,
                      group="optimisation (AdamW; linear warm-up, then cosine decay)")
    batch_size: int = knob(None, f"pairs (or SFT examples) per micro-batch (default: {stage_default('batch_size')})",
                           range="positive")
    grad_accum: int = knob(1, "micro-batches per optimizer step", range="positive")
    lr: float = knob(None, f"peak learning rate (default: {stage_default('lr')})", range="positive")
    warmup: float = knob(0.1, "fraction of the steps spent warming the LR up", range="in [0, 1]")
    min_lr_ratio: float = knob(0.1, "the LR decays to lr * min_lr_ratio", range="in [0, 1]")
    weight_decay: float = knob(0.1, "AdamW decay, on matrices and embeddings only", range="zero or positive")
    grad_clip: float = knob(1.0, "clip the global grad norm to this (0: no clipping)", range="zero or positive")
    max_bad_steps: int = knob(10, "stop after this many non-finite steps in a row (each is skipped)",
                              range="positive", **WATCH, **INHERIT)
    # the preference losses' own knobs (--beta, --lam, ...) are declared with each loss in dpop.py
    # and inserted here, under this group's title, by config.with_loss_knobs below
    ref_logps: str = knob("auto", "the reference's log-probs: auto (computed before step 1, cached beside --init; "
                                  "docs/performance.md), precompute (for every pair), or every-step (in the loop)",
                          one_of=("auto", "precompute", "every-step"), **WATCH)
    full_logits: bool = knob(False, "logits at every position, not only the completions' (slower, same maths)",
                             **WATCH)
    share_prompt: bool = knob(False, "one packed row per pair, so each prompt is read once (same maths)", **WATCH)
    sft_steps: int = knob(None, "its steps (default: 3 passes over the data, at most 600)", range="positive",
                          group="the SFT model that a preference run without --init trains first and starts "
                                "from (--loss sft reads --steps, --batch-size and --lr instead)")
    sft_batch_size: int = knob(None, "its batch (default: 64, or fewer when the data has fewer pairs)",
                               range="positive")
    sft_lr: float = knob(None, "its peak learning rate (default: 1e-3)", range="positive")
    sft_target_acc: float = knob(0.5, "SFT from random weights stops at this held-out accuracy (0: never)",
                                 range="in [0, 1]", **RESUME, **INHERIT)
    sft_check_every: int = knob(10, "it checks that accuracy every this many steps, by one greedy pass",
                                range="positive", **RESUME, **INHERIT)
    n_layer: int = knob(4, "transformer blocks", range="positive", **INHERIT,
                        group="the model, when it starts from random weights (else the --init checkpoint's shape)")
    n_head: int = knob(4, "attention heads", range="positive", **INHERIT)
    n_embd: int = knob(128, "width", range="positive", **INHERIT)
    block_size: int = knob(64, "context length in tokens", range=f"in [1, {config.MAX_BLOCK_SIZE}]", **INHERIT)
    dropout: float = knob(0.0, "dropout probability", range="in [0, 1)", **INHERIT)
    eval_every: int = knob(100, "evaluate and checkpoint every this many steps (and at the end)", range="positive",
                           **RESUME, **INHERIT, group="evaluation, logging, machine")
    log_every: int = knob(10, "print and record a metrics row every this many steps", range="positive",
                          **WATCH, **INHERIT)
    seed: int = knob(1337, "seed of the weights' init and of the data order", range="in [0, 2**32)", **INHERIT)
    device: str = knob("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu", **RESUME, **INHERIT)
    compile: bool = knob(False, "torch.compile the policy for training (pays off on a GPU)", **WATCH)
    dtype: str = knob("auto", "float32, bfloat16, float16 (with a GradScaler), or auto: bfloat16 "
                              "on CUDA if supported, else float16; float32 elsewhere",
                      one_of=("auto", "float32", "bfloat16", "float16"), **INHERIT)


TrainConfig = config.with_loss_knobs(TrainConfig, before="ref_logps", group="the preference loss")


def parse_args(argv=None):
    # flags generated from TrainConfig; a bad flag is one "error:" line (extras/config.py)
    return config.parse_config(TrainConfig, argv, __doc__)


def resolve(cfg):
    """Fill the stage defaults, the loss knobs' defaults and the output folder; refuse bad values."""
    stage = STAGE_DEFAULTS["sft" if cfg.loss == "sft" else "preference"]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in stage.items() if getattr(cfg, k) is None})
    config.resolve_loss_knobs(cfg)  # beta 0.1 for dpop, ...: dpop.LOSSES
    if not cfg.out:
        kind = "sft-cont" if cfg.loss == "sft" and cfg.init else cfg.loss
        name = cfg.data if cfg.data in ("arith", "arith-hed") else os.path.splitext(os.path.basename(cfg.data))[0]
        cfg.out = os.path.join("out", f"{kind}-{name}-seed{cfg.seed}")
    config.check_config(cfg)  # every value in its range, or one line that says which is not
    return cfg


# ---------------------------------------------------------------------------------------------
# Set-up: device and precision, data, model, optimizer and learning rate

def setup_device(cfg):
    """Pick the device and the precision context once: autocast where a low-precision dtype is
    asked for, a null context for float32. The GradScaler is enabled only for float16."""
    device = cfg.device if cfg.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(distributed.local_device(device))  # under torchrun: this process's own GPU
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if cfg.dtype == "auto":  # bfloat16 on a GPU that has it, else float16; float32 elsewhere
        dtype = torch.float32 if device.type != "cuda" else (
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    return device, dtype, ctx, scaler


def build_model(cfg, enc, init_ckpt=None):
    """The policy: random weights of cfg's shape, or the weights and shape of init_ckpt (what
    checkpoints.load_init read from --init; model_from_init checks the shape flags against it)."""
    if init_ckpt is not None:  # a shape flag left at its default takes the checkpoint's
        return checkpoints.model_from_init(init_ckpt, cfg, enc, TrainConfig)
    return GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))


def frozen_copy(model):
    """The reference model: a copy in eval mode whose parameters need no gradients. It is never
    given to the optimizer and only ever run under no_grad."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def make_optimizer(model, cfg, device, fused=True):
    """AdamW; matrices and embeddings are decayed, biases and LayerNorm gains are not. The fused
    kernel (one pass over each tensor) is about 3x faster than the default on CPUs too."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95),
                             fused=fused and device.type in ("cuda", "cpu"))


def get_lr(step, cfg):
    """Linear warm-up over the first warmup * steps steps, then cosine decay to min_lr_ratio * lr."""
    warmup_steps = int(cfg.warmup * cfg.steps)
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, cfg.steps - warmup_steps)
    coeff = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * coeff)


# ---------------------------------------------------------------------------------------------
# One batch: log-probs and the loss

def pair_logps(model, batch, full_logits=False):
    """Summed completion log-probs of a collated batch: (chosen (B,), rejected (B,)), float32
    whatever the autocast dtype. By default the model computes logits at the completion
    positions only (dpop.completion_logps); full_logits is the textbook way, every position's."""
    if isinstance(batch, speedups.PackedBatch):  # --share-prompt: one packed row per pair
        return speedups.packed_logps(model, batch)
    idx, targets, mask = batch
    if full_logits:
        logps = sequence_logps(model(idx), targets, mask)  # logits (2B, T, V)
    else:
        logps = completion_logps(model(idx, logits_at=mask), targets, mask)  # logits (N, V)
    return logps.chunk(2)


def sft_loss(model, batch):
    """Mean negative log-likelihood per completion token of the chosen rows (standard SFT)."""
    idx, targets, mask = (t[: len(t) // 2] for t in batch)  # chosen rows only
    logits = model(idx, logits_at=mask)  # (N, V): completion positions only
    return F.cross_entropy(logits.float(), targets[mask])


def completion_lengths(batch):
    """The token counts of the chosen and the rejected completions of a batch, ((B,), (B,))."""
    if isinstance(batch, speedups.PackedBatch):  # seq: 0..B-1 chosen, then B..2B-1 rejected
        return torch.bincount(batch.seq, minlength=2 * len(batch.idx)).chunk(2)
    return batch.mask.sum(-1).chunk(2)


def loss_and_metrics(policy_logps, ref_logps, lengths, cfg):
    """The mean loss of cfg's loss and the standard metrics, plus the terms its entry in
    dpop.LOSSES logs (RPO: loss/dpo and loss/nll). ref_logps: the reference's (chosen, rejected),
    or (None, None) for a loss without one. An SFT run's held-out figures are DPO's."""
    name, spec, knobs = config.loss_of(cfg)  # its entry in dpop.LOSSES; DPO's for SFT
    losses, chosen_rewards, rejected_rewards = preference_loss(
        *policy_logps, *ref_logps, loss=name, chosen_lengths=lengths[0], rejected_lengths=lengths[1], **knobs)
    loss = losses.mean()
    metrics = {"loss": loss.item(), **preference_metrics(chosen_rewards, rejected_rewards, *policy_logps,
                                                         knobs["beta"], reference=spec.reference)}
    x = PairLogps(*policy_logps, *ref_logps, *lengths)
    metrics.update({k: term(x, **knobs).mean().item() for k, term in spec.logs.items()})
    return loss, metrics


def batch_loss(model, ref, batch, cfg, ref_logps=None):
    """The mean loss of one micro-batch and its metrics (a dict of floats). ref_logps: the
    reference's (chosen, rejected), when computed beforehand; else the reference runs, if any."""
    if cfg.loss == "sft":
        loss = sft_loss(model, batch)
        return loss, {"loss": loss.item()}
    policy_chosen_logps, policy_rejected_logps = pair_logps(model, batch, cfg.full_logits)
    if ref_logps is None and ref is not None:
        with torch.no_grad():
            ref_logps = pair_logps(ref, batch, cfg.full_logits)
    return loss_and_metrics((policy_chosen_logps, policy_rejected_logps), ref_logps or (None, None),
                            completion_lengths(batch), cfg)


# ---------------------------------------------------------------------------------------------
# Evaluation on held-out data

@torch.no_grad()
def all_pair_logps(model, pairs, enc, ctx, device, batch_size=64, collate_fn=collate, full_logits=False):
    """Chosen and rejected log-probs of every pair, in order: two (N,) tensors on the CPU."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        with ctx:
            c, r = pair_logps(model, speedups.to_device(collate_fn(pairs[i:i + batch_size], enc.eot_token), device),
                              full_logits)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def generation_accuracy(model, enc, problems, ctx, device):
    """Fraction of problems whose greedy completion states the right final answer, and the
    completions (texts, in the problems' order)."""
    texts = complete(model, enc, [prompt for prompt, _ in problems], ctx, device)  # extras/generation.py: batched
    correct = sum(answer_of(text) == answer for text, (_, answer) in zip(texts, problems))
    return correct / max(1, len(problems)), texts


def evaluate(model, cfg, enc, ctx, device, eval_pairs, start_eval_logps, problems):
    """Held-out metrics: on eval pairs, the loss and preference metrics against the starting model
    (start_eval_logps: its (chosen, rejected), when there is one), for SFT also the NLL per chosen
    token and its perplexity; greedy generation accuracy on problems with known answers."""
    metrics = {}
    if eval_pairs and (cfg.loss == "sft" or start_eval_logps is not None):
        chosen, rejected = all_pair_logps(model, eval_pairs, enc, ctx, device)
    if eval_pairs and cfg.loss == "sft":
        metrics["chosen_nll"] = -chosen.sum().item() / sum(len(c) for _, c, _ in eval_pairs)
        metrics["chosen_ppl"] = math.exp(metrics["chosen_nll"])
    if eval_pairs and start_eval_logps is not None:
        lengths = [torch.tensor([len(p[i]) for p in eval_pairs]) for i in (1, 2)]  # chosen, rejected
        reference = config.loss_of(cfg)[1].reference  # a frozen copy of the starting model (SFT: DPO's)
        metrics.update(loss_and_metrics((chosen, rejected), start_eval_logps if reference else (None, None),
                                        lengths, cfg)[1])
        if not reference:  # the change from the starting model all the same, in nats
            metrics["logratio/chosen"] = (chosen - start_eval_logps[0]).mean().item()
            metrics["logratio/rejected"] = (rejected - start_eval_logps[1]).mean().item()
    if problems:
        metrics["gen_accuracy"], _ = generation_accuracy(model, enc, problems, ctx, device)
    model.train()
    return metrics


# ---------------------------------------------------------------------------------------------
# Training

def optimizer_step(model, optimizer, scaler, grad_clip, loss):
    """Unscale, clip, then step unless the loss or the gradient is not finite: such a step never
    reaches the weights. With float16, overflowing gradients are the GradScaler's to skip (it
    lowers its scale). Returns (grad norm, whether the step was taken, whether the GradScaler
    skipped it)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    finite = math.isfinite(loss) and (scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
    scale = scaler.get_scale()
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), finite, finite and scaler.get_scale() < scale


def train(cfg):
    """Train one stage as cfg says and return its final summary (a dict; empty on ranks > 0)."""
    rank, world = distributed.rank_and_world()  # (0, 1) unless torchrun started several processes
    master = rank == 0  # only rank 0 evaluates, logs and writes files
    device, dtype, ctx, scaler = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    enc = load_tokenizer(cfg.tokenizer)
    # checkpoints.load_init reads --init: a train.py checkpoint or Hugging Face GPT-2 weights
    model = build_model(cfg, enc, checkpoints.load_init(cfg.init) if cfg.init else None).to(device)
    # extras/splits.run_splits: the built-in splits, or a JSONL file's (and --eval-data's)
    train_pairs, eval_pairs, val_problems, test_problems = tokenize_splits(
        run_splits(cfg.data, cfg.eval_data), enc, model.config.block_size, cfg.data)
    global_batch = cfg.batch_size * cfg.grad_accum * world  # distinct pairs per optimizer step
    config.check_global_batch(cfg, global_batch, world, len(train_pairs))  # one line if the data has fewer pairs
    uses_ref = cfg.loss != "sft" and LOSSES[cfg.loss].reference  # does the loss compare with a reference?
    report.print_config(cfg, model, device, dtype, world, global_batch)  # a few lines: what trains, how

    # The starting model (--init) is the model before its first step: its held-out figures are
    # computed once, for the summary. The reference, for a loss that has one, is the starting model
    # frozen: its log-probs computed now (and cached), or a frozen copy run in the loop (every-step).
    start_eval_logps = all_pair_logps(model, eval_pairs, enc, ctx, device) if cfg.init and eval_pairs else None
    start_test = generation_accuracy(model, enc, test_problems, ctx, device) \
        if cfg.init and test_problems and master else (None, None)  # (accuracy, completions)
    packed = cfg.share_prompt and cfg.loss != "sft" and not cfg.full_logits  # SFT reads chosen rows
    collate_fn = speedups.collate_shared if packed else collate
    ref_train_logps = None  # --ref-logps auto or precompute: extras/speedups.py (the model is still the reference)
    if uses_ref and cfg.ref_logps != "every-step":
        ref_train_logps = speedups.reference_logps(model, train_pairs, cfg, global_batch, device, dtype, partial(
            all_pair_logps, enc=enc, ctx=ctx, device=device, collate_fn=collate_fn, full_logits=cfg.full_logits))
    ref = frozen_copy(model) if uses_ref and ref_train_logps is None else None

    speedups.sparse_embedding_grad(model, device, world)  # a memory lever for large vocabularies
    optimizer = make_optimizer(model, cfg, device)
    ckpt_path, metrics_path = os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "metrics.jsonl")
    # --resume: weights, optimizer and random states from ckpt_path, after checking the config
    step = checkpoints.restore(cfg, ckpt_path, model, optimizer, scaler) if cfg.resume else 0
    if master:
        files.start_metrics(metrics_path, step)  # keeps the rows up to this step

    def checkpoint(done):  # weights, optimizer, step, config: one file, written atomically
        if master:
            checkpoints.save_training_state(ckpt_path, model, optimizer, scaler, step, done, cfg)

    # The compiled module trains; the plain one (the same weights) is evaluated and saved, so
    # checkpoints have no "_orig_mod." prefixes.
    train_model = torch.compile(model) if cfg.compile else model
    model.train()
    health = stopping.StepHealth(cfg, ckpt_path, dtype != torch.float32)  # counts non-finite steps
    stop_rule = config.has_stop_rule(vars(cfg))  # SFT from random weights, on data with problems
    meter = flops.Meter(model.config, train_pairs, cfg, device, dtype, ref is not None, packed)  # the log's util
    t_start, t_last, start_step = time.time(), time.time(), step
    with stopping.catch_signals() as stop:  # Ctrl-C or SIGTERM: checkpoint after the step, stop
        while step < cfg.steps:
            # --- the batch: a pure function of (seed, step), so --resume reads the same data
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            global_ids = batch_indices(len(train_pairs), global_batch, step, cfg.seed)
            per_rank = global_batch // world
            mine = global_ids[rank * per_rank:(rank + 1) * per_rank]  # this rank's share

            # --- forward and backward: grad_accum micro-batches, whose gradients add up
            stats = {}
            for m in range(cfg.grad_accum):
                ids = mine[m * cfg.batch_size:(m + 1) * cfg.batch_size]
                batch = speedups.to_device(collate_fn([train_pairs[i] for i in ids], enc.eot_token), device)
                ref_logps = None if ref_train_logps is None else ref_train_logps.of(step, m, ids, device)
                with ctx:
                    loss, micro_stats = batch_loss(train_model, ref, batch, cfg, ref_logps)
                # exercise 5 begins: backward, scaled for accumulation
                scaler.scale(loss / cfg.grad_accum).backward()  # divided: the sum is the mean's gradient
                # exercise 5 ends
                for k, v in micro_stats.items():  # log the true mean over micro-batches, not the last
                    stats[k] = stats.get(k, 0.0) + v / cfg.grad_accum
            distributed.average_gradients(model)  # under torchrun: the mean over the ranks, one all-reduce
            stats = distributed.all_mean(stats, device)  # the same for the logged figures

            # --- update: unscale, clip, step unless the loss or a gradient is not finite, zero
            grad_norm, finite, overflow = optimizer_step(model, optimizer, scaler, cfg.grad_clip, stats["loss"])
            step += 1
            health.record(step, finite, overflow)  # stops the run after max_bad_steps bad ones in a row
            meter.add(train_pairs[i] for i in global_ids)  # tokens and model FLOPs (extras/flops.py)

            last = step == cfg.steps  # the last step logs, evaluates and checkpoints whatever the intervals
            # --- log
            if master and (step % cfg.log_every == 0 or last):
                now = time.time()
                row = {"step": step, **stats, "grad_norm": grad_norm, "lr": lr,
                       **meter.rates(now - t_last), **health.counts()}
                eta = (now - t_start) / (step - start_step) * (cfg.steps - step)
                shown = LOSSES[cfg.loss].shown if cfg.loss in LOSSES else ()  # the loss's own terms
                print(report.format_row(row, shown) + f" | eta {eta:.0f}s")  # step | loss | ...
                files.log_row(metrics_path, row)
                t_last = now

            # --- eval and checkpoint; SFT from random weights stops at its target accuracy,
            # checked every sft_check_every steps as well (generation accuracy alone)
            at_eval = step % cfg.eval_every == 0 or last
            if at_eval or (stop_rule and step % cfg.sft_check_every == 0):
                reached = False
                if master:
                    metrics = evaluate(model, cfg, enc, ctx, device, eval_pairs if at_eval else [],
                                       start_eval_logps, val_problems)
                    print(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                    files.log_row(metrics_path, {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
                    reached = stop_rule and metrics.get("gen_accuracy", 0.0) >= cfg.sft_target_acc
                stop_early = distributed.any_rank(reached, device)  # rank 0's say
                if stop_early:
                    print(f"SFT reached {cfg.sft_target_acc:.0%} generation accuracy on the eval problems: stopping")
                checkpoint(done=stop_early or last)
                if stop_early:
                    break
                t_last = time.time()  # tokens/s measures training only

            # --- interrupted: checkpoint this step and leave (every rank at the same step)
            if distributed.any_rank(stop.requested, device):
                checkpoint(done=False)
                stop.exit(step, ckpt_path)  # "stopped at step N ...; to continue, add --resume"

    print(f"{cfg.loss} finished {step} steps in {time.time() - t_start:.0f}s; checkpoint {ckpt_path}")
    summary = {}
    if master:
        if cfg.export_hf:
            save_hf_gpt2(model, cfg.export_hf, eos_id=enc.eot_token)  # extras/hf_gpt2.py
            print(f"exported a Hugging Face GPT-2 checkpoint to {cfg.export_hf}")
        # --- summary: the starting model vs the trained one, on held-out data
        trained, texts = evaluate(model, cfg, enc, ctx, device, eval_pairs, start_eval_logps, problems=[]), None
        if test_problems:  # evaluate's last figure, here to keep the completions for the examples
            trained["gen_accuracy"], texts = generation_accuracy(model, enc, test_problems, ctx, device)
        # report.summarize: summary.json (whole or not at all), a table, three problems' completions
        summary = report.summarize(cfg, trained, start_test, start_eval_logps, eval_pairs, test_problems, texts)
    distributed.barrier()  # under torchrun, the next stage reads this one's checkpoint
    return summary


# ---------------------------------------------------------------------------------------------
# The two stages: an SFT model, then preference training from it

def ensure_sft_model(cfg):
    """The path of the default SFT checkpoint for cfg's data and seed, trained first if missing:
    the preference run's starting model (and its reference, for a loss that has one). The SFT
    recipe is the defaults, sized to the data; only the knobs that say which data, model and
    machine (sft_inherits) carry over, and --sft-steps, --sft-batch-size and --sft-lr override."""
    keep = config.fields_where(TrainConfig, "sft_inherits")
    steps, batch_size = config.sft_length(cfg)  # 3 passes over the data (at most 600), batch <= 64
    sft_cfg = resolve(TrainConfig(loss="sft", steps=steps, batch_size=batch_size, lr=cfg.sft_lr,
                                  **{k: getattr(cfg, k) for k in sorted(keep)}))
    path = os.path.join(sft_cfg.out, "ckpt.pt")
    role = "reference" if LOSSES[cfg.loss].reference else "starting model"
    # checkpoints.claim_reference: waits while another run trains this model, stops (one line)
    # if it was made with another recipe, and holds its folder while this run trains it
    with checkpoints.claim_reference(sft_cfg, path, cfg) as finished:
        if finished:
            print(f"reusing the SFT {role} {path} (delete it to train a new one)")
            return path
        sft_cfg.resume = os.path.exists(path)  # an SFT run that was interrupted continues
        print(f"=== stage 1: SFT {role} -> {path}")
        train(sft_cfg)
    print(f"=== stage 2: {cfg.loss} from {path}")
    return path


def main(argv=None):
    # bad input, a full disk or Ctrl-C outside the loop: one line that says what to do, no traceback
    with stopping.one_line_errors():
        cfg = resolve(parse_args(argv))
        distributed.setup_distributed()  # under torchrun: join the other processes (left on exit)
        with files.FolderLock(cfg.out):  # a second run on this --out stops here, in one line
            if cfg.loss != "sft" and not cfg.init:
                cfg.init = ensure_sft_model(cfg)  # stage 1
            return train(cfg)  # stage 2 (or the only stage)


if __name__ == "__main__":
    main()
