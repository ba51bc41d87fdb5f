"""What a real training run needs and a lesson does not: checkpoints written atomically and read
back with checks, --init from a checkpoint or GPT-2 weights, --resume, the default SFT
reference's reuse, a lock on each output folder, Ctrl-C and SIGTERM, several processes under
torchrun, and the metrics file. train.py calls these; each call there says in a comment what it
does, so a student never has to open this file to follow a step.

Whatever a run finds on disk (a torn file, another run's files, a full or read-only disk), it
either carries on correctly or stops with one `error:` line that names the path and says what to
do: never a traceback, never a silently wrong result.
"""
import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import BUILTIN, DataError, answer_of, load_tokenizer
from extras.formats import check_data_name, read_splits
from extras.hf_gpt2 import is_hf_spec, load_hf_init, save_hf_gpt2
from model import GPT, GPTConfig

try:
    import fcntl  # file locks; POSIX only
except ImportError:  # Windows: no lock, so two runs on one folder go undetected there
    fcntl = None


# ---------------------------------------------------------------------------------------------
# The command line: flags generated from the config dataclass, and their ranges

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


def knob(default, help, group=None):
    """A config dataclass field with its --help text; a group title starts a new group of flags."""
    return dataclasses.field(default=default, metadata={"help": help, **({"group": group} if group else {})})


def stage_help(stage_defaults, name):
    """A knob's default in each stage, for --help: "sft 600, a preference loss 300"."""
    values = (stage_defaults[stage][name] for stage in ("sft", "preference"))
    return "sft {}, a preference loss {}".format(*(f"{v:.0e}".replace("e-0", "e-") if isinstance(v, float)
                                                   else v for v in values))


def parse_config(config_class, argv, description, choices, epilog=None):
    """An instance of config_class (a dataclass whose fields carry their --help text in
    metadata["help"]) from the command line: --batch-size for batch_size; a bool field is a
    switch; choices: {field: allowed values}. A field whose metadata has a "group" starts a new
    group of flags in --help, under that title."""
    p = ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    group = p
    for f in dataclasses.fields(config_class):
        if "group" in f.metadata:
            group = p.add_argument_group(f.metadata["group"])
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            group.add_argument(flag, type=f.type, default=f.default, choices=choices.get(f.name),
                               help=f.metadata["help"])
    return config_class(**vars(p.parse_args(argv)))


# GPT-2 has 1024 positions. 65536 is 64 times that and already costs n_embd x 256 KiB of position
# embeddings and, on a CPU, a (T, T) attention matrix per head of 16 GiB; --block-size 1000000000
# would ask for a 512 GB allocation, so larger values are refused before anything is built.
MAX_BLOCK_SIZE = 65536


