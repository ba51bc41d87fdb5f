"""The maths of preference optimisation: sequence log-probs, the preference losses, and metrics.

Pure functions of tensors. No model, optimizer or I/O lives here; train.py calls these and the
tests pin them down. The notation follows the Smaug paper (Pal et al. 2024, arXiv 2402.13228,
the corrected revision of July 2024). For a prompt x, chosen completion yw and rejected yl:

    chosen log-ratio    c = logp_policy(yw|x) - logp_ref(yw|x)
    rejected log-ratio  r = logp_policy(yl|x) - logp_ref(yl|x)
    margin              d = c - r

    DPO   loss = -log sigmoid(beta * d)                               (Rafailov et al. 2023, eq. 7)
    DPOP  loss = -log sigmoid(beta * (d - lam * max(0, -c)))          (Pal et al. 2024)
    RPO   loss = -log sigmoid(beta * d) - alpha * logp_policy(yw|x) / |yw|   (Pang et al. 2024)
    SimPO loss = -log sigmoid(beta * (logp_policy(yw|x) / |yw| - logp_policy(yl|x) / |yl|) - gamma)

DPOP's penalty max(0, -c) is zero while the policy keeps the chosen completion at least as likely
as the reference did, and it sits INSIDE the sigmoid, scaled by beta (the corrected bracketing;
earlier revisions circulated two others). With lam = 0 DPOP is DPO. RPO, the fix most trainers
use now, adds the chosen completion's negative log-likelihood per token (|yw| its token count)
outside the sigmoid; with alpha = 0 it is DPO. SimPO (Meng et al. 2024) needs no reference.

A loss is one function and one entry in LOSSES that says what it needs (a reference model or
not), its knobs and their defaults, and what it logs; train.py and extras/ ask the entry and never
name a loss. To add one: its function, its entry, a line in KNOBS for a new knob, its tests.

Read it in order: the textbook path (sequence_logps, the losses and LOSSES, preference_loss,
preference_metrics), then the faster equivalents the loop uses (completion_logps and helpers).
"""
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


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


class PairLogps(NamedTuple):
    """What a loss reads, each (B,): the summed log-probs of the chosen and rejected completions
    under the policy and the frozen reference (None for a loss without one), and the completions'
    token counts (for the losses that average per token)."""
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor = None
    ref_rejected_logps: torch.Tensor = None
    chosen_lengths: torch.Tensor = None
    rejected_lengths: torch.Tensor = None

    @property
    def chosen_logratios(self):  # c
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self):  # r
        return self.policy_rejected_logps - self.ref_rejected_logps


# Each loss: a function of PairLogps and its knobs that returns the (B,) per-pair losses.

def dpo_loss(x, beta, label_smoothing):
    """-log sigmoid(beta*d); with label_smoothing eps > 0, conservative DPO (Mitchell 2023):
    -(1-eps) log sigmoid(beta*d) - eps log sigmoid(-beta*d)."""
    margins = x.chosen_logratios - x.rejected_logratios
    return -(1 - label_smoothing) * F.logsigmoid(beta * margins) - label_smoothing * F.logsigmoid(-beta * margins)


def dpop_loss(x, beta, lam):
    """Smaug's DPOP: -log sigmoid(beta*(d - lam*max(0, -c))); lam = 0 gives DPO."""
    # exercise 3 begins: the DPOP loss
    chosen_logratios = x.chosen_logratios
    margins = chosen_logratios - x.rejected_logratios
    # max(0, logp_ref(yw) - logp_pi(yw)). relu, not clamp: at c = 0 (policy == reference, as
    # at step 0) relu's gradient is 0 and the penalty is inactive, while clamp's would be 1
    penalty = torch.relu(-chosen_logratios)
    return -F.logsigmoid(beta * (margins - lam * penalty))
    # exercise 3 ends


def rpo_loss(x, beta, rpo_alpha):
    """Pang et al.'s RPO: DPO plus rpo_alpha times chosen_nll; rpo_alpha = 0 gives DPO."""
    return -F.logsigmoid(beta * (x.chosen_logratios - x.rejected_logratios)) + rpo_alpha * chosen_nll(x)


