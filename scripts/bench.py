"""Local-training throughput of our pipeline against the standard one, on the current device, in one run.

    python scripts/bench.py                                        # default config -> results/bench.json
    python scripts/bench.py --config configs/cifar10_esc50_resnet18.yaml --steps 10 --out results/bench_r18.json

Measured side by side, each section warmed up, then timed `--repeats` times (min and median reported):
  (a) ours: the real local update (local_update.local_ssl_update): client data held on the device (uint8
      images, fp16 log-mels), both views made by batched per-sample augmentation on the device, one forward
      over both views; in fp32, and with bf16 autocast + channels_last where the device has native bf16
      (what pretrain.py then uses);
  (b) standard: the same model, loss and batch size fed by a DataLoader with workers applying torchvision
      transforms per sample (images) / per-sample log-mel + SpecAugment with torchaudio (audio), in fp32, and
      again with bf16 + channels_last, so the data-pipeline gain at equal numerics is visible;
  (c) one FedAvg aggregation over K client states vs one client's local epoch;
  (d) peak memory; (e) round time vs K clients per round (real rounds of federation.run_round, measured) and
      throughput vs input size; (f) run.compile on vs off (same numerics, same run); on CUDA, achieved TFLOP/s
      (torch's flop counter) as a fraction of the GPU's bf16 peak.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from catalog import load_data  # noqa: E402
from data import LogMel  # noqa: E402
from engine import PretrainConfig  # noqa: E402
from federation import ClientUpdate, run_round  # noqa: E402
from local_update import LocalSettings, local_ssl_update, make_optimizer  # noqa: E402
from losses import nt_xent  # noqa: E402
from models import backbone_family, build_model  # noqa: E402
from settings import int_at_least, load_config, split_overrides  # noqa: E402
from strategies import WeightedAverage  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A6000": 155.0, "L40": 181.0, "4090": 165.0}


def timed(fn, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn() after warmup calls; CUDA work is synchronised around each call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def train_step(model, opt, x1, x2, modality, tau, amp_ctx):
    with amp_ctx():
        z = model(torch.cat([x1, x2]), modality)
    loss = nt_xent(*z.float().chunk(2), tau)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


# ----------------------------------------------------------------------------- (a) ours

def ours_runner(model, opt, md, modality, cfg, steps, batch, device, amp):
    """`steps` local steps of the real training path (local_update.local_ssl_update) on a client holding
    steps * batch random samples of the on-device data."""
    settings = LocalSettings(cfg.data, dataclasses.replace(cfg.optim, batch_size=batch, batch_size_audio=batch),
                             cfg.loss, amp=amp)
    scaler = runtime.make_scaler(device, amp)
    g = torch.Generator(device=device).manual_seed(0)
    n = len(md.train_x)

    def run():
        idx = torch.randint(n, (steps * batch,), generator=g, device=device)
        local_ssl_update(model, opt, scaler, {modality: md}, {modality: idx}, settings, cfg.optim.peak_lr, g,
                         max_steps=steps)
    return run


def round_runner(model, opt, md, cfg, k, steps, batch, device):
    """One real round (federation.run_round: load the global state, local update, streaming FedAvg) over k
    clients, each holding steps * batch image samples."""
    settings = LocalSettings(cfg.data, dataclasses.replace(cfg.optim, batch_size=batch), cfg.loss, amp=cfg.run.amp)
    scaler = runtime.make_scaler(device, cfg.run.amp)
    state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    n = len(md.train_x)

    def local_update(cid):
        model.load_state_dict(state)
        g = torch.Generator(device=device).manual_seed(cid)
        idx = torch.randint(n, (steps * batch,), generator=g, device=device)
        out = local_ssl_update(model, opt, scaler, {"image": md}, {"image": idx}, settings, cfg.optim.peak_lr, g)
        return ClientUpdate(cid, model.state_dict(), {"image": len(idx)}, out)
    return lambda: run_round(state, list(range(k)), local_update)


# ----------------------------------------------------------------------------- (b) the standard pipeline

class StandardImages(torch.utils.data.Dataset):
    """SimCLR's usual input pipeline: torchvision transforms on one PIL image at a time, two views."""

    def __init__(self, images: np.ndarray, mean, std, aug):
        import torchvision.transforms as T
        self.images = images  # (N, H, W, C) uint8
        size = images.shape[1]
        ops = [T.RandomResizedCrop(size, scale=tuple(aug.crop_scale)), T.RandomHorizontalFlip(aug.flip_p),
               T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.jitter_p)]
        if images.shape[-1] == 3:
            ops.append(T.RandomGrayscale(aug.gray_p))
        self.t = T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        im = Image.fromarray(self.images[i].squeeze(-1) if self.images.shape[-1] == 1 else self.images[i])
        return self.t(im), self.t(im)