def check_config(cfg):
    """Refuse values that cannot work, before any work, with one line that names the flag and
    the range it takes; also the folders the run will write (--out, --export-hf), the data files,
    and --resume's checkpoint."""
    def refuse(name, allowed):
        raise DataError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(cfg, name)}")

    for f in dataclasses.fields(cfg):  # nan and inf would pass every comparison below
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            refuse(f.name, "a finite number")
    for name in ("steps", "batch_size", "grad_accum", "lr", "beta", "eval_every", "log_every",
                 "sft_check_every", "max_bad_steps", "n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) <= 0:
            refuse(name, "positive")
    for name in ("lam", "rpo_alpha", "grad_clip", "weight_decay"):  # --grad-clip 0: no clipping
        if getattr(cfg, name) < 0:
            refuse(name, "zero or positive")
    for name in ("warmup", "min_lr_ratio", "sft_target_acc"):  # fractions
        if not 0 <= getattr(cfg, name) <= 1:
            refuse(name, "in [0, 1]")
    if not 0 <= cfg.dropout < 1:
        refuse("dropout", "in [0, 1)")
    if not 1 <= cfg.block_size <= MAX_BLOCK_SIZE:
        refuse("block_size", f"in [1, {MAX_BLOCK_SIZE}]")
    if cfg.n_embd % cfg.n_head:
        raise DataError(f"--n-embd {cfg.n_embd} must be a multiple of --n-head {cfg.n_head} "
                        f"(each head gets n_embd / n_head channels)")
    if not 0 <= cfg.seed < 2 ** 32:
        refuse("seed", "in [0, 2**32)")
    if cfg.ref_logps not in ("auto", "precompute", "every-step"):
        raise DataError(f"--ref-logps {cfg.ref_logps}: choose auto, precompute or every-step")
    if cfg.label_smoothing and cfg.loss != "dpo":
        raise DataError("--label-smoothing applies to --loss dpo only")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise DataError(f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu")
    if cfg.device not in ("auto", "cpu", "mps", "cuda") and not re.fullmatch(r"cuda:\d+", cfg.device):
        raise DataError(f"--device {cfg.device}: choose auto, cuda, cuda:N, mps or cpu")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise DataError(f"--dtype {cfg.dtype}: choose auto, float32, bfloat16 or float16")
    load_tokenizer(cfg.tokenizer)  # a name or file that is not a tokenizer: one line, now
    for flag, name in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if name:
            check_data_name(name, flag)
    check_writable(cfg.out, "--out")
    if cfg.export_hf:
        check_writable(cfg.export_hf, "--export-hf")
    # A preference run without --init first continues or reuses its SFT reference, so there an
    # absent checkpoint may be right: claim_reference decides.
    if cfg.resume and (cfg.loss == "sft" or cfg.init) and not os.path.isfile(os.path.join(cfg.out, "ckpt.pt")):
        raise DataError(nothing_to_resume(cfg.out))


def check_global_batch(cfg, global_batch, world, n_pairs):
    """One step reads global_batch (batch_size x grad_accum x world) distinct pairs: refuse, in
    one line that names the flag to lower, data with fewer training pairs than that."""
    if global_batch > n_pairs:
        raise DataError(f"a global batch of {global_batch} pairs (--batch-size {cfg.batch_size} x --grad-accum "
                        f"{cfg.grad_accum} x {world} process{'es' * (world > 1)}) but only {n_pairs} training pairs; "
                        f"lower --batch-size" + (" (for the SFT reference: --sft-batch-size)" if cfg.loss == "sft" else ""))


def check_writable(folder, flag):
    """The folder a run will write in (it may not exist yet): refused, in one line, if it is a
    file, lies under a file, or lies in a folder this user cannot write (or on a read-only disk)."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(folder) else f"is under {path}, a file"
        raise DataError(f"{flag} {folder} {where}, not a folder; use another {flag}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {folder}: cannot write in {path} (no permission, or a read-only "
                        f"disk); use another {flag}")


def nothing_to_resume(out):
    return (f"--resume: no checkpoint at {os.path.join(out, 'ckpt.pt')} to continue (is --out "
            f"right?); drop --resume to start from step 0")


# ---------------------------------------------------------------------------------------------
# Several processes under torchrun: each is a rank with its own share of every batch

def setup_distributed():
    """Join torchrun's process group when torchrun started this process (it sets RANK,
    WORLD_SIZE, LOCAL_RANK and the rendezvous address): nccl between GPUs, gloo on CPUs. Ranks
    above 0 print nothing."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_backend() == "nccl":  # this process's GPU, before the first collective (any_rank)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")


def rank_and_world():
    """This process's rank and the number of processes: (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_device(device):
    """Under torchrun, one GPU per process: "cuda" becomes this process's cuda:LOCAL_RANK."""
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return device


def wrap_for_ranks(model, device):
    """Under torchrun, the module that trains is wrapped in DDP, which averages the gradients
    across ranks during backward; otherwise it is returned as it is."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_gradients(model, last):
    """The context for one micro-batch's backward: under DDP only the last micro-batch of a step
    all-reduces the gradients (no_sync for the others: the sum is the same, the traffic once)."""
    return nullcontext() if last or not isinstance(model, DDP) else model.no_sync()


def all_mean(values, device):
    """The mean over the ranks of a dict of floats, with one all-reduce; as it is without torchrun."""
    if not dist.is_initialized():
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def barrier():
    """Under torchrun, wait until every rank is here."""
    if dist.is_initialized():
        dist.barrier()


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Files: written atomically; a failure is one line that names the path

def write_atomically(path, write):
    """Call write(f) on a temporary file next to path (binary), flush it to disk, then rename it
    over path: a crash at any moment leaves either the old file or the new one. If anything goes
    wrong on the way (a full disk, a second Ctrl-C), the temporary file is removed, and an
    OSError names path. torch.save's zip writer reports a short write as a RuntimeError
    ("unexpected pos"): with less than 1 MiB left on the disk, that is a full disk."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = False
        if isinstance(e, RuntimeError):  # measured before the temporary file frees its space
            with suppress(OSError):
                full = shutil.disk_usage(folder).free < 1 << 20
        with suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, path) from None
        if isinstance(e, RuntimeError):
            code = errno.ENOSPC if full else errno.EIO
            why = os.strerror(code) if full else f"the write failed: {str(e).strip().splitlines()[0][:120]}"
            raise OSError(code, why, path) from None
        raise


