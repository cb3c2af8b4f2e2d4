"""Data residency tiers (residency.py): the same bits in every tier, auto's choice from given budgets, a cache that is
memory-mapped rather than loaded whole, and pages released after a read."""
import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import residency
from data import DataConfig, ModalityData, read_array_dir, write_array_dir
from readers import decode_into
from residency import MappedArray, choose, place

GB = 2 ** 30


@pytest.mark.parametrize("need_gb, device, dev_gb, host_gb, tier", [
    (10, "cuda", 40, 100, "device"),    # fits 60% of the GPU
    (30, "cuda", 40, 100, "host"),      # too big for the GPU, fits half the RAM
    (60, "cuda", 40, 100, "disk"),      # fits neither
    (10, "cpu", 0, 100, "device"),      # on CPU the device is the host memory: device when it fits ...
    (60, "cpu", 0, 100, "disk"),        # ... else disk, never a host copy of the same memory
])
def test_auto_picks_the_fastest_tier_that_fits_the_budgets(need_gb, device, dev_gb, host_gb, tier):
    got, line = choose(need_gb * GB, device, "auto", dev_gb, host_gb)
    assert got == tier
    assert line.startswith(f"data.residency=auto: {tier} (") and f"{need_gb:.2f} GiB" in line


def test_a_forced_tier_is_kept_and_named():
    assert choose(100 * GB, "cuda", "device", 1, 1)[0] == "device"
    assert "memory-mapped" in choose(1, "cpu", "disk")[1]


def test_every_tier_holds_the_same_samples_and_statistics(tiny_data):
    cfg, dev = tiny_data
    from catalog import load_data
    for tier in ("host", "disk"):
        other = load_data(DataConfig(**{**cfg.__dict__, "residency": tier}), "cpu", progress=False)
        for m, md in dev.items():
            o = other[m]
            assert o.residency == tier and (len(o.maps) == 2) == (tier == "disk")
            for k in ("train_x", "test_x", "train_y", "test_y", "mean", "std"):
                assert torch.equal(getattr(md, k), getattr(o, k)), (tier, m, k)
            rows = torch.tensor([5, 0, 3, 3])
            assert torch.equal(o.client_view(rows, "cpu").train_x, md.train_x[rows])
            assert torch.equal(o.take("test", slice(2, 9), "cpu"), md.test_x[2:9])


def test_a_second_disk_tier_load_maps_the_log_mels_it_kept(tiny_data, monkeypatch):
    """A process that lives for one message (a deployed Flower ClientApp) computes no log-mels: it maps the disk
    tier's files of an earlier load, which hold the very values."""
    import avfashion
    from catalog import load_data
    cfg, dev = tiny_data
    disk = DataConfig(**{**cfg.__dict__, "residency": "disk"})
    load_data(disk, "cpu", progress=False)  # writes them (if no earlier test did)
    monkeypatch.setattr(avfashion, "waveforms_to_logmel", lambda *a, **k: pytest.fail("log-mels computed again"))
    again = load_data(disk, "cpu", progress=False)["audio"]
    for k in ("train_x", "test_x", "mean", "std", "train_y", "test_y"):
        assert torch.equal(getattr(again, k), getattr(dev["audio"], k)), k


