"""One step of DPO and DPOP by hand: c, r, z, the loss and its two gradients, by autograd.

    python gradients.py                  # the worked step of docs/derivation.md, at c = 0 and c = -2
    python gradients.py --c -1 --r -4    # any other point
    python gradients.py --figure assets/gradient-weight.png   # the slide: the weights against c

For one pair, c and r are the policy's log-ratios to the reference (nats) of the chosen and the
rejected completion. The losses are dpop.py's own functions, with beta 0.1 and lam 50 (the
demo's); "DPOP, clamp" writes the penalty clamp(-c, min=0) instead of relu(-c): the same value
everywhere, but at c = 0, where every pair sits at step 0, PyTorch gives clamp the gradient 1 and
relu the gradient 0. The figure needs matplotlib, an optional extra (pip install matplotlib).
"""
import argparse

import torch
import torch.nn.functional as F

from dpop import PairLogps, dpo_loss, dpop_loss

BETA, LAM = 0.1, 50.0


def dpop_clamp_loss(x, beta, lam):
    """DPOP with the penalty written clamp(-c, min=0): what not to write (see the docstring)."""
    z = beta * (x.chosen_logratios - x.rejected_logratios - lam * torch.clamp(-x.chosen_logratios, min=0))
    return -F.logsigmoid(z)


LOSSES = {"DPO": lambda x: dpo_loss(x, BETA, 0.0),
          "DPOP (relu)": lambda x: dpop_loss(x, BETA, LAM),
          "DPOP, clamp": lambda x: dpop_clamp_loss(x, BETA, LAM)}


def step(loss, c, r):
    """(z, loss, dL/dc, dL/dr) of one pair at log-ratios c and r (float64, so the printed digits
    are the formula's). z is the sigmoid's argument: the loss is -log sigmoid(z)."""
    c, r = (torch.tensor([float(v)], dtype=torch.float64, requires_grad=True) for v in (c, r))
    zero = torch.zeros(1, dtype=torch.float64)  # the reference's log-probs; the policy's are c and r
    value = LOSSES[loss](PairLogps(c, r, zero, zero)).sum()
    dc, dr = torch.autograd.grad(value, (c, r))
    z = -torch.log(torch.expm1(value.detach()))  # loss = log(1 + exp(-z))
    return round(z.item(), 9) + 0.0, value.item(), dc.item(), dr.item()  # + 0.0: no "-0.0000"


def table(points):
    lines = [f"beta {BETA}, lam {LAM:g}; c and r in nats; the loss is -log sigmoid(z)",
             f"{'loss':<12} {'c':>5} {'r':>5} {'z':>8} {'loss':>9} {'dL/dc':>9} {'dL/dr':>9}"]
    for c, r in points:
        for name in LOSSES:
            z, value, dc, dr = step(name, c, r)
            lines.append(f"{name:<12} {c:>5g} {r:>5g} {z:>8.4f} {value:>9.4f} {dc:>9.4f} {dr:>9.4f}")
    return "\n".join(lines)


def figure(path):
    """The gradient weights against c, with r = 0: -dL/dc (the pull up on the chosen) and dL/dr
    (the push down on the rejected), log scale; the dots are c = 0 exactly, step 0."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"the figure needs matplotlib, an optional extra: pip install matplotlib; then "
              f"python gradients.py --figure {path}")
        return
    cs = [i / 100 for i in range(-300, 101) if i != 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = {"DPO": ("tab:blue", "-"), "DPOP (relu)": ("tab:orange", "-"), "DPOP, clamp": ("tab:red", ":")}
    for ax, (k, title) in zip(axes, [(2, "pull up on the chosen: -dL/dc"), (3, "push down on the rejected: dL/dr")]):
        for name, (colour, line) in styles.items():
            sign = -1 if k == 2 else 1
            neg = [c for c in cs if c < 0]
            pos = [c for c in cs if c > 0]
            for part in (neg, pos):  # two pieces: the jump at c = 0 is not a line
                ax.plot(part, [sign * step(name, c, 0)[k] for c in part], line, color=colour,
                        label=name if part is neg else None)
            ax.plot([0], [sign * step(name, 0, 0)[k]], "o", color=colour, markersize=7 if line == ":" else 5)
        ax.set_yscale("log")
        ax.set_xlabel("c = log-ratio of the chosen (nats); r = 0")
        ax.set_title(title)
        ax.axvline(0, color="grey", lw=0.5)
    axes[0].legend(loc="center left")
    axes[0].annotate("clamp at c = 0: 2.55, 51x", (0, 2.55), (0.1, 1.2), fontsize=9, color="tab:red",
                     arrowprops=dict(arrowstyle="->", color="tab:red"))
    axes[0].annotate("DPO and relu at c = 0: 0.05", (0, 0.05), (0.05, 0.12), fontsize=9)
    fig.suptitle(f"beta {BETA}, lam {LAM:g}: the dots are c = 0 exactly (step 0); clamp's is 51x DPO's")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--c", type=float, default=None, help="the chosen log-ratio (default: 0, then -2)")
    p.add_argument("--r", type=float, default=None, help="the rejected log-ratio (default: 0, then -5)")
    p.add_argument("--figure", default="", metavar="PNG", help="draw the gradient weights against c into PNG")
    args = p.parse_args(argv)
    if args.figure:
        figure(args.figure)
        return
    points = [(0.0, 0.0), (-2.0, -5.0)] if args.c is None and args.r is None else \
        [(args.c or 0.0, args.r or 0.0)]
    print(table(points))


if __name__ == "__main__":
    main()
