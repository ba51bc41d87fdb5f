"""Speed-ups never change the maths: each one on and off gives the same losses and gradients
(float32; tolerances stated per test)."""
import json
import math
import os
from contextlib import nullcontext

import pytest
import torch
from conftest import GPT2_RANKS, forward_backward

import train
from data import builtin_data, collate, load_tokenizer, tokenize_pairs
from dpop import completion_logps, sequence_logps
from extras import speedups
from extras.speedups import collate_shared, manual_attention, sparse_embedding_grad
from model import GPT, GPTConfig
from train import TrainConfig, completion_lengths, frozen_copy, pair_logps, sft_loss

CPU = torch.device("cpu")


def reference_train_logps(ref, pairs, out, enc):
    """speedups.reference_train_logps with train.py's all_pair_logps, as the loop calls it."""
    return speedups.reference_train_logps(
        ref, pairs, str(out), lambda m, some: train.all_pair_logps(m, some, enc, nullcontext(), CPU))


def setup(seed=0, n=12):
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    enc = load_tokenizer("byte")
    pairs, _, _ = tokenize_pairs(builtin_data("arith")["train"][:n], enc, 64)
    return policy, enc, pairs


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def mixed_pairs(enc):
    """Pairs of unequal prompt and completion lengths, so that packed rows get padding."""
    records = [{"prompt": "Q: what is 2+2?\nA:", "chosen": " 4", "rejected": " 22, I think"},
               {"prompt": "", "chosen": "no prompt at all", "rejected": "none"},
               {"prompt": "x" * 30, "chosen": "y", "rejected": "z"}]
    return tokenize_pairs(records, enc, 64)[0]


def one_step(loss, collate_fn=collate, full_logits=False, mixed=False, sparse=False):
    """forward_backward over two micro-batches, the policy first moved away from its reference so
    that DPOP's penalty acts: (stats, gradients). mixed: 6 built-in pairs and mixed_pairs.
    sparse: the token lookup's share of wte's gradient sparse (speedups.sparse_embedding_grad)."""
    policy, enc, pairs = setup()
    policy.transformer.wte.sparse = sparse
    if mixed:
        pairs = pairs[:6] + mixed_pairs(enc)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref = frozen_copy(setup()[0])
    split = (len(pairs) + 1) // 2
    batches = [collate_fn(pairs[:split], enc.eot_token), collate_fn(pairs[split:], enc.eot_token)]
    cfg = TrainConfig(loss=loss, full_logits=full_logits)
    stats = forward_backward(policy, ref, batches, cfg)
    return stats, grads_of(policy)


def assert_same_step(slow, fast):
    (slow_stats, slow_grads), (fast_stats, fast_grads) = slow, fast
    assert fast_stats["loss"] == pytest.approx(slow_stats["loss"], abs=1e-5)
    for name, slow in slow_grads.items():
        assert (fast_grads[name] - slow).abs().max() <= 5e-5 * slow.abs().max(), name


def assert_same_logged_steps(slow_out, fast_out, n):
    """Two runs of train.main logged the same n training steps. Step 1 reads the same weights in
    both, so only the order of float32 sums differs: loss to 1e-6, grad norm to 1e-5 relative.
    After it, AdamW's first update moves every weight by about lr times the sign of its
    gradient, and a gradient component near zero can take either sign: the later steps agree
    to 1e-3 relative (seen: 1.5e-5 on a loss of 0.99 with two threads)."""
    rows = [[r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
            for out in (slow_out, fast_out)]
    assert len(rows[0]) == len(rows[1]) == n
    for a, b in zip(*rows):
        first = a["step"] == 1
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) if first else \
            b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5 if first else 1e-3)


def test_completion_only_logits_equal_full_logits():
    policy, enc, pairs = setup()
    batch = collate(pairs, enc.eot_token)
    idx, targets, mask = batch
    full = sequence_logps(policy(idx), targets, mask)
    fast = completion_logps(policy(idx, logits_at=mask), targets, mask)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-6)  # sums of ~40 logps near -5.5


