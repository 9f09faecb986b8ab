"""Small helpers that several entry points share: the error surface and exit codes, atomic file
writes, seeds, the differences between two settings records, and torchrun's process group.

`evaluations/` stands alone and keeps its own copies of what it needs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

#################################################################################
#                          Expected failures, exit codes                        #
#################################################################################

# Exit codes of every entry point (train.py, generate.py, preprocessing/prepare.py, quickstart.py).
EXIT_ERROR = 1  # an expected failure, reported in one message (a bug shows a traceback)
EXIT_USAGE = 2  # a bad command line (argparse's code)
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGINT after saving: re-run the same command to continue
EXIT_INTERRUPTED = 130  # interrupted by a second Ctrl-C (nothing saved after the last save)


class ReportedError(Exception):
    """An expected failure: bad input, a missing or corrupt file, an incompatible resume, a full
    disk, weights not available offline. The entry point reports its message (what is wrong,
    which file, what to do) without a traceback and exits with its `exit_code`."""

    exit_code = EXIT_ERROR


class RunStopped(ReportedError):
    """A run stopped by SIGTERM/SIGINT after saving its state; the same command continues it."""

    exit_code = EXIT_STOPPED


class InputError(ReportedError, ValueError):
    """A value the user gave (a flag, a file's content) that cannot be used as it is."""


#################################################################################
#                               Atomic writes                                   #
#################################################################################


def atomic_write(path: str, write: Callable[[str], None], durable: bool = True) -> None:
    """Run `write(tmp)` on a temporary file beside `path`, then rename it to `path`.

    A crash at any point leaves either the old file or the complete new one, never a partial
    file; the temporary file (`.NAME.XXXX.tmp`) is removed if `write` fails. `durable` also
    flushes the file and the rename to disk (fsync), so that they survive a power loss; small
    files written by the thousand (sample PNGs) skip it.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = _new_file_beside(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def _new_file_beside(path: str) -> str:
    """Create an empty, uniquely named `.NAME.XXXXXXXX.tmp` beside `path`; return its path.

    Not `tempfile.mkstemp`: its files are mode 0600 and keep it after the rename, so datasets and
    checkpoints would be unreadable to the user's group. Opening with 0o666 lets the kernel apply
    the umask exactly as a plain `open()` does (no need to read the umask, which only
    `os.umask` can do, by changing it)."""
    directory, name = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:  # another writer drew the same name: draw again
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}: 100 names were taken")


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON, atomically and durably (readers see all of it or none)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")

    atomic_write(path, write)


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_temporary(name: str, of: str = "") -> bool:
    """Whether file name `name` is a temporary file of `atomic_write` (for the file named `of`,
    when given): what a killed write leaves behind."""
    return name.startswith(f".{of}") and name.endswith(".tmp")


def remove_temporaries(folder: str, of: str = "") -> list[str]:
    """Delete the temporary files that killed `atomic_write`s left in `folder` (of the file
    named `of`, when given; see `is_temporary`); returns their paths, in name order."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    doomed = [os.path.join(folder, name) for name in names if is_temporary(name, of)]
    for path in doomed:
        os.remove(path)
    return doomed


#################################################################################
#                                One writer                                     #
#################################################################################


@contextmanager
def exclusive_lock(path: str, what: str, advice: str) -> Iterator[None]:
    """Hold an advisory lock (`flock`) on the file `path`, created if needed, while the block
    runs; the lock file records the holder's PID. A lock held elsewhere is refused at once with
    a ReportedError naming `what`, the holder's PID and `advice`.

    The kernel drops the lock with the process, so a `kill -9` never leaves a stale lock behind
    (the file stays, with the dead PID, and is simply taken over). A killed process holds it
    until it has finished exiting, which takes a while for a large one: a held lock is retried
    for LOCK_WAIT_SECONDS before it is refused."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _lock_within(fd, LOCK_WAIT_SECONDS):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ReportedError(
                f"{what} is in use by another process (PID {holder}, lock {path}): {advice}"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


LOCK_WAIT_SECONDS = 10.0  # how long a held lock is retried: its holder may be exiting


def _lock_within(fd: int, seconds: float) -> bool:
    """Take the exclusive lock on `fd`, retrying every 50 ms for `seconds`; whether it was."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


#################################################################################
#                      Sizes: what is asked, what is there                      #
#################################################################################


def readable_size(num_bytes: int) -> str:
    """1536 -> "1.5 KiB"."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: a GPU's free memory, or the host's
    available memory (MemAvailable: free plus what the page cache can give back)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: free pages alone
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require(what: str, needed: int, available: int, where: str, advice: str) -> None:
    """Refuse, before allocating or writing anything, a request larger than what is there."""
    if needed > available:
        raise InputError(
            f"{what} needs at least {readable_size(needed)} of {where}, and "
            f"{readable_size(available)} is available: {advice}"
        )


#################################################################################
#                                   Seeds                                       #
#################################################################################


def hash_seed(*values: int) -> int:
    """A well-mixed 64-bit seed for a tuple of non-negative integers (NumPy's SeedSequence):
    neighbouring tuples, e.g. (seed, 0) and (seed, 1), give unrelated random streams."""
    state = np.random.SeedSequence(values).generate_state(1, dtype=np.uint64)
    return int(state[0])


#################################################################################
#                         Comparing settings records                            #
#################################################################################


def dict_differences(
    old: dict[str, Any],
    new: dict[str, Any],
    old_label: str = "before",
    new_label: str = "now",
    name: Callable[[str], str] = str,
) -> list[str]:
    """One line per key whose value differs: "NAME: OLD OLD_LABEL, NEW NEW_LABEL".

    Values are compared as JSON, so that a tuple equals the list it reads back as."""

    def as_json(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    return [
        f"{name(key)}: {old.get(key)!r} {old_label}, {new.get(key)!r} {new_label}"
        for key in sorted(set(old) | set(new))
        if as_json(old.get(key)) != as_json(new.get(key))
    ]


#################################################################################
#                           torchrun's process group                            #
#################################################################################


def init_distributed(
    backend: str | None = None, timeout: timedelta | None = None
) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment, or (0, 1, ...) without it.

    Each process computes on the GPU of its local rank when there is one. `backend`: NCCL on
    GPUs and gloo on CPUs by default; a process group that only meets at barriers may ask for
    gloo everywhere."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend, timeout=timeout)  # None: PyTorch's default
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device or torch.device("cpu")


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a sharded (DTensor) one (a view of
    its storage), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
