"""Where a dataset lives while a run trains on it, `data.residency`:

- device: every sample on the training device (fastest when it fits);
- host:   the samples in host memory (pinned on CUDA); before a client trains, its samples are gathered and
          copied to the device, and the next client's are gathered while this one trains;
- disk:   the samples in uncompressed .npy files, memory-mapped; a client's samples are read when it trains and
          their pages released afterwards, so the process holds about one client's data at a time;
- auto:   the fastest tier that fits (device, then host, then disk), said in one line.

Labels, groups and normalising statistics always stay on the device (a few bytes per sample). Every tier gives the
same bits: a client's gathered samples are exactly the rows the device tier would index.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from settings import UserError

TIERS = ("device", "host", "disk")
DEVICE_SHARE = 0.6   # of the free device memory; the rest is for the model, activations and the allocator
HOST_SHARE = 0.5     # of the available host memory (pinned memory cannot be swapped; the OS and decoders need room)
CHUNK_BYTES = 64 << 20


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def free_device_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_host_bytes()


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); total RAM where it is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose(need: int, device, tier: str = "auto", device_budget: float = 0, host_budget: float = 0) -> tuple[str, str]:
    """(tier, the one line that says which and why) for `need` bytes of samples. Budgets in GiB (0 = measured:
    the free device memory, the available host memory). On a CPU device the device and host are one memory."""
    device = torch.device(device)
    host_free = host_budget * 2**30 if host_budget else available_host_bytes()
    if device.type == "cuda":
        dev_free = device_budget * 2**30 if device_budget else free_device_bytes(device)
        dev_share = DEVICE_SHARE
    else:  # the device is the host memory
        dev_free, dev_share = (device_budget * 2**30 if device_budget else host_free), HOST_SHARE
    dev_cap, host_cap = dev_share * dev_free, HOST_SHARE * host_free
    if tier != "auto":
        return tier, f"data.residency={tier}: {gib(need)} of samples on the {where(tier, device)}"
    if need <= dev_cap:
        return "device", (f"data.residency=auto: device ({gib(need)} of samples fit {dev_share:.0%} of the "
                          f"{gib(dev_free)} free on {device})")
    why = f"{gib(need)} of samples > {dev_share:.0%} of the {gib(dev_free)} free on {device}"
    if device.type == "cuda" and need <= host_cap:
        return "host", f"data.residency=auto: host ({why}; they fit {HOST_SHARE:.0%} of {gib(host_free)} of host memory)"
    return "disk", (f"data.residency=auto: disk ({why}" + (f", and > {HOST_SHARE:.0%} of {gib(host_free)} of host "
                    f"memory" if device.type == "cuda" else "") + "; memory-mapped, about one client in memory at a time)")


def where(tier: str, device) -> str:
    return {"device": str(device), "host": "host (pinned)" if torch.device(device).type == "cuda" else "host",
            "disk": "disk (memory-mapped)"}[tier]


# ----------------------------------------------------------------------------- memory-mapped arrays

NP_TO_TORCH = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16, np.dtype(np.float16): torch.float16,
               np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}


class MappedFileChanged(UserError):
    """A file the disk tier maps was truncated or rewritten by another process (reading it would end in SIGBUS)."""


_LEASED: dict[int, Path] = {}  # fd -> the mapped file it holds a read lease on


def _lease_broken(signum, frame):
    """SIGIO: another process opens a leased file for writing or truncates it (the kernel holds it back up to
    /proc/sys/fs/lease-break-time seconds). Stop this process cleanly first, naming the file."""
    for fd, path in list(_LEASED.items()):
        try:
            broken = fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
        except OSError:
            continue
        if broken:
            raise MappedFileChanged(f"{path}, which data.residency=disk maps, is being truncated or rewritten by another "
                                    f"process: stopped before reading it could crash the run (SIGBUS). Let that process "
                                    f"finish, delete the file (it is written again), then resume")


def _lease(fd: int, path: Path) -> None:
    """A read lease on a mapped file, so a truncation by another process is announced (SIGIO) before it can hurt.
    Only where the file system and this thread allow it (not NFS, not a worker thread); the size check before every
    read (MappedArray.check) stands in elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return
    if signal.getsignal(signal.SIGIO) is not _lease_broken:
        signal.signal(signal.SIGIO, _lease_broken)
    _LEASED[fd] = path