def explain_os_error(e):
    """One line for a file-system failure: the path, what went wrong, and what to do. When the
    path is in a run's folder that holds a checkpoint, that checkpoint is intact (they are
    written atomically), and --resume continues from it."""
    path = e.filename or "a file"
    ckpt = os.path.join(os.path.dirname(path), "ckpt.pt")
    then = (f", then run the same command with --resume (the last checkpoint, {ckpt}, is intact)"
            if os.path.isfile(ckpt) else ", then run the same command again")
    advice = {
        errno.ENOSPC: "the disk is full: free some space" + then,
        errno.EDQUOT: "over the disk quota: free some space" + then,
        errno.EFBIG: "larger than the file size limit (ulimit -f): raise it" + then,
        errno.EIO: "is the disk full, or a file size limit (ulimit -f) reached? free some space" + then,
        errno.EACCES: "no permission to write there: use another folder",
        errno.EPERM: "no permission to write there: use another folder",
        errno.EROFS: "a read-only disk: use another folder",
        errno.ENOTDIR: "a file stands where a folder should be: use another folder",
        errno.EEXIST: "a file stands where a folder should be: use another folder",
        errno.EISDIR: "a folder stands where a file should be: move it away",
    }.get(e.errno, "check the disk and the folder" + then)
    return f"{path}: cannot write it ({e.strerror or e}); {advice}"


def save_checkpoint(path, obj):
    """torch.save(obj) to path atomically (see write_atomically)."""
    write_atomically(path, lambda f: torch.save(obj, f))


@lru_cache(maxsize=None)
def _sha256(path, size, mtime_ns):  # size and mtime: an edited file is read again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digests(cfg):
    """{flag: digest} of the files a run reads its data, tokenizer and starting weights from, so
    that an edited pairs.jsonl, or an SFT reference trained again, is noticed."""
    digests = {}
    for name in ("data", "eval_data", "tokenizer", "init"):
        path = getattr(cfg, name)
        if path not in ("", "byte", *BUILTIN) and os.path.isfile(path):  # built-in names come first
            st = os.stat(path)
            digests[name] = _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)
    return digests


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, read back with checks

def save_training_state(path, model, optimizer, scaler, step, done, cfg, tokenizer):
    """The run's checkpoint, in one file: the plain (uncompiled, unwrapped) model's weights, the
    optimizer and GradScaler states, the step, whether the run is done, the config, the number
    of processes and the digests of the input files (its recipe, see recipe_differences), and
    the random states (so that --resume continues exactly)."""
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "step": step, "done": done,
        "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config),
        "tokenizer": tokenizer, "processes": rank_and_world()[1], "files": file_digests(cfg),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}})


def looks_like(path):
    """What a file that torch cannot load looks like, in a few words for an error message."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):  # checkpoints are zip archives
        return "a zip archive that torch cannot read; it may be truncated"
    if b"\0" in head:
        return "not a file written by torch.save; it may be truncated"
    if head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"["):
        return "it is JSON text, not a checkpoint (preference pairs go to --data)"
    return "it is a text file, not a checkpoint"


def load_checkpoint(path):
    """A checkpoint written by train.py, as a dict; DataError with one line if it is not one."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}): {looks_like(path)}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "config"} <= ckpt.keys():
        raise DataError(f"{path}: not a checkpoint written by train.py")
    return ckpt


def load_weights(model, state_dict, path):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise DataError(f"{path}: the weights do not fit the model ({first})") from None


