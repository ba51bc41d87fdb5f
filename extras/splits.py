"""Which data a run reads (--data, --eval-data) and what it holds out for evaluation.

The path of a run's data reads one way, a name for each stage: run_splits (--data and
--eval-data) -> splits_of (built-in, or a file) -> formats.parse_jsonl (a file's lines as
records) and hold_out (the held-out share); then data.tokenize_splits tokenizes what run_splits
returns.
"""
import os
import random

from data import BUILTIN, DataError, builtin_data
from extras.formats import parse_jsonl


def check_data_name(name, flag="--data"):
    """DataError, in one line, unless name is a built-in data set or an existing file."""
    if name not in BUILTIN and not os.path.isfile(name):
        raise DataError(f"{flag} {name}: not a built-in data set ({', '.join(BUILTIN)}) nor an "
                        f"existing file")


def splits_of(name, flag="--data", quiet=False):
    """(train, eval, test) of a data set: the built-in splits; or a JSONL file's pairs parsed
    (parse_jsonl) and a fixed share held out for evaluation (hold_out), with no test problems (no
    known answers). flag names the command-line flag in error messages; quiet: no warnings."""
    check_data_name(name, flag)
    if name in BUILTIN:
        ds = builtin_data(name)
        return ds["train"], ds["eval"], ds["test"]
    records, n_identical = parse_jsonl(name, quiet)
    if n_identical and not quiet:
        print(f"warning: skipped {n_identical} pairs of {name} whose chosen equals rejected")
    return (*hold_out(records), [])


def hold_out(records):
    """(train, held-out) records: a fixed 5% (at most 256, and at least one pair of a file with
    two or more) of a shuffled copy held out."""
    records = list(records)
    random.Random(0).shuffle(records)
    n_eval = min(256, max(len(records) // 20, len(records) > 1))
    return records[n_eval:], records[:n_eval]


def run_splits(data, eval_data=""):
    """The (train, eval, test) records a run reads: --data's splits; with --eval-data, all of
    --data trains (its own held-out pairs too) and --eval-data's held-out split evaluates.
    data.tokenize_splits then tokenizes them. A run with nothing held out stops here (its summary
    would be empty), and held-out pairs that also train are counted in a warning."""
    train, held_out, test = splits_of(data, "--data")
    if eval_data:
        train = train + held_out
        _, held_out, test = splits_of(eval_data, "--eval-data")
    if not held_out:
        flag, name = ("--eval-data", eval_data) if eval_data else ("--data", data)
        raise DataError(f"{flag} {name}: nothing is held out for evaluation (one pair; 5% of a file, at "
                        f"least one pair, is held out); give it two or more pairs"
                        + ("" if eval_data else ", or pass --eval-data FILE"))
    seen = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    also = sum((r["prompt"], r["chosen"], r["rejected"]) in seen for r in held_out)
    if also:
        print(f"warning: {also} of the {len(held_out)} held-out pairs are training pairs too; their "
              f"held-out figures measure memory, not generalisation")
    return train, held_out, test
