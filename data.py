"""Preference data: the tokenizer, (prompt, chosen, rejected) records, and batches with masks.

Nothing here knows about models or devices: collate returns CPU tensors and train.py moves them.

Records are dicts with string fields prompt, chosen and rejected, made by the built-in
generator (`builtin_data`), which follows the Smaug paper's MetaMath recipe on 3-digit addition
so that DPO's failure mode shows up on a laptop CPU in minutes, or read from your own JSON Lines
file by extras/formats.py (not a lesson file: the forms people download).
"""
import os
import random
import re
from typing import NamedTuple

import numpy as np
import torch
import tiktoken
from tiktoken.load import load_tiktoken_bpe

EOT = "<|endoftext|>"
# how many ranks the ranks files of tiktoken's encodings hold, to notice one that was cut short
RANKS_IN = {"gpt2": 50256, "r50k_base": 50256, "p50k_base": 50280, "cl100k_base": 100256, "o200k_base": 199998}  # the end-of-text special token; its id is enc.eot_token
# GPT-2's pre-tokenizer pattern (public in GPT-2's encoder.py and in tiktoken), used with ranks files
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class DataError(ValueError):
    """Bad input from the user: the message is one line, fit to print as it is."""


# ---------------------------------------------------------------------------------------------
# Tokenizer

