"""The maths of dpop.py, pinned by closed forms, invariants and gradient directions."""
import math

import pytest
import torch

from dpop import LOSSES, preference_loss, preference_metrics, sequence_logps


def naive_sequence_logps(logits, targets, mask):
    out = []
    for b in range(logits.size(0)):
        total = 0.0
        for t in range(logits.size(1)):
            if mask[b, t]:
                probs = [math.exp(v) for v in logits[b, t].double().tolist()]
                total += math.log(probs[targets[b, t]] / sum(probs))
        out.append(total)
    return torch.tensor(out)


def random_batch(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:5] = True   # prompt of 2, response of 3, then padding
    mask[1, 4:] = True    # a long prompt
    mask[2, 1:2] = True   # a single response token
    return logits, targets, mask


def test_sequence_logps_matches_naive_loop():
    logits, targets, mask = random_batch()
    got = sequence_logps(logits, targets, mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), naive_sequence_logps(logits, targets, mask).double(),
                               atol=1e-5, rtol=1e-5)


def test_sequence_logps_ignores_prompt_and_padding():
    logits, targets, mask = random_batch()
    before = sequence_logps(logits, targets, mask)
    changed_logits, changed_targets = logits.clone(), targets.clone()
    changed_logits[~mask] = torch.randn_like(changed_logits[~mask]) * 100
    changed_logits[0, 0, 0] = float("nan")   # even NaN or -inf at a masked position changes nothing
    changed_logits[1, 0, 0] = float("-inf")
    changed_targets[~mask] = 0
    torch.testing.assert_close(sequence_logps(changed_logits, changed_targets, mask), before)
    # and a masked-in position does count
    changed_logits[0, 3] += torch.randn(11)
    assert not torch.allclose(sequence_logps(changed_logits, changed_targets, mask)[0], before[0])


def test_sequence_logps_is_float32_for_half_inputs():
    logits, targets, mask = random_batch()
    got = sequence_logps(logits.bfloat16(), targets, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_logps(logits.bfloat16().float(), targets, mask))


def four_logps(seed=0, B=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, generator=g) * 5 - 20 for _ in range(4)]


@pytest.mark.parametrize("loss", LOSSES)
def test_policy_equal_to_reference(loss):
    chosen, rejected = torch.tensor([-12.0, -3.0]), torch.tensor([-15.0, -2.0])
    pc, pr = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    beta = 0.1
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, chosen, rejected, loss=loss,
                                                               beta=beta, lam=50.0)
    expected = {"dpo": math.log(2), "dpop": math.log(2), "hinge": 1.0,  # SLiC: max(0, 1 - 0)
                "ipo": (1 / (2 * beta)) ** 2}[loss]
    torch.testing.assert_close(losses, torch.full((2,), expected))
    assert torch.equal(chosen_rewards, torch.zeros(2)) and torch.equal(rejected_rewards, torch.zeros(2))
    if loss in ("dpo", "dpop"):  # d loss / d c = -beta / 2 at the reference
        losses.sum().backward()
        torch.testing.assert_close(pc.grad, torch.full((2,), -beta / 2))
        torch.testing.assert_close(pr.grad, torch.full((2,), beta / 2))


def test_conservative_dpo_at_reference_is_log2():
    x = torch.tensor([-5.0])
    losses, _, _ = preference_loss(x, x, x, x, loss="dpo", label_smoothing=0.2)
    torch.testing.assert_close(losses, torch.tensor([math.log(2)]))


def test_closed_form_values():
    # c = 2, r = -3 -> d = 5; beta = 0.1
    pc, pr, rc, rr = torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]), torch.tensor([-10.0])
    sig = lambda z: 1 / (1 + math.exp(-z))
    cases = {
        ("dpo", 0.0): -math.log(sig(0.5)),
        ("dpo", 0.1): -0.9 * math.log(sig(0.5)) - 0.1 * math.log(sig(-0.5)),
        ("dpop", 0.0): -math.log(sig(0.5)),      # c > 0: no penalty
        ("ipo", 0.0): (5 - 5) ** 2,              # 1 / (2 beta) = 5
        ("hinge", 0.0): 0.5,                     # 1 - 0.5
    }
    for (loss, eps), expected in cases.items():
        got, rw_c, rw_r = preference_loss(pc, pr, rc, rr, loss=loss, beta=0.1, label_smoothing=eps)
        assert got.item() == pytest.approx(expected, abs=1e-6), loss
        assert rw_c.item() == pytest.approx(0.2) and rw_r.item() == pytest.approx(-0.3)
    # DPOP with the chosen 2 nats BELOW the reference: c = -2, r = -5 -> d = 3, penalty 2
    got, _, _ = preference_loss(torch.tensor([-12.0]), torch.tensor([-15.0]), rc, rr,
                                loss="dpop", beta=0.1, lam=50.0)
    assert got.item() == pytest.approx(-math.log(sig(0.1 * (3 - 50 * 2))), abs=1e-6)


