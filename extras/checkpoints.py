"""Checkpoints: a run's state saved in one file and read back with checks; --init from a checkpoint
or GPT-2 weights; --resume, which refuses another recipe than the checkpoint's; and the default
SFT reference, reused only when it was made with the recipe this run would make it with.

Whatever a run finds on disk (a torn file, another run's files, an edited data file), it either
carries on correctly or stops with one `error:` line that names the path and says what to do.
"""
import dataclasses
import hashlib
import os
import random
from contextlib import contextmanager
from functools import lru_cache

import torch

from data import BUILTIN, DataError, load_tokenizer
from dpop import KNOBS
from extras.config import fields_where, has_stop_rule, loss_knobs, nothing_to_resume
from extras.distributed import rank_and_world
from extras.files import FolderLock, save_checkpoint
from extras.hf_gpt2 import is_hf_spec, load_hf_init, save_hf_gpt2
from model import GPT, GPTConfig


# ---------------------------------------------------------------------------------------------
# The files a run reads, by their contents

@lru_cache(maxsize=None)
def _sha256(path, size, mtime_ns):  # size and mtime: an edited file is read again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@lru_cache(maxsize=8)
def tokenizer_ids(spec):  # a checkpoint's every save: computed once per tokenizer
    return tokenizer_id(load_tokenizer(spec))


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


def tokenizer_id(enc):
    """A tokenizer's identity, whatever its spec (gpt2, or the path of gpt2's ranks file): a
    digest of every token's bytes, in id order. Two tokenizers of one size that split text
    differently have different ids, so a checkpoint is never read with another's tokens."""
    h = hashlib.sha256()
    for i in range(enc.n_vocab):
        h.update(enc.decode_single_token_bytes(i) + b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Save and load

def save_training_state(path, model, optimizer, scaler, step, done, cfg):
    """The run's checkpoint, in one file: the plain (uncompiled, unwrapped) model's weights, the
    optimizer and GradScaler states, the step, whether the run is done, the config, the number
    of processes and the digests of the input files (its recipe, see recipe_differences), and
    the random states (so that --resume continues exactly)."""
    save_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "step": step, "done": done,
        "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.config),
        "processes": rank_and_world()[1], "files": file_digests(cfg),
        "tokenizer_id": tokenizer_ids(cfg.tokenizer),
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
        python -c "from extras.checkpoints import export_checkpoint; export_checkpoint('out/dpop-arith-seed1337/ckpt.pt', 'hf')"
    """
    model, ckpt = model_from_checkpoint(ckpt_path)
    save_hf_gpt2(model, folder, eos_id=load_tokenizer(ckpt["config"]["tokenizer"]).eot_token)


# ---------------------------------------------------------------------------------------------
# --init: a train.py checkpoint, or GPT-2 weights

def load_init(spec):
    """The --init weights, as a dict shaped like a train.py checkpoint: from a train.py
    checkpoint; from a Hugging Face GPT-2 folder, model.safetensors or pytorch_model.bin; or from
    a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) looked up in the Hugging Face cache."""
    if os.path.isfile(os.path.join(spec, "ckpt.pt")) and not os.path.exists(os.path.join(spec, "config.json")):
        raise DataError(f"--init {spec} is a train.py run's folder: pass its checkpoint, --init "
                        f"{os.path.join(spec, 'ckpt.pt')}")
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


def model_from_init(init_ckpt, cfg, enc, config_class):
    """The policy from load_init's dict: its weights and shape. A shape flag that was given
    (differs from its default in config_class) must agree with the checkpoint, except that a
    smaller --block-size crops the position embeddings (GPT-2's 1024 positions cost memory a
    short data set never uses). The vocabulary must be the tokenizer's."""
    gptconf = GPTConfig(**{**init_ckpt["model_config"], "dropout": cfg.dropout})
    state_dict = init_ckpt["model"]
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        default = config_class.__dataclass_fields__[name].default
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
    if "tokenizer_id" in init_ckpt and init_ckpt["tokenizer_id"] != tokenizer_id(enc):  # one size, other tokens
        raise DataError(f"--init {cfg.init} was trained with another tokenizer than --tokenizer {cfg.tokenizer} "
                        f"(the same size, other tokens); use its own (--tokenizer {init_ckpt['config'].get('tokenizer')})")
    model = GPT(gptconf)
    load_weights(model, state_dict, cfg.init)
    return model


# ---------------------------------------------------------------------------------------------
# A run's recipe: --resume, and the default SFT reference

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
    # a loss's knob that this run's loss does not read (None here) changes nothing
    unread = {name for name in KNOBS if name not in loss_knobs(cfg.loss)}
    skip = set(may_differ) | {"batch_size", "grad_accum"} | same_files | unread
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


def check_resume(cfg, ckpt):
    """Refuse to resume with another recipe than the checkpoint's, except in the knobs that say
    resume_may_change (extras/config.py)."""
    differ = recipe_differences(cfg, ckpt, fields_where(type(cfg), "resume_may_change"))
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
# with. The knobs that say reference_may_differ may differ: they say where and how a run is
# watched and kept, or compute the same maths another way (compile; ref_logps, full_logits and
# share_prompt do not apply to SFT). All others count, --device and --dtype too (another dtype,
# or a GPU's TF32 matmuls, train another model), and --eval-every where it adds places to stop:
# SFT that stops at a target accuracy stops at a check or an evaluation, and an --eval-every that
# is a multiple of --sft-check-every adds none. A mismatch stops the run rather than giving
# each recipe its own folder: the reference keeps the one folder name the README and the
# messages give, and nothing the user made is replaced or duplicated without being asked.

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
            may_differ = fields_where(type(sft_cfg), "reference_may_differ")
            if not (has_stop_rule(vars(sft_cfg)) or has_stop_rule(ckpt["config"])):
                may_differ |= {"eval_every", "sft_check_every"}  # no stop rule: they change nothing
            elif "sft_check_every" not in ckpt["config"]:  # made before the knob: checked at each eval
                ckpt = {**ckpt, "config": {**ckpt["config"], "sft_check_every": ckpt["config"]["eval_every"]}}
            if all(c["eval_every"] % c["sft_check_every"] == 0 for c in (vars(sft_cfg), ckpt["config"])):
                may_differ |= {"eval_every"}  # every evaluation is a check as well: no other stops
            differ = recipe_differences(sft_cfg, ckpt, may_differ)
            if differ:
                raise DataError(f"{ckpt_path} is an SFT reference made with another recipe: "
                                f"{', '.join(differ)}; delete {folder} to train one with these flags, "
                                f"pass --init {ckpt_path} to use it as it is, or use the flags it was "
                                f"made with")
            done = bool(ckpt.get("done"))
        run_ckpt = os.path.join(run_cfg.out, "ckpt.pt")
        if run_cfg.resume and done is not False and not os.path.isfile(run_ckpt):
            raise DataError(nothing_to_resume(run_cfg.out))
        if run_cfg.resume and os.path.isfile(run_ckpt):  # before any SFT work: was it started from this model?
            started = load_checkpoint(run_ckpt)["config"].get("init") or ""
            if os.path.realpath(started) != os.path.realpath(ckpt_path):
                raise DataError(f"--resume: {run_ckpt} was started from --init {started}; add --init "
                                f"{started} to continue it")
        yield done is True