@pytest.mark.slow
def test_the_same_seed_gives_the_same_weights_in_every_tier(cache_dir, tmp_path):
    """A 4-client, 2-round federation through the pretrain.py command line: host and disk (which gather each client,
    prefetching the next) end on exactly the device tier's weights."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    import digests
    own = digests.own_record(digests.read_records())
    got = {t: digests.run_case("fedavg", str(cache_dir), tmp_path / t, extra=(f"--data.residency={t}",))
           for t in ("host", "disk")}
    # the device tier is this platform's recorded digest where it has one (test_digests holds it), else run here
    got["device"] = own["digests"]["fedavg"] if own else \
        digests.run_case("fedavg", str(cache_dir), tmp_path / "device", extra=("--data.residency=device",))
    assert got["host"] == got["device"] and got["disk"] == got["device"], got


def _mapped_address(m: MappedArray) -> tuple[int, int]:
    base = ctypes.addressof(ctypes.c_char.from_buffer(m.mm))
    return base, base + len(m.mm)


def test_a_cache_entry_is_memory_mapped_not_loaded_whole(tmp_path):
    x = np.arange(4 * 3 * 8 * 8, dtype=np.uint8).reshape(4, 3, 8, 8)
    write_array_dir(tmp_path / "entry", {"train_x": x, "train_y": np.arange(4), "classes": ["a", "b"]})
    z = read_array_dir(tmp_path / "entry", small=0)
    assert isinstance(z["train_x"], np.memmap) and z["classes"] == ["a", "b"]
    t, m = place(z["train_x"], "disk", "cpu")  # the cache file itself is mapped: no copy, no spill file
    assert m.path == tmp_path / "entry" / "train_x.npy"
    lo, hi = _mapped_address(m)
    assert lo <= t.data_ptr() < hi and torch.equal(t, torch.from_numpy(x))


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_released_pages_leave_the_process(tmp_path):
    """Reading all of a 192 MiB mapped array faults its pages into this process; release() gives them back, so a
    disk-tier run holds about one client's data however large the file."""
    n = 192
    path = residency.write_npy(tmp_path / "big.npy", ((i, np.full((1, 1 << 20), i, np.uint8)) for i in range(n)),
                               (n, 1 << 20), np.uint8)
    m = MappedArray(path)
    before = _rss_file_kb()
    total = sum(int(m.tensor[i:i + 16].sum(dtype=torch.int64)) for i in range(0, n, 16))
    assert total == sum(i * (1 << 20) for i in range(n))  # the bytes written, read back through the map
    read = _rss_file_kb()
    m.release()
    after = _rss_file_kb()
    assert read - before > 150 * 1024, (before, read)
    assert after - before < 16 * 1024, (before, read, after)


def test_a_damaged_spill_file_is_written_again(tmp_path):
    x = torch.arange(24, dtype=torch.float16).view(6, 4)
    spill = tmp_path / "s.npy"
    place(x, "disk", "cpu", spill)
    spill.write_bytes(spill.read_bytes()[:-8])  # truncated
    t, _ = place(x, "disk", "cpu", spill)
    assert torch.equal(t, x)


def test_decoding_fills_one_array_and_compacts_the_bad_items():
    items = list(range(7))
    (a, b), keep = decode_into(lambda i: None if i % 3 == 1 else (np.full(2, i), i * 10), items,
                               [(2,), ()], [np.int64, np.int64])
    assert keep.tolist() == [True, False, True, True, False, True, True]
    assert a[:, 0].tolist() == [0, 2, 3, 5, 6] and b.tolist() == [0, 20, 30, 50, 60]


def test_a_client_view_indexes_like_the_whole_set():
    md = ModalityData(torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2), torch.arange(10) % 2,
                      torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"],
                      torch.zeros(1), torch.ones(1), residency="host")
    rows = torch.tensor([7, 2, 9])
    view = md.client_view(rows, "cpu")
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(view.train_x[perm], md.train_x[rows[perm]]) and view.residency == "device"


def test_decoding_into_files_builds_the_same_cache_as_in_memory(tmp_path, monkeypatch):
    """Large decoded arrays go to files in the entry being built (so they never have to fit in RAM); with a bad
    file among them (compaction, then a chunked copy) the entry equals the one decoded in memory, and no temp
    file is left behind."""
    import layouts
    import readers
    from catalog import read_arrays
    root = layouts.write_audiofolder(tmp_path / "af")
    (root / "clips" / "bad.flac").write_bytes(b"not audio")
    with open(root / "labels.csv", "a") as f:
        f.write("clips/bad.flac,a,train\n")
    cfg = lambda d: DataConfig(cache_dir=str(tmp_path / d), max_bad_frac=0.5)  # noqa: E731
    with pytest.warns(UserWarning, match="bad.flac"):
        mem = read_arrays("audiofolder", root, cfg("mem"))
    monkeypatch.setattr(readers, "FILE_BACKED_BYTES", 0)
    with pytest.warns(UserWarning, match="bad.flac"):
        files = read_arrays("audiofolder", root, cfg("files"))
    for k in ("train_x", "train_y", "test_x", "test_group"):
        assert np.array_equal(mem[k], files[k]), k
    assert len(files["train_x"]) == 6
    leftovers = [p.name for p in (tmp_path / "files").rglob("*") if "decode-" in p.name or ".tmp" in p.name]
    assert not leftovers and not [p for p in (tmp_path / "files").iterdir() if p.name.startswith(".")]


