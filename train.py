"""Train a GPT with DPO, DPOP, IPO, a hinge loss, or plain SFT. The loop is the lesson: it is all here.

    python train.py --loss dpop               # the demo: SFT reference (trained or reused), then DPOP
    python train.py --loss dpo                # the same with DPO: watch logratio/chosen go negative
    python train.py --loss sft                # only the SFT stage
    python train.py --loss dpop --init out/sft-arith-seed1337/ckpt.pt --data pairs.jsonl
    python train.py --help                    # every flag

Without --init, a preference run first trains the SFT reference on the chosen completions of the
same data (or reuses out/sft-<data>-seed<seed>/ckpt.pt when it is there), then trains the policy
from it against a frozen copy of it, then prints a summary of reference vs trained.
The maths lives in dpop.py, the data in data.py, the model in model.py.
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (BUILTIN, DataError, answer_of, batch_indices, builtin_data, collate,
                  collate_shared, load_preferences, load_tokenizer, mean_edit_distance, tokenize_pairs)
from dpop import (LOSSES, completion_logps, preference_loss, preference_metrics, sequence_logps,
                  summed_logps)
from model import GPT, GPT2_SIZES, GPTConfig, find_hf_gpt2, load_hf_gpt2, save_hf_gpt2


# ---------------------------------------------------------------------------------------------
# Every knob, with its default and its --help text. Flags are generated from this dataclass
# (--batch-size for batch_size).

def knob(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train
    loss: str = knob("dpop", "sft, or a preference loss: dpo, dpop, ipo, hinge")
    data: str = knob("arith", "built-in data (arith; arith-hed, the high-edit-distance control) "
                              "or a .jsonl file of prompt/chosen/rejected")
    eval_data: str = knob("", "evaluate on this data set's held-out pairs and problems instead, "
                              "and train on all of --data (built-in name or .jsonl)")
    tokenizer: str = knob("byte", "byte (built-in), a tiktoken name (gpt2, ...) or a .tiktoken file")
    init: str = knob("", "checkpoint to start from; empty: sft starts from random weights, and "
                         "preference losses from the default SFT checkpoint (trained if missing)")
    out: str = knob("", "output folder; empty: out/<loss>-<data>-seed<seed>")
    resume: bool = knob(False, "continue from <out>/ckpt.pt")
    export_hf: str = knob("", "after training, also write the model as a Hugging Face GPT-2 "
                              "checkpoint (config.json, model.safetensors) into this folder")
    # optimisation; None: the stage's default (sft: 600 / 64 / 1e-3, preference: 300 / 32 / 2e-4)
    steps: int = knob(None, "optimizer steps (default: the stage's)")
    batch_size: int = knob(None, "pairs (or SFT examples) per micro-batch (default: the stage's)")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    lr: float = knob(None, "peak learning rate (default: the stage's)")
    warmup: float = knob(0.1, "fraction of the steps spent warming the LR up; then cosine decay")
    min_lr_ratio: float = knob(0.1, "the LR decays to lr * min_lr_ratio")
    weight_decay: float = knob(0.1, "AdamW decay, on matrices and embeddings only")
    grad_clip: float = knob(1.0, "clip the global grad norm to this (0: no clipping)")
    max_bad_steps: int = knob(10, "stop after this many steps in a row with a non-finite loss or "
                                  "gradient (each one is skipped)")
    # the preference loss
    beta: float = knob(0.1, "how far the policy may move from the reference")
    lam: float = knob(50.0, "DPOP's penalty weight (the paper's value)")
    label_smoothing: float = knob(0.0, "conservative DPO: assumed fraction of flipped labels")
    ref_logps: str = knob("auto", "the reference's log-probs: precompute (one pass over the data "
                                  "before training, cached in --out, then the reference model is "
                                  "freed), every-step, or auto (precompute when the run sees each "
                                  "pair at least once on average)")
    full_logits: bool = knob(False, "compute logits at every position, not only the completion "
                                    "positions (slower; for comparison)")
    share_prompt: bool = knob(False, "read each prompt once: pack prompt, chosen and rejected into "
                                     "one row (faster with long prompts; same maths)")
    # the SFT stage
    sft_target_acc: float = knob(0.5, "stop SFT from random weights once held-out generation "
                                      "accuracy reaches this (built-in data; 0: never)")
    # the model, when it starts from random weights (otherwise the --init checkpoint's shape)
    n_layer: int = knob(4, "transformer blocks")
    n_head: int = knob(4, "attention heads")
    n_embd: int = knob(128, "width")
    block_size: int = knob(64, "context length in tokens")
    dropout: float = knob(0.0, "dropout probability")
    # evaluation and logging
    eval_every: int = knob(50, "evaluate and checkpoint every this many steps (and at the end)")
    log_every: int = knob(10, "print and record a metrics row every this many steps")
    seed: int = knob(1337, "seed of the weights' init and of the data order")
    device: str = knob("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    compile: bool = knob(False, "torch.compile the policy for training (pays off on a GPU)")
    dtype: str = knob("auto", "auto (bfloat16 on CUDA where supported, else float16; float32 "
                              "elsewhere), float32, bfloat16 or float16 (with a GradScaler)")


STAGE_DEFAULTS = {"sft": dict(steps=600, batch_size=64, lr=1e-3),
                  "preference": dict(steps=300, batch_size=32, lr=2e-4)}
# A run may change these on --resume; any other difference from the checkpoint's config is refused.
RESUME_MAY_CHANGE = {"steps", "eval_every", "log_every", "resume", "device", "sft_target_acc",
                     "max_bad_steps", "out", "compile", "export_hf", "ref_logps", "full_logits",
                     "share_prompt"}
MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        sys.exit(f"error: {message} (see python train.py --help)")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "loss":
            p.add_argument(flag, default=f.default, choices=("sft",) + LOSSES, help=help_text)
        else:
            p.add_argument(flag, type=f.type, default=f.default, help=help_text)
    return TrainConfig(**vars(p.parse_args(argv)))


def data_name(cfg):
    return cfg.data if cfg.data in BUILTIN else os.path.splitext(os.path.basename(cfg.data))[0]


def resolve(cfg):
    """Fill the stage defaults and the output folder, and refuse values that cannot work."""
    stage = STAGE_DEFAULTS["sft" if cfg.loss == "sft" else "preference"]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in stage.items() if getattr(cfg, k) is None})
    if not cfg.out:
        kind = "sft-cont" if cfg.loss == "sft" and cfg.init else cfg.loss
        cfg.out = os.path.join("out", f"{kind}-{data_name(cfg)}-seed{cfg.seed}")
    for name in ("steps", "batch_size", "grad_accum", "lr", "beta", "eval_every", "log_every",
                 "max_bad_steps"):
        if getattr(cfg, name) <= 0:
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.ref_logps not in ("auto", "precompute", "every-step"):
        raise DataError(f"--ref-logps {cfg.ref_logps}: choose auto, precompute or every-step")
    if cfg.lam < 0:
        raise DataError(f"--lam must be zero or positive, got {cfg.lam}")
    if cfg.label_smoothing and cfg.loss != "dpo":
        raise DataError(f"--label-smoothing applies to --loss dpo only")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise DataError(f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Several processes under torchrun: each is a rank with its own share of every batch

def setup_distributed():
    """Join torchrun's process group when torchrun started this process (it sets RANK,
    WORLD_SIZE, LOCAL_RANK and the rendezvous address): nccl between GPUs, gloo on CPUs. Ranks
    above 0 print nothing."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")