def model_from_checkpoint(ckpt_path):
    """The GPT of a train.py checkpoint, with its weights; and the checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_weights(model, ckpt["model"], ckpt_path)
    return model, ckpt


def export_checkpoint(ckpt_path, folder):
    """Write a train.py checkpoint as a Hugging Face GPT-2 checkpoint, without training:
        python -c "from extras.runtime import export_checkpoint; export_checkpoint('out/dpop-arith-seed1337/ckpt.pt', 'hf')"
    """
    model, ckpt = model_from_checkpoint(ckpt_path)
    save_hf_gpt2(model, folder, eos_id=load_tokenizer(ckpt["config"]["tokenizer"]).eot_token)


# ---------------------------------------------------------------------------------------------
# --init: a train.py checkpoint, or GPT-2 weights

def load_init(spec):
    """The --init weights, as a dict shaped like a train.py checkpoint: from a train.py
    checkpoint; from a Hugging Face GPT-2 folder, model.safetensors or pytorch_model.bin; or from
    a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) looked up in the Hugging Face cache."""
    if not is_hf_spec(spec):
        return load_checkpoint(spec)
    try:
        model = load_hf_init(spec)
    except LookupError as e:  # a GPT-2 name that is not in the Hugging Face cache
        raise DataError(f"--init {spec}: {e.args[0]}") from None
    except FileNotFoundError as e:
        raise DataError(f"--init {spec}: {e.filename or e}: not found") from None
    except Exception as e:
        raise DataError(f"--init {spec}: not a Hugging Face GPT-2 checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "config": {"tokenizer": "gpt2"}}


def model_from_init(init_ckpt, cfg, shape_defaults, enc):
    """The policy from load_init's dict: its weights and shape. A shape flag that was given
    (differs from shape_defaults, {name: default}) must agree with the checkpoint, except that a
    smaller --block-size crops the position embeddings (GPT-2's 1024 positions cost memory a
    short data set never uses). The vocabulary must be the tokenizer's."""
    gptconf = GPTConfig(**{**init_ckpt["model_config"], "dropout": cfg.dropout})
    state_dict = init_ckpt["model"]
    for name, default in shape_defaults.items():
        asked = getattr(cfg, name)
        if name == "block_size" and asked != default and asked < gptconf.block_size:
            gptconf.block_size = asked
            state_dict = {**state_dict, "transformer.wpe.weight": state_dict["transformer.wpe.weight"][:asked]}
        elif asked != default and asked != getattr(gptconf, name):
            raise DataError(f"--{name.replace('_', '-')} {asked}, but --init {cfg.init} has "
                            f"{name} {getattr(gptconf, name)}; drop the flag")
    if gptconf.vocab_size != enc.n_vocab:
        raise DataError(f"--init {cfg.init}: the model has a vocabulary of {gptconf.vocab_size} but "
                        f"--tokenizer {cfg.tokenizer} has {enc.n_vocab}; use the checkpoint's "
                        f"tokenizer (--tokenizer {init_ckpt['config'].get('tokenizer')})")
    model = GPT(gptconf)
    load_weights(model, state_dict, cfg.init)
    return model


# ---------------------------------------------------------------------------------------------
# One run per folder: a lock

class FolderLock:
    """<folder>/.lock, held with fcntl.flock while a run writes in folder, so that two runs never
    write the same files. On a folder another run holds, it stops at once with one line, or,
    with wait=True (the SFT reference, see claim_reference), says that it waits and goes on when
    the other run is done. The file holds the holder's pid, for these messages.

    The kernel drops the lock when its process ends, kill -9 included: there is never a stale
    lock to delete. The file itself stays (deleting it would let a waiter lock a file that a
    newcomer no longer sees). Opening it is the run's first write in the folder, so a folder
    that cannot be written is found here, before any work. Under torchrun rank 0 holds it for
    all the ranks, and every rank gets the same answer.

        with FolderLock(cfg.out):
            ...  # train, write checkpoints
    """
    def __init__(self, folder, wait=False):
        self.folder, self.wait, self.file = folder, wait, None

    def __enter__(self):
        master = rank_and_world()[0] == 0
        said = False
        while True:
            holder, error = self.try_lock() if master else (None, None)
            if not any_rank(bool(holder or error)):
                return self
            if error or not self.wait:
                raise (DataError(error or f"another run is using {self.folder} (pid {holder}); wait "
                                          f"for it or use another --out") if master else SystemExit(1))
            if not said:
                print(f"waiting: another run (pid {holder}) is using {self.folder}; this run goes on "
                      f"when it is done", flush=True)
                said = True
            time.sleep(1)

    def try_lock(self):
        """(None, None) once this process holds the lock; (the holder's pid, None) while another
        process holds it; (None, a message) if the folder cannot be written."""
        if fcntl is None:
            return None, None
        try:
            os.makedirs(self.folder, exist_ok=True)
            f = open(os.path.join(self.folder, ".lock"), "a+")  # a+: not emptied before it is ours
        except OSError as e:
            return None, explain_os_error(e)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            return holder, None
        except OSError as e:  # a file system without locks
            f.close()
            print(f"warning: {self.folder}: cannot lock it ({e.strerror}); two runs on it at once "
                  f"would go unnoticed")
            return None, None
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        except OSError as e:
            f.close()
            return None, explain_os_error(OSError(e.errno, e.strerror, f.name))
        self.file = f
        return None, None

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # and with it the lock
            self.file = None


