"""Fetching a dataset from its public archive, for `data.download: true` (needs internet):

    python downloads.py esc50 ~/data/esc50        # or: --data.download=true on any stage

A download goes to a `.part` file beside the dataset folder with a progress bar, resumes where it stopped (HTTP
Range) when run again or when the connection drops, and is checked against the archive's published checksum. It is
then extracted into a temporary folder and moved into place in one rename, so an interrupted or corrupt download
never leaves anything that looks like a dataset. CIFAR-10/100 and STL-10 are fetched by torchvision instead.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from data import DataError


@dataclass(frozen=True)
class Archive:
    url: str
    checksum: Optional[str]  # "md5:..." or "sha256:..." as published; None where the archive is not fixed
    inner: str               # the folder inside the archive that is the dataset ("" = its top level)
    marker: str              # a file every complete copy of the dataset has, relative to its root
    max_bytes: int = 1 << 30  # the most its files may add up to, extracted: its known size times about two (a bomb
                              # that declares more is refused before anything is written)


GB = 1 << 30
ARCHIVES = {
    # GitHub's archive of the master branch: no fixed checksum, so the extracted layout is checked instead
    "esc50": Archive("https://github.com/karolpiczak/ESC-50/archive/master.zip", None, "ESC-50-master",
                     "meta/esc50.csv", 2 * GB),  # about 0.9 GB extracted
    "speechcommands": Archive("http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
                              "sha256:af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58", "",
                              "testing_list.txt", 5 * GB),  # about 2.4 GB
    "tinyimagenet": Archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "md5:90528d7ca1a48142e341f4ef8d21d0de",
                            "tiny-imagenet-200", "wnids.txt", 1 * GB),  # about 0.5 GB
    "urbansound8k": Archive("https://zenodo.org/record/1203745/files/UrbanSound8K.tar.gz",
                            "md5:9aa69802bbf37fb986f71ec1483a196e", "UrbanSound8K", "metadata/UrbanSound8K.csv",
                            14 * GB),  # about 6.6 GB
}
ATTEMPTS = 3       # a dropped connection is resumed this many times in one call
TIMEOUT_S = 60     # a server silent this long counts as dropped


def fetcher(name: str):
    """The DatasetSpec.download of `name`: (root) -> None, a no-op when root already holds the dataset."""
    return lambda root: fetch(name, Path(root))


def fetch(name: str, root: Path, archive: Archive | None = None, progress: bool = True) -> Path:
    archive = archive or ARCHIVES[name]
    root = Path(root)
    if (root / archive.marker).is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{name}: {root} exists but is not a complete copy ({archive.marker} is missing), so the "
                        f"download will not write into it: move it away, or point the config at the dataset")
    work = root.parent / f".{root.name}.download"
    work.mkdir(parents=True, exist_ok=True)
    part = work / (Path(urllib.request.urlparse(archive.url).path).name + ".part")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _download(archive.url, part, progress, name)
            break
        except (OSError, http.client.HTTPException) as e:  # dropped, reset or timed out: resume from what arrived
            if attempt == ATTEMPTS:
                raise DataError(f"{name}: the download of {archive.url} stopped at {_size(part)} bytes ({e}); run "
                                f"again to resume from {part}") from e
            print(f"{name}: the download stopped at {_size(part)} bytes ({e}); resuming", file=sys.stderr)
    if archive.checksum:
        algo, want = archive.checksum.split(":", 1)
        got = _digest(part, algo)
        if got != want:
            part.unlink()
            raise DataError(f"{name}: {archive.url} has {algo} {got}, expected {want}: the file was corrupt or changed "
                            f"upstream and was removed; run again")
    _extract(name, part, root, archive, work)
    shutil.rmtree(work, ignore_errors=True)
    print(f"{name}: downloaded and extracted into {root}")
    return root


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def _download(url: str, part: Path, progress: bool, name: str) -> None:
    """Fetch `url` into `part`, continuing from its current size when the server honours Range (206); a server that
    answers 200 instead sends the whole file again, written from the start."""
    from tqdm import tqdm
    have = _size(part)
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the range starts at the end: the file is complete
            return
        raise DataError(f"{name}: {url} answered HTTP {e.code} {e.reason}") from e
    with resp:
        resumed = resp.status == 206
        total = resp.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else None
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True, desc=f"{name} download",
                     disable=None if progress else True, leave=False) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and _size(part) < total:
        raise ConnectionError(f"the server closed the connection after {_size(part)} of {total} bytes")


def _digest(path: Path, algo: str) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+
            return hashlib.file_digest(f, algo).hexdigest()
        h = hashlib.new(algo)
        while chunk := f.read(1 << 22):
            h.update(chunk)
        return h.hexdigest()


def _extract(name: str, part: Path, root: Path, archive: Archive, work: Path) -> None:
    """Unpack into a temp folder beside root, check the layout, then move the dataset folder to root in one rename.
    Only regular files and folders are written, with plain modes (no setuid, no world-writable bits); an archive that
    holds anything else (a link, a device, a FIFO), a member outside the folder, or more than archive.max_bytes is
    refused before anything is written. A corrupt or truncated archive is removed, and nothing is left at root."""
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=work))
    try:
        try:
            members = _zip_members(part) if zipfile.is_zipfile(part) else _tar_members(part)
            total = 0
            for member, kind, size in members:
                _safe(tmp, member)
                if kind not in ("file", "dir"):
                    raise DataError(f"{name}: the archive holds {kind} {member!r}; only regular files and folders are "
                                    f"extracted, so it was refused and nothing was written")
                total += size
            if total > archive.max_bytes:
                raise DataError(f"{name}: the archive's files add up to {_human(total)}, more than the "
                                f"{_human(archive.max_bytes)} this dataset takes (a decompression bomb, or another "
                                f"archive); refused before anything was written")
            _write_members(part, tmp, archive.max_bytes)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            part.unlink(missing_ok=True)
            raise DataError(f"{name}: {part.name} is corrupt or truncated ({type(e).__name__}: {e}); it was removed: "
                            f"run again") from e
        top = tmp / archive.inner if archive.inner else tmp
        if not (top / archive.marker).is_file():
            part.unlink(missing_ok=True)
            raise DataError(f"{name}: the archive from {archive.url} has no {archive.inner + '/' if archive.inner else ''}"
                            f"{archive.marker}: not the expected layout; it was removed")
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            root.rmdir()  # empty (fetch refuses a non-empty one)
        os.replace(top, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _human(n: int) -> str:
    return f"{n / GB:.1f} GiB" if n >= GB else f"{n / (1 << 20):.1f} MiB"


def _zip_members(path: Path) -> list[tuple[str, str, int]]:
    """(name, kind, declared size) of each member; the kind from the Unix mode a zip stores for links and devices."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename, "dir" if i.is_dir() else _kind(i.external_attr >> 16), i.file_size) for i in z.infolist()]