@pytest.mark.parametrize("loss", ["dpo", "dpop", "rpo", "simpo", "sft"])
def test_completion_only_head_gives_the_same_gradients(loss):
    """The same loss to 1e-5, and each gradient tensor to 5e-5 of its largest entry: an untrained
    model's summed log-probs are near -220, where float32 resolves 1.5e-5, and DPOP's lam = 50
    magnifies that (its gradients reach 50 here)."""
    assert_same_step(one_step(loss, full_logits=True), one_step(loss, full_logits=False))


def test_completion_lengths_of_both_batch_layouts():
    """The per-token losses (RPO's NLL, SimPO) divide by these: the chosen and the rejected
    completions' token counts, end-of-text included, whichever way the batch was collated."""
    _, enc, pairs = setup()
    pairs = pairs[:4] + mixed_pairs(enc)
    expected = [torch.tensor([len(p[i]) for p in pairs]) for i in (1, 2)]
    for collate_fn in (collate, collate_shared):
        chosen, rejected = completion_lengths(collate_fn(pairs, enc.eot_token))
        assert torch.equal(chosen, expected[0]) and torch.equal(rejected, expected[1])


def test_shared_prompt_rows_give_the_same_logps():
    policy, enc, pairs = setup()
    pairs = pairs[:4] + mixed_pairs(enc)
    with torch.no_grad():
        two_rows = pair_logps(policy, collate(pairs, enc.eot_token))
        one_row = pair_logps(policy, collate_shared(pairs, enc.eot_token))
    for a, b in zip(one_row, two_rows):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("loss", ["dpo", "dpop", "rpo", "simpo"])
def test_shared_prompt_gives_the_same_gradients(loss):
    """Tolerances as for the completion-only head above."""
    assert_same_step(one_step(loss, mixed=True), one_step(loss, collate_shared, mixed=True))


@pytest.mark.parametrize("loss", ["dpo", "dpop", "sft"])
def test_sparse_embedding_grad_gives_the_same_dense_gradients(loss):
    """Tolerances as above. The tied lm_head's share is dense, so the sum is a dense tensor,
    which the fused AdamW and the gradient clipping need."""
    dense, sparse = one_step(loss), one_step(loss, sparse=True)
    assert_same_step(dense, sparse)
    assert not sparse[1]["transformer.wte.weight"].is_sparse


def test_sparse_embedding_grad_where_it_was_measured():
    cpu = torch.device("cpu")
    big = GPT(GPTConfig(vocab_size=50257, n_layer=1, n_head=1, n_embd=8, block_size=8))
    sparse_embedding_grad(big, cpu, world=1)
    assert big.transformer.wte.sparse
    sparse_embedding_grad(big, cpu, world=2)  # torchrun was not measured with it
    assert not big.transformer.wte.sparse
    byte_vocab = setup()[0]
    sparse_embedding_grad(byte_vocab, cpu, world=1)
    assert not byte_vocab.transformer.wte.sparse