def test_dpop_with_lam_zero_is_dpo():
    logps = four_logps()
    dpo, dpo_c, dpo_r = preference_loss(*logps, loss="dpo", beta=0.3)
    dpop, dpop_c, dpop_r = preference_loss(*logps, loss="dpop", beta=0.3, lam=0.0)
    assert torch.equal(dpo, dpop) and torch.equal(dpo_c, dpop_c) and torch.equal(dpo_r, dpop_r)


def test_dpop_penalty_zero_at_or_above_reference_positive_below():
    ref_chosen, ref_rejected = torch.full((3,), -10.0), torch.full((3,), -10.0)
    policy_chosen = torch.tensor([-10.0, -9.0, -11.0])  # at, above, below the reference
    policy_rejected = torch.full((3,), -14.0)
    dpo, _, _ = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss="dpo")
    dpop, _, _ = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss="dpop")
    assert torch.equal(dpop[:2], dpo[:2])
    assert dpop[2] > dpo[2] + 1.0  # penalty 1 nat * lam 50 * beta 0.1 = 5 inside the sigmoid


def test_dpop_gradient_weight_when_penalty_active():
    beta, lam = 0.1, 50.0
    pc = torch.tensor([-12.0, -8.0], requires_grad=True)  # below, above the reference
    pr = torch.tensor([-15.0, -15.0], requires_grad=True)
    rc, rr = torch.tensor([-10.0, -10.0]), torch.tensor([-10.0, -10.0])
    losses, _, _ = preference_loss(pc, pr, rc, rr, loss="dpop", beta=beta, lam=lam)
    losses.sum().backward()
    c, r = (pc - rc).detach(), (pr - rr).detach()
    z = beta * ((c - r) - lam * torch.clamp(-c, min=0))
    weight = torch.sigmoid(-z)
    # active (row 0): the chosen gets beta*(1+lam)*sigmoid(-z); inactive (row 1): DPO's beta*sigmoid(-z)
    torch.testing.assert_close(pc.grad, -beta * torch.tensor([1 + lam, 1.0]) * weight)
    torch.testing.assert_close(pr.grad, beta * weight)  # the rejected's weight is unchanged
    assert pc.grad[0] < 0  # gradient descent raises the chosen log-prob


def test_dpo_gradient_directions():
    logps = [t.requires_grad_(True) for t in four_logps()[:2]] + four_logps(1)[2:]
    losses, _, _ = preference_loss(*logps, loss="dpo")
    losses.sum().backward()
    assert (logps[0].grad < 0).all() and (logps[1].grad > 0).all()


def test_rewards_are_detached():
    logps = [t.requires_grad_(True) for t in four_logps()[:2]] + four_logps(1)[2:]
    _, chosen_rewards, rejected_rewards = preference_loss(*logps)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_bad_loss_arguments():
    logps = four_logps()
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        preference_loss(*logps, loss="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(*logps, loss="dpop", label_smoothing=0.1)


def test_preference_metrics():
    chosen_rewards = torch.tensor([0.2, -0.1, 0.0, 0.3])
    rejected_rewards = torch.tensor([-0.5, 0.1, -0.2, 0.3])
    m = preference_metrics(chosen_rewards, rejected_rewards, torch.full((4,), -3.0),
                           torch.full((4,), -9.0), beta=0.1)
    assert m["rewards/accuracies"] == 0.5  # strict: a tie is not a win
    assert m["rewards/margins"] == pytest.approx((0.7 - 0.2 + 0.2 + 0.0) / 4)
    assert m["logratio/chosen"] == pytest.approx(0.4 / 4 / 0.1)
    assert m["penalty/active"] == 0.25
    assert m["logps/chosen"] == -3.0 and m["logps/rejected"] == -9.0
    assert m["rewards/chosen"] == pytest.approx(0.4 / 4) and m["rewards/rejected"] == pytest.approx(-0.3 / 4)
    assert m["logratio/rejected"] == pytest.approx(-0.3 / 4 / 0.1)
    assert len(m) == 9 and all(type(v) is float for v in m.values())  # Python floats, for the log