class StandardAudio(torch.utils.data.Dataset):
    """The usual audio SSL pipeline: per clip, a random time shift and gain on the waveform, then log-mel
    and SpecAugment masks with torchaudio transforms, two views."""

    def __init__(self, wavs: np.ndarray, cfg, mean: float, std: float):
        import torchaudio.transforms as AT
        self.wavs, self.cfg, self.mean, self.std = wavs, cfg, mean, std
        self.front = LogMel(cfg.data.sample_rate, cfg.data.n_mels, cfg.data.win_ms, cfg.data.hop_ms)
        a = cfg.data.audio_aug
        self.fmask = AT.FrequencyMasking(int(a.freq_mask_frac * cfg.data.n_mels))
        self.tmask = AT.TimeMasking(max(1, int(a.time_mask_frac * self.front(torch.zeros(1, wavs.shape[1])).shape[-1])))

    def __len__(self):
        return len(self.wavs)

    def view(self, w):
        a = self.cfg.data.audio_aug
        shift = int((torch.rand(()) * 2 - 1) * a.time_shift * len(w))
        x = torch.roll(w, shift) * 10 ** ((torch.rand(()) * 2 - 1) * a.gain_db / 20)
        x = x + 10 ** (self.cfg.data.dither_db / 20) * torch.randn_like(x)
        s = self.front(x.unsqueeze(0))[0]  # (1, F, T)
        for _ in range(a.freq_masks):
            s = self.fmask(s)
        for _ in range(a.time_masks):
            s = self.tmask(s)
        return (s - self.mean) / self.std

    def __getitem__(self, i):
        w = torch.from_numpy(self.wavs[i].astype(np.float32) / 32768.0)
        return self.view(w), self.view(w)


def standard_runner(model, opt, dataset, modality, tau, steps, batch, workers, device, amp_ctx=contextlib.nullcontext):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    def run():
        for _ in range(steps):
            v1, v2 = next_batch()
            train_step(model, opt, v1.to(device, non_blocking=True), v2.to(device, non_blocking=True), modality, tau,
                       amp_ctx)
    return run


# ----------------------------------------------------------------------------- main

