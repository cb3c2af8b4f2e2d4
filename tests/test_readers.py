"""Each paper-scale loader on tiny files in its official format, bad files, and config dry runs."""
import shutil
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

import layouts
import pretrain
from catalog import load_data
from data import DataConfig, DataError
from helpers import ROOT
from fluidr3 import render_fluidr3, write_midi
from readers import BadFiles, read_audio, read_image, FLUIDR3_SF2


def load(tmp_path, dataset, modality, **kw):
    cfg = DataConfig(dataset=dataset, modalities=(modality,), cache_dir=str(tmp_path / "cache"), **kw)
    return load_data(cfg, torch.device("cpu"))[modality]


def test_cifar10_official_batches(tmp_path):
    md = load(tmp_path, "cifar10+esc50", "image", image_root=str(layouts.write_cifar10(tmp_path / "c10")))
    assert md.train_x.shape == (100, 3, 32, 32) and md.test_x.shape == (20, 3, 32, 32)  # 5 batches / test_batch
    assert md.classes == [f"c{i}" for i in range(10)] and md.train_x.dtype == torch.uint8


def test_cifar100_fine_labels(tmp_path):
    md = load(tmp_path, "cifar100+esc50", "image", image_root=str(layouts.write_cifar100(tmp_path / "c100")))
    assert len(md.classes) == 100 and md.train_y.max().item() == 99 and len(md.test_y) == 200


def test_stl10_column_major_binary(tmp_path):
    imgs = layouts.write_stl10(tmp_path / "stl")
    md = load(tmp_path, "stl10+esc50", "image", image_root=str(tmp_path / "stl"))
    assert torch.equal(md.train_x, torch.from_numpy(imgs))  # transposed back to (N, C, H, W)
    assert md.train_y.tolist() == [i % 10 for i in range(10)]  # labels 1..10 on disk


def test_tinyimagenet_val_annotations(tmp_path):
    md = load(tmp_path, "tinyimagenet+esc50", "image", image_root=str(layouts.write_tinyimagenet(tmp_path / "tin")))
    assert md.train_x.shape == (12, 3, 64, 64) and len(md.test_y) == 6
    assert md.test_y.tolist() == [0, 1, 2, 0, 1, 2]  # labels come from val_annotations.txt
    assert md.classes == ["thing n01", "thing n02", "thing n03"]


