"""Files a run writes: every one atomically (a crash leaves the old file or the new one, never a
torn one), a failure as one line that names the path and says what to do (explain_os_error),
one run per output folder (FolderLock), and the metrics file, one JSON object per line.
"""
import errno
import json
import os
import shutil
import time
from contextlib import suppress

import torch

from data import DataError
from extras.distributed import any_rank, rank_and_world

try:
    import fcntl  # file locks; POSIX only
except ImportError:  # Windows: no lock, so two runs on one folder go undetected there
    fcntl = None


# ---------------------------------------------------------------------------------------------
# Written atomically; a failure is one line that names the path

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