def rank_and_world():
    """This process's rank and the number of processes: (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_mean(values, device):
    """The mean over the ranks of a dict of floats, with one all-reduce; as it is without torchrun."""
    if not dist.is_initialized():
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


# ---------------------------------------------------------------------------------------------
# Setup: device and precision, data, model, checkpoints

def setup_device(cfg):
    """Pick the device and the precision context once: autocast where a low-precision dtype is
    asked for, a null context for float32. The GradScaler is enabled only for float16."""
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    else:
        device = cfg.device
    if device == "cuda" and dist.is_initialized():  # under torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise DataError(f"--device {cfg.device}: choose auto, cuda, cuda:N, mps or cpu")
    device = torch.device(device)
    dtype_name = cfg.dtype
    if dtype_name == "auto":
        dtype_name = "float32" if device.type != "cuda" else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype_name not in dtypes:
        raise DataError(f"--dtype {cfg.dtype}: choose auto, float32, bfloat16 or float16")
    dtype = dtypes[dtype_name]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    return device, dtype, ctx, scaler


def read_splits(name, flag):
    """(train, eval, test) of a data set: the built-in splits; or a JSONL file's pairs with a
    fixed 5% (at most 256) held out for evaluation, and no test problems (no known answers)."""
    if name in BUILTIN:
        ds = builtin_data(name)
        return ds["train"], ds["eval"], ds["test"]
    if not (name.endswith((".jsonl", ".json")) or os.path.exists(name)):
        raise DataError(f"{flag} {name}: not a built-in data set ({', '.join(BUILTIN)}) "
                        f"nor an existing .jsonl file")
    records, n_identical = load_preferences(name)
    if n_identical:
        print(f"warning: skipped {n_identical} pairs of {name} whose chosen equals rejected")
    random.Random(0).shuffle(records)
    n_eval = min(256, len(records) // 20)
    return records[n_eval:], records[:n_eval], []


def load_data(cfg, enc, block_size):
    """Tokenized train and eval pairs, and held-out problems with known answers (built-in data
    only): the eval problems (for SFT's early stop and the log) and the test problems (for the
    summary). With --eval-data, all of --data trains and the other set's held-out data evaluates."""
    train_recs, eval_recs, test = read_splits(cfg.data, "--data")
    if cfg.eval_data:
        train_recs = train_recs + eval_recs  # --data's own held-out pairs train too
        _, eval_recs, test = read_splits(cfg.eval_data, "--eval-data")
    train, n_cut, n_drop = tokenize_pairs(train_recs, enc, block_size)
    evals, n_cut_e, n_drop_e = tokenize_pairs(eval_recs, enc, block_size)
    if not train:
        raise DataError(f"{cfg.data}: no training pair fits a context of {block_size} tokens")
    print(f"data {cfg.data}: {len(train)} train pairs, {len(evals)} eval pairs, {len(test)} test "
          f"problems; {n_cut + n_cut_e} truncated, {n_drop + n_drop_e} dropped (no completion "
          f"token or no difference left); mean normalised edit distance chosen vs rejected "
          f"{mean_edit_distance(train):.3f}")
    val = [(r["prompt"], answer_of(r["chosen"])) for r in eval_recs] if test else []
    return train, evals, val, test


