"""The maths of preference optimisation: sequence log-probs, the DPO/DPOP loss, and metrics.

Pure functions of tensors. No model, optimizer or I/O lives here; train.py calls these and the
tests pin them down. The notation follows the Smaug paper (Pal et al. 2024, arXiv 2402.13228,
the corrected revision of July 2024). For a prompt x, chosen completion yw and rejected yl:

    chosen log-ratio    c = logp_policy(yw|x) - logp_ref(yw|x)
    rejected log-ratio  r = logp_policy(yl|x) - logp_ref(yl|x)
    margin              d = c - r

    DPO   loss = -log sigmoid(beta * d)                               (Rafailov et al. 2023, eq. 7)
    DPOP  loss = -log sigmoid(beta * (d - lam * max(0, -c)))          (Pal et al. 2024)
    RPO   loss = -log sigmoid(beta * d) - alpha * logp_policy(yw|x) / |yw|   (Pang et al. 2024)

DPOP's penalty max(0, -c) is zero while the policy keeps the chosen completion at least as likely
as the reference did, and it sits INSIDE the sigmoid, scaled by beta. (Earlier revisions of the
paper circulated two other bracketings; this is the corrected one.) With lam = 0 DPOP is DPO.
RPO is the other fix for a falling chosen log-prob, the one most trainers use now: DPO plus the
chosen completion's negative log-likelihood per token (|yw| its number of tokens), an SFT term
outside the sigmoid. With alpha = 0 RPO is DPO.

Read it in order: the textbook path first (sequence_logps, preference_loss, preference_metrics),
then the faster equivalents that train.py uses by default (completion_logps and its helpers): the
same sums without the logits that the loss throws away. Tests pin each fast one to the textbook one.
"""
import torch
import torch.nn.functional as F

LOSSES = ("dpo", "dpop", "rpo", "ipo", "hinge")


# ---------------------------------------------------------------------------------------------
# The textbook path: log-probs of whole sequences, the losses, the metrics

def sequence_logps(logits, targets, mask):
    """Sum of the log-probs of the target tokens where mask is true: log p(completion | prompt).

    Args:
        logits: (B, T, V) model outputs, any float dtype. They are cast to float32 before the
            log-softmax: in float16 the log-softmax over a large vocabulary loses the small
            probabilities and can produce -inf or NaN (the DPO reference casts for this reason).
        targets: (B, T) token ids, already shifted by collate: targets[:, t] is the token that
            follows idx[:, t]. This function never shifts.
        mask: (B, T) bool, true on completion tokens, false on prompt and padding.

    Returns:
        (B,) float32: one summed log-prob per row. A sum, not a mean, as in the DPO paper.
    """
    logps = F.log_softmax(logits.float(), dim=-1)                         # (B, T, V)
    # exercise 2 begins: the summed log-prob of the completion tokens
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)     # (B, T)
    # where() rather than a multiply: a masked position holding -inf or NaN must not leak in
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1)
    # exercise 2 ends


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, loss="dpop", beta=0.1, lam=50.0, label_smoothing=0.0,
                    alpha=1.0, chosen_lengths=None):
    """Per-pair preference losses and the implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference.
        loss: one of LOSSES.
            "dpo":   -log sigmoid(beta*d). With label_smoothing eps > 0 it is conservative DPO
                     (Mitchell 2023): -(1-eps) log sigmoid(beta*d) - eps log sigmoid(-beta*d).
            "dpop":  -log sigmoid(beta*(d - lam*max(0, -c))), Smaug's DPOP; lam = 0 gives DPO.
            "rpo":   -log sigmoid(beta*d) + alpha * chosen_nll(policy_chosen_logps,
                     chosen_lengths), Pang et al.'s DPO + NLL; alpha = 0 gives DPO.
            "ipo":   (d - 1/(2*beta))**2, Azar et al. 2023 (log-probs summed, like the others).
            "hinge": max(0, 1 - beta*d), the SLiC-style hinge.
        beta: the inverse temperature; how far from the reference the policy may move.
        lam: DPOP's penalty weight. The paper uses 50 and found results insensitive in [5, 500].
        label_smoothing: probability that a label is flipped; only "dpo" accepts it.
        alpha: RPO's weight on the NLL term (Pang et al. use 1).
        chosen_lengths: (B,) the number of tokens of each chosen completion; "rpo" needs it.

    Returns:
        losses: (B,) per-pair loss, differentiable w.r.t. the policy log-probs.
        chosen_rewards, rejected_rewards: (B,) beta * c and beta * r, detached (what DPO
            trainers log as rewards/chosen and rewards/rejected).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if label_smoothing and loss != "dpo":
        raise ValueError(f"label_smoothing applies to loss 'dpo' only, not {loss!r}")
    if loss == "rpo" and chosen_lengths is None:
        raise ValueError("loss 'rpo' needs chosen_lengths, the chosen completions' token counts")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps        # c
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # r
    margins = chosen_logratios - rejected_logratios                  # d

    if loss == "dpo":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margins)
                  - label_smoothing * F.logsigmoid(-beta * margins))
    elif loss == "dpop":
        # exercise 3 begins: the DPOP branch
        # max(0, logp_ref(yw) - logp_pi(yw)). relu, not clamp: at c = 0 (policy == reference, as
        # at step 0) relu's gradient is 0 and the penalty is inactive, while clamp's would be 1
        penalty = torch.relu(-chosen_logratios)
        losses = -F.logsigmoid(beta * (margins - lam * penalty))
        # exercise 3 ends
    elif loss == "rpo":
        losses = -F.logsigmoid(beta * margins) + alpha * chosen_nll(policy_chosen_logps, chosen_lengths)
    elif loss == "ipo":
        losses = (margins - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * margins)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen_logps, chosen_lengths):
    """RPO's SFT term: the chosen completion's negative log-likelihood per token, (B,). A mean
    over its tokens, not a sum, so that its scale does not grow with the completion's length."""
    return -policy_chosen_logps / chosen_lengths


