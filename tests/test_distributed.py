"""torchrun with 2 CPU processes (gloo) against one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL
from extras.checkpoints import load_checkpoint

# float32: the two runs sum the same gradients in another order, and AdamW's first steps magnify
# the rounding of near-zero gradients: the weights agree to 2e-5 (4 steps at lr 1e-4 move them
# about 4e-4, and a shard mix-up would move them differently by that much) and the logged losses
# to 5e-5
TOLERANCE, LOSS_TOLERANCE = 2e-5, 5e-5


def train_rows(out):
    rows = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("per_rank, ref_logps, loss", [
    (["--batch-size", "2", "--grad-accum", "2"], "every-step", "dpop"),
    # each rank precomputes half the reference log-probs, then they are gathered. DPO, because
    # DPOP's gradient jumps at c = 0, where every pair sits at step 0, and log-probs computed in
    # other batches differ in the last bits: the penalty would switch on for some pairs
    (["--batch-size", "4"], "precompute", "dpo"),
])
def test_two_ranks_equal_one_process_at_twice_the_batch(tmp_path, sft_ckpt, small_pairs, per_rank,
                                                         ref_logps, loss):
    common = [*TINY_MODEL, "--loss", loss, "--init", sft_ckpt, "--data", small_pairs, "--steps", "4",
              "--lr", "1e-4", "--eval-every", "4", "--log-every", "1", "--sft-target-acc", "0",
              "--ref-logps", ref_logps]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *common, "--batch-size", "8", "--out", str(tmp_path / "one")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "train.py", *common, *per_rank, "--out", str(tmp_path / "two")],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert ranks.returncode == 0, ranks.stdout[-3000:] + ranks.stderr[-3000:]
    assert "4 steps of 8 pairs (batch " in ranks.stdout and "x 2 processes)" in ranks.stdout
    one, two = (load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("one", "two"))
    assert two["step"] == 4 and two["done"]
    assert not any(k.startswith("module.") for k in two["model"])
    diff = max((two["model"][k] - one["model"][k]).abs().max().item() for k in one["model"])
    print(f"max abs weight difference after 4 steps: {diff:.2e}")
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], atol=TOLERANCE, rtol=0)
    for a, b in zip(train_rows(str(tmp_path / "one")), train_rows(str(tmp_path / "two"))):
        assert a["loss"] == pytest.approx(b["loss"], abs=LOSS_TOLERANCE)  # averaged over ranks
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=LOSS_TOLERANCE)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


LEAVE = """
import os, socket, sys, torch
sys.path.insert(0, os.getcwd())
from extras import distributed
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
before = len(os.listdir("/proc/self/task"))
distributed.setup_distributed()
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())  # imports torch._dynamo
model(torch.ones(2, 4)).sum().backward()
distributed.average_gradients(model)
optimizer.step()
distributed.barrier()
during = len(os.listdir("/proc/self/task"))
distributed.close_distributed()
print(before, during, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.slow
def test_leaving_the_process_group_ends_its_threads():
    """close_distributed frees the group, so gloo's worker threads end before Python shuts down:
    one freeing a tensor during the shutdown aborted 4 torchrun runs in about 260. They outlived it
    when a module imported after the group was made held it (extras/distributed.py's imports).
    In a fresh process, since that module is imported once."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts threads in /proc (Linux)")
    out = subprocess.run([sys.executable, "-c", LEAVE], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    before, during, after = map(int, out.stdout.split()[-3:])
    assert during > before  # gloo's worker threads
    assert after == before


def test_the_mean_over_one_rank_is_the_gradient_itself(tmp_path):
    """distributed.average_gradients lays every gradient end to end, all-reduces and puts each
    back in place: over one rank, bit for bit what it was, the tied embedding's included. Two
    ranks against one process: test_two_ranks_equal_one_process_at_twice_the_batch."""
    import torch.distributed as dist
    from extras.distributed import average_gradients, close_distributed
    from model import GPT, GPTConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=48))
        model(torch.randint(0, 257, (2, 8))).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        average_gradients(model)
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, grads[name]), name
    finally:
        close_distributed()
