"""The maths of dpop.py, pinned by closed forms, invariants and gradient directions."""
import math

import pytest
import torch

from dpop import LOSSES, PairLogps, chosen_nll, preference_loss, preference_metrics, sequence_logps


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


@pytest.mark.parametrize("loss", [name for name, spec in LOSSES.items() if spec.reference])
def test_policy_equal_to_reference(loss):
    chosen, rejected = torch.tensor([-12.0, -3.0]), torch.tensor([-15.0, -2.0])
    pc, pr = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
    beta, alpha, lengths = 0.1, 0.5, torch.tensor([4, 3])  # chosen completions of 4 and 3 tokens
    knobs = {k: v for k, v in dict(beta=beta, lam=50.0, rpo_alpha=alpha).items() if k in LOSSES[loss].knobs}
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, chosen, rejected, loss=loss, chosen_lengths=lengths, **knobs)
    expected = {"dpo": math.log(2), "dpop": math.log(2), "hinge": 1.0,  # SLiC: max(0, 1 - 0)
                "ipo": (1 / (2 * beta)) ** 2,
                # RPO: DPO's ln 2 plus alpha times the NLL per token, 12/4 and 3/3 nats
                "rpo": torch.tensor([math.log(2) + alpha * 3.0, math.log(2) + alpha * 1.0])}[loss]
    torch.testing.assert_close(losses, torch.full((2,), expected) if loss != "rpo" else expected)
    assert torch.equal(chosen_rewards, torch.zeros(2)) and torch.equal(rejected_rewards, torch.zeros(2))
    if loss in ("dpo", "dpop", "rpo"):  # d loss / d c = -beta / 2 at the reference
        losses.sum().backward()
        nll_grad = -alpha / lengths if loss == "rpo" else torch.zeros(2)  # RPO: minus alpha / |yw|
        torch.testing.assert_close(pc.grad, torch.full((2,), -beta / 2) + nll_grad)
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
    # past the hinge's margin (beta * d = 1.5 > 1) the loss is 0, not negative
    got, _, _ = preference_loss(pc, pr, rc, rr, loss="hinge", beta=0.3)
    assert got.item() == 0.0
    for (loss, eps), expected in cases.items():
        smoothing = {"label_smoothing": eps} if eps else {}
        got, rw_c, rw_r = preference_loss(pc, pr, rc, rr, loss=loss, beta=0.1, **smoothing)
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


def test_rpo_with_alpha_zero_is_dpo():
    logps, lengths = four_logps(), torch.arange(1, 17)
    dpo = preference_loss(*logps, loss="dpo", beta=0.3)
    rpo = preference_loss(*logps, loss="rpo", beta=0.3, rpo_alpha=0.0, chosen_lengths=lengths)
    assert all(torch.equal(a, b) for a, b in zip(dpo, rpo))


def test_rpo_closed_form_and_its_gradient_on_each_chosen_token():
    """Off the reference: c = 2, r = -3, so d = 5 and DPO's part is -log sigmoid(0.5); the chosen
    completion has 4 tokens summing to -8, so the NLL part is alpha * 8 / 4. The gradient on each
    chosen token's log-prob is DPO's -beta * sigmoid(-beta d), the same for every token, plus
    -alpha / 4 from the NLL; padding gets none."""
    beta, alpha = 0.1, 0.5
    tokens = torch.tensor([[-1.0, -2.0, -3.0, -2.0, 0.0]], requires_grad=True)  # the last is padding
    mask = torch.tensor([[True, True, True, True, False]])
    policy_chosen = torch.where(mask, tokens, torch.zeros_like(tokens)).sum(-1)  # -8
    losses, _, _ = preference_loss(policy_chosen, torch.tensor([-13.0]), torch.tensor([-10.0]),
                                   torch.tensor([-10.0]), loss="rpo", beta=beta, rpo_alpha=alpha,
                                   chosen_lengths=mask.sum(-1))
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert losses.item() == pytest.approx(-math.log(sig(0.5)) + alpha * 8 / 4, abs=1e-6)
    losses.sum().backward()
    per_token = -beta * sig(-0.5) - alpha / 4
    torch.testing.assert_close(tokens.grad, torch.tensor([[per_token] * 4 + [0.0]]))
    assert per_token < 0  # gradient descent raises every chosen token's log-prob
    torch.testing.assert_close(chosen_nll(PairLogps(policy_chosen, None, chosen_lengths=mask.sum(-1))),
                               torch.tensor([2.0]))


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
    torch.testing.assert_close(pr.grad, beta * weight)  # DPO's form, but z holds the penalty
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
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(*logps, loss="rpo")


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


