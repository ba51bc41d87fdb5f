"""How close a training step comes to the machine's limit: the model FLOPs of its tokens, and the
throughput of the matrix multiplications it is made of, measured on this machine at this model's
shapes. Their ratio is the `util` of train.py's log lines (nanoGPT prints the same idea as MFU,
against a GPU's datasheet peak) and bench.py's `fraction_of_matmul_peak`.

Model FLOPs count the useful matmuls only: 6 per weight per token for a forward and backward pass
through the blocks (2 forward, 4 backward), attention's 12 * n_layer * T * n_embd per token of a
row of T tokens, the vocabulary head only at the completion tokens (the only logits the loss
reads), and a third of all that again when a reference forward runs in the step. Padding,
layer norms, GELU, softmax and the optimizer are not counted: they are where the rest goes.
"""
import time

import torch


def rows_of(pair, sft=False, shared=False):
    """The input rows one (prompt, chosen, rejected) pair makes in a training step, as their token
    counts, and its completion tokens (where the head runs): SFT reads the chosen row; a
    preference loss both rows, or one packed row (shared) whose prompt is read once. A
    completion's last token is only a target, so each row is one token shorter than its text."""
    p, c, r = (len(x) for x in pair)
    if sft:
        return [p + c - 1], c
    return ([p + c + r - 2] if shared else [p + c - 1, p + r - 1]), c + r


def pair_flops(config, pairs, sft=False, reference=False, shared=False):
    """The model FLOPs of one training pass over pairs ((prompt, chosen, rejected) token lists),
    in the rows rows_of gives; reference: a reference forward runs in the step too."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    flops = 0
    for pair in pairs:
        rows, completion = rows_of(pair, sft, shared)
        flops += sum(6 * 12 * L * C * C * T + 12 * L * T * T * C for T in rows) + 6 * V * C * completion
    return flops * (4 / 3 if reference else 1)


def matmul_shapes(config, tokens, completion_tokens):
    """The (m, k, n) products of one forward and backward pass over `tokens` rows of width n_embd,
    with their count per pass: each Linear's forward (x W^T) and its two backward products
    (the gradient of x, of W), in the blocks and in the head (at the completion tokens)."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    out = []
    for m, k, n, count in [(tokens, C, 3 * C, L), (tokens, C, C, L), (tokens, C, 4 * C, L),
                           (tokens, 4 * C, C, L), (completion_tokens, C, V, 1)]:
        out += [((m, k, n), count), ((m, n, k), count), ((n, m, k), count)]  # y = x W^T, dx = dy W, dW = dy^T x
    return out


def matmul_throughput(config, device, dtype, tokens, completion_tokens, repeats=3):
    """FLOP/s of the step's matrix products on this machine: their FLOPs over the best time of
    each, in the dtype autocast computes in (float32 on a GPU uses TF32 where train.py allows
    it). Rows are capped at 4096:
    beyond that a product's throughput no longer grows, and the measurement stays under a
    second on a CPU for GPT-2."""
    tokens, completion_tokens = min(tokens, 4096), min(completion_tokens, 4096)
    flops = seconds = 0.0
    for (m, k, n), count in matmul_shapes(config, tokens, completion_tokens):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(repeats + 1):  # the first call warms up
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        flops += 2 * m * k * n * count
        seconds += best * count
    return flops / seconds


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Tokens and model FLOPs since the last log line; rates() turns them into tokens/s and util,
    the fraction of this machine's matmul throughput at the run's shapes (measured here, once)."""
    def __init__(self, config, pairs, cfg, device, dtype, reference, shared):
        self.config, self.sft, self.shared, self.reference = config, cfg.loss == "sft", shared, reference
        self.peak = self.measure_peak(pairs[:1000], cfg.batch_size, device, dtype)
        self.reset()

    def measure_peak(self, sample, batch_size, device, dtype):
        """matmul_throughput at the shapes of a micro-batch of batch_size pairs like those of
        sample (their mean), printed: the figure util is measured against."""
        shapes = [rows_of(pair, self.sft, self.shared) for pair in sample]
        tokens = batch_size * sum(sum(rows) for rows, _ in shapes) // len(sample)
        completion = batch_size * sum(c for _, c in shapes) // len(sample)
        peak = matmul_throughput(self.config, device, dtype, tokens, completion)
        print(f"matmuls at this model's shapes ({tokens} rows a micro-batch): {peak / 1e9:.0f} GFLOP/s on "
              f"this machine (util: the model's FLOP/s over this)")
        return peak

    def reset(self):
        self.tokens = self.flops = 0

    def add(self, pairs):
        """Count a step's pairs: tokens as TRL counts them (prompt and completion of each row the
        loss reads, SFT's chosen rows only), model FLOPs as pair_flops does."""
        pairs = list(pairs)
        self.tokens += sum(len(p) + len(c) + (0 if self.sft else len(p) + len(r)) for p, c, r in pairs)
        self.flops += pair_flops(self.config, pairs, self.sft, self.reference, self.shared)

    def rates(self, seconds):
        rates = {"tokens_per_s": self.tokens / seconds, "util": self.flops / seconds / self.peak}
        self.reset()
        return rates