# ---------------------------------------------------------------------------------------------
# A run's recipe; --resume; the default SFT reference

def recipe_differences(cfg, ckpt, may_differ):
    """How this run's config differs from the run that wrote ckpt, as a list of "name (old ->
    new)", leaving out the fields in may_differ. Besides the config's fields: the global batch,
    batch_size x grad_accum x processes (how it is split changes neither the data order nor the
    mean gradient, so batch_size and grad_accum alone are not compared), and the contents of the
    files the run reads (file_digests; a checkpoint from before they were recorded is taken at
    its word)."""
    # a knob newer than the checkpoint counts as set to its default there
    old = {**{f.name: f.default for f in dataclasses.fields(cfg)}, **ckpt["config"]}
    new = dataclasses.asdict(cfg)
    now = file_digests(cfg)
    # a file with the recorded contents is the same input however its path is spelled (./a, /x/a)
    same_files = {k for k in now if ckpt.get("files", {}).get(k) == now[k]}
    skip = set(may_differ) | {"batch_size", "grad_accum"} | same_files
    differ = [f"{k} ({old.get(k)!r} -> {v!r})" for k, v in new.items() if k not in skip and old.get(k) != v]

    def global_batch(c, processes):  # (pairs, how they are split)
        b, a = c.get("batch_size") or 0, c.get("grad_accum") or 0
        return b * a * processes, f"{b * a * processes} = {b} x {a} x {processes} processes"
    (old_batch, old_split), (new_batch, new_split) = (global_batch(old, ckpt.get("processes", 1)),
                                                      global_batch(new, rank_and_world()[1]))
    if old_batch != new_batch:
        differ.append(f"global batch ({old_split} -> {new_split})")
    if "files" in ckpt:
        differ += [f"the contents of {new[k]}" for k in sorted(set(now) | set(ckpt["files"]))
                   if old.get(k) == new[k] and ckpt["files"].get(k) != now.get(k)]
    return differ


# A run may change these on --resume; any other difference from the checkpoint's recipe is refused.
RESUME_MAY_CHANGE = {"steps", "eval_every", "log_every", "resume", "device", "sft_target_acc",
                     "sft_check_every", "max_bad_steps", "out", "compile", "export_hf", "ref_logps",
                     "full_logits", "share_prompt"}


def check_resume(cfg, ckpt):
    """Refuse to resume with another recipe than the checkpoint's, except the fields in
    RESUME_MAY_CHANGE."""
    differ = recipe_differences(cfg, ckpt, RESUME_MAY_CHANGE)
    if differ:
        raise DataError(f"--resume: {cfg.out}/ckpt.pt was made with another configuration: "
                        f"{', '.join(differ)}; use the same flags or another --out")


