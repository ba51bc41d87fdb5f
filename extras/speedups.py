"""Speed levers: each one computes what the lesson's plain path computes, faster or in less memory,
and tests/test_speedups.py pins each one to the plain path. Not needed to follow a training step.

- collate_shared / packed_logps (--share-prompt): one packed row per pair, so each prompt is read
  once instead of twice.
- sparse_embedding_grad: the token lookup's share of the tied wte gradient built sparse (CPU,
  large vocabularies).
- reference_logps (--ref-logps auto, precompute): the reference's log-probs computed before step 1,
  for the micro-batches the loop will read (the same bits as the loop's own reference forward) or
  for every pair (reference_train_logps), cached beside --init for the next run from the same
  reference, so that the loop runs no reference and keeps no copy of it.
- to_device: pinned host memory, so a copy to a GPU overlaps with compute.
- manual_attention: the textbook attention that SDPA replaces (bench.py --manual-attention turns
  this lever off, to measure it).
"""
import hashlib
import math
import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from data import batch_indices
from dpop import summed_logps
from extras.distributed import rank_and_world
from extras.files import save_checkpoint


# ---------------------------------------------------------------------------------------------
# Packed rows: prompt, chosen and rejected in one row (--share-prompt)

class PackedBatch(NamedTuple):
    """What collate_shared returns (CPU tensors); see its docstring."""
    idx: torch.Tensor           # (B, T) long
    position_ids: torch.Tensor  # (B, T) long
    attn_mask: torch.Tensor     # (B, T, T) bool
    where: torch.Tensor         # (2, N) long: (row, column) of each completion token's logits
    targets: torch.Tensor       # (N,) long
    seq: torch.Tensor           # (N,) long: 0..B-1 chosen, B..2B-1 rejected


def collate_shared(pairs, pad_id):
    """Pack each pair into ONE row, prompt + chosen + rejected, so that the prompt is read once
    instead of twice (the rows of `collate` repeat it). The rejected tokens restart their
    positions after the prompt and may not read the chosen tokens, so every completion token
    sees exactly what it sees in `collate`'s rows: the log-probs are the same, for less work
    when prompts are long. A completion's last token is only ever a target, so it is not input.

    Worked example, the pair of `collate`'s docstring (E = end-of-text, also the pad id):
        prompt [E, '1', '=']   chosen ['1', E]   rejected ['2', '2', E]
        column    0  1  2  3  4  5
        idx       E  1  =  1  2  2         prompt, chosen[:-1], rejected[:-1], then padding
        position  0  1  2  3  3  4         the rejected tokens restart at the prompt's length
        attention causal, except that columns 4 and 5 (rejected) do not see column 3 (chosen)
        chosen targets   '1' read at column 2, E at column 3
        rejected targets '2' read at column 2, '2' at column 4, E at column 5

    Args:
        pairs: list of (prompt_ids, chosen_ids, rejected_ids) from tokenize_pairs.
        pad_id: token id written at padded positions (never a target, so any valid id works).
    Returns:
        PackedBatch: idx (B, T) long; position_ids (B, T) long, each token's position;
        attn_mask (B, T, T) bool, true where a token may read another; where (2, N) long, the
        (row, column) whose logits predict each of the N completion tokens; targets (N,) long,
        those tokens; seq (N,) long, the sequence each belongs to: pair i's chosen is i, its
        rejected B + i.
    """
    B = len(pairs)
    lengths = [len(p) + len(c) + len(r) - 2 for p, c, r in pairs]
    T = max(lengths)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    attn_mask = torch.tril(torch.ones(T, T, dtype=torch.bool)).repeat(B, 1, 1)
    rows, cols, targets, seq = [], [], [], []
    for i, (p, c, r) in enumerate(pairs):
        P, C = len(p), len(c)
        idx[i, :lengths[i]] = torch.tensor(p + c[:-1] + r[:-1])
        position_ids[i, :P + C - 1] = torch.arange(P + C - 1)
        position_ids[i, P + C - 1:lengths[i]] = torch.arange(P, lengths[i] - C + 1)
        attn_mask[i, P + C - 1:, P:P + C - 1] = False  # rejected (and the padding after it) never read chosen
        for which, completion, start in ((i, c, P), (B + i, r, P + C - 1)):
            # the first token is predicted at the prompt's last column, the others at their predecessor's
            cols += [P - 1] + list(range(start, start + len(completion) - 1))
            rows += [i] * len(completion)
            targets += completion
            seq += [which] * len(completion)
    return PackedBatch(idx, position_ids, attn_mask, torch.tensor([rows, cols]), torch.tensor(targets),
                       torch.tensor(seq))