@pytest.mark.parametrize("collate_fn", [collate, collate_shared])
def test_manual_attention_gives_the_same_gradients(collate_fn, monkeypatch):
    """bench.py --manual-attention, SDPA's lever off, computes the same attention, causal and
    with packed rows' masks. Tolerances as above."""
    sdpa = one_step("dpop", collate_fn, mixed=True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", manual_attention)
    assert_same_step(sdpa, one_step("dpop", collate_fn, mixed=True))


def test_sft_loss_is_the_mean_token_nll():
    policy, enc, pairs = setup()
    batch = collate(pairs, enc.eot_token)
    idx, targets, mask = (t[:len(pairs)] for t in batch)
    expected = -sequence_logps(policy(idx), targets, mask).sum() / mask.sum()
    torch.testing.assert_close(sft_loss(policy, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", ["dpo", "dpop", "ipo"])
def test_precomputed_reference_logps_give_the_same_gradients(tmp_path, loss):
    """Reference log-probs computed once beforehand (in other batches) against the reference run
    on each micro-batch: losses to 1e-5, gradients to 1e-5 (the policy is moved off the
    reference first: at c = 0 exactly, DPOP's gradient jumps, and log-probs computed in other
    batches differ from the in-step ones in the last bits)."""
    policy, enc, pairs = setup()
    ref = frozen_copy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = TrainConfig(loss=loss, out=str(tmp_path))
    table = reference_train_logps(ref, pairs, tmp_path, enc)
    assert table.shape == (len(pairs), 2)
    again = reference_train_logps(ref, pairs, tmp_path, enc)
    assert torch.equal(again, table) and len(list(tmp_path.glob("ref_logps-*.pt"))) == 1  # cached
    micro = [[3, 0, 7, 5], [11, 2, 9, 1]]
    batches = [collate([pairs[i] for i in ids], enc.eot_token) for ids in micro]
    results = []
    for ref_logps in (None, [table[ids].unbind(1) for ids in micro]):
        policy.zero_grad()
        stats = forward_backward(policy, ref, batches, cfg, ref_logps)
        results.append((stats, grads_of(policy)))
    (every, every_grads), (pre, pre_grads) = results
    # summed log-probs near -220 resolve 1.5e-5 in float32, and the margin carries a few such
    # steps; IPO's loss (d - 1/(2 beta))^2 multiplies that by its slope 2|d - 1/(2 beta)|, about
    # 10 here (seen: 1.9e-5 apart on a loss of 25.2 with the default, unvectorised kernels)
    slope = 2 * math.sqrt(every["loss"]) if loss == "ipo" else 1.0
    assert pre["loss"] == pytest.approx(every["loss"], abs=1e-5 * slope)
    assert pre["rewards/margins"] == pytest.approx(every["rewards/margins"], abs=1e-5)
    # IPO's gradient is (d - 1/(2 beta)) times the log-probs' gradients: the same few 1.5e-5 steps
    # of d scale all of it, by a few 1e-6 relative (seen: 7.4e-6 on an entry of 1.75)
    for name in every_grads:
        torch.testing.assert_close(pre_grads[name], every_grads[name], atol=1e-5,
                                   rtol=1e-5 if loss == "ipo" else 0)


def test_precomputed_logps_match_per_pair_and_change_with_the_weights(tmp_path):
    policy, enc, pairs = setup()
    table = reference_train_logps(policy, pairs, tmp_path, enc)
    chosen, rejected = pair_logps(policy, collate(pairs[4:5], enc.eot_token))
    assert table[4, 0].item() == pytest.approx(chosen.item(), abs=1e-5)
    assert table[4, 1].item() == pytest.approx(rejected.item(), abs=1e-5)
    with torch.no_grad():
        policy.transformer.wte.weight.mul_(1.1)
    reference_train_logps(policy, pairs, tmp_path, enc)
    assert len(list(tmp_path.glob("ref_logps-*.pt"))) == 2  # other weights, another cache entry


def test_share_prompt_flag_trains_the_same(tmp_path, tiny_args, sft_ckpt, small_pairs, monkeypatch):
    """The flag reaches the loop (its packed rows are read), and three logged steps agree with
    and without it."""
    packed, real = [], speedups.packed_logps
    monkeypatch.setattr(speedups, "packed_logps", lambda *a: packed.append(1) or real(*a))
    common = ("--loss", "dpop", "--init", sft_ckpt, "--data", small_pairs, "--steps", "3", "--batch-size", "8",
              "--eval-every", "3")
    train.main(tiny_args("two_rows", *common))
    assert not packed
    train.main(tiny_args("one_row", *common, "--share-prompt"))
    assert packed
    assert_same_logged_steps(tmp_path / "two_rows", tmp_path / "one_row", 3)


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS), reason="shared/data/gpt2.tiktoken not present")
def test_sparse_embedding_grad_trains_as_the_dense_one(tmp_path, tiny_args, small_pairs, monkeypatch):
    """With GPT-2's vocabulary the loop makes the lookup's gradient sparse; three logged steps
    (fused AdamW, clipping, checkpoint) agree with the dense layout's."""
    common = ("--loss", "sft", "--tokenizer", GPT2_RANKS, "--data", small_pairs, "--steps", "3",
              "--batch-size", "8", "--eval-every", "3")
    seen, real = [], speedups.sparse_embedding_grad

    def spy(model, device, world):
        real(model, device, world)
        seen.append(model.transformer.wte.sparse)
    monkeypatch.setattr(speedups, "sparse_embedding_grad", spy)
    train.main(tiny_args("sparse", *common))
    assert seen == [True]
    monkeypatch.setattr(speedups, "sparse_embedding_grad", lambda *args: None)
    train.main(tiny_args("dense", *common))
    assert_same_logged_steps(tmp_path / "dense", tmp_path / "sparse", 3)


def rows_of(folder):
    """The metrics rows of a run, without the timings (which no two runs share)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "util")} for line in f]


@pytest.mark.parametrize("layout", [(), ("--share-prompt",)])
def test_the_reference_of_the_runs_own_batches_is_the_loops_to_the_bit(tmp_path, tiny_args, sft_ckpt, small_pairs,
                                                                       monkeypatch, capsys, layout):
    """--ref-logps auto on a run that reads fewer pairs than the data holds computes the
    reference's log-probs of the micro-batches the loop will read (gradient accumulation
    included), before step 1, as the loop would: every logged figure and the final weights
    equal those of a frozen copy run in the loop (every-step), bit for bit. The table is cached
    beside --init, so a second loss from the same reference and seed reads it and builds no
    frozen copy; a folder that cannot take the cache is a warning, not a failure."""
    init = tmp_path / "sft" / "ckpt.pt"  # a folder of its own: no other test's cache in it
    init.parent.mkdir()
    init.write_bytes(open(sft_ckpt, "rb").read())
    run = ("--init", str(init), "--data", small_pairs, "--steps", "3", "--eval-every", "3", *layout)
    common = (*run, "--batch-size", "4", "--grad-accum", "2")  # 3 steps x 8 pairs: 24 of the 61 training pairs
    for loss in ("dpop", "dpo"):
        train.main(tiny_args(f"{loss}-loop", *common, "--loss", loss, "--ref-logps", "every-step"))
    capsys.readouterr()
    train.main(tiny_args("dpop-auto", *common, "--loss", "dpop"))
    assert "reference log-probs of the 3 steps' batches computed" in capsys.readouterr().out
    [cache] = (tmp_path / "sft").glob("ref_logps-*.pt")
    assert torch.load(cache).shape == (3 * 2 * 4, 2)
    monkeypatch.setattr(train, "frozen_copy", lambda model: pytest.fail("a frozen copy was built"))
    train.main(tiny_args("dpo-auto", *common, "--loss", "dpo"))
    assert f"reference log-probs from {cache}" in capsys.readouterr().out
    # the same pairs in micro-batches of 8: other bits (and, at step 1, another DPOP), another table
    train.main(tiny_args("dpo-8", *run, "--batch-size", "8", "--loss", "dpo"))
    assert "reference log-probs of the 3 steps' batches computed" in capsys.readouterr().out
    assert len(list((tmp_path / "sft").glob("ref_logps-*.pt"))) == 2
    for loss in ("dpop", "dpo"):
        assert rows_of(tmp_path / f"{loss}-auto") == rows_of(tmp_path / f"{loss}-loop")
        auto, loop = (torch.load(tmp_path / f"{loss}-{how}" / "ckpt.pt")["model"] for how in ("auto", "loop"))
        assert all(torch.equal(auto[k], loop[k]) for k in loop)
    cache.unlink()

    def read_only(path, obj):
        raise OSError(30, "Read-only file system", path)
    monkeypatch.setattr(speedups, "save_checkpoint", read_only)
    train.main(tiny_args("dpo-again", *common, "--loss", "dpo"))
    assert f"warning: cannot cache the reference log-probs in {init.parent}" in capsys.readouterr().out
    assert rows_of(tmp_path / "dpo-again") == rows_of(tmp_path / "dpo-loop")