def test_simpo_closed_form_gradient_and_rewards():
    """SimPO with the paper's beta 2 and gamma 1: the chosen completion's 3 tokens sum to -6 (a mean
    of -2), the rejected's 4 to -20 (-5), so z = 2 * (-2) - 2 * (-5) - 1 = 5 and the loss is
    -log sigmoid(5). Each summed log-prob's gradient is sigmoid(-z) times beta over its length;
    the rewards are beta times the per-token means; a reference passed in is not read."""
    sig = lambda z: 1 / (1 + math.exp(-z))
    pc, pr = torch.tensor([-6.0], requires_grad=True), torch.tensor([-20.0], requires_grad=True)
    lengths = dict(chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([4]))
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, loss="simpo", **lengths)
    assert losses.item() == pytest.approx(-math.log(sig(5)), abs=1e-6)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-sig(-5) * 2 / 3, abs=1e-7)
    assert pr.grad.item() == pytest.approx(sig(-5) * 2 / 4, abs=1e-7)
    assert chosen_rewards.item() == -4.0 and rejected_rewards.item() == -10.0
    assert not chosen_rewards.requires_grad
    with_ref = preference_loss(pc.detach(), pr.detach(), torch.tensor([-1.0]), torch.tensor([-30.0]),
                               loss="simpo", **lengths)
    assert all(torch.equal(a, b.detach()) for a, b in zip(with_ref, (losses, chosen_rewards, rejected_rewards)))
    # equal per-token means and no margin: ln 2, and gamma moves it by the margin's amount
    even = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]))
    at_par, _, _ = preference_loss(torch.tensor([-3.0]), torch.tensor([-6.0]), loss="simpo",
                                   beta=1.0, simpo_gamma=0.0, **even)
    assert at_par.item() == pytest.approx(math.log(2), abs=1e-6)
    with_margin, _, _ = preference_loss(torch.tensor([-3.0]), torch.tensor([-6.0]), loss="simpo",
                                        beta=1.0, simpo_gamma=0.5, **even)
    assert with_margin.item() == pytest.approx(-math.log(sig(-0.5)), abs=1e-6)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(pc, pr, loss="simpo")


def test_the_worked_step_by_hand():
    """docs/derivation.md's one step by hand: gradients.py's autograd through dpop.py's losses
    against the closed forms (beta 0.1, lam 50), and the page shows the table the script prints.
    At c = 0 relu's gradient is DPO's and clamp's is 51 times it; at c = -2, r = -5 the penalty
    pulls the chosen 120 times harder and, through sigmoid(-z), pushes the rejected 2.35 times."""
    import os
    import gradients
    beta, lam = 0.1, 50.0
    s = lambda v: 1 / (1 + math.exp(-v))  # sigmoid
    expected = {("DPO", 0): (0.0, math.log(2), -beta / 2, beta / 2),
                ("DPOP (relu)", 0): (0.0, math.log(2), -beta / 2, beta / 2),
                ("DPOP, clamp", 0): (0.0, math.log(2), -beta * (1 + lam) / 2, beta / 2),
                ("DPO", -2): (0.3, -math.log(s(0.3)), -beta * s(-0.3), beta * s(-0.3)),
                ("DPOP (relu)", -2): (-9.7, -math.log(s(-9.7)), -beta * (1 + lam) * s(9.7), beta * s(9.7)),
                ("DPOP, clamp", -2): (-9.7, -math.log(s(-9.7)), -beta * (1 + lam) * s(9.7), beta * s(9.7))}
    for (name, c), values in expected.items():
        got = gradients.step(name, c, {0: 0, -2: -5}[c])
        assert got == pytest.approx(values, rel=1e-9, abs=1e-12), name
    assert gradients.step("DPOP (relu)", -2, -5)[2] / gradients.step("DPO", -2, -5)[2] == pytest.approx(119.8, abs=0.1)
    assert gradients.step("DPOP (relu)", -2, -5)[3] / gradients.step("DPO", -2, -5)[3] == pytest.approx(2.35, abs=0.01)
    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "derivation.md")).read()
    assert gradients.table([(0.0, 0.0), (-2.0, -5.0)]) in page


def test_rpo_nll_is_per_sequence_not_per_batch_token():
    """docs/experiment.md's example: chosen completions of 1 and 3 tokens at -2 and -3 nats. The
    NLL term here is the mean over pairs of each one's NLL per token, (2/1 + 3/3) / 2 = 1.5, as in
    Pang et al.; TRL's sft loss divides the batch's summed NLL by its token count, 5/4 = 1.25."""
    x = PairLogps(torch.tensor([-2.0, -3.0]), torch.tensor([-9.0, -9.0]), chosen_lengths=torch.tensor([1, 3]))
    per_pair = chosen_nll(x)
    assert per_pair.mean().item() == pytest.approx(1.5)
    assert (-x.policy_chosen_logps.sum() / x.chosen_lengths.sum()).item() == pytest.approx(1.25)
