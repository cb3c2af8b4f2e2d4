"""Downloads (downloads.py) against a local HTTP server on 127.0.0.1 serving tiny archives in each official layout:
a clean fetch that the loader then reads, a wrong checksum, a truncated archive, a server that stops mid-file (once:
resumed; always: a clear error and nothing that looks like a dataset)."""
import hashlib
import io
import shutil
import stat
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import downloads
import layouts
from data import DataConfig, DataError


def one_line_error(fn, *args) -> str:
    """The DataError a user sees, on one line."""
    with pytest.raises(DataError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


class Server:
    """Files by URL path; `stop_after[path] = (n, times)` closes the connection after n bytes, `times` times."""

    def __init__(self):
        self.files, self.stop_after, self.requests = {}, {}, []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = srv.files.get(self.path)
                srv.requests.append((self.path, self.headers.get("Range")))
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                n, times = srv.stop_after.get(self.path, (None, 0))
                if times:
                    srv.stop_after[self.path] = (n, times - 1)
                    self.wfile.write(body[start:start + n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    s.thread.start()
    try:
        yield s
    finally:  # stopped even when the test fails
        s.httpd.shutdown()
        s.httpd.server_close()


def _pack(src: Path, top: str, kind: str) -> bytes:
    """The folder `src` as the official archive would hold it: under `top/` ("" = at the top level)."""
    buf = io.BytesIO()
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as z:
            for p in files:
                z.write(p, str(Path(top) / p.relative_to(src)))
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for p in files:
                t.add(p, str(Path(top) / p.relative_to(src)))
    return buf.getvalue()


LAYOUTS = {  # name: (writer, archive kind)
    "esc50": (lambda r: layouts.write_esc50(r, rate=16000), "zip"),
    "speechcommands": (layouts.write_speechcommands, "tar"),
    "tinyimagenet": (layouts.write_tinyimagenet, "zip"),
    "urbansound8k": (layouts.write_urbansound8k, "tar"),
}


def _serve(server, tmp_path, name, checksum=True):
    writer, kind = LAYOUTS[name]
    src = tmp_path / "src" / name
    src.mkdir(parents=True)
    writer(src)
    if name == "tinyimagenet":  # the writer nests its own tiny-imagenet-200/
        src = src / "tiny-imagenet-200"
    arc = downloads.ARCHIVES[name]
    body = _pack(src, arc.inner, kind)
    path = f"/{name}.{'zip' if kind == 'zip' else 'tar.gz'}"
    server.files[path] = body
    return replace(arc, url=server.url(path), checksum=f"sha256:{hashlib.sha256(body).hexdigest()}" if checksum else None)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_public_archive_downloads_and_loads(server, tmp_path, monkeypatch, name):
    arc = _serve(server, tmp_path, name)
    monkeypatch.setitem(downloads.ARCHIVES, name, arc)
    root = tmp_path / "data" / name
    cfg = DataConfig(download=True, cache_dir=str(tmp_path / "cache"), clip_seconds=0.5, image_size=16)
    from catalog import read_arrays
    arrays = read_arrays(name, root, cfg)
    assert (root / arc.marker).is_file() and len(arrays["train_x"]) > 0 and len(arrays["test_x"]) > 0
    assert not (tmp_path / "data" / f".{name}.download").exists()  # the archive and temp folders are gone
    n = len(server.requests)
    read_arrays(name, root, cfg)  # a second run neither downloads nor rebuilds
    assert len(server.requests) == n


def test_a_wrong_checksum_leaves_nothing(server, tmp_path):
    arc = replace(_serve(server, tmp_path, "esc50"), checksum="md5:" + "0" * 32)
    root = tmp_path / "data" / "esc50"
    msg = one_line_error(downloads.fetch, "esc50", root, arc, False)
    assert "expected 0000" in msg and "was removed" in msg
    assert not root.exists() and not list((tmp_path / "data").rglob("*.part"))


def test_a_truncated_archive_without_checksum_is_refused_and_removed(server, tmp_path):
    arc = _serve(server, tmp_path, "urbansound8k", checksum=False)
    path = "/" + arc.url.rsplit("/", 1)[1]
    server.files[path] = server.files[path][: len(server.files[path]) // 2]
    root = tmp_path / "data" / "urbansound8k"
    msg = one_line_error(downloads.fetch, "urbansound8k", root, arc, False)
    assert "corrupt or truncated" in msg and not root.exists()
    assert not list((tmp_path / "data").rglob("*.part"))


def test_a_server_that_stops_mid_file_is_resumed(server, tmp_path):
    arc = _serve(server, tmp_path, "tinyimagenet")
    path = "/" + arc.url.rsplit("/", 1)[1]
    server.stop_after[path] = (len(server.files[path]) // 3, 1)
    root = downloads.fetch("tinyimagenet", tmp_path / "data" / "tiny", arc, progress=False)
    assert (root / "wnids.txt").is_file()
    assert server.requests[-1][1] == f"bytes={len(server.files[path]) // 3}-"  # resumed, not restarted


def test_a_server_that_keeps_stopping_leaves_a_part_file_to_resume_and_no_dataset(server, tmp_path, monkeypatch):
    arc = _serve(server, tmp_path, "speechcommands")
    path = "/" + arc.url.rsplit("/", 1)[1]
    size = len(server.files[path])
    server.stop_after[path] = (size // 10, 99)
    root = tmp_path / "data" / "sc"
    msg = one_line_error(downloads.fetch, "speechcommands", root, arc, False)
    assert "run again to resume" in msg and not root.exists()
    (part,) = (tmp_path / "data").rglob("*.part")
    assert part.stat().st_size == downloads.ATTEMPTS * (size // 10)
    server.stop_after.clear()  # the next run finishes from there
    assert (downloads.fetch("speechcommands", root, arc, progress=False) / "testing_list.txt").is_file()


def test_a_folder_that_is_not_the_dataset_is_never_written_into(tmp_path):
    root = tmp_path / "esc50"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    msg = one_line_error(downloads.fetch, "esc50", root, None, False)
    assert "is not a complete copy" in msg and (root / "notes.txt").read_text() == "mine"
    shutil.rmtree(root)


def test_an_archive_member_outside_the_folder_is_refused(server, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        data = b"x"
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(data))
    server.files["/evil.tar.gz"] = buf.getvalue()
    arc = downloads.Archive(server.url("/evil.tar.gz"), None, "", "x")
    with pytest.raises(DataError, match="outside the dataset folder"):
        downloads.fetch("x", tmp_path / "data" / "x", arc, progress=False)
    assert not (tmp_path / "data" / "evil.txt").exists()


def _tar(members) -> bytes:
    """A tar.gz of (TarInfo, bytes) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for info, data in members:
            info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _info(name, kind=tarfile.REGTYPE, mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.mode = kind, mode
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info


@pytest.mark.parametrize("member, what", [(_info("x/null", tarfile.CHRTYPE, 0o666), "a device 'x/null'"),
                                          (_info("x/pipe", tarfile.FIFOTYPE), "a FIFO 'x/pipe'")])
def test_an_archive_with_a_special_file_writes_nothing(server, tmp_path, member, what):
    server.files["/s.tar.gz"] = _tar([(_info("x/marker"), b"ok"), (member, b"")])
    arc = downloads.Archive(server.url("/s.tar.gz"), None, "x", "marker")
    msg = one_line_error(downloads.fetch, "s", tmp_path / "data" / "s", arc, False)
    assert f"the archive holds {what}; only regular files and folders are extracted" in msg
    assert not (tmp_path / "data" / "s").exists() and not [p for p in (tmp_path / "data").rglob("*") if p.is_file()
                                                            and p.suffix != ".part"]


def test_extracted_files_lose_setuid_and_world_write_bits(server, tmp_path):
    server.files["/m.tar.gz"] = _tar([(_info("x/marker", mode=0o4777), b"ok"), (_info("x/run.sh", mode=0o755), b"#!")])
    arc = downloads.Archive(server.url("/m.tar.gz"), None, "x", "marker")
    root = downloads.fetch("m", tmp_path / "data" / "m", arc, progress=False)
    modes = {p.name: p.stat().st_mode for p in root.rglob("*")}
    assert all(stat.S_ISREG(m) for m in modes.values())
    assert not modes["marker"] & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH | stat.S_IWGRP)
    assert modes["run.sh"] & stat.S_IXUSR  # an executable stays executable


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_decompression_bomb_is_refused_before_anything_is_written(server, tmp_path, kind):
    big = b"\0" * (4 << 20)  # 4 MiB of zeros packs into a few kB
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("x/marker", b"ok")
            for i in range(4):
                z.writestr(f"x/zero{i}", big)
        body = buf.getvalue()
    else:
        body = _tar([(_info("x/marker"), b"ok")] + [(_info(f"x/zero{i}"), big) for i in range(4)])
    assert len(body) < 200_000
    server.files["/b"] = body
    arc = downloads.Archive(server.url("/b"), None, "x", "marker", max_bytes=8 << 20)
    msg = one_line_error(downloads.fetch, "b", tmp_path / "data" / "b", arc, False)
    assert "the archive's files add up to 16.0 MiB, more than the 8.0 MiB this dataset takes" in msg
    assert "refused before anything was written" in msg
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.suffix != ".part"]


def test_a_zip_member_that_inflates_past_its_declared_size_stops_at_the_cap(tmp_path):
    p = tmp_path / "a.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x/zero", b"\0" * (3 << 20))
    with pytest.raises(DataError, match="inflates past"):
        downloads._write_members(p, tmp_path / "out", limit=1 << 20)