def _tar_members(path: Path) -> list[tuple[str, str, int]]:
    with tarfile.open(path) as t:
        return [(m.name, "dir" if m.isdir() else "file" if m.isreg() else
                 "a link" if m.issym() or m.islnk() else "a device" if m.ischr() or m.isblk() else
                 "a FIFO" if m.isfifo() else "an unknown member", m.size if m.isreg() else 0) for m in t.getmembers()]


def _kind(mode: int) -> str:
    """A zip member's kind from its stored Unix mode (no file-type bits stored: a plain file)."""
    if not stat.S_IFMT(mode) or stat.S_ISREG(mode):
        return "file"
    return ("a link" if stat.S_ISLNK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "an unknown member")


def _write_members(path: Path, dest: Path, limit: int) -> None:
    """Write every file and folder of a checked archive under `dest`. A zip is streamed, at most `limit` bytes in all
    (a member that inflates past what it declared stops here too), files 0644 (0755 when executable); a tar goes
    through tarfile's data filter (no special mode bits, nothing group- or world-writable)."""
    written = 0

    def copy(src, target: Path, executable: bool) -> None:
        nonlocal written
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise DataError(f"the archive inflates past the {_human(limit)} this dataset takes; refused")
                f.write(chunk)
        os.chmod(target, 0o755 if executable else 0o644)

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for i in z.infolist():
                if i.is_dir():
                    (dest / i.filename).mkdir(mode=0o755, parents=True, exist_ok=True)
                else:
                    with z.open(i) as src:
                        copy(src, dest / i.filename, bool((i.external_attr >> 16) & 0o111))
        return
    with tarfile.open(path) as t:  # a tar member holds exactly its declared size; the data filter drops special bits
        t.extractall(dest, filter="data")


def _safe(base: Path, member: str) -> None:
    target = (base / member).resolve()
    if not str(target).startswith(str(base.resolve()) + os.sep) and target != base.resolve():
        raise DataError(f"the archive member {member!r} would be written outside the dataset folder; refusing it")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ARCHIVES:
        sys.exit(f"usage: python downloads.py NAME ROOT, NAME one of {', '.join(ARCHIVES)}")
    socket.setdefaulttimeout(TIMEOUT_S)
    try:
        fetch(argv[0], Path(argv[1]).expanduser())
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
