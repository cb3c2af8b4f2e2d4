import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from augment import AudioAugConfig, ImageAugConfig, augment_audio, augment_image, color_jitter, random_resized_crop
from avfashion import read_idx, trim_and_centre, wav_bytes_to_array
from data import DataConfig, DataError, ModalityData
from partition import assign_modalities, dirichlet_partition, group_partition, iid_partition, partition
from settings import ConfigError


# ----------------------------------------------------------------------------- file formats

def write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, (5, 4, 3)).astype(np.uint8)
    write_idx(tmp_path / name, arr)
    assert np.array_equal(read_idx(tmp_path / name), arr)


def test_read_idx_truncated_is_a_clear_error(tmp_path):
    arr = np.zeros((5, 4, 3), np.uint8)
    write_idx(tmp_path / "x", arr)
    (tmp_path / "y").write_bytes((tmp_path / "x").read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "y")


def test_missing_fashion_mnist_names_the_package(tmp_path):
    from avfashion import load_fashion_mnist
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_wav_bytes_with_streamed_header():
    pcm = np.arange(-50, 50, dtype=np.int16)
    fmt = struct.pack("<HHIIHH", 1, 1, 22050, 44100, 2, 16)
    raw = (b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
           + b"data" + struct.pack("<I", 0x7FFFF000) + pcm.tobytes())  # size fields are placeholders
    wav, rate = wav_bytes_to_array(raw)
    assert rate == 22050 and np.array_equal(wav, pcm)
    with pytest.raises(DataError, match="expected 16-bit PCM, got PCM_U8"):
        wav_bytes_to_array(raw.replace(fmt, struct.pack("<HHIIHH", 1, 1, 22050, 22050, 1, 8)))
    with pytest.raises(DataError, match="not a readable WAV stream"):
        wav_bytes_to_array(b"RIFX" + raw[4:])


def test_soundfile_reads_espeak_ng_bit_for_bit_as_the_hand_parser_did():
    """The parser it replaced: 16-bit samples from the data chunk on, whatever the size fields say."""
    import shutil
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    from avfashion import _run_espeak
    raw = _run_espeak(["-v", "en-us+m3", "-s", "160", "-p", "50", "--stdout", "seven"])
    body = raw[raw.index(b"data") + 8:]
    wav, rate = wav_bytes_to_array(raw)
    assert rate == int.from_bytes(raw[24:28], "little") and np.array_equal(wav, np.frombuffer(body, "<i2"))


def test_trim_and_centre():
    wav = np.zeros(1000, np.int16)
    wav[100:200] = 1000
    out = trim_and_centre(wav, 400, margin=10)
    loud = np.nonzero(out)[0]
    assert len(out) == 400 and len(loud) == 100
    assert abs((loud[0] + loud[-1]) / 2 - 199.5) <= 1  # centred


# ----------------------------------------------------------------------------- partitions

def _check_disjoint_complete(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_dirichlet_partition_disjoint_complete_reproducible_and_skewed():
    labels = np.repeat(np.arange(10), 100)
    a = dirichlet_partition(labels, 20, 0.1, np.random.default_rng(1), min_size=5)
    b = dirichlet_partition(labels, 20, 0.1, np.random.default_rng(1), min_size=5)
    _check_disjoint_complete(a, 1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert min(len(p) for p in a) >= 5
    # alpha=0.1: a typical client is dominated by few classes; alpha=1000 is near-uniform
    top = np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in a])
    iidish = dirichlet_partition(labels, 20, 1000.0, np.random.default_rng(1))
    top_iid = np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in iidish])
    assert top > 0.5 and top_iid < 0.3


def test_dirichlet_impossible_is_a_config_error():
    with pytest.raises(ConfigError, match="fed.clients"):
        dirichlet_partition(np.zeros(10, int), 20, 0.1, np.random.default_rng(0), min_size=2)


def test_iid_and_group_partitions():
    _check_disjoint_complete(iid_partition(103, 10, np.random.default_rng(0)), 103)
    groups = np.repeat(np.arange(7), 5)
    parts = group_partition(groups, 3, np.random.default_rng(0))
    _check_disjoint_complete(parts, 35)
    owners = {}
    for k, p in enumerate(parts):
        for gid in np.unique(groups[p]):
            assert owners.setdefault(gid, k) == k  # a speaker never spans two clients
    with pytest.raises(ConfigError, match="fewer than"):
        group_partition(groups, 8, np.random.default_rng(0))


def test_assign_modalities_counts():
    held = assign_modalities(10, ("image", "audio"), (0.4, 0.4, 0.2), np.random.default_rng(0))
    assert sorted(map(len, held)).count(2) == 2
    assert sum(h == ("image",) for h in held) == 4 and sum(h == ("audio",) for h in held) == 4
    assert assign_modalities(3, ("audio",), (0.4, 0.4, 0.2), np.random.default_rng(0)) == [("audio",)] * 3