def test_imagefolder_resizes_and_converts(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = load(tmp_path, "imagefolder+esc50", "image", image_root=str(layouts.write_imagefolder(tmp_path / "if")),
                  image_size=32)
    assert md.train_x.shape == (8, 3, 32, 32) and md.classes == ["cat", "dog"] and len(md.test_y) == 6


def test_esc50_official_folds(tmp_path):
    root = layouts.write_esc50(tmp_path / "esc")
    md = load(tmp_path, "cifar10+esc50", "audio", audio_root=str(root), test_fold=2, clip_seconds=1.0, n_mels=32)
    assert len(md.train_y) == 16 and len(md.test_y) == 4  # fold 2 held out, never a random split
    assert md.train_x.shape[1:] == (1, 32, 101) and md.classes == [f"cat{i}" for i in range(5)]
    with pytest.raises(DataError, match="test_fold=7"):
        load(tmp_path, "cifar10+esc50", "audio", audio_root=str(root), test_fold=7)


def test_speechcommands_official_lists(tmp_path):
    root = layouts.write_speechcommands(tmp_path / "sc")
    md = load(tmp_path, "cifar10+speechcommands", "audio", audio_root=str(root), n_mels=32)
    # per word: speaker 0 in testing_list, speaker 1 in validation_list (left out), 2 and 3 train
    assert len(md.train_y) == 6 and len(md.test_y) == 3 and md.classes == ["no", "up", "yes"]
    assert len(set(md.train_group.tolist())) == 2  # speaker ids from the file names


def test_urbansound8k_folds_stereo_and_resampling(tmp_path, capsys):
    root = layouts.write_urbansound8k(tmp_path / "us")
    md = load(tmp_path, "cifar10+urbansound8k", "audio", audio_root=str(root), test_fold=10, n_mels=32)
    assert len(md.train_y) == 18 and len(md.test_y) == 2
    assert "20 file(s) resampled from 22050 Hz to 16000 Hz" in capsys.readouterr().out


def test_audiofolder_csv(tmp_path):
    md = load(tmp_path, "cifar10+audiofolder", "audio", audio_root=str(layouts.write_audiofolder(tmp_path / "af")),
              n_mels=32)
    assert len(md.train_y) == 6 and len(md.test_y) == 2 and md.classes == ["a", "b"]


def test_vggsound_pairs_stay_aligned_and_bad_clips_drop_together(tmp_path):
    root = layouts.write_vggsound(tmp_path / "vgg")
    (root / "audio" / "vid005_000150.flac").write_bytes(b"")  # an empty audio file: the clip goes, frame too
    cfg = DataConfig(dataset="vggsound", root=str(root), cache_dir=str(tmp_path / "cache"), n_mels=32, max_bad_frac=0.2)
    with pytest.warns(UserWarning, match="vid005_000150.flac"):
        data = load_data(cfg, torch.device("cpu"))
    img, aud = data["image"], data["audio"]
    assert torch.equal(img.train_y, aud.train_y) and torch.equal(img.test_y, aud.test_y)
    assert len(img.train_y) + len(img.test_y) == 11 and img.train_x.shape[1:] == (3, 64, 64)


def test_bad_audio_files_are_skipped_with_names_then_fatal_above_the_limit(tmp_path):
    bad = BadFiles("t", max_frac=0.5)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF....not audio")
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    sf.write(str(tmp_path / "nan.wav"), np.full((100, 1), np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(str(tmp_path / "rate.wav"), np.zeros((800, 1), np.float32), 8000)
    with pytest.warns(UserWarning) as rec:
        assert read_audio(tmp_path / "garbage.wav", 16000, 100, bad) is None
        assert read_audio(tmp_path / "empty.wav", 16000, 100, bad) is None
        assert read_audio(tmp_path / "nan.wav", 16000, 100, bad) is None
    text = " ".join(str(r.message) for r in rec)
    assert "garbage.wav: unreadable" in text and "empty.wav: empty" in text and "nan.wav: NaN/Inf samples" in text
    x = read_audio(tmp_path / "rate.wav", 16000, 2000, bad)
    assert x.shape == (2000,) and bad.notes == {"resampled from 8000 Hz to 16000 Hz": 1}
    bad.finish(total=10)  # 3 of 10 is within max_frac=0.5
    with pytest.raises(DataError, match=r"3 of 4 files are unreadable.*garbage.wav"):
        bad.finish(total=4)


def test_images_converted_or_skipped(tmp_path):
    bad = BadFiles("t", max_frac=1.0)
    layouts.jpeg(tmp_path / "g.png", mode="L")
    layouts.jpeg(tmp_path / "a.png", mode="RGBA")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert read_image(tmp_path / "g.png", 16, bad).shape == (3, 16, 16)
    assert read_image(tmp_path / "a.png", 16, bad).shape == (3, 16, 16)
    assert bad.notes == {"converted from L to RGB": 1, "converted from RGBA to RGB": 1}
    with pytest.warns(UserWarning, match="broken.jpg: corrupt image"):
        assert read_image(tmp_path / "broken.jpg", 16, bad) is None


def test_missing_dataset_says_what_goes_where(tmp_path):
    with pytest.raises(DataError, match=r"esc50: the dataset folder not found under .*Expected layout: meta/esc50.csv"):
        load(tmp_path, "cifar10+esc50", "audio", audio_root=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load(tmp_path, "cifar10+esc50", "image", image_root=str(tmp_path / "nothing"))


def test_decoded_once_then_cached(tmp_path, monkeypatch):
    import dataclasses

    import catalog
    root = layouts.write_cifar10(tmp_path / "c10")
    load(tmp_path, "cifar10+esc50", "image", image_root=str(root))

    def no_decode(*a, **kw):
        raise AssertionError("decoded again although the source did not change")
    monkeypatch.setitem(catalog.DATASETS, "cifar10", dataclasses.replace(catalog.DATASETS["cifar10"], read=no_decode))
    assert len(load(tmp_path, "cifar10+esc50", "image", image_root=str(root)).train_y) == 100  # served by the cache


@pytest.mark.skipif(shutil.which("fluidsynth") is None or not __import__("os").path.exists(FLUIDR3_SF2),
                    reason="needs fluidsynth and fluid-soundfont-gm (bash setup.sh installs them)")
def test_fluidr3_renders_labelled_notes():
    out = render_fluidr3(FLUIDR3_SF2, DataConfig(), BadFiles("fluidr3", 0.5), programs=[0, 7, 33])
    assert out["train_x"].shape == (60, 16000) and out["test_x"].shape == (30, 16000)  # program 7 is held out
    assert set(out["train_y"].tolist()) == {0, 4} and set(out["test_y"].tolist()) == {0}
    onset = np.abs(out["train_x"][:, :1600]).max(1)  # every clip starts with its note
    assert (onset > 100).all()


def test_midi_file_structure(tmp_path):
    write_midi(tmp_path / "m.mid", 5, [(60, 100), (64, 80)], 1.5, 0.8)
    b = (tmp_path / "m.mid").read_bytes()
    assert b[:4] == b"MThd" and b[14:18] == b"MTrk" and b"\xc0\x05" in b and b"\x90\x3c\x64" in b and b.endswith(b"\xff\x2f\x00")


# ----------------------------------------------------------------------------- paper-scale config dry runs

TINY_FED = ["--fed.clients=4", "--fed.clients_per_round=2", "--optim.batch_size=4", "--optim.batch_size_audio=2",
            "--run.device=cpu", "--run.progress=false", "--run.dry_run=true", "--fed.alpha=1.0"]


@pytest.mark.parametrize("config, writers", [
    ("configs/cifar10_esc50_resnet18.yaml", {"image_root": layouts.write_cifar10, "audio_root": layouts.write_esc50}),
    ("configs/tinyimagenet_speechcommands_vits.yaml",
     {"image_root": layouts.write_tinyimagenet, "audio_root": layouts.write_speechcommands}),
    ("configs/vggsound_resnet18.yaml", {"root": lambda p: layouts.write_vggsound(p, n=24)}),
])
def test_paper_config_dry_run(tmp_path, monkeypatch, config, writers):
    monkeypatch.chdir(ROOT)
    roots = [f"--data.{k}={w(tmp_path / k)}" for k, w in writers.items()]
    out = pretrain.main([config, *roots, f"--data.cache_dir={tmp_path / 'cache'}", f"--run.out_dir={tmp_path / 'run'}",
                         *TINY_FED])
    assert all(np.isfinite(v) for k, v in out.items() if k.startswith("loss")) and "loss_image" in out
    assert "loss_audio" in out and not (tmp_path / "run").exists()  # a dry run writes nothing


def test_logmel_statistics_come_from_the_runs_own_training_split(tmp_path):
    """Changing the held-out fold changes the training split and so the normalising statistics, which equal
    the mean/std of exactly that split's log-mels (no statistics cache shared across folds)."""
    root = layouts.write_esc50(tmp_path / "esc")
    stats = []
    for fold in (1, 2):
        md = load(tmp_path, "cifar10+esc50", "audio", audio_root=str(root), test_fold=fold, clip_seconds=1.0, n_mels=32)
        f = md.train_x.double()
        assert md.mean.item() == pytest.approx(f.mean().item(), rel=1e-5)
        assert md.std.item() == pytest.approx(f.std().item(), rel=1e-4)
        stats.append((md.mean.item(), md.std.item()))
    assert stats[0] != stats[1]
