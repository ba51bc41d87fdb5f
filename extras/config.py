"""The training config's flags and their checks: every knob is one dataclass field that also says
its --help text, the values it takes, whether --resume may change it, whether a reused SFT
reference may differ in it, and whether the SFT reference inherits it. The hand-kept lists of
field names that used to track the config are derived from these fields here.

train.py declares its knobs with `knob` (TrainConfig); the preference losses' own knobs (--beta,
--lam, ...) come from dpop.LOSSES and dpop.KNOBS through `with_loss_knobs`, so adding a loss
never touches train.py. `parse_config` makes the flags; `check_config` refuses, in one line that
names the flag, any value that cannot work.
"""
import argparse
import dataclasses
import math
import os
import re
import shutil
import sys

import torch

from data import BUILTIN, DataError, load_tokenizer
from dpop import KNOBS, LOSSES
from extras.distributed import rank_and_world
from extras.splits import check_data_name, splits_of

# GPT-2 has 1024 positions. 65536 is 64 times that and already costs n_embd x 256 KiB of position
# embeddings and, on a CPU, a (T, T) attention matrix per head of 16 GiB; --block-size 1000000000
# would ask for a 512 GB allocation, so larger values are refused before anything is built.
MAX_BLOCK_SIZE = 65536

# The ranges a knob may declare, by the words its error message uses.
RANGES = {
    "positive": lambda v: v > 0,
    "zero or positive": lambda v: v >= 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 0.5)": lambda v: 0 <= v < 0.5,
    f"in [1, {MAX_BLOCK_SIZE}]": lambda v: 1 <= v <= MAX_BLOCK_SIZE,
    "in [0, 2**32)": lambda v: 0 <= v < 2 ** 32,
    "in (0, 1)": lambda v: 0 < v < 1,
}


# ---------------------------------------------------------------------------------------------
# Knobs: dataclass fields that say what the rest of the tool needs to know of them

def knob(default, help, group=None, range=None, choices=None, one_of=None, resume_may_change=False,
         reference_may_differ=False, sft_inherits=False):
    """A config dataclass field with its --help text and what the tool needs to know of it.

    group: a title that starts a new group of flags in --help. range: a key of RANGES (None, an
    unset stage default, always passes). choices: the values argparse accepts; one_of: the values
    check_config accepts, with its own message. resume_may_change: --resume may run with another
    value. reference_may_differ: a reused SFT reference may have been made with another value (it
    says where and how a run is watched and kept, or computes the same maths another way).
    sft_inherits: the SFT reference that a preference run trains first takes this run's value
    (what says which data, model and machine); every other knob is the SFT recipe's default."""
    meta = dict(help=help, group=group, range=range, choices=choices, one_of=one_of,
                resume_may_change=resume_may_change, reference_may_differ=reference_may_differ,
                sft_inherits=sft_inherits)
    return dataclasses.field(default=default, metadata=meta)


def fields_where(config_class, key):
    """The names of the config's fields whose knob says key (e.g. "resume_may_change")."""
    return {f.name for f in dataclasses.fields(config_class) if f.metadata.get(key)}


def with_loss_knobs(config_class, before, group):
    """config_class with a field for each knob in dpop.KNOBS, placed before the field `before`
    and under the --help group `group`. Their default is None, "the loss's own": resolve_loss_knobs
    fills those of the run's loss from its entry in dpop.LOSSES and leaves the others None."""
    def default_help(name):  # "0.1; simpo 2.0": the most common default first, then the others
        defaults = {loss: spec.knobs[name] for loss, spec in LOSSES.items() if name in spec.knobs}
        common = max(set(defaults.values()), key=list(defaults.values()).count)
        others = [f"{loss} {v}" for loss, v in defaults.items() if v != common]
        users = "" if len(defaults) == len(LOSSES) else f"; --loss {', '.join(defaults)} only"
        return f"default: {'; '.join([str(common)] + others)}{users}"

    loss_fields = [(name, float, knob(None, f"{help_text} ({default_help(name)})", range=allowed,
                                      group=group if i == 0 else None))
                   for i, (name, (help_text, allowed)) in enumerate(KNOBS.items())]
    fields = []
    for f in dataclasses.fields(config_class):
        if f.name == before:
            fields += loss_fields
        fields.append((f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata)))
    made = dataclasses.make_dataclass(config_class.__name__, fields, namespace={"__doc__": config_class.__doc__})
    made.__module__ = config_class.__module__  # where a reader finds it: train.py
    return made