class MappedArray:
    """A .npy file mapped (copy-on-write, nothing is ever written back) as a CPU tensor: reading rows faults in
    only their pages, and `release()` drops every page from this process (the page cache keeps them while the OS
    has room), so resident memory stays about one client's data however large the file. It holds the file open with
    a read lease (see _lease), and `check()` tells a file truncated since it was mapped by its size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = None
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
            if fortran or dtype not in NP_TO_TORCH:
                raise ValueError(f"{self.path}: a C-ordered array of {list(NP_TO_TORCH)} is expected, got {dtype}")
            n = int(np.prod(shape))
            if os.fstat(f.fileno()).st_size != offset + n * dtype.itemsize:
                raise ValueError(f"{self.path}: {os.fstat(f.fileno()).st_size} bytes, expected {offset + n * dtype.itemsize} "
                                 f"(truncated?)")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if n else None
            self.size = offset + n * dtype.itemsize
        self.tensor = (torch.frombuffer(self.mm, dtype=NP_TO_TORCH[dtype], count=n, offset=offset).view(shape)
                       if n else torch.empty(shape, dtype=NP_TO_TORCH[dtype]))
        if n:
            self.fd = os.open(self.path, os.O_RDONLY)
            _lease(self.fd, self.path)

    def check(self) -> None:
        """Before reading: the file still has the size it was mapped with (a shorter one would SIGBUS)."""
        if self.fd is not None and os.fstat(self.fd).st_size < self.size:
            raise MappedFileChanged(f"{self.path}, which data.residency=disk maps, was truncated to "
                                    f"{os.fstat(self.fd).st_size} of its {self.size} bytes while this run used it: "
                                    f"stopped before reading it could crash the run (SIGBUS). Delete the file (it is "
                                    f"written again), then resume")

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            _LEASED.pop(self.fd, None)
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.mm is not None and hasattr(self.mm, "madvise"):  # Linux and macOS
            self.mm.madvise(mmap.MADV_DONTNEED)


def write_npy(path: Path, chunks, shape: tuple, dtype) -> Path:
    """Write an array chunk by chunk (`chunks` yields (start, rows) in order) to a .npy file, atomically: a
    temp name until the last row is written, so an interrupted write leaves nothing that looks finished."""
    sink = Sink("disk", shape, NP_TO_TORCH[np.dtype(dtype)], "cpu", Path(path))
    try:
        for i, rows in chunks:
            sink.write(i, rows)
        sink.finish()
    finally:
        sink.abort()
    return Path(path)


def release_pages(x) -> None:
    """Drop the pages of a numpy memmap (and of its views) from this process after a chunk was read or written:
    clean pages go back to the page cache, written pages of a shared file mapping are kept for write-back, so
    streaming through a file never grows the process by the file's size."""
    mm = getattr(x, "_mmap", None)  # numpy keeps the mapping of a memmap (and of its views) here
    if mm is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (ValueError, OSError):  # closed, or a platform without madvise
            pass


def rows_per_chunk(x) -> int:
    row = max(1, int(np.prod(x.shape[1:])) * x.element_size() if isinstance(x, torch.Tensor) else x[:1].nbytes)
    return max(1, CHUNK_BYTES // row)


def chunks_of(x):
    """(start, rows) over the first axis, about CHUNK_BYTES at a time."""
    step = rows_per_chunk(x)
    for i in range(0, len(x), step):
        yield i, x[i:i + step]


def as_tensor(rows) -> torch.Tensor:
    return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows))


class Sink:
    """The destination of one array of a tier, filled chunk by chunk in order: a preallocated device or (pinned)
    host tensor, or a .npy file that is then mapped. `finish()` -> (tensor, MappedArray or None)."""

    def __init__(self, tier: str, shape: tuple, dtype: torch.dtype, device, spill: Path | None = None):
        self.tier, self.shape, self.spill = tier, tuple(shape), spill
        if tier == "disk":
            if spill is None:
                raise ValueError("the disk tier needs a file to write to")
            np_dtype = next(k for k, v in NP_TO_TORCH.items() if v == dtype)
            self.tmp = spill.with_name(f"{spill.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
            try:
                spill.parent.mkdir(parents=True, exist_ok=True)
                self.out = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np_dtype, shape=self.shape)
            except OSError as e:
                raise UserError(f"data.residency=disk cannot write its file in {spill.parent} ({e.strerror}): give a "
                                f"writable cache folder (data.cache_dir, or FSSUAVL_CACHE), or data.residency=host "
                                f"if the samples fit in memory") from e
        else:
            on = torch.device(device) if tier == "device" else torch.device("cpu")
            pin = tier == "host" and torch.device(device).type == "cuda"
            self.out = torch.empty(self.shape, dtype=dtype, device=on, pin_memory=pin)

    def write(self, i: int, rows) -> None:
        if self.tier == "disk":
            self.out[i:i + len(rows)] = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
            release_pages(self.out)
        else:
            self.out[i:i + len(rows)].copy_(as_tensor(rows))

    def finish(self) -> tuple[torch.Tensor, MappedArray | None]:
        if self.tier != "disk":
            return self.out, None
        self.out.flush()
        del self.out
        os.replace(self.tmp, self.spill)
        m = MappedArray(self.spill)
        return m.tensor, m

    def abort(self) -> None:
        """Remove a disk sink's unfinished temp file (a no-op once finished): call it in a `finally`."""
        if self.tier == "disk":
            self.__dict__.pop("out", None)
            self.tmp.unlink(missing_ok=True)


def reuse(path: Path, shape) -> MappedArray | None:
    """The finished .npy file `path` mapped, when it holds an array of `shape`; None when it is missing or damaged
    (then it is written again)."""
    if not path.is_file():
        return None
    try:
        m = MappedArray(path)
    except ValueError:
        return None
    return m if tuple(m.tensor.shape) == tuple(shape) else None


def place(x, tier: str, device, spill: Path | None = None) -> tuple[torch.Tensor, MappedArray | None]:
    """An array (numpy, a memmap, or a tensor anywhere) in `tier`, copied a chunk at a time so no step holds it
    twice. disk: a finished `spill` file is mapped as it is (its name is keyed by what it holds); a .npy memmap
    that is already the whole array is mapped in place."""
    if tier == "device" and isinstance(x, torch.Tensor) and same_device(x.device, device):
        return x, None
    if tier == "disk":
        if isinstance(x, np.memmap) and str(x.filename or "").endswith(".npy"):
            m = reuse(Path(x.filename), x.shape)  # a cache file that is the whole array: mapped in place
            if m is not None:
                return m.tensor, m
        if spill is not None and (m := reuse(spill, x.shape)) is not None:
            return m.tensor, m
    dtype = x.dtype if isinstance(x, torch.Tensor) else NP_TO_TORCH[np.dtype(x.dtype)]
    sink = Sink(tier, tuple(x.shape), dtype, device, spill)
    try:
        for i, rows in chunks_of(x):
            sink.write(i, rows)
            release_pages(x)
        return sink.finish()
    finally:
        sink.abort()


def same_device(have: torch.device, want) -> bool:
    want = torch.device(want)
    return have.type == want.type and (want.index is None or have.index == want.index)