def packed_logps(model, batch):
    """Summed completion log-probs of a PackedBatch: (chosen (B,), rejected (B,)), float32, equal
    to those of data.collate's two rows per pair."""
    logits = model(batch.idx, logits_at=(batch.where[0], batch.where[1]),
                   position_ids=batch.position_ids, attn_mask=batch.attn_mask)  # (N, V)
    return summed_logps(logits, batch.targets, batch.seq, 2 * batch.idx.size(0)).chunk(2)


# ---------------------------------------------------------------------------------------------
# Memory: the token lookup's gradient

def sparse_embedding_grad(model, device, world):
    """wte is tied to lm_head, so its gradient has two shares: the head's, dense (every logit
    touches every row), and the token lookup's, zero except at the rows of the batch's tokens.
    With a large vocabulary on a CPU, the lookup's share is made sparse and added onto the
    head's, rather than built as a second zero-filled (vocab, n_embd) tensor: the same sum, with
    74 MiB less at bench.py's peak (--dense-embedding-grad there turns it off). wte.weight.grad
    is still dense. A byte vocabulary's (257, n_embd) gradient is too small to matter (and its
    sums in another order would move the demo's figures in their last bits), and torchrun and GPUs
    were not measured: those keep the default."""
    model.transformer.wte.sparse = (device.type == "cpu" and world == 1
                                    and model.config.vocab_size > 4096)


# ---------------------------------------------------------------------------------------------
# The reference's log-probs, computed before the first step (--ref-logps auto or precompute)

def precompute_pays(cfg, global_batch, n_pairs):
    """--ref-logps precompute, or auto when the run reads each training pair at least once on
    average: one pass over the data then costs no more than a reference forward every step."""
    return cfg.ref_logps == "precompute" or (
        cfg.ref_logps == "auto" and cfg.steps * global_batch >= n_pairs)


def how_computed(device, dtype):
    """What moves the bits of a forward pass besides the weights and the tokens: part of a
    cache's key."""
    return (f"{device} {dtype} torch {torch.__version__} threads {torch.get_num_threads()} "
            f"{torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else ''}")


class ReferenceLogps(NamedTuple):
    """The reference's log-probs computed before training: table (K, 2) of (chosen, rejected).
    per_pair: row i is training pair i (one pass over the data); else the rows are the run's own
    micro-batches, step by step, batch_size rows each."""
    table: torch.Tensor
    per_pair: bool
    batch_size: int
    grad_accum: int

    def of(self, step, m, ids, device):
        """(chosen, rejected) of micro-batch m of step `step`, whose pairs are ids."""
        if self.per_pair:
            rows = self.table[ids]
        else:
            start = (step * self.grad_accum + m) * self.batch_size
            rows = self.table[start:start + len(ids)]
        return rows.to(device).unbind(1)


def reference_logps(ref, pairs, cfg, global_batch, device, dtype, pair_logps):
    """The reference's log-probs of the training pairs, computed before the first step so that
    the loop runs no reference (and keeps no copy of it). When the run reads each pair at least
    once on average (precompute_pays), one pass over the data, pair by pair; else those of the
    micro-batches the loop will read, each computed as the loop would compute it (the same bits
    as --ref-logps every-step). pair_logps(model, some_pairs, batch_size=64) -> (chosen, rejected).
    Cached beside the --init checkpoint when it is train.py's (so --loss dpo and --loss dpop from
    one SFT model and seed compute them once), else in --out."""
    rank, world = rank_and_world()
    folder = os.path.dirname(cfg.init) if cfg.init.endswith(".pt") else cfg.out
    how = how_computed(device, dtype)
    if precompute_pays(cfg, global_batch, len(pairs)):
        return ReferenceLogps(reference_train_logps(ref, pairs, folder, pair_logps, how), True, 0, 0)
    batches = micro_batches(len(pairs), cfg, global_batch, rank, world)
    flat = [i for ids in batches for i in ids]
    # the batches themselves, not only their pairs, key it: a pair's log-probs computed among 4
    # pairs and among 8 differ in their last bits, and at step 1 DPOP's penalty turns on at the
    # first bit below c = 0
    key = hashlib.sha256(repr(pairs).encode() + how.encode() + repr(batches).encode())

    def compute():
        chosen, rejected = zip(*(pair_logps(ref, [pairs[i] for i in ids], batch_size=len(ids)) for ids in batches))
        return torch.stack((torch.cat(chosen), torch.cat(rejected)), 1)
    table = cached_table(folder, key, ref, (len(flat), 2), compute, f"the {cfg.steps} steps' batches",
                         save=True)
    return ReferenceLogps(table, False, cfg.batch_size, cfg.grad_accum)