def load_tokenizer(spec):
    """Return a tiktoken.Encoding for spec.

    Args:
        spec: "byte" (built-in, offline: the 256 byte values are tokens 0..255 and end-of-text is
            256), a tiktoken encoding name such as "gpt2" or "cl100k_base" (downloaded and cached by
            tiktoken on first use), or the path of a .tiktoken ranks file, read with GPT-2's
            pattern and with end-of-text appended after the last rank.
    Returns:
        The encoding. Its end-of-text id is `enc.eot_token` and its vocabulary size `enc.n_vocab`.
    """
    if spec == "byte":
        return tiktoken.Encoding(name="byte", pat_str=GPT2_PATTERN, special_tokens={EOT: 256},
                                 mergeable_ranks={bytes([i]): i for i in range(256)})
    if os.path.isfile(spec):
        if os.path.getsize(spec) == 0:
            raise DataError(f"--tokenizer {spec}: the file is empty; pass a whole .tiktoken ranks file")
        try:
            ranks = load_tiktoken_bpe(spec)
        except Exception as e:
            raise DataError(f"--tokenizer {spec}: not a .tiktoken ranks file ({type(e).__name__}: "
                            f"{str(e)[:100]})") from None
        # a byte-level BPE has a rank for every byte (else encoding some text panics), ranks 0..n-1
        missing = 256 - len({t for t in ranks if len(t) == 1})
        cut = RANKS_IN.get(os.path.splitext(os.path.basename(spec))[0], len(ranks)) != len(ranks)
        if missing or cut or sorted(ranks.values()) != list(range(len(ranks))):
            why = (f"{missing} of the 256 single bytes have no rank" if missing else f"{len(ranks)} ranks"
                   + (f" where the real file has {RANKS_IN[os.path.splitext(os.path.basename(spec))[0]]}"
                      if cut else ", not numbered 0 to n-1"))
            raise DataError(f"--tokenizer {spec}: not a whole byte-level BPE ranks file ({why}); it may be "
                            f"cut short: use the whole file")
        return tiktoken.Encoding(name=os.path.basename(spec), pat_str=GPT2_PATTERN,
                                 mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    if spec not in tiktoken.list_encoding_names():
        raise DataError(f"--tokenizer {spec!r}: not 'byte', a tiktoken encoding "
                        f"({', '.join(tiktoken.list_encoding_names())}) or an existing file")
    try:
        return tiktoken.get_encoding(spec)
    except Exception as e:  # tiktoken raises requests' errors, or others, when offline
        raise DataError(f"--tokenizer {spec}: tiktoken could not download it ({type(e).__name__}); "
                        f"pass the path of a local .tiktoken ranks file instead, e.g. "
                        f"--tokenizer gpt2.tiktoken, or set TIKTOKEN_CACHE_DIR to a cache that has it") from None


# ---------------------------------------------------------------------------------------------
# Built-in data: 3-digit addition with worked solutions, the paper's MetaMath recipe in miniature

BUILTIN = ("arith", "arith-hed")
DATA_SEED = 1234  # fixed, so every training seed sees the same data set
N_TRAIN, N_EVAL, N_TEST = 20_000, 256, 200
ANSWER_RE = re.compile(r"answer (\d+)")


def arith_solution(a, b):
    """A worked solution of a+b, column by column, and its intermediate results.

    Example: arith_solution(347, 589) ->
        ("7+9=16; 4+8+1=13; 3+5+1=9; answer 936", [16, 13, 9])
    Each step adds one column of digits plus the carry from the previous column.
    """
    steps, results, carry = [], [], 0
    for i in range(3):
        x, y = a // 10**i % 10, b // 10**i % 10
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        results.append(s)
        carry = s // 10
    return "; ".join(steps) + f"; answer {a + b}", results


def builtin_data(name):
    """The built-in data set `name` (see BUILTIN), generated offline from DATA_SEED.

    "arith" (low edit distance, like the paper's MetaMath pairs): the rejected completion is the
    chosen one with ONE intermediate result corrupted and everything else unchanged:
        prompt   "347+589="
        chosen   "7+9=16; 4+8+1=13; 3+5+1=9; answer 936"
        rejected "7+9=16; 4+8+1=11; 3+5+1=9; answer 936"
    "arith-hed" (high edit distance, the control): the rejected completion is the worked solution
    of a different problem, so a wholly different, wrong solution.

    Returns:
        dict with "train" and "eval" (lists of records, on disjoint problems) and "test" (held-out
        problems as (prompt, answer) for generation accuracy, disjoint from both).
    """
    if name not in BUILTIN:
        raise DataError(f"unknown built-in data {name!r}: choose {', '.join(BUILTIN)} or a .jsonl path")
    rng = random.Random(DATA_SEED)
    problems = set()
    while len(problems) < N_TRAIN + N_EVAL + N_TEST:
        problems.add((rng.randint(100, 999), rng.randint(100, 999)))
    problems = sorted(problems)
    rng.shuffle(problems)
    records = []
    for a, b in problems[:N_TRAIN + N_EVAL]:
        chosen, results = arith_solution(a, b)
        if name == "arith":
            i = rng.randrange(3)
            wrong = max(0, results[i] + rng.choice([-3, -2, -1, 1, 2, 3]))
            wrong = wrong if wrong != results[i] else results[i] + 1  # max(0, .) may undo the change
            steps = chosen.split("; ")  # three steps, then "answer N"
            steps[i] = steps[i].rsplit("=", 1)[0] + f"={wrong}"
            rejected = "; ".join(steps)
        else:
            a2, b2 = a, b
            while a2 + b2 == a + b:
                a2, b2 = rng.randint(100, 999), rng.randint(100, 999)
            rejected, _ = arith_solution(a2, b2)
        records.append({"prompt": f"{a}+{b}=", "chosen": chosen, "rejected": rejected})
    test = [(f"{a}+{b}=", a + b) for a, b in problems[N_TRAIN + N_EVAL:]]
    return {"train": records[:N_TRAIN], "eval": records[N_TRAIN:], "test": test}


def answer_of(text):
    """The final answer in a generated solution, or None: "...; answer 936" -> 936."""
    found = ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


# ---------------------------------------------------------------------------------------------
# Tokenizing pairs and batching them

def tokenize_pairs(records, enc, block_size):
    """Tokenize records into (prompt_ids, chosen_ids, rejected_ids) lists of ints.

    Prompt and completions are tokenized separately and then joined, so the prompt boundary is
    exact whatever the tokenizer would merge across it. The prompt starts with end-of-text (as a
    beginning-of-sequence token: even an empty prompt then predicts the first completion token)
    and each completion ends with end-of-text.

    A sequence prompt + completion may hold block_size + 1 tokens (the model reads the first
    block_size and predicts the last block_size). When the longer completion does not fit, the
    prompt is cut from the left, keeping at least one token; if it still does not fit, the
    completions are cut from the right. A pair is dropped when no completion token would remain
    or when the cut makes chosen and rejected identical (no preference left to learn).

    Returns:
        (pairs, n_truncated, n_dropped)
    """
    eot = enc.eot_token
    limit = block_size + 1
    pairs, n_truncated, n_dropped = [], 0, 0
    for rec in records:
        prompt = [eot] + enc.encode_ordinary(rec["prompt"])
        chosen = enc.encode_ordinary(rec["chosen"]) + [eot]
        rejected = enc.encode_ordinary(rec["rejected"]) + [eot]
        longest = max(len(chosen), len(rejected))
        if len(prompt) + longest > limit:
            n_truncated += 1
            prompt = prompt[-max(1, limit - longest):]
            room = limit - len(prompt)
            chosen, rejected = chosen[:room], rejected[:room]
            if room < 1 or chosen == rejected:
                n_dropped += 1
                continue
        pairs.append((prompt, chosen, rejected))
    return pairs, n_truncated, n_dropped


class Batch(NamedTuple):
    """What collate returns: the B chosen rows, then the B rejected rows (all CPU tensors)."""
    idx: torch.Tensor      # (2B, T) long: the tokens the model reads
    targets: torch.Tensor  # (2B, T) long: the token that follows each of them
    mask: torch.Tensor     # (2B, T) bool: true where the target is a completion token


def collate(pairs, pad_id):
    """Stack a batch of B pairs into 2B rows: the B chosen rows first, then the B rejected rows,
    so that one forward pass serves both. The target shift happens here, once.

    Worked example with a byte tokenizer (E = end-of-text id, also the pad id) and one pair:
        prompt [E, '1', '=']   chosen ['1', E]   rejected ['2', '2', E]
        row 0 (chosen):   tokens  E  1  =  1  E
                          idx     E  1  =  1  E          (tokens[:-1], then padding)
                          targets 1  =  1  E  E          (tokens[1:], then padding)
                          mask    0  0  1  1  0          (true where the target is a completion token)
        row 1 (rejected): idx     E  1  =  2  2
                          targets 1  =  2  2  E
                          mask    0  0  1  1  1

    Args:
        pairs: list of (prompt_ids, chosen_ids, rejected_ids) from tokenize_pairs.
        pad_id: token id written at padded positions (masked out, so any valid id works).
    Returns:
        Batch(idx (2B, T) long, targets (2B, T) long, mask (2B, T) bool), with T the longest row
        minus 1.
    """
    rows = [(p, p + c) for p, c, _ in pairs] + [(p, p + r) for p, _, r in pairs]
    T = max(len(seq) for _, seq in rows) - 1
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (prompt, seq) in enumerate(rows):
        n = len(seq) - 1
        idx[i, :n] = torch.tensor(seq[:-1])
        targets[i, :n] = torch.tensor(seq[1:])
        # exercise 1 begins: the completion mask
        mask[i, len(prompt) - 1:n] = True  # targets[t] = seq[t+1]: the completion starts at t = len(prompt)-1
        # exercise 1 ends
    return Batch(idx, targets, mask)


def batch_indices(n, batch_size, step, seed):
    """The indices of the examples in optimizer step `step`: a pure function of its arguments, so
    a resumed run sees exactly the batches an uninterrupted run would. The data is read as a
    stream of epochs, each a fresh permutation of range(n) drawn from (seed, epoch), and step s
    takes the stream's positions s*batch_size to (s+1)*batch_size - 1: every example is seen once
    per epoch, and a batch may straddle two epochs.
    """
    if batch_size > n:
        raise DataError(f"batch of {batch_size} examples but only {n} training pairs; lower --batch-size")
    indices, position = [], step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position + len(indices), n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        indices += torch.randperm(n, generator=g)[offset:offset + batch_size - len(indices)].tolist()
    return indices


# ---------------------------------------------------------------------------------------------
# Edit distance: the quantity the paper ties DPO's failure mode to

def edit_distance(a, b):
    """Levenshtein distance between two token lists (insert, delete, substitute cost 1)."""
    while a and b and a[0] == b[0]:  # a shared prefix or suffix costs nothing: strip it first
        a, b = a[1:], b[1:]
    while a and b and a[-1] == b[-1]:
        a, b = a[:-1], b[:-1]
    if not a or not b:
        return len(a) + len(b)
    b_arr = np.array(b)
    prev = np.arange(len(b) + 1)
    for i, tok in enumerate(a, start=1):
        # without insertions: the best of a deletion (prev + 1) and a substitution or match
        row = np.empty_like(prev)
        row[0] = i
        row[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (b_arr != tok))
        # insertions chain along the row: row[j] = min over k <= j of row[k] + (j - k)
        j = np.arange(len(row))
        prev = np.minimum.accumulate(row - j) + j
    return int(prev[-1])


def mean_edit_distance(pairs, max_pairs=1000):
    """Mean normalised token edit distance between chosen and rejected over (up to max_pairs of)
    the pairs: edit_distance / max(len(chosen), len(rejected)). MetaMath pairs: about 0.065."""
    sample = pairs[:max_pairs]
    return float(np.mean([edit_distance(c, r) / max(len(c), len(r)) for _, c, r in sample]))


# ---------------------------------------------------------------------------------------------
# Putting it together: what a run trains and evaluates on

def tokenize_splits(splits, enc, block_size, name):
    """What a run trains and evaluates on, tokenized; prints one line of counts.

    Args:
        splits: (train, eval, test): records for training and for evaluation, and test problems
            as (prompt, answer). builtin_data's splits, or those of a JSONL file (--data and
            --eval-data are read by extras/splits.py: run_splits).
        name: the data's name, for the messages.
    Returns:
        (train_pairs, eval_pairs, val_problems, test_problems): pairs from tokenize_pairs, and
        held-out problems as (prompt, answer), built-in data only: the eval problems (SFT's early
        stop and the log read them) and the test problems (the summary reads them).
    """
    train_recs, eval_recs, test = splits
    train, n_cut, n_drop = tokenize_pairs(train_recs, enc, block_size)
    evals, n_cut_e, n_drop_e = tokenize_pairs(eval_recs, enc, block_size)
    if not train:
        raise DataError(f"{name}: no training pair fits a context of {block_size} tokens")
    print(f"data {name}: {len(train)} train pairs, {len(evals)} eval pairs, {len(test)} test "
          f"problems; {n_cut + n_cut_e} truncated, {n_drop + n_drop_e} dropped (no completion "
          f"token or no difference left); mean normalised edit distance chosen vs rejected "
          f"{mean_edit_distance(train):.3f}")
    val = [(r["prompt"], answer_of(r["chosen"])) for r in eval_recs] if test else []
    return train, evals, val, test
