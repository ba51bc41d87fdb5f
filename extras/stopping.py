"""Stopping a run well: failures the user can fix end in one line (one_line_errors); Ctrl-C and
SIGTERM finish the step, checkpoint and leave with a word on how to continue (catch_signals);
steps whose loss or gradient is not finite are skipped and counted, and too many in a row stop
the run in one line (StepHealth).
"""
import os
import signal
import sys
import traceback
from contextlib import contextmanager, suppress

from data import DataError
from dpop import LOSSES
from extras.distributed import barrier, close_distributed
from extras.files import explain_os_error


@contextmanager
def one_line_errors():
    """A script's body, whose failures the user can fix end it with one line and no traceback:
    bad input (DataError: its message), a file-system failure (the path and what to do), Ctrl-C
    outside the loop (set-up, summary), an exercise of a student copy not written yet (where).
    Under torchrun the process group is left either way."""
    try:
        yield
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a folder that cannot be written
        sys.exit(f"error: {explain_os_error(e)}")
    except KeyboardInterrupt:
        print("stopped by SIGINT (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except NotImplementedError as e:  # a student copy's exercise not written yet (extras/exercises.py)
        if not str(e).startswith("exercise "):
            raise
        frame = traceback.extract_tb(e.__traceback__)[-1]
        sys.exit(f"error: {os.path.relpath(frame.filename)}:{frame.lineno}, in {frame.name}: {e}; write it "
                 f"(EXERCISES.md), then run this again")
    finally:
        close_distributed()


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

        with stopping.catch_signals() as stop:
            while ...:
                if distributed.any_rank(stop.requested, device): ...; stop.exit(step, ckpt_path)
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


class StepHealth:
    """Counts the steps that were skipped: their loss or gradient was not finite (optimizer_step
    never applied them), or float16's GradScaler found an overflow. max_bad non-finite steps in a
    row (cfg.max_bad_steps) stop the run with one error line whose advice names what it can see:
    the run's --lr and its loss's knobs as they are, and float32 only when the run is not in it."""
    def __init__(self, cfg, ckpt_path, low_precision=False):
        self.max_bad, self.ckpt_path, self.low_precision = cfg.max_bad_steps, ckpt_path, low_precision
        knobs = LOSSES[cfg.loss].knobs if cfg.loss in LOSSES else {}
        self.settings = {"lr": cfg.lr, **{k: getattr(cfg, k) for k in knobs if getattr(cfg, k)}}
        self.skipped, self.overflow, self.in_a_row = 0, 0, 0

    def record(self, step, finite, overflow):
        self.skipped += not finite
        self.overflow += overflow
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.max_bad:
            given = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in self.settings.items())
            lower = " or ".join(f"--{k.replace('_', '-')}" for k in self.settings)
            advice = f"try a lower {lower}" + (", or --dtype float32" if self.low_precision else "")
            sys.exit(f"error: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                     f"(up to step {step}, with {given}); stopped. The last good checkpoint is "
                     f"{self.ckpt_path}; {advice}")

    def counts(self):
        return {"skipped_steps": self.skipped, "overflow_steps": self.overflow}