def dpo_part(x, beta, **_):
    """RPO's DPO part as its log shows it, -log sigmoid(beta*c - beta*r): from the two rewards."""
    return -F.logsigmoid(beta * x.chosen_logratios - beta * x.rejected_logratios)


def chosen_nll(x, **_):
    """RPO's SFT term: the chosen completion's negative log-likelihood per token. A mean over its
    tokens, not a sum, so that its scale does not grow with the completion's length."""
    return -x.policy_chosen_logps / x.chosen_lengths


def ipo_loss(x, beta):
    """IPO (Azar et al. 2023): (d - 1/(2*beta))**2, with log-probs summed like the others."""
    return (x.chosen_logratios - x.rejected_logratios - 1 / (2 * beta)) ** 2


def hinge_loss(x, beta):
    """The SLiC-style hinge (Zhao et al. 2023): max(0, 1 - beta*d)."""
    return torch.relu(1 - beta * (x.chosen_logratios - x.rejected_logratios))


def simpo_loss(x, beta, simpo_gamma):
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|yw| logp(yw) - beta/|yl| logp(yl) -
    gamma). No reference: each log-prob is a per-token mean, and gamma a target reward margin."""
    return -F.logsigmoid(beta * x.policy_chosen_logps / x.chosen_lengths
                         - beta * x.policy_rejected_logps / x.rejected_lengths - simpo_gamma)


class Loss(NamedTuple):
    """A loss's entry: all that train.py and extras/ know of it."""
    fn: Callable           # fn(PairLogps, **knobs) -> (B,) per-pair losses
    reference: bool        # does it compare against a frozen reference model?
    knobs: dict            # its knobs and their defaults; every loss has beta (its rewards' scale)
    lengths: bool = False  # does it read the completions' token counts?
    logs: dict = {}        # more per-pair terms to log: {metric name: fn(PairLogps, **knobs) -> (B,)}
    shown: tuple = ()      # those of them the log line shows, by the name after the "/"


LOSSES = {
    "dpo": Loss(dpo_loss, True, {"beta": 0.1, "label_smoothing": 0.0}),
    "dpop": Loss(dpop_loss, True, {"beta": 0.1, "lam": 50.0}),
    "rpo": Loss(rpo_loss, True, {"beta": 0.1, "rpo_alpha": 1.0}, lengths=True,
                logs={"loss/dpo": dpo_part, "loss/nll": chosen_nll}, shown=("loss/nll",)),
    "ipo": Loss(ipo_loss, True, {"beta": 0.1}),
    "hinge": Loss(hinge_loss, True, {"beta": 0.1}),
    # the paper's beta 2.0 and gamma / beta 0.5 (its Llama-3 base recipe)
    "simpo": Loss(simpo_loss, False, {"beta": 2.0, "simpo_gamma": 1.0}, lengths=True),
}

# Every knob of a loss: its --help text and the values it takes (train.py makes --rpo-alpha of
# rpo_alpha; its default is the entry's of the loss that runs).
KNOBS = {
    "beta": ("inverse temperature: a larger beta keeps the policy closer to the reference (without a "
             "reference, the scale of the rewards)", "positive"),
    "lam": ("DPOP's penalty weight (the paper's value)", "zero or positive"),
    "rpo_alpha": ("RPO's weight on the chosen completion's NLL per token (Pang et al.'s value)",
                  "zero or positive"),
    "label_smoothing": ("conservative DPO: assumed fraction of flipped labels", "in [0, 0.5)"),
    "simpo_gamma": ("SimPO's target reward margin gamma", "zero or positive"),
}


def preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                    loss="dpop", chosen_lengths=None, rejected_lengths=None, **knobs):
    """Per-pair losses and implicit rewards of any loss in LOSSES.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference (None without one).
        loss: a name in LOSSES.
        chosen_lengths, rejected_lengths: (B,) the completions' token counts, for a loss that
            averages per token.
        knobs: the loss's knobs; one left out, or None, takes the entry's default.
    Returns:
        losses: (B,) per-pair loss, differentiable w.r.t. the policy log-probs.
        chosen_rewards, rejected_rewards: (B,) detached, what DPO trainers log as rewards/chosen
            and rewards/rejected: beta * c and beta * r (implicit_rewards).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    spec = LOSSES[loss]
    unknown = [k for k, v in knobs.items() if k not in spec.knobs and v is not None]
    if unknown:
        raise ValueError(f"loss {loss!r} takes no {', '.join(unknown)} (its knobs: {', '.join(spec.knobs)})")
    if spec.reference and ref_chosen_logps is None:
        raise ValueError(f"loss {loss!r} needs the reference's log-probs")
    if spec.lengths and chosen_lengths is None:
        raise ValueError(f"loss {loss!r} needs chosen_lengths, the completions' token counts")
    knobs = {k: default if knobs.get(k) is None else knobs[k] for k, default in spec.knobs.items()}
    refs = (ref_chosen_logps, ref_rejected_logps) if spec.reference else (None, None)  # none read
    x = PairLogps(policy_chosen_logps, policy_rejected_logps, *refs, chosen_lengths, rejected_lengths)
    return spec.fn(x, **knobs), *implicit_rewards(x, knobs["beta"])


def implicit_rewards(x, beta):
    """beta * c and beta * r, detached; without a reference, beta times the mean log-prob per
    token (SimPO's reward, Meng et al. 2024)."""
    if x.ref_chosen_logps is None:
        return (beta * x.policy_chosen_logps.detach() / x.chosen_lengths,
                beta * x.policy_rejected_logps.detach() / x.rejected_lengths)
    return beta * x.chosen_logratios.detach(), beta * x.rejected_logratios.detach()


def preference_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps,
                       policy_rejected_logps, beta, reference=True):
    """The standard DPO metrics for one batch, as a dict of Python floats.

    Args:
        chosen_rewards, rejected_rewards: (B,) from preference_loss.
        policy_chosen_logps, policy_rejected_logps: (B,) summed log-probs under the policy.
        beta: the same beta, to turn rewards back into log-ratios (nats).
        reference: whether the rewards are beta times log-ratios to a reference (False for a
            loss without one: then only TRL's names are returned).

    Returns:
        TRL's names (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
        logps/chosen, logps/rejected), plus logratio/chosen and logratio/rejected (the mean
        change of each log-prob from the reference, in nats: the failure DPOP targets is
        logratio/chosen going negative) and penalty/active (the fraction of pairs where DPOP's
        penalty is non-zero, i.e. the chosen log-prob fell below the reference's).
    """
    # exercise 4 begins: the preference metrics
    margins = chosen_rewards - rejected_rewards
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }
    if reference:
        metrics["logratio/chosen"] = (chosen_rewards / beta).mean().item()
        metrics["logratio/rejected"] = (rejected_rewards / beta).mean().item()
        metrics["penalty/active"] = (chosen_rewards < 0).float().mean().item()
    return metrics
    # exercise 4 ends


# ---------------------------------------------------------------------------------------------
# Faster equivalents: the same sums from the completion positions' logits only

def completion_logps(logits, targets, mask):
    """The same sums as sequence_logps, from the logits of the completion positions only: with
    long prompts most positions are prompt or padding, whose logits sequence_logps throws away.
    The model computes just the masked ones (GPT.forward(idx, logits_at=mask)), so the (B, T, V)
    logits and their float32 copy never exist, only (N, V).

    Args:
        logits: (N, V) logits at the N positions where mask is true, in row-major order.
        targets, mask: (B, T) as for sequence_logps.
    Returns:
        (B,) float32, equal to sequence_logps of the full logits.
    """
    rows = mask.nonzero()[:, 0]  # (N,) the row each token belongs to
    return summed_logps(logits, targets[mask], rows, mask.size(0))


def summed_logps(logits, targets, seq, n_seq):
    """Per-sequence sums of token log-probs, (n_seq,) float32, for tokens in any order or layout:
    logits (N, V) predict N tokens whose ids are targets (N,), in sequences seq (N,), 0..n_seq-1."""
    return torch.zeros(n_seq, device=logits.device).index_add(0, seq, token_logps(logits, targets))


def token_logps(logits, targets):
    """The log-prob of each of N tokens, (N,) float32, from their (N, V) logits and (N,) ids:
    log softmax(logits)[target], without materialising a (N, V) log-softmax."""
    # exercise 2 begins: the per-token log-prob the loop's faster path sums
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    # exercise 2 ends
