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


ARCHIVES = {
    # GitHub's archive of the master branch: no fixed checksum, so the extracted layout is checked instead
    "esc50": Archive("https://github.com/karolpiczak/ESC-50/archive/master.zip", None, "ESC-50-master",
                     "meta/esc50.csv"),
    "speechcommands": Archive("http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
                              "sha256:af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58", "",
                              "testing_list.txt"),
    "tinyimagenet": Archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "md5:90528d7ca1a48142e341f4ef8d21d0de",
                            "tiny-imagenet-200", "wnids.txt"),
    "urbansound8k": Archive("https://zenodo.org/record/1203745/files/UrbanSound8K.tar.gz",
                            "md5:9aa69802bbf37fb986f71ec1483a196e", "UrbanSound8K", "metadata/UrbanSound8K.csv"),
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
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _extract(name: str, part: Path, root: Path, archive: Archive, work: Path) -> None:
    """Unpack into a temp folder beside root, check the layout, then move the dataset folder to root in one rename.
    A corrupt or truncated archive is removed, and nothing is left at root."""
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=work))
    try:
        try:
            if zipfile.is_zipfile(part):
                with zipfile.ZipFile(part) as z:
                    for n in z.namelist():
                        _safe(tmp, n)
                    z.extractall(tmp)
            else:
                with tarfile.open(part) as t:
                    for m in t.getmembers():
                        _safe(tmp, m.name)
                        if m.issym() or m.islnk():
                            raise DataError(f"{name}: the archive holds a link ({m.name}); refusing to extract it")
                    t.extractall(tmp)
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
