"""Several processes under torchrun: each is a rank with its own share of every batch. One call
joins the process group (setup_distributed), and the loop asks these helpers for its rank, its
device, the mean of the gradients over the ranks, and the means and flags that every rank must
agree on. Without torchrun each of them is a no-op: (0, 1), the gradients as they are.
"""
import os
import sys

import torch
import torch.distributed as dist
# Imported before the process group exists, on purpose. Its functions take the group as a default
# argument; imported later (AdamW imports it, through torch._dynamo) they would hold the group for
# good, close_distributed could not free it, gloo's worker threads would outlive it, and one of
# them freeing a tensor while Python shuts down aborts the process ("terminate called without an
# active exception": 4 torchrun runs in about 260 on 2 CPU cores).
import torch.distributed.nn  # noqa: F401


def setup_distributed():
    """Join torchrun's process group when torchrun started this process (it sets RANK,
    WORLD_SIZE, LOCAL_RANK and the rendezvous address): nccl between GPUs, gloo on CPUs. Ranks
    above 0 print nothing."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_backend() == "nccl":  # this process's GPU, before the first collective (any_rank)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")


def rank_and_world():
    """This process's rank and the number of processes: (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_device(device):
    """Under torchrun, one GPU per process: "cuda" becomes this process's cuda:LOCAL_RANK."""
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return device


def average_gradients(model):
    """Under torchrun, each rank's gradients become their mean over the ranks: one all-reduce of
    them all laid end to end, once a step, after the last micro-batch's backward. Every rank
    starts from the same weights (the seed or the checkpoint), so every rank takes the same step.

    Not DDP, which overlaps that all-reduce with the backward: its Reducer holds the process
    group, and when the Reducer went last (a wrapper freed after close_distributed), the group
    was destroyed while holding Python's lock, and its gloo threads, which need that lock to
    end, hung the process. The price, estimated and not measured: a GPT-2 step on 8 GPUs waits
    for its 500 MB of gradients at the GPUs' link speed, a few milliseconds."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)  # the sum over the ranks
    flat /= dist.get_world_size()
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def all_mean(values, device):
    """The mean over the ranks of a dict of floats, with one all-reduce; as it is without torchrun."""
    if not dist.is_initialized():
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def barrier():
    """Under torchrun, wait until every rank is here."""
    if dist.is_initialized():
        dist.barrier()


def close_distributed():
    """Leave the process group; under gloo this joins its worker threads."""
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag, device=None):
    """Whether flag is true on any rank (one all-reduce under torchrun; flag itself otherwise),
    so that every rank stops at the same step. device: where the process group reduces (default:
    this process's GPU for nccl, the CPU for gloo)."""
    if not dist.is_initialized():
        return bool(flag)
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0