def micro_batches(n, cfg, global_batch, rank, world):
    """The pair indices of each micro-batch this rank reads, step by step: the loop's own
    schedule (train.py), which tests/test_speedups.py pins to it."""
    per_rank = global_batch // world
    out = []
    for step in range(cfg.steps):
        mine = batch_indices(n, global_batch, step, cfg.seed)[rank * per_rank:(rank + 1) * per_rank]
        out += [mine[m * cfg.batch_size:(m + 1) * cfg.batch_size] for m in range(cfg.grad_accum)]
    return out


def reference_train_logps(ref, pairs, out, all_pair_logps, how=""):
    """The reference's log-probs of every training pair, as an (N, 2) tensor of (chosen,
    rejected), so that training needs no reference forward pass. all_pair_logps(model, pairs)
    computes them (train.py passes its own). Cached in the folder out under a key made of
    everything that moves their bits: the reference's weights, the tokenized pairs, and how they
    are computed (how: the device, the dtype, ...); a cache that cannot be read is computed
    again. Under torchrun each rank computes every world_size-th pair and the shares are
    gathered."""
    rank, world = rank_and_world()

    def compute():
        ids = list(range(rank, len(pairs), world))  # this rank's share
        shares = [(ids, torch.stack(all_pair_logps(ref, [pairs[i] for i in ids]), 1))]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, shares[0])
            shares = gathered
        logps = torch.zeros(len(pairs), 2)
        for ids, values in shares:
            logps[ids] = values
        return logps
    key = hashlib.sha256(repr(pairs).encode() + how.encode())
    return cached_table(out, key, ref, (len(pairs), 2), compute, f"{len(pairs)} pairs", save=rank == 0)


def cached_table(folder, key, ref, shape, compute, what, save):
    """compute()'s table, or the one cached in folder under key (which is completed here with
    the reference's weights). A cache that cannot be read is computed again; one that cannot be
    written is only a warning."""
    for t in ref.state_dict().values():
        key.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    path = os.path.join(folder, f"ref_logps-{key.hexdigest()[:16]}.pt")
    if os.path.exists(path):
        try:
            logps = torch.load(path, weights_only=True)
            if isinstance(logps, torch.Tensor) and logps.shape == shape:
                print(f"reference log-probs from {path}")
                return logps
            problem = "it holds something else"
        except Exception as e:
            problem = f"{type(e).__name__}"
        print(f"warning: {path}: cannot use the cached reference log-probs ({problem}); "
              f"computing them again")
    t0 = time.time()
    logps = compute()
    if save:
        try:
            save_checkpoint(path, logps)
        except OSError as e:  # a read-only folder: the run goes on without the cache
            print(f"warning: cannot cache the reference log-probs in {folder} ({e.strerror or e}); going on")
            path = "nowhere"
    print(f"reference log-probs of {what} computed in {time.time() - t0:.0f}s; cached in {path}")
    return logps


# ---------------------------------------------------------------------------------------------
# Copies to the device, attention

def to_device(batch, device):
    """A collated batch (a NamedTuple of tensors) on device. Pinned memory lets the copy to a GPU
    overlap with compute."""
    if device.type == "cuda":
        return type(batch)(*(t.pin_memory().to(device, non_blocking=True) for t in batch))
    return type(batch)(*(t.to(device) for t in batch))


def manual_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    """softmax(q k^T / sqrt(head size), masked) v, the (B, nh, T, T) scores built in full: what
    F.scaled_dot_product_attention computes without materialising them. No dropout (the
    benchmark runs without it)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v
