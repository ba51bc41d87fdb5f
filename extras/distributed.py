"""Several processes under torchrun: each is a rank with its own share of every batch. One call
joins the process group (setup_distributed), and the loop asks these helpers for its rank, its
device, the DDP wrapper, the gradient sync of each micro-batch, and the means and flags that
every rank must agree on. Without torchrun each of them is a no-op: (0, 1), the module as it is.
"""
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
# Imported before the process group exists, on purpose. Its functions take the group as a default
# argument; imported later (AdamW and DDP import it, through torch._dynamo) they would hold the
# group for good, close_distributed could not free it, gloo's worker threads would outlive it, and
# one of them freeing a tensor while Python shuts down aborts the process ("terminate called
# without an active exception": 4 torchrun runs in about 260 on 2 CPU cores).
import torch.distributed.nn  # noqa: F401
from torch.nn.parallel import DistributedDataParallel as DDP


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


def wrap_for_ranks(model, device):
    """Under torchrun, the module that trains is wrapped in DDP, which averages the gradients
    across ranks during backward; otherwise it is returned as it is."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_gradients(model, last):
    """The context for one micro-batch's backward: under DDP only the last micro-batch of a step
    all-reduces the gradients (no_sync for the others: the sum is the same, the traffic once)."""
    return nullcontext() if last or not isinstance(model, DDP) else model.no_sync()


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