def save_checkpoint(path, obj):
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed over
    the old one. A crash at any moment leaves either the old checkpoint or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                        f"it may be truncated") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "config"} <= ckpt.keys():
        raise DataError(f"{path}: not a checkpoint written by train.py")
    return ckpt


def load_init(spec):
    """The --init weights, as a dict shaped like a train.py checkpoint: from a train.py
    checkpoint; from a Hugging Face GPT-2 folder, model.safetensors or pytorch_model.bin; or from
    a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) looked up in the Hugging Face cache."""
    if spec not in GPT2_SIZES and not (os.path.isdir(spec) or spec.endswith((".safetensors", ".bin"))):
        return load_checkpoint(spec)
    try:
        model = load_hf_gpt2(find_hf_gpt2(spec) if spec in GPT2_SIZES else spec)
    except LookupError as e:  # a GPT-2 name that is not in the Hugging Face cache
        raise DataError(f"--init {spec}: {e.args[0]}") from None
    except FileNotFoundError as e:
        raise DataError(f"--init {spec}: {e.filename or e}: not found") from None
    except Exception as e:
        raise DataError(f"--init {spec}: not a Hugging Face GPT-2 checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "config": {"tokenizer": "gpt2"}}


def build_model(cfg, enc, init_ckpt):
    """The policy: the --init checkpoint's weights and shape, or random weights of cfg's shape.
    With --init, a shape flag must agree with the checkpoint, except that a smaller --block-size
    crops the position embeddings (GPT-2's 1024 positions cost memory a short data set never uses)."""
    if init_ckpt is None:
        gptconf = GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                            n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
        return GPT(gptconf)
    gptconf = GPTConfig(**{**init_ckpt["model_config"], "dropout": cfg.dropout})
    state_dict = init_ckpt["model"]
    for name in MODEL_SHAPE:
        asked, default = getattr(cfg, name), TrainConfig.__dataclass_fields__[name].default
        if name == "block_size" and asked != default and asked < gptconf.block_size:
            gptconf.block_size = asked
            state_dict = {**state_dict, "transformer.wpe.weight": state_dict["transformer.wpe.weight"][:asked]}
        elif asked != default and asked != getattr(gptconf, name):
            raise DataError(f"--{name.replace('_', '-')} {asked}, but --init {cfg.init} has "
                            f"{name} {getattr(gptconf, name)}; drop the flag")
    if gptconf.vocab_size != enc.n_vocab:
        raise DataError(f"--init {cfg.init}: the model has a vocabulary of {gptconf.vocab_size} but "
                        f"--tokenizer {cfg.tokenizer} has {enc.n_vocab}; use the checkpoint's "
                        f"tokenizer (--tokenizer {init_ckpt['config'].get('tokenizer')})")
    model = GPT(gptconf)
    load_weights(model, state_dict, cfg.init)
    return model


def load_weights(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise DataError(f"{path}: the weights do not fit the model ({first})") from None


def model_from_checkpoint(ckpt_path):
    """The GPT of a train.py checkpoint, with its weights; and the checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_weights(model, ckpt["model"], ckpt_path)
    return model, ckpt


def export_checkpoint(ckpt_path, folder):
    """Write a train.py checkpoint as a Hugging Face GPT-2 checkpoint, without training:
        python -c "import train; train.export_checkpoint('out/dpop-arith-seed1337/ckpt.pt', 'hf')"
    """
    model, ckpt = model_from_checkpoint(ckpt_path)
    eos_id = load_tokenizer(ckpt["config"]["tokenizer"]).eot_token
    save_hf_gpt2(model, folder, eos_id=eos_id)


def frozen_copy(model):
    """The reference model: a copy in eval mode whose parameters need no gradients. It is never
    given to the optimizer and only ever run under no_grad."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def sparse_embedding_grad(model, device, world):
    """wte is tied to lm_head, so its gradient has two shares: the head's, dense (every logit
    touches every row), and the token lookup's, zero except at the rows of the batch's tokens.
    With a large vocabulary on a CPU, the lookup's share is made sparse and added onto the
    head's, rather than built as a second zero-filled (vocab, n_embd) tensor: the same sum, with
    74 MiB less at bench.py's peak (--dense-embedding-grad there turns it off). wte.weight.grad
    is still dense. A byte vocabulary's (257, n_embd) gradient is too small to matter (and its
    sums in another order would move the demo's figures in their last bits), DDP insists on one
    layout per parameter, and GPUs were not measured: those keep the default."""
    model.transformer.wte.sparse = (device.type == "cpu" and world == 1
                                    and model.config.vocab_size > 4096)


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
# One batch through the models, and evaluation

def pair_logps(model, batch, ctx, full_logits=False):
    """Summed completion log-probs of a collated batch: (chosen (B,), rejected (B,)), float32
    whatever the autocast dtype. The model computes logits at the completion positions only,
    unless full_logits (the slower textbook way, kept for the benchmark and the tests). A batch
    of six tensors is one packed row per pair, from data.collate_shared."""
    if len(batch) == 6:
        idx, pos, attn_mask, where, targets, seq = batch
        with ctx:
            logits = model(idx, positions=(where[0], where[1]), pos=pos, attn_mask=attn_mask)  # (N, V)
        return summed_logps(logits, targets, seq, 2 * idx.size(0)).chunk(2)
    idx, targets, mask = batch
    with ctx:
        if full_logits:
            logps = sequence_logps(model(idx), targets, mask)  # logits (2B, T, V)
        else:
            logps = completion_logps(model(idx, positions=mask), targets, mask)  # logits (N, V)
    return logps.chunk(2)


def sft_loss(model, batch, ctx):
    """Mean negative log-likelihood per completion token of the chosen rows (standard SFT)."""
    idx, targets, mask = (t[: len(t) // 2] for t in batch)  # chosen rows only
    with ctx:
        logits = model(idx, positions=mask)  # (N, V): completion positions only
    return F.cross_entropy(logits.float(), targets[mask])


def forward_backward(model, ref, batches, cfg, ctx, scaler, ref_logps=None):
    """Accumulate the gradients of one optimizer step over its micro-batches. Each micro-batch's
    loss is divided by their number, because accumulated gradients add up: the sum is then the
    gradient of the mean over the global batch. Returns the metrics averaged the same way (the
    true mean over micro-batches, not the last one's). Under DDP the gradients are averaged
    across ranks once, in the last micro-batch's backward; the others run under no_sync.
    ref_logps: None to run the reference on each micro-batch, or its precomputed
    (chosen, rejected) log-probs for each micro-batch."""
    stats = {}
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not isinstance(model, DDP)
        with nullcontext() if sync else model.no_sync():
            micro_stats = forward_backward_one(model, ref, batch, cfg, ctx, scaler, len(batches),
                                               None if ref_logps is None else ref_logps[i])
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + v / len(batches)
    return stats


def forward_backward_one(model, ref, batch, cfg, ctx, scaler, n_micro, ref_logps):
    """One micro-batch: forward, its loss divided by n_micro, backward; returns its metrics."""
    if cfg.loss == "sft":
        loss = sft_loss(model, batch, ctx)
        micro_stats = {"loss": loss.item()}
    else:
        policy_chosen, policy_rejected = pair_logps(model, batch, ctx, cfg.full_logits)
        if ref_logps is None:
            with torch.no_grad():
                ref_logps = pair_logps(ref, batch, ctx, cfg.full_logits)
        ref_chosen, ref_rejected = ref_logps
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss=cfg.loss,
            beta=cfg.beta, lam=cfg.lam, label_smoothing=cfg.label_smoothing)
        loss = losses.mean()
        micro_stats = {"loss": loss.item(), **preference_metrics(
            chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, cfg.beta)}
    scaler.scale(loss / n_micro).backward()
    return micro_stats


def to_device(batch, device):
    # pinned memory lets the copy to a GPU overlap with compute
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


@torch.no_grad()
def all_pair_logps(model, pairs, enc, ctx, device, batch_size=64):
    """Chosen and rejected log-probs of every pair, in order: two (N,) tensors on the CPU."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, to_device(collate(pairs[i:i + batch_size], enc.eot_token), device), ctx)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def complete(model, enc, prompts, ctx, device, max_new_tokens=48, batch_size=512, **sampling):
    """The model's completion of each prompt, as text, in prompt order: greedy, or sampled with
    generate's temperature, top_k and generator. Prompts of equal token length are decoded
    together, batch_size at a time (no padding needed)."""
    model.eval()
    by_length = {}
    for i, prompt in enumerate(prompts):
        ids = [enc.eot_token] + enc.encode_ordinary(prompt)
        by_length.setdefault(len(ids), []).append((i, ids))
    texts = [None] * len(prompts)
    for n, group in by_length.items():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            idx = torch.tensor([ids for _, ids in batch], device=device)
            with ctx:
                out = model.generate(idx, max_new_tokens, eos_id=enc.eot_token, **sampling)
            for (i, _), row in zip(batch, out[:, n:].tolist()):
                texts[i] = enc.decode([t for t in row if t != enc.eot_token])
    return texts


def generation_accuracy(model, enc, problems, ctx, device):
    """Fraction of problems whose greedy completion states the right final answer."""
    texts = complete(model, enc, [prompt for prompt, _ in problems], ctx, device)
    correct = sum(answer_of(text) == answer for text, (_, answer) in zip(texts, problems))
    return correct / max(1, len(problems))


def reference_train_logps(ref, pairs, cfg, enc, ctx, device):
    """The reference's log-probs of every training pair, as an (N, 2) tensor of (chosen,
    rejected), so that training needs no reference forward pass. Cached in --out under a key made
    of the reference's weights and the tokenized pairs. Under torchrun each rank computes every
    world_size-th pair and the shares are gathered."""
    key = hashlib.sha256(repr(pairs).encode())
    for t in ref.state_dict().values():
        key.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    path = os.path.join(cfg.out, f"ref_logps-{key.hexdigest()[:16]}.pt")
    if os.path.exists(path):
        print(f"reference log-probs from {path}")
        return torch.load(path)
    t0 = time.time()
    rank, world = rank_and_world()
    ids = list(range(rank, len(pairs), world))  # this rank's share
    share = (ids, torch.stack(all_pair_logps(ref, [pairs[i] for i in ids], enc, ctx, device), 1))
    shares = [share]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, share)
    logps = torch.zeros(len(pairs), 2)
    for ids, values in shares:
        logps[ids] = values
    if rank == 0:
        save_checkpoint(path, logps)
    print(f"reference log-probs of {len(pairs)} pairs computed in {time.time() - t0:.0f}s; "
          f"cached in {path}")
    return logps


def evaluate(model, cfg, enc, ctx, device, eval_pairs, ref_eval_logps, problems):
    """Held-out metrics: preference metrics on eval pairs (when there is a reference) and greedy
    generation accuracy on held-out problems (when the data has known answers)."""
    metrics = {}
    if eval_pairs and ref_eval_logps is not None:
        chosen, rejected = all_pair_logps(model, eval_pairs, enc, ctx, device)
        loss_name = cfg.loss if cfg.loss != "sft" else "dpo"  # an SFT run still reports DPO's metrics
        losses, chosen_rewards, rejected_rewards = preference_loss(
            chosen, rejected, *ref_eval_logps, loss=loss_name, beta=cfg.beta, lam=cfg.lam,
            label_smoothing=cfg.label_smoothing)
        metrics["loss"] = losses.mean().item()
        metrics.update(preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected, cfg.beta))
    if problems:
        metrics["gen_accuracy"] = generation_accuracy(model, enc, problems, ctx, device)
    model.train()
    return metrics


# ---------------------------------------------------------------------------------------------
# Training

def log_row(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def check_resume(cfg, ckpt):
    old = ckpt["config"]
    differ = [k for k, v in dataclasses.asdict(cfg).items()
              if k not in RESUME_MAY_CHANGE and old.get(k) != v]
    if differ:
        what = ", ".join(f"{k} ({old.get(k)!r} -> {getattr(cfg, k)!r})" for k in differ)
        raise DataError(f"--resume: {cfg.out}/ckpt.pt was made with another configuration: {what}; "
                        f"use the same flags or another --out")


def restore(cfg, ckpt_path, model, optimizer, scaler):
    """Load a --resume checkpoint into the run; return its step (0 when there is none yet)."""
    if not os.path.exists(ckpt_path):
        print(f"--resume: no checkpoint at {ckpt_path} yet; starting from step 0")
        return 0
    ckpt = load_checkpoint(ckpt_path)
    check_resume(cfg, ckpt)
    load_weights(model, ckpt["model"], ckpt_path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    print(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"]


def ensure_sft_reference(cfg):
    """The path of the default SFT checkpoint for cfg's data and seed, trained first if missing."""
    # the SFT recipe is the defaults; only what says which data, model and machine carries over
    keep = ("data", "eval_data", "tokenizer", "seed", "device", "dtype", "eval_every", "log_every",
            "sft_target_acc", "max_bad_steps", "dropout") + MODEL_SHAPE
    sft_cfg = resolve(TrainConfig(loss="sft", **{k: getattr(cfg, k) for k in keep}))
    path = os.path.join(sft_cfg.out, "ckpt.pt")
    sft_cfg.resume = os.path.exists(path)  # an SFT run that was interrupted continues
    if sft_cfg.resume and load_checkpoint(path).get("done"):
        print(f"reusing the SFT reference {path} (delete it to train a new one)")
        return path
    print(f"=== stage 1: SFT reference -> {path}")
    train(sft_cfg)
    print(f"=== stage 2: {cfg.loss} from {path}")
    return path


def catch_signals():
    """Ctrl-C (SIGINT) and SIGTERM set a flag instead of killing the run: the loop finishes its
    step, checkpoints and exits. A second signal stops at once (the last checkpoint stays intact,
    since checkpoints are written atomically). Returns the flag (a list) and a function that puts
    the previous handlers back."""
    caught = []

    def handler(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
              f"(send it again to stop at once)", flush=True)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return caught, lambda: [signal.signal(s, h) for s, h in previous.items()]


def optimizer_step(model, optimizer, scaler, cfg, loss):
    """Clip, then step unless the loss or the gradient is not finite: such a step never reaches
    the weights. With float16, overflowing gradients are the GradScaler's to skip (it lowers its
    scale). Returns (grad norm, whether the step was taken, whether the GradScaler skipped it)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    finite = math.isfinite(loss) and (scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
    scale = scaler.get_scale()
    if finite:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), finite, finite and scaler.get_scale() < scale


def train(cfg):
    """Train one stage as cfg says and return its final summary (a dict; empty on ranks > 0)."""
    rank, world = rank_and_world()
    master = rank == 0  # under torchrun, only rank 0 evaluates, logs and writes checkpoints
    device, dtype, ctx, scaler = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    enc = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, enc, load_init(cfg.init) if cfg.init else None).to(device)
    train_pairs, eval_pairs, val_problems, test_problems = load_data(cfg, enc, model.config.block_size)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config}; device {device}, "
          f"{dtype}; global batch {global_batch} pairs = batch size "
          f"{cfg.batch_size} x grad accum {cfg.grad_accum} x {world} processes")

    # The reference: a frozen copy of the starting model. Its held-out figures (log-probs on the
    # eval pairs, accuracy on the test problems) are computed once; its log-probs on the training
    # pairs too when precomputing pays, and then the reference model is freed.
    ref = frozen_copy(model) if cfg.init else None
    ref_eval_logps = all_pair_logps(ref, eval_pairs, enc, ctx, device) if ref and eval_pairs else None
    ref_test_acc = generation_accuracy(ref, enc, test_problems, ctx, device) \
        if ref and test_problems and master else None
    precompute = cfg.ref_logps == "precompute" or (
        cfg.ref_logps == "auto" and cfg.steps * global_batch >= len(train_pairs))
    ref_train_logps = None
    if ref is not None and cfg.loss != "sft" and precompute:
        ref_train_logps = reference_train_logps(ref, train_pairs, cfg, enc, ctx, device)
    if cfg.loss == "sft" or ref_train_logps is not None:
        ref = None  # not needed in the loop

    sparse_embedding_grad(model, device, world)
    optimizer = make_optimizer(model, cfg, device)
    ckpt_path, metrics_path = os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "metrics.jsonl")
    start_step = restore(cfg, ckpt_path, model, optimizer, scaler) if cfg.resume else 0
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        old_rows = open(metrics_path).readlines() if start_step and os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:  # keep the rows up to the checkpoint; later ones are redone
            f.writelines(r for r in old_rows if json.loads(r)["step"] <= start_step)

    def checkpoint(step, done):
        if master:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "done": done,
                "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config),
                "tokenizer": cfg.tokenizer,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}})

    packed = cfg.share_prompt and cfg.loss != "sft" and not cfg.full_logits  # SFT reads chosen rows
    collate_fn = collate_shared if packed else collate
    # The compiled (and, under torchrun, DDP-wrapped) module trains; the plain one is evaluated
    # and saved, so checkpoints have no "_orig_mod." or "module." prefixes.
    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    caught, restore_signals = catch_signals()
    t_start = t_last = time.time()
    tokens_since, n_skipped, n_overflow, bad_in_a_row = 0, 0, 0, 0
    step = start_step
    try:
        while step < cfg.steps:
            # --- train step: this rank's share of the global batch, in grad_accum micro-batches
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            per_rank = cfg.batch_size * cfg.grad_accum
            indices = batch_indices(len(train_pairs), global_batch, step, cfg.seed)
            mine = indices[rank * per_rank:(rank + 1) * per_rank]
            micro = [mine[m * cfg.batch_size:(m + 1) * cfg.batch_size] for m in range(cfg.grad_accum)]
            batches = [to_device(collate_fn([train_pairs[i] for i in ids], enc.eot_token), device)
                       for ids in micro]
            ref_logps = None if ref_train_logps is None else \
                [ref_train_logps[ids].to(device).unbind(1) for ids in micro]
            stats = forward_backward(train_model, ref, batches, cfg, ctx, scaler, ref_logps)
            tokens = sum(len(p) + len(c) + (len(p) + len(r) if cfg.loss != "sft" else 0)
                         for p, c, r in (train_pairs[i] for i in mine))  # SFT reads chosen rows only
            # one all-reduce: the metrics' mean over ranks, the tokens, and whether any rank was signalled
            stats = all_mean({**stats, "tokens": tokens, "signal": caught[0] if caught else 0}, device)
            tokens_since += stats.pop("tokens") * world
            signalled = stats.pop("signal")
            if signalled and not caught:
                caught.append(signal.SIGTERM)  # another rank was asked to stop: stop together
            grad_norm, finite, overflow = optimizer_step(model, optimizer, scaler, cfg, stats["loss"])
            n_skipped, n_overflow = n_skipped + (not finite), n_overflow + overflow
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            step += 1
            if bad_in_a_row >= cfg.max_bad_steps:
                sys.exit(f"error: {bad_in_a_row} steps in a row had a non-finite loss or gradient "
                         f"(up to step {step}); stopped. The last good checkpoint is {ckpt_path}; "
                         f"try a lower --lr, or --dtype float32")

            # --- log
            if master and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.time()
                row = {"step": step, **stats, "grad_norm": grad_norm, "lr": lr,
                       "tokens_per_s": tokens_since / (now - t_last), "skipped_steps": n_skipped,
                       "overflow_steps": n_overflow}
                eta = (now - t_start) / (step - start_step) * (cfg.steps - step)
                print(format_row(row, cfg) + f" | eta {eta:.0f}s")
                log_row(metrics_path, row)
                t_last, tokens_since = now, 0

            # --- eval and checkpoint
            if step % cfg.eval_every == 0 or step == cfg.steps:
                stop_early = False
                if master:
                    metrics = evaluate(model, cfg, enc, ctx, device, eval_pairs, ref_eval_logps, val_problems)
                    print(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                    log_row(metrics_path, {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
                    stop_early = (cfg.loss == "sft" and not cfg.init and cfg.sft_target_acc > 0
                                  and metrics.get("gen_accuracy", 0.0) >= cfg.sft_target_acc)
                stop_early = all_mean({"stop": float(stop_early)}, device)["stop"] > 0  # rank 0's say
                if stop_early:
                    print(f"SFT reached the target generation accuracy {cfg.sft_target_acc:.0%}: stopping")
                checkpoint(step, done=stop_early or step == cfg.steps)
                if stop_early:
                    break
                t_last = time.time()  # tokens/s measures training only

            # --- interrupted: checkpoint this step and leave
            if caught:
                checkpoint(step, done=False)
                print(f"stopped at step {step} by {signal.Signals(caught[0]).name}; checkpoint "
                      f"{ckpt_path}. To continue, run the same command with --resume")
                if world > 1:
                    dist.barrier()  # the others wait until rank 0 has written the checkpoint
                sys.exit(128 + caught[0])
    finally:
        restore_signals()

    print(f"{cfg.loss} finished {step} steps in {time.time() - t_start:.0f}s; checkpoint {ckpt_path}")
    summary = {}
    if master:
        if cfg.export_hf:
            save_hf_gpt2(model, cfg.export_hf, eos_id=enc.eot_token)
            print(f"exported a Hugging Face GPT-2 checkpoint to {cfg.export_hf}")
        summary = summarize(cfg, model, enc, ctx, device, eval_pairs, ref_eval_logps, ref_test_acc,
                            test_problems)
    if world > 1:
        dist.barrier()  # the next stage reads this one's checkpoint
    return summary


def format_row(row, cfg):
    """One log line: the failure DPOP targets (logratio/chosen < 0) stays in view."""
    line = f"step {row['step']:4d} | loss {row['loss']:.4f}"
    if cfg.loss != "sft":
        line += (f" | margin {row['rewards/margins']:+.3f} | acc {row['rewards/accuracies']:.2f}"
                 f" | dchosen {row['logratio/chosen']:+.2f} | drejected {row['logratio/rejected']:+.2f}"
                 f" | penalty {row['penalty/active']:.2f}")
    return line + (f" | gnorm {row['grad_norm']:.2f} | lr {row['lr']:.1e}"
                   f" | {row['tokens_per_s']:.0f} tok/s")


def summarize(cfg, model, enc, ctx, device, eval_pairs, ref_eval_logps, ref_test_acc, problems):
    """Reference vs trained on held-out data; printed, written to <out>/summary.json, returned."""
    trained = evaluate(model, cfg, enc, ctx, device, eval_pairs, ref_eval_logps, problems)
    summary = {"trained": trained}
    if cfg.init:
        summary["reference"] = {} if ref_test_acc is None else {"gen_accuracy": ref_test_acc}
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"--- summary ({cfg.loss}, {len(eval_pairs)} held-out pairs, {len(problems)} held-out problems)")
    if "gen_accuracy" in trained:
        ref_acc = summary.get("reference", {}).get("gen_accuracy")
        ref_txt = f"{ref_acc:6.1%}" if ref_acc is not None else "     -"
        print(f"  generation accuracy        reference {ref_txt}   trained {trained['gen_accuracy']:6.1%}")
    if "logratio/chosen" in trained:
        print(f"  chosen log-prob change     {trained['logratio/chosen']:+8.2f} nats"
              f"   (trained {trained['logps/chosen']:.2f} vs reference {ref_eval_logps[0].mean():.2f})")
        print(f"  rejected log-prob change   {trained['logratio/rejected']:+8.2f} nats"
              f"   (trained {trained['logps/rejected']:.2f} vs reference {ref_eval_logps[1].mean():.2f})")
        print(f"  margin                     {trained['logratio/chosen'] - trained['logratio/rejected']:+8.2f} nats")
        print(f"  reward accuracy            {trained['rewards/accuracies']:8.1%}")
    return summary


def main(argv=None):
    try:
        cfg = resolve(parse_args(argv))
        setup_distributed()
        if cfg.loss != "sft" and not cfg.init:
            cfg.init = ensure_sft_reference(cfg)
        return train(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