def _fake_data(n_img=200, n_aud=120):
    g = torch.Generator().manual_seed(0)
    img = ModalityData(torch.zeros(n_img, 1, 8, 8, dtype=torch.uint8), torch.arange(n_img) % 10,
                       torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                       [str(i) for i in range(10)], torch.tensor([0.5]), torch.tensor([0.25]))
    aud = ModalityData(torch.randn(n_aud, 1, 8, 12, generator=g).half(), torch.arange(n_aud) % 20,
                       torch.zeros(4, 1, 8, 12).half(), torch.zeros(4, dtype=torch.long),
                       [str(i) for i in range(20)], torch.tensor([0.0]), torch.tensor([1.0]),
                       train_group=torch.arange(n_aud) // 10)
    return {"image": img, "audio": aud}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural", "pathological"])
def test_partition_per_modality(scheme):
    data = _fake_data()
    clients = partition(data, 10, scheme, 0.5, (0.4, 0.4, 0.2), seed=3)
    again = partition(data, 10, scheme, 0.5, (0.4, 0.4, 0.2), seed=3)
    for m, md in data.items():
        parts = [c[m] for c in clients if m in c]
        _check_disjoint_complete(parts, len(md.train_y))
        assert all(np.array_equal(c[m], d[m]) for c, d in zip(clients, again) if m in c)
    kinds = sorted(tuple(sorted(c)) for c in clients)
    assert kinds.count(("audio", "image")) == 2 and kinds.count(("image",)) == 4 and kinds.count(("audio",)) == 4


# ----------------------------------------------------------------------------- augmentations

def test_image_augmentation_is_per_sample_and_reproducible():
    md = _fake_data()["image"]
    x = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8).expand(16, -1, -1, -1).contiguous()
    v = augment_image(x, md, ImageAugConfig(), torch.Generator().manual_seed(0))
    assert v.shape == (16, 1, 8, 8) and v.dtype == torch.float32
    flat = v.flatten(1)
    assert len({tuple(r.tolist()) for r in flat.round(decimals=4)}) == 16  # every sample got its own view
    v2 = augment_image(x, md, ImageAugConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(v, v2)
    # value range: de-normalised views stay within [0, 1]
    raw = v * md.std + md.mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_crop_and_jitter_value_ranges_and_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 12, 12, generator=g)
    same = random_resized_crop(x, g, (1.0, 1.0), (1.0, 1.0), flip_p=0.0)
    assert torch.allclose(same, x, atol=1e-5)  # full-area crop without flip is the identity
    flipped = random_resized_crop(x, g, (1.0, 1.0), (1.0, 1.0), flip_p=1.0)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    y = color_jitter(x, g, (0.4, 0.4, 0.4, 0.1), p=1.0)
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x)
    assert torch.equal(color_jitter(x, g, (0.4, 0.4, 0.4, 0.1), p=0.0), x)


def test_audio_augmentation_is_per_sample_and_masks_bounded():
    md = _fake_data()["audio"]
    x = md.train_x[:1].expand(32, -1, -1, -1).contiguous()
    cfg = AudioAugConfig(noise_p=0.0, gain_db=0.0, time_shift=0.0, time_stretch=1.0, freq_shift=0.0,
                         freq_masks=1, time_masks=0, freq_mask_frac=0.25)
    v = augment_audio(x, md, cfg, torch.Generator().manual_seed(1))
    zero_rows = (v == 0).all(dim=3).sum(dim=(1, 2))  # masked mel bins per sample
    assert zero_rows.max() <= 0.25 * 8 + 1 and len(set(zero_rows.tolist())) > 1
    full = augment_audio(x, md, AudioAugConfig(), torch.Generator().manual_seed(2))
    assert len({tuple(r.tolist()) for r in full.flatten(1).round(decimals=4)}) == 32
    assert torch.equal(full, augment_audio(x, md, AudioAugConfig(), torch.Generator().manual_seed(2)))
    assert torch.isfinite(full).all()


def test_data_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.modalities"):
        DataConfig(modalities=("image", "video"))
    with pytest.raises(ConfigError, match="data.hop_ms"):
        DataConfig(hop_ms=0.0)


# ----------------------------------------------------------------------------- AV-Fashion

def test_avfashion_build(tiny_data):
    cfg, data = tiny_data
    img, aud = data["image"], data["audio"]
    assert img.train_x.dtype == torch.uint8 and img.shape == (1, 28, 28) and len(img.test_x) == 10000
    assert aud.shape == (1, 32, 51) and aud.train_x.dtype == torch.float16
    assert set(aud.train_group.tolist()).isdisjoint(aud.test_group.tolist())  # held-out voices
    assert set(aud.train_y.tolist()) == set(range(20))
    assert torch.isfinite(aud.train_x.float()).all()