def test_an_interrupted_write_leaves_nothing_that_looks_finished(tmp_path):
    def chunks():
        yield 0, np.ones((2, 4), np.uint8)
        raise KeyboardInterrupt  # a stop in the middle of the array
    with pytest.raises(KeyboardInterrupt):
        residency.write_npy(tmp_path / "x.npy", chunks(), (4, 4), np.uint8)
    assert list(tmp_path.iterdir()) == []


def _mapped_set(tmp_path) -> ModalityData:
    """A disk-tier modality whose train_x is a mapped .npy of 64 rows."""
    x = np.arange(64 * 16, dtype=np.uint8).reshape(64, 1, 4, 4)
    path = residency.write_npy(tmp_path / "x.npy", [(0, x)], x.shape, np.uint8)
    m = MappedArray(path)
    y = torch.zeros(64, dtype=torch.long)
    return ModalityData(m.tensor, y, m.tensor[:2], y[:2], ["a"], torch.zeros(1), torch.ones(1), residency="disk", maps=(m,))


def test_a_mapped_file_truncated_by_another_process_stops_the_run_with_its_name(tmp_path):
    import subprocess
    import time
    md = _mapped_set(tmp_path)
    path = md.maps[0].path
    assert md.maps[0].fd in residency._LEASED  # a read lease: the kernel tells us before the truncation happens
    # the other process truncates a moment after it starts, so the announcement finds this test waiting for it
    child = subprocess.Popen(["sh", "-c", f"sleep 0.5; truncate -s 10 '{path}'"], stderr=subprocess.DEVNULL)
    with pytest.raises(residency.MappedFileChanged, match=f"{path}, which data.residency=disk maps, is being truncated"):
        deadline = time.monotonic() + 120  # the child truncates after 0.5 s; this bounds only a hang
        while time.monotonic() < deadline:
            time.sleep(0.01)
    child.wait(timeout=60)


def test_a_mapped_file_found_cut_short_is_named_before_any_read(tmp_path):
    md = _mapped_set(tmp_path)
    m = md.maps[0]
    residency._LEASED.pop(m.fd)  # a file system without leases (NFS): the size check before each read stands in
    import fcntl
    fcntl.fcntl(m.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    os_truncate = __import__("os").truncate
    os_truncate(m.path, 100)
    with pytest.raises(residency.MappedFileChanged, match=r"was truncated to 100 of its \d+ bytes while this run used it"):
        md.client_view(torch.arange(8), "cpu")


def test_a_disk_tier_that_cannot_write_its_file_is_one_line(tmp_path):
    from settings import UserError
    (tmp_path / "resident").write_text("a file where the folder should be")
    with pytest.raises(UserError) as e:
        residency.Sink("disk", (4, 2), torch.uint8, "cpu", tmp_path / "resident" / "x.npy")
    assert str(e.value).startswith(f"data.residency=disk cannot write its file in {tmp_path / 'resident'} (")
    assert "give a writable cache folder (data.cache_dir, or FSSUAVL_CACHE)" in str(e.value)


def test_a_data_cache_that_cannot_be_written_is_one_line(tmp_path):
    from data import DataError, write_npz
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match=r"cannot write the data cache in .*/f/cache \(Not a directory\): give a writable "
                                        r"data.cache_dir"):
        write_npz(tmp_path / "f" / "cache" / "a.npz", {"a": np.zeros(2)})