def restore(cfg, ckpt_path, model, optimizer, scaler):
    """Load a --resume checkpoint into the run (weights, optimizer, GradScaler, random states);
    return its step. check_config and claim_reference have refused a --resume with nothing to
    continue, except a preference run whose SFT reference was unfinished: it starts at step 0."""
    if not os.path.exists(ckpt_path):
        print(f"--resume: no checkpoint at {ckpt_path} yet; starting from step 0")
        return 0
    try:
        ckpt = load_checkpoint(ckpt_path)
    except DataError as e:
        raise DataError(f"--resume: {e}; drop --resume to start from step 0, or use another --out") from None
    check_resume(cfg, ckpt)
    load_weights(model, ckpt["model"], ckpt_path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        step = int(ckpt["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # another version's checkpoint
        raise DataError(f"{ckpt_path}: cannot be resumed ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else 'incomplete'}); "
                        f"drop --resume to start from step 0, or use another --out") from None
    print(f"resumed from {ckpt_path} at step {step}")
    return step


# The default SFT reference is reused if it was trained with the recipe this run would train it
# with. These fields may differ: they say where and how a run is watched and kept, or compute
# the same maths another way (compile; ref_logps, full_logits and share_prompt do not apply to
# SFT). All others count, --device and --dtype too (another dtype, or a GPU's TF32 matmuls, train
# another model), and --eval-every when SFT stops at a target accuracy, since it can only stop
# at an evaluation. A mismatch stops the run rather than giving each recipe its own folder: the
# reference keeps the one folder name the README and the messages give, and nothing the user
# made is replaced or duplicated without being asked.
REFERENCE_MAY_DIFFER = {"out", "resume", "export_hf", "log_every", "max_bad_steps", "compile",
                        "ref_logps", "full_logits", "share_prompt"}


def has_stop_rule(config):
    """Whether a run with this config (a dict: vars(cfg), or a checkpoint's) is SFT from random
    weights that stops at its target accuracy: only the built-in data has problems to measure
    that accuracy on."""
    return (config.get("loss") == "sft" and not config.get("init") and (config.get("sft_target_acc") or 0) > 0
            and (config.get("eval_data") or config.get("data")) in BUILTIN)


@contextmanager
def claim_reference(sft_cfg, ckpt_path, run_cfg):
    """For a preference run (run_cfg) that starts from the default SFT reference at ckpt_path:
    take the reference's folder lock, waiting while another run trains it (and saying so), and
    yield whether the reference is finished, to be reused. If it is not, the caller trains or
    continues it while the lock is held, so that a second run waits and then reuses it.

    Stops with one line if the reference was made with another recipe than sft_cfg (what
    differs, and what to do), cannot be read, lives in run_cfg.out itself, or if run_cfg asks to
    --resume when there is nothing to continue: no checkpoint in its --out, and no unfinished
    reference whose run would be the one to continue."""
    folder = sft_cfg.out
    if os.path.realpath(run_cfg.out) == os.path.realpath(folder):
        raise DataError(f"--out {run_cfg.out} is the SFT reference's folder; give the {run_cfg.loss} "
                        f"run another --out")
    with FolderLock(folder, wait=True):
        done = None  # no reference yet
        if os.path.exists(ckpt_path):
            try:
                ckpt = load_checkpoint(ckpt_path)
            except DataError as e:
                raise DataError(f"{e}; delete {folder} to train the reference again") from None
            may_differ = set(REFERENCE_MAY_DIFFER)
            if not (has_stop_rule(vars(sft_cfg)) or has_stop_rule(ckpt["config"])):
                may_differ |= {"eval_every", "sft_check_every"}  # no stop rule: they change nothing
            elif "sft_check_every" not in ckpt["config"]:  # made before the knob: checked at each eval
                ckpt = {**ckpt, "config": {**ckpt["config"], "sft_check_every": ckpt["config"]["eval_every"]}}
            differ = recipe_differences(sft_cfg, ckpt, may_differ)
            if differ:
                raise DataError(f"{ckpt_path} is an SFT reference made with another recipe: "
                                f"{', '.join(differ)}; delete {folder} to train one with these flags, "
                                f"pass --init {ckpt_path} to use it as it is, or use the flags it was "
                                f"made with")
            done = bool(ckpt.get("done"))
        if run_cfg.resume and done is not False and not os.path.isfile(os.path.join(run_cfg.out, "ckpt.pt")):
            raise DataError(nothing_to_resume(run_cfg.out))
        yield done is True


# ---------------------------------------------------------------------------------------------
# The metrics file: one JSON object per line

def start_metrics(path, start_step):
    """Start <out>/metrics.jsonl: empty for a new run; on resume, the rows up to the checkpoint's
    step are kept and later ones (which the run redoes) are dropped, as is a line torn by a crash
    while it was written. Rewritten atomically, so a crash now cannot lose the kept rows."""
    rows = []
    if start_step and os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a row torn by a crash while it was written
                if isinstance(row, dict) and row.get("step", start_step + 1) <= start_step:
                    rows.append(line if line.endswith("\n") else line + "\n")
    write_atomically(path, lambda f: f.write("".join(rows).encode("utf-8")))


def log_row(path, row):
    """Append one row. A failed write (a full disk) is an OSError that names the file; the line
    it may leave torn is dropped by start_metrics on --resume."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


# ---------------------------------------------------------------------------------------------
# What a run prints: its configuration, one line per logged step, and the summary

def sft_length(cfg):
    """The default SFT reference's (steps, batch size) for a preference run's data: a batch of at
    most 64 pairs per process and no more than the data has, 3 passes over the data and at most
    600 steps; --sft-steps and --sft-batch-size override. The pairs are counted, not tokenized."""
    train, held_out, _ = read_splits(cfg.data, "--data", quiet=True)
    n_pairs = len(train) + (len(held_out) if cfg.eval_data else 0)  # --eval-data: all of --data trains
    batch_size = cfg.sft_batch_size or max(1, min(64, n_pairs // rank_and_world()[1]))
    return cfg.sft_steps or max(1, min(600, math.ceil(3 * n_pairs / batch_size))), batch_size


def print_config(cfg, model, device, dtype, world):
    """The run's configuration in a few lines: the model that trains (with --init, the
    checkpoint's shape, not the flags' defaults), the stage's recipe, the machine."""
    c = model.config
    start = f"from {cfg.init}" if cfg.init else "from random weights"
    print(f"model: {c.n_layer} blocks x {c.n_head} heads, width {c.n_embd}, context {c.block_size}, "
          f"vocabulary {c.vocab_size}: {model.num_params() / 1e6:.2f}M parameters, {start}")
    recipe = f"loss {cfg.loss}" + ("" if cfg.loss == "sft" else f", beta {cfg.beta}") + \
        (f", lam {cfg.lam}" if cfg.loss == "dpop" else "") + (f", alpha {cfg.rpo_alpha}" if cfg.loss == "rpo" else "")
    print(f"training: {recipe}; {cfg.steps} steps of {cfg.batch_size * cfg.grad_accum * world} pairs "
          f"(batch {cfg.batch_size} x grad accum {cfg.grad_accum} x {world} process{'es' * (world > 1)}); lr {cfg.lr:g} "
          f"(warm-up {cfg.warmup:.0%} of the steps, cosine to {cfg.min_lr_ratio:g} x); seed {cfg.seed}")
    if has_stop_rule(vars(cfg)):
        print(f"stop rule: at {cfg.sft_target_acc:.0%} greedy accuracy on the eval problems, checked every "
              f"{cfg.sft_check_every} steps (--sft-target-acc, --sft-check-every)")
    print(f"machine: {device}, {str(dtype).removeprefix('torch.')}; output {cfg.out}")

def format_row(row, loss):
    """One log line of train.py's loop: the failure DPOP targets (dchosen, the chosen log-prob's
    change from the reference, going negative) stays in view."""
    line = f"step {row['step']:4d} | loss {row['loss']:.4f}"
    if loss != "sft":
        line += (f" | margin {row['rewards/margins']:+.3f} | acc {row['rewards/accuracies']:.2f}"
                 f" | dchosen {row['logratio/chosen']:+.2f} | drejected {row['logratio/rejected']:+.2f}"
                 f" | chosen<ref {row['penalty/active']:.2f}")
    if "loss/nll" in row:  # RPO: its NLL term
        line += f" | nll {row['loss/nll']:.3f}"
    return line + (f" | gnorm {row['grad_norm']:.2f} | lr {row['lr']:.1e}"
                   f" | {row['tokens_per_s']:.0f} tok/s")


def report(summary, cfg, ref_eval_logps, eval_pairs, problems, ref_texts, texts):
    """train.summarize's output: <out>/summary.json, written whole or not at all; its figures as a
    small table, reference vs trained on held-out data; and, when the reference's completions of
    the test problems are known (ref_texts), the first three problems with both models' ones."""
    write_atomically(os.path.join(cfg.out, "summary.json"), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    trained, n_pairs, n_problems = summary["trained"], len(eval_pairs), len(problems)
    print(f"--- summary ({cfg.loss}; held-out: {n_pairs} eval pairs" +
          (f", {n_problems} test problems)" if n_problems else ")"))
    if "gen_accuracy" in trained:
        ref_acc = summary.get("reference", {}).get("gen_accuracy")
        ref_txt = "     -" if ref_acc is None else f"{ref_acc:6.1%}"
        print(f"  generation accuracy        reference {ref_txt}   trained {trained['gen_accuracy']:6.1%}"
              f"   (greedy, on the {n_problems} test problems)")
    if "chosen_nll" in trained:
        print(f"  chosen completions         {trained['chosen_nll']:8.3f} nats per token "
              f"(perplexity {trained['chosen_ppl']:.2f}) on the eval pairs")
    if "logratio/chosen" in trained:
        for i, which in enumerate(("chosen", "rejected")):
            print(f"  {which + ' log-prob change':26} {trained['logratio/' + which]:+8.2f} nats   (trained "
                  f"{trained['logps/' + which]:.2f} vs reference {ref_eval_logps[i].mean():.2f})")
        print(f"  margin                     {trained['logratio/chosen'] - trained['logratio/rejected']:+8.2f} nats")
        print(f"  reward accuracy            {trained['rewards/accuracies']:8.1%}")
    if ref_texts is not None:
        print_examples(problems[:3], {"reference": ref_texts, "trained": texts},
                       "the first 3 test problems, greedy completions")


def print_examples(problems, completions, title):
    """Problems side by side: each prompt, then every model's completion, marked right or wrong by
    its final answer (what the accuracy figures count). problems: (prompt, answer) pairs, answer
    None for a prompt without one; completions: {model name: texts, in the problems' order}.

        --- the first 3 test problems, greedy completions
          123+456=   answer 579
            reference  right  3+6=9; 2+5=7; 1+4=5; answer 579
            trained    wrong  3+6=9; 2+5=8; 1+4=5; answer 589
    """
    width = max(map(len, completions))
    print(f"--- {title}")
    for i, (prompt, answer) in enumerate(problems):
        print(f"  {prompt}" + ("" if answer is None else f"   answer {answer}"))
        for name, texts in completions.items():
            mark = "" if answer is None else "right  " if answer_of(texts[i]) == answer else "wrong  "
            print(f"    {name:{width}}  {mark}" + texts[i].replace("\n", "\\n"))  # one line each


# ---------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM, and steps that went wrong

def say(message):
    """print from a signal handler: the handler may interrupt a print of the loop, and printing
    again into the same buffer raises RuntimeError (reentrant call), which would end the run."""
    with suppress(RuntimeError):
        print(message, flush=True)


class catch_signals:
    """Ctrl-C (SIGINT) and SIGTERM set a flag instead of killing the run: the loop finishes its
    step, checkpoints and calls exit(). A second signal stops at once, in one line (the last
    checkpoint stays intact, since checkpoints are written atomically). Used as a context
    manager: the previous handlers come back on leaving it.

        with runtime.catch_signals() as stop:
            while ...:
                if runtime.any_rank(stop.requested, device): ...; stop.exit(step, ckpt_path)
    """
    def __init__(self):
        self.caught = []

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.caught:
            say(f"\n{name} again: stopped at once (the last checkpoint is intact)")
            raise SystemExit(128 + signum)  # no traceback; a checkpoint being written is removed
        self.caught.append(signum)
        say(f"\n{name}: saving a checkpoint after this step (send it again to stop at once)")

    @property
    def requested(self):
        return bool(self.caught)

    def exit(self, step, ckpt_path):
        """After the checkpoint of this step: say how to continue, and leave with 128 + the
        signal's number (SIGTERM's when another rank was the one signalled)."""
        signum = self.caught[0] if self.caught else signal.SIGTERM
        print(f"stopped at step {step} by {signal.Signals(signum).name}; checkpoint {ckpt_path}. "
              f"To continue, run the same command with --resume")
        barrier()  # under torchrun, the others wait until rank 0 has written the checkpoint
        sys.exit(128 + signum)


def any_rank(flag, device=None):
    """Whether flag is true on any rank (one all-reduce under torchrun; flag itself otherwise),
    so that every rank stops at the same step. device: where the process group reduces (default:
    this process's GPU for nccl, the CPU for gloo)."""
    if not dist.is_initialized():
        return bool(flag)
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0


class StepHealth:
    """Counts the steps that were skipped: their loss or gradient was not finite (optimizer_step
    never applied them), or float16's GradScaler found an overflow. max_bad non-finite steps in a
    row stop the run with one error line."""
    def __init__(self, max_bad, ckpt_path):
        self.max_bad, self.ckpt_path = max_bad, ckpt_path
        self.skipped, self.overflow, self.in_a_row = 0, 0, 0

    def record(self, step, finite, overflow):
        self.skipped += not finite
        self.overflow += overflow
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.max_bad:
            sys.exit(f"error: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                     f"(up to step {step}); stopped. The last good checkpoint is {self.ckpt_path}; "
                     f"try a lower --lr, or --dtype float32")

    def counts(self):
        return {"skipped_steps": self.skipped, "overflow_steps": self.overflow}
