"""The teacher's answer key of docs/homework.md. extras/exercises.py never copies this file into a
student copy. tests/test_homework.py grades a student's APO-zero if dpop.LOSSES has one, and this
one otherwise, so that the grader itself is tested against a known answer wherever the repo's
tests run.

Task 3: APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
Revisions", arXiv 2408.06266; TRL's loss_type "apo_zero"), through the loss registry:

    def apo_zero_loss(x, beta):
        return 1 - torch.sigmoid(beta * x.chosen_logratios) + torch.sigmoid(beta * x.rejected_logratios)

    LOSSES["apo_zero"] = Loss(apo_zero_loss, True, {"beta": 0.1})

and, in tests/test_dpop.py's test_policy_equal_to_reference, "apo_zero": 1.0 (1 - 1/2 + 1/2).
The student's entry goes in dpop.py, beside the others; nothing else in the repo changes (beta
is in KNOBS already, so --loss apo_zero and --beta work at once).
"""
import torch

from dpop import Loss

ANSWERS = """
Task 2 (the derivation, 20 points)
(a) 5 points. For one x: sum_y pi [r - beta log(pi/pi_ref)] = -beta sum_y pi log(pi / (pi_ref
    exp(r/beta) / Z)) + beta log Z = -beta KL(pi || pi_ref exp(r/beta)/Z) + beta log Z. Z does not
    depend on pi and a KL is 0 only between equal distributions: pi* = pi_ref exp(r/beta)/Z.
(b) 5 points. r = beta log(pi*/pi_ref) + beta log Z(x); in r(x,yw) - r(x,yl) the two beta log Z(x)
    are the same number (same x) and cancel; Z, a sum over every completion, is never computed.
(c) 5 points. c = -1, r = -4, beta 0.1, lam 50: z = 0.1 (3 - 50) = -4.7, loss = log(1 + e^4.7) =
    4.7091, sigmoid(4.7) = 0.99098, dL/dc = -0.1 x 51 x 0.99098 = -5.0540, dL/dr = +0.0991 (DPO:
    z = 0.3, -0.0426 and +0.0426). `python gradients.py --c -1 --r -4` prints them. DPO's row is
    the one of c = -2, r = -5 because DPO reads only c - r = 3; DPOP's penalty reads c itself
    (lam x 1 here, lam x 2 there), so its z differs: -4.7 against -9.7.
(d) 5 points. At step 0 c = 0 for every pair. max(0, -c) has no derivative there; torch.relu(-c)
    takes 0 (the first step is DPO's, -beta/2 on c), torch.clamp(-c, min=0) takes 1 (the pull on
    the chosen is 51 times DPO's, -2.55, on every pair, before any chosen has fallen).

Task 4 (the study, 25 points): full marks for the table from the student's own runs and an
answer that reads it. On the project's 2-core machine (AMD EPYC, 2026-12-05), 150 steps each from
the demo's reference (56.5%): lam 0 (DPO) 0.0%, chosen -22.14 nats, margin c - r +11.21, chosen<ref
1.00; lam 0.5: 70.5%, +0.53, +10.59, 0.28; lam 5: 88.0%, +1.02, +7.22, 0.09; lam 50: 86.0%, +1.01,
+3.39, 0.00. So already lam 0.5 keeps the chosen above the reference on average (though about a
quarter of a batch's pairs still fall below it), lam 5 and 50 end level (the paper's
"insensitive" holds between them for what was measured; the margin shrinks as lam grows, since
the penalty, not the margin, takes the loss's attention), and checking 500 means one more run at
--lam 500 (expect huge gradient norms while the penalty acts: clipping keeps the steps bounded).
Numbers vary by machine: grade the reading, not the digits.
"""


def apo_zero_loss(x, beta):
    """APO-zero: 1 - sigmoid(beta c) + sigmoid(beta r). Each term is bounded, and the chosen's
    pulls it up whatever r does: dL/dc = -beta sigmoid'(beta c) < 0 everywhere."""
    return 1 - torch.sigmoid(beta * x.chosen_logratios) + torch.sigmoid(beta * x.rejected_logratios)


ENTRY = Loss(apo_zero_loss, True, {"beta": 0.1})


def register(losses):
    """Put the key's entry in losses (dpop.LOSSES) unless it holds an apo_zero already."""
    losses.setdefault("apo_zero", ENTRY)