def test_avfashion_clips_are_distinct_and_build_is_cached(tiny_data):
    from avfashion import build_avfashion
    cfg, _ = tiny_data
    path = build_avfashion(cfg, progress=False)
    z = np.load(path)
    hashes = {hashlib.sha1(c.tobytes()).hexdigest() for c in z["audio"]}
    assert len(hashes) == len(z["audio"]) == 12 * 20
    mtime = path.stat().st_mtime_ns
    assert build_avfashion(cfg, progress=False) == path and path.stat().st_mtime_ns == mtime


def test_one_modality_of_a_joint_federation_keeps_its_clients_and_indices():
    """The separate-model baselines: restricting the data to one modality leaves that modality's clients and
    indices exactly as in the two-modality partition; the other clients hold nothing."""
    data = _fake_data()
    both = partition(data, 10, "dirichlet", 0.5, (0.4, 0.4, 0.2), seed=3)
    for m in ("image", "audio"):
        one = partition({m: data[m]}, 10, "dirichlet", 0.5, (0.4, 0.4, 0.2), seed=3, federation=("image", "audio"))
        for c_both, c_one in zip(both, one):
            assert set(c_one) == ({m} & set(c_both))
            if m in c_both:
                assert np.array_equal(c_both[m], c_one[m])
    single = partition({"image": data["image"]}, 10, "dirichlet", 0.5, (0.4, 0.4, 0.2), seed=3)
    assert all("image" in c for c in single)  # federation=single: every client holds the one modality


def test_stratified_subset_covers_every_class_in_proportion_on_a_class_sorted_list():
    from data import stratified_subset
    y = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 100, 100, 100, 200, 250])  # sorted, unbalanced, 1000
    idx = stratified_subset(y, 100, seed=0)
    counts = np.bincount(y[idx], minlength=10)
    assert len(idx) == 100 and len(set(idx)) == 100 and np.all(np.diff(idx) > 0)
    assert counts.tolist() == [5, 5, 5, 5, 5, 10, 10, 10, 20, 25]  # the first 100 would be classes 0-1 only
    assert np.array_equal(idx, stratified_subset(torch.from_numpy(y), 100, seed=0))  # same for a tensor
    assert not np.array_equal(idx, stratified_subset(y, 100, seed=1))
    odd = np.bincount(y[stratified_subset(y, 33, seed=0)], minlength=10)
    assert odd.sum() == 33 and np.all(np.abs(odd - np.bincount(y) * 33 / 1000) < 1)  # largest remainders
    assert len(stratified_subset(y, 0, 0)) == 1000 and len(stratified_subset(y, 5000, 0)) == 1000


def test_knn_bank_and_queries_are_stratified(tiny_data):
    from evaluation import extract_features
    cfg, data = tiny_data
    md = data["audio"]
    order = torch.argsort(md.train_y, stable=True)  # a class-sorted copy of the training split
    sorted_md = ModalityData(md.train_x[order], md.train_y[order], md.test_x, md.test_y, md.classes, md.mean, md.std)
    model = __import__("models").build_model(__import__("models").ModelConfig(arch="resnet_tiny", width=8),
                                             {"audio": md.shape})
    _, y = extract_features(model, sorted_md, "train", "audio", limit=100)
    assert len(y) == 100 and len(torch.unique(y)) == len(md.classes)  # all 20 words, 5 each
    assert torch.bincount(y).tolist() == [5] * 20


def test_max_test_images_keeps_a_stratified_subset_of_the_test_images(tiny_data):
    """data.max_test_images (the tests' quick monitor) takes each class's share of the test images, on AV-Fashion's
    own loader and on the generic image builder alike, and leaves the training split alone."""
    from dataclasses import replace
    import catalog
    from data import image_modality
    cfg, full = tiny_data
    small = catalog.load_data(replace(cfg, max_test_images=200), "cpu", progress=False)["image"]
    assert len(small.test_x) == 200 and torch.equal(small.train_x, full["image"].train_x)
    assert torch.bincount(small.test_y).tolist() == [20] * 10  # Fashion-MNIST's test split is balanced
    # the kept images are the full split's at the kept indices, labels with them
    rows = {x.numpy().tobytes(): int(y) for x, y in zip(full["image"].test_x, full["image"].test_y)}
    assert all(rows[x.numpy().tobytes()] == int(y) for x, y in zip(small.test_x, small.test_y))
    arrays = {"train_x": full["image"].train_x.numpy(), "train_y": full["image"].train_y.numpy(),
              "test_x": full["image"].test_x.numpy(), "test_y": full["image"].test_y.numpy(), "classes": list("0123456789")}
    md = image_modality(arrays, replace(cfg, max_test_images=200), "cpu")
    assert torch.equal(md.test_y, small.test_y) and torch.equal(md.test_x, small.test_x)