def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps,
                       policy_rejected_logps, beta):
    """The standard DPO metrics for one batch, as a dict of Python floats.

    Args:
        chosen_rewards, rejected_rewards: (B,) from preference_loss.
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs under the policy.
        beta: the same beta, to turn rewards back into log-ratios (nats).

    Returns:
        TRL's names (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
        logps/chosen, logps/rejected), plus logratio/chosen and logratio/rejected (the mean
        change of each log-prob from the reference, in nats: the failure DPOP targets is
        logratio/chosen going negative) and penalty/active (the fraction of pairs where DPOP's
        penalty is non-zero, i.e. the chosen log-prob fell below the reference's).
    """
    # exercise 4 begins: the preference metrics
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
        "logratio/chosen": (chosen_rewards / beta).mean().item(),
        "logratio/rejected": (rejected_rewards / beta).mean().item(),
        "penalty/active": (chosen_rewards < 0).float().mean().item(),
    }
    # exercise 4 ends


# ---------------------------------------------------------------------------------------------
# Faster equivalents: the same sums from the completion positions' logits only

def completion_logps(logits, targets, mask):
    """The same sums as sequence_logps, from the logits of the completion positions only.

    With long prompts, most positions are prompt or padding, whose logits sequence_logps throws
    away. The model can compute just the masked ones (GPT.forward(idx, logits_at=mask)); then
    the (B, T, V) logits and their float32 copy never exist, only (N, V).

    Args:
        logits: (N, V) logits at the N positions where mask is true, in row-major order.
        targets, mask: (B, T) as for sequence_logps.
    Returns:
        (B,) float32, equal to sequence_logps of the full logits.
    """
    rows = mask.nonzero()[:, 0]  # (N,) the row each token belongs to
    return summed_logps(logits, targets[mask], rows, mask.size(0))


def summed_logps(logits, targets, seq, n_seq):
    """Per-sequence sums of token log-probs, for tokens in any order or layout.

    Args:
        logits: (N, V) the logits that predict each of N tokens.
        targets: (N,) the tokens' ids.
        seq: (N,) the sequence each token belongs to, in 0..n_seq-1.
    Returns:
        (n_seq,) float32.
    """
    return torch.zeros(n_seq, device=logits.device).index_add(0, seq, token_logps(logits, targets))


def token_logps(logits, targets):
    """The log-prob of each of N tokens, (N,) float32, from their (N, V) logits and (N,) ids:
    log softmax(logits)[target], without materialising a (N, V) log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