def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Bench:
    """One benchmark run: the config, the data on the device, the timing settings, and the rows measured so far."""

    def __init__(self, cfg, args, device, data):
        self.cfg, self.args, self.device, self.data = cfg, args, device, data
        self.B, self.R, self.W = cfg.optim.batch_size, args.repeats, args.warmup
        self.workers = args.workers if args.workers >= 0 else (os.cpu_count() or 2)
        self.rows: list[dict] = []
        self.channels_last = backbone_family(cfg.model.arch).memory_format == torch.channels_last  # the family's layout

    def fresh_model(self, channels_last=False):
        torch.manual_seed(0)
        m = build_model(self.cfg.model, {k: md.shape for k, md in self.data.items()}).to(self.device)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m, make_optimizer(m, self.cfg.optim)

    def row(self, name, modality, secs, batch):
        tput = [batch * self.args.steps / s for s in secs]
        r = {"pipeline": name, "modality": modality, "samples_per_s_median": statistics.median(tput),
             "samples_per_s_best": max(tput), "seconds_per_step_min": min(secs) / self.args.steps}
        self.rows.append(r)
        print(f"{name:38s} {modality:6s} {r['samples_per_s_median']:9.1f} samples/s (best {r['samples_per_s_best']:.1f})",
              flush=True)
        return r

    def throughput(self, m, md) -> None:
        """(a), (b), (f): ours vs the standard pipeline, fp32 and bf16, and compile on vs off, for one modality."""
        cfg, dev, steps, W, R = self.cfg, self.device, self.args.steps, self.W, self.R
        B_m = cfg.optim.batch_for(m)
        fast = "bf16 autocast + channels_last" if self.channels_last else "bf16 autocast"
        if m == "image":
            std_ds = StandardImages(md.train_x.permute(0, 2, 3, 1).cpu().numpy(), md.mean.tolist(), md.std.tolist(),
                                    cfg.data.image_aug)
        else:
            std_ds = StandardAudio(_audio_waveforms(cfg), cfg, md.mean.item(), md.std.item())
        model, opt = self.fresh_model()
        base = self.row("standard: DataLoader + per-sample, fp32", m, timed(
            standard_runner(model, opt, std_ds, m, cfg.loss.tau, steps, B_m, self.workers, dev), W, R), B_m)
        model, opt = self.fresh_model()
        r = self.row("ours: on-device batched aug, fp32", m, timed(
            ours_runner(model, opt, md, m, cfg, steps, B_m, dev, "fp32"), W, R), B_m)
        r["ratio_vs_standard"] = r["samples_per_s_median"] / base["samples_per_s_median"]
        print(f"{'':44s} ratio vs standard fp32: {r['ratio_vs_standard']:.2f}x")
        if runtime.amp_active(dev, "bf16"):
            model, opt = self.fresh_model(channels_last=self.channels_last)
            std_fast = self.row(f"standard + {fast}", m, timed(standard_runner(
                model, opt, std_ds, m, cfg.loss.tau, steps, B_m, self.workers, dev,
                lambda: torch.autocast(dev.type, dtype=torch.bfloat16)), W, R), B_m)
            model, opt = self.fresh_model(channels_last=self.channels_last)
            r = self.row(f"ours + {fast} (pretrain.py default)", m, timed(
                ours_runner(model, opt, md, m, cfg, steps, B_m, dev, "bf16"), W, R), B_m)
            r["ratio_vs_standard"] = r["samples_per_s_median"] / base["samples_per_s_median"]
            r["ratio_vs_standard_same_numerics"] = r["samples_per_s_median"] / std_fast["samples_per_s_median"]
            print(f"{'':44s} ratio vs standard fp32: {r['ratio_vs_standard']:.2f}x; vs standard with the same "
                  f"numerics: {r['ratio_vs_standard_same_numerics']:.2f}x")
        if not self.args.skip_compile:  # run.compile: the trunk compiled in place; compilation happens in the warm-up
            amp = cfg.run.amp if runtime.amp_active(dev, cfg.run.amp) else "fp32"
            eager = next(x for x in reversed(self.rows) if x["modality"] == m and x["pipeline"].startswith("ours"))
            model, opt = self.fresh_model(channels_last=self.channels_last and amp != "fp32")
            model.trunk.compile()
            c = self.row(f"ours + run.compile ({amp})", m, timed(
                ours_runner(model, opt, md, m, cfg, steps, B_m, dev, amp), W + 1, R), B_m)
            c["ratio_vs_eager"] = c["samples_per_s_median"] / eager["samples_per_s_median"]
            print(f"{'':44s} ratio vs the same without compile: {c['ratio_vs_eager']:.2f}x")

    def aggregation(self) -> dict:
        """(c): one FedAvg aggregation over K client states vs one client's local epoch (estimated from steps)."""
        cfg, data = self.cfg, self.data
        model, _ = self.fresh_model()
        n_client = int(np.mean([len(md.train_x) for md in data.values()]) / max(1, cfg.fed.clients) *
                       (2 if len(data) > 1 else 1))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        K = cfg.fed.clients_per_round

        def aggregate():
            agg = WeightedAverage()
            for _ in range(K):
                agg.add(state, 1.0)
            agg.result(state)
        agg_s = min(timed(aggregate, 1, self.R))
        step_s = statistics.median(r["seconds_per_step_min"] for r in self.rows if r["pipeline"].startswith("ours"))
        epoch_s = step_s * max(1, math.ceil(n_client / self.B))
        print(f"aggregation of {K} client states: {agg_s * 1e3:.1f} ms = {100 * agg_s / epoch_s:.2f}% of one client's "
              f"local epoch (~{n_client} samples, {epoch_s:.2f} s, an estimate from the step time)")
        return {"clients": K, "seconds": agg_s, "local_epoch_seconds_est": epoch_s,
                "fraction_of_local_epoch": agg_s / epoch_s, "client_samples_est": n_client}

    def scaling(self) -> dict:
        """(e): real rounds vs K clients per round, and throughput vs input size (image modality, our pipeline)."""
        cfg, dev, B, R, steps = self.cfg, self.device, self.B, self.R, self.args.steps
        md = self.data["image"]
        model, opt = self.fresh_model()
        res = {"round_vs_k": [{"k": k, "seconds": statistics.median(timed(
            round_runner(model, opt, md, cfg, k, steps, B, dev), 1, R))} for k in (1, 2, 4, 8)]}
        sizes = []
        for scale in (1, 2):
            hw = tuple(s * scale for s in md.shape[1:])
            big = md.to(dev)
            big.train_x = F.interpolate(md.train_x[:2 * B].float(), size=hw).round().to(torch.uint8)
            m2 = build_model(cfg.model, {"image": (md.shape[0], *hw)}).to(dev)
            o2 = make_optimizer(m2, cfg.optim)
            secs = timed(ours_runner(m2, o2, big, "image", cfg, steps, B, dev, cfg.run.amp), 1, R)
            sizes.append({"input": list(hw), "samples_per_s": B * steps / min(secs)})
        res["throughput_vs_input_size"] = sizes
        print(f"round time vs K, measured (each client: {steps} local steps of {B}): " +
              ", ".join(f"K={r['k']}: {r['seconds']:.2f} s" for r in res["round_vs_k"]))
        print("throughput vs input size: " + ", ".join(f"{s['input']}: {s['samples_per_s']:.0f}/s" for s in sizes))
        return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int_at_least(1), default=6, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int_at_least(1), default=3)
    p.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed repeats first")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers of the standard pipeline (-1: cores)")
    p.add_argument("--out", default="results/bench.json")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="no run.compile rows (compiling takes a minute or more)")
    argv, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = p.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, overrides)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = runtime.resolve_device(cfg.run.device)
    runtime.seed_everything(0)
    cfg.data.residency = "device"  # the bench times the pipeline on device-resident data (scripts/rehearse.py: tiers)
    data = load_data(cfg.data, device, progress=False)
    b = Bench(cfg, args, device, data)
    res = {"device": str(device), "env": runtime.environment_info(device), "config": args.config,
           "batch_size": b.B, "steps_per_repeat": args.steps, "repeats": b.R, "workers": b.workers,
           "bf16_native": runtime.amp_active(device, "bf16")}
    for m, md in data.items():
        b.throughput(m, md)
    res["throughput"] = b.rows
    res["aggregation"] = b.aggregation()
    res["peak_memory_mb"] = peak_memory_mb(device)
    print(f"peak memory: {res['peak_memory_mb']:.0f} MiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
    if not args.skip_scaling and "image" in data:
        res.update(b.scaling())
    if device.type == "cuda":
        res["tflops"] = _cuda_tflops(cfg, data, device, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"written to {out}")
    return res


def _audio_waveforms(cfg) -> np.ndarray:
    """The raw training clips of the configured dataset, for the standard pipeline's per-sample log-mel."""
    if cfg.data.dataset == "avfashion":
        from avfashion import build_avfashion
        z = np.load(build_avfashion(cfg.data, progress=False))
        train = ~z["test_voice"][z["audio_speaker"]]
        return z["audio"][train]
    from catalog import read_arrays
    from readers import default_root
    name = cfg.data.dataset.split("+")[1]
    root = Path(cfg.data.audio_root) if cfg.data.audio_root else default_root(name)
    return read_arrays(name, root, cfg.data)["train_x"]


def _cuda_tflops(cfg, data, device, args) -> dict:
    """Achieved training TFLOP/s of our pipeline in bf16 (flop counter over one step) vs the GPU's peak."""
    from torch.utils.flop_counter import FlopCounterMode
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    out = {"gpu": name, "bf16_peak_tflops": peak}
    for m, md in data.items():
        torch.manual_seed(0)
        model = build_model(cfg.model, {k: v.shape for k, v in data.items()}).to(device)
        opt = make_optimizer(model, cfg.optim)
        B = cfg.optim.batch_for(m)
        amp_ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        x = md.normalize(md.train_x[:B])
        with FlopCounterMode(display=False) as fc:
            train_step(model, opt, x, x, m, cfg.loss.tau, amp_ctx)
        flops = fc.get_total_flops()
        secs = timed(ours_runner(model, opt, md, m, cfg, args.steps, B, device, "bf16"), 1, args.repeats)
        tf = flops * args.steps / min(secs) / 1e12
        out[m] = {"flops_per_step": flops, "achieved_tflops": tf, "fraction_of_peak": tf / peak if peak else None}
        print(f"{m}: {tf:.1f} TFLOP/s achieved" + (f" = {100 * tf / peak:.1f}% of bf16 peak ({peak} TFLOP/s)" if peak else ""))
    return out


if __name__ == "__main__":
    main()