def loss_knobs(loss):
    """The knobs a run with this --loss reads: its entry's; SFT's held-out figures are DPO's with
    its beta (and no label smoothing)."""
    return LOSSES[loss].knobs if loss in LOSSES else {"beta": LOSSES["dpo"].knobs["beta"]}


def loss_of(cfg):
    """(name, entry in dpop.LOSSES, knob values) of the loss cfg trains with, or for SFT of the one
    whose figures it reports on held-out pairs (DPO's). A knob left None (a config that was not
    resolved) takes the entry's default."""
    name = cfg.loss if cfg.loss in LOSSES else "dpo"
    knobs = {k: default if getattr(cfg, k) is None else getattr(cfg, k) for k, default in loss_knobs(cfg.loss).items()}
    return name, LOSSES[name], knobs


def resolve_loss_knobs(cfg):
    """Fill the run's loss knobs that were not given with the loss's defaults."""
    for name, default in loss_knobs(cfg.loss).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, default)


# ---------------------------------------------------------------------------------------------
# The command line: flags generated from the config dataclass

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        sys.exit(f"error: {message} (see python {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that keeps the description's lines as written and shows a flag's default where it
    says something: not for a switch, an unset value (None or "") or a help text that already
    names its default."""
    def _get_help_string(self, action):
        shown = not (action.default is None or action.default is False or action.default == ""
                     or action.default == argparse.SUPPRESS)
        return action.help + (" (default: %(default)s)" if shown and "default" not in action.help else "")


def stage_help(stage_defaults, name):
    """A knob's default in each stage, for --help: "sft 600, a preference loss 300"."""
    values = (stage_defaults[stage][name] for stage in ("sft", "preference"))
    return "sft {}, a preference loss {}".format(*(f"{v:.0e}".replace("e-0", "e-") if isinstance(v, float)
                                                   else v for v in values))


def parse_config(config_class, argv, description, epilog=None):
    """An instance of config_class (fields made by `knob`) from the command line: --batch-size
    for batch_size; a bool field is a switch."""
    p = ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    group = p
    for f in dataclasses.fields(config_class):
        if f.metadata.get("group"):
            group = p.add_argument_group(f.metadata["group"])
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            group.add_argument(flag, type=f.type, default=f.default, choices=f.metadata.get("choices"),
                               help=f.metadata["help"])
    return config_class(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Checks: before any work, one line that names the flag

def flag(name):
    return "--" + name.replace("_", "-")


def check_config(cfg):
    """Refuse values that cannot work, before any work, with one line that names the flag and
    the range it takes; also the folders the run will write (--out, --export-hf), the data files,
    and --resume's checkpoint."""
    fields = dataclasses.fields(cfg)
    check_finite({f.name: getattr(cfg, f.name) for f in fields})
    for name in KNOBS:  # a loss's knob given to a loss that does not read it would change nothing
        takes = loss_knobs(cfg.loss)
        if getattr(cfg, name) is not None and name not in takes:
            users = [loss for loss, spec in LOSSES.items() if name in spec.knobs]
            raise DataError(f"{flag(name)} applies to --loss {', '.join(users)} only")
    check_ranges({f.name: getattr(cfg, f.name) for f in fields if f.metadata.get("range")},
                 {f.name: f.metadata["range"] for f in fields if f.metadata.get("range")})
    for f in fields:
        value, one_of = getattr(cfg, f.name), f.metadata.get("one_of")
        if one_of and value not in one_of:
            raise DataError(f"{flag(f.name)} {value}: choose {', '.join(one_of[:-1])} or {one_of[-1]}")
    if cfg.n_embd % cfg.n_head:
        raise DataError(f"--n-embd {cfg.n_embd} must be a multiple of --n-head {cfg.n_head} "
                        f"(each head gets n_embd / n_head channels)")
    check_device(cfg.device)
    if cfg.compile:
        check_compiler()
    load_tokenizer(cfg.tokenizer)  # a name or file that is not a tokenizer: one line, now
    for option, name in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if name:
            check_data_name(name, option)
    check_writable(cfg.out, "--out")
    if cfg.export_hf:
        check_writable(cfg.export_hf, "--export-hf")
    same = os.path.realpath  # the starting model must outlive the run that reads it
    if cfg.init and same(cfg.init) == same(os.path.join(cfg.out, "ckpt.pt")):
        raise DataError(f"--init {cfg.init} is the checkpoint this run would write (--out {cfg.out}); "
                        f"give the run another --out, or use --resume to continue that run")
    if cfg.init and cfg.export_hf and same(cfg.export_hf) in (same(cfg.init), same(os.path.dirname(cfg.init))):
        raise DataError(f"--export-hf {cfg.export_hf} would overwrite --init {cfg.init}; export to another folder")
    # A preference run without --init first continues or reuses its SFT reference, so there an
    # absent checkpoint may be right: checkpoints.claim_reference decides.
    if cfg.resume and (cfg.loss == "sft" or cfg.init) and not os.path.isfile(os.path.join(cfg.out, "ckpt.pt")):
        raise DataError(nothing_to_resume(cfg.out))


def check_finite(values):
    """nan and inf would pass every range: refused first, by the flag's name ({name: value})."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{flag(name)} must be a finite number, got {value}")


def check_ranges(values, ranges):
    """Every value in its range ({name: value}, {name: a key of RANGES}), or one line that names
    the flag, its range and the value. None (an unset default) passes. Every script's flags are
    checked with it, up front."""
    check_finite(values)
    for name, allowed in ranges.items():
        if values[name] is not None and not RANGES[allowed](values[name]):
            raise DataError(f"{flag(name)} must be {allowed}, got {values[name]}")


def check_python(python, option):
    """A python to run: an executable file, or a name on the PATH."""
    if not (shutil.which(python) or (os.path.isfile(python) and os.access(python, os.X_OK))):
        raise DataError(f"{option} {python}: no such python (give the path of a virtual "
                        f"environment's bin/python)")


def check_device(device, option="--device"):
    """A device that is not here, or not a device: one line, before any work."""
    if device not in ("auto", "cpu", "mps", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise DataError(f"{option} {device}: choose auto, cuda, cuda:N, mps or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"{option} {device}: no CUDA device is available here; use {option} cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise DataError(f"{option} {device}: there are {torch.cuda.device_count()} CUDA devices here "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"{option} mps: no Apple GPU (MPS) is available here; use {option} cpu")


def check_compiler(option="--compile"):
    """torch.compile writes C++ (on a CPU) or Triton (on a GPU) kernels and builds them with the
    machine's C/C++ compiler: without one it fails after the set-up with a long traceback."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise DataError(f"{option}: no C++ compiler found (torch.compile builds its kernels with one); "
                        f"install g++ (apt-get install g++) or drop {option}")


def check_global_batch(cfg, global_batch, world, n_pairs):
    """One step reads global_batch (batch_size x grad_accum x world) distinct pairs: refuse, in
    one line that names the flag to lower, data with fewer training pairs than that."""
    if global_batch > n_pairs:
        raise DataError(f"a global batch of {global_batch} pairs (--batch-size {cfg.batch_size} x --grad-accum "
                        f"{cfg.grad_accum} x {world} process{'es' * (world > 1)}) but only {n_pairs} training pairs; "
                        f"lower --batch-size" + (" (for the SFT reference: --sft-batch-size)" if cfg.loss == "sft" else ""))


def check_writable(folder, option):
    """The folder a run will write in (it may not exist yet): refused, in one line, if it is a
    file, lies under a file, or lies in a folder this user cannot write (or on a read-only disk)."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(folder) else f"is under {path}, a file"
        raise DataError(f"{option} {folder} {where}, not a folder; use another {option}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{option} {folder}: cannot write in {path} (no permission, or a read-only "
                        f"disk); use another {option}")


def nothing_to_resume(out):
    return (f"--resume: no checkpoint at {os.path.join(out, 'ckpt.pt')} to continue (is --out "
            f"right?); drop --resume to start from step 0")


# ---------------------------------------------------------------------------------------------
# Facts about a config that several modules ask

def has_stop_rule(config):
    """Whether a run with this config (a dict: vars(cfg), or a checkpoint's) is SFT from random
    weights that stops at its target accuracy: only the built-in data has problems to measure
    that accuracy on."""
    return (config.get("loss") == "sft" and not config.get("init") and (config.get("sft_target_acc") or 0) > 0
            and (config.get("eval_data") or config.get("data")) in BUILTIN)


def sft_length(cfg):
    """The default SFT reference's (steps, batch size) for a preference run's data: a batch of at
    most 64 pairs per process and no more than the data has, 3 passes over the data and at most
    600 steps; --sft-steps and --sft-batch-size override. The pairs are counted, not tokenized."""
    train, held_out, _ = splits_of(cfg.data, "--data", quiet=True)
    n_pairs = len(train) + (len(held_out) if cfg.eval_data else 0)  # --eval-data: all of --data trains
    batch_size = cfg.sft_batch_size or max(1, min(64, n_pairs // rank_and_world()[1]))
    return cfg.sft_steps or max(1, min(600, math.ceil(3 * n_pairs / batch_size))), batch_size
