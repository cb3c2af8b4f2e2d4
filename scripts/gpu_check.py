"""The GPU check, ready for the first CUDA machine: one command, at most --budget-s seconds (8 minutes), one JSON and
one Markdown report. It uses the torch already installed there (any 2.x with CUDA) and skips, with the reason, what it
cannot run.

    python scripts/gpu_check.py --out results/gpu_check            # on a CUDA machine
    python scripts/gpu_check.py --smoke --out /tmp/gpu_check        # on CPU, in under a minute: the same plumbing

Sections: (1) the environment; (2) the CUDA tests (tests/test_cuda.py; they need the AV-Fashion packages); (3)
scripts/bench.py on ResNet-18 at 32 px (CIFAR-10 + ESC-50) and ViT-S (Tiny-ImageNet + SpeechCommands): ours vs a standard
DataLoader pipeline, bf16, compile on/off, achieved TFLOP/s against the GPU's bf16 peak; (4) each paper config
rehearsed (scripts/rehearse.py) for two rounds on stand-ins of its data (scripts/standins.py, at --scale of the
official sizes): seconds per round, peak device memory, the tier auto chose. --smoke shrinks every section (tiny
stand-ins, small models, one step) so CI runs it and it never rots.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # config: (stand-ins it reads, its data overrides, the small model of --smoke)
    "cifar10_esc50_resnet18": (("cifar10", "esc50"), ["--data.image_root={cifar10}", "--data.audio_root={esc50}"],
                               ["--model.arch=resnet_tiny"]),
    "tinyimagenet_speechcommands_vits": (("tinyimagenet", "speechcommands"),
                                         ["--data.image_root={tinyimagenet}", "--data.audio_root={speechcommands}"],
                                         ["--model.arch=vit_micro"]),
    "vggsound_resnet18": (("vggsound",), ["--data.root={vggsound}"], ["--model.arch=resnet_tiny"]),
}
SMOKE = ["--fed.clients=4", "--fed.clients_per_round=2", "--optim.batch_size=8", "--optim.batch_size_audio=4",
         "--fed.local_epochs=1", "--fed.modality_fractions=[0,0,1]", "--data.clip_seconds=1.0", "--data.image_size=32",
         "--run.device=cpu"]


class Report:
    def __init__(self, budget_s: float, timeout_scale: float = 1.0):
        self.t0, self.budget, self.sections = time.perf_counter(), budget_s * timeout_scale, {}
        self.scale = timeout_scale

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def run(self, name: str, cmd: list[str], timeout: float, json_out: Path | None = None) -> dict:
        """One command, bounded by the time left; its status, seconds, output tail and JSON (when it writes one)."""
        if self.left() < 20:
            self.sections[name] = {"status": "skipped", "reason": "the time budget is spent"}
            return self.sections[name]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               timeout=min(timeout * self.scale, self.left()))
            res = {"status": "ok" if p.returncode == 0 else f"failed (exit {p.returncode})",
                   "tail": (p.stdout + p.stderr)[-1500:]}
        except subprocess.TimeoutExpired:
            res = {"status": "timed out", "tail": ""}
        res["seconds"] = round(time.perf_counter() - t, 1)
        if json_out is not None and json_out.is_file():
            res["result"] = json.loads(json_out.read_text())
        self.sections[name] = res
        print(f"{name}: {res['status']} in {res['seconds']} s", flush=True)
        return res

    def skip(self, name: str, reason: str) -> None:
        self.sections[name] = {"status": "skipped", "reason": reason}
        print(f"{name}: skipped ({reason})", flush=True)


def environment() -> dict:
    import torch
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1), "bf16": torch.cuda.is_bf16_supported()}
    return env


def markdown(rep: dict) -> str:
    lines = [f"# GPU check ({'smoke, CPU' if rep['smoke'] else rep['env'].get('gpu', 'no GPU')})", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in rep["env"].items()), "",
             "| section | status | seconds |", "|---|---|---|"]
    for name, s in rep["sections"].items():
        lines.append(f"| {name} | {s['status']}{' (' + s['reason'] + ')' if 'reason' in s else ''} | {s.get('seconds', '-')} |")
    rows = [(n, s["result"]) for n, s in rep["sections"].items() if n.startswith("rehearse ") and "result" in s]
    if rows:
        lines += ["", "| config | tier (auto's reason) | s per round (measured) | s per local step | peak device GiB | "
                  "peak RSS GiB |", "|---|---|---|---|---|---|"]
        for n, r in rows:
            steps = ", ".join(f"{m} {v:.3f}" for m, v in r["step_s"].items())
            lines.append(f"| {n[9:]} | {r['tier']} ({r['auto']}) | {', '.join(map(str, r['rounds_s']))} | {steps} | "
                         f"{r.get('device_peak_gib', '-')} | {r['rss_peak_gib']} |")
    for n, s in rep["sections"].items():
        tf = s.get("result", {}).get("tflops") if n.startswith("bench ") else None
        if tf:
            lines.append(f"- {n}: " + ", ".join(f"{m} {v['achieved_tflops']:.1f} TFLOP/s"
                                                + (f" ({100 * v['fraction_of_peak']:.1f}% of bf16 peak)"
                                                   if v.get("fraction_of_peak") else "")
                                                for m, v in tf.items() if isinstance(v, dict)))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny everything: checks the plumbing in under a minute")
    p.add_argument("--standins", type=Path, help="stand-ins folder (default: made in a temp folder)")
    p.add_argument("--scale", type=float, default=0.25, help="stand-in size as a fraction of the official counts")
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply the budget and every section's timeout (a loaded machine, or the test suite: they "
                        "then bound a hang, not the speed)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    import standins
    env = environment()
    rep = Report(a.budget_s, a.timeout_scale)
    a.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    cuda = env["cuda_available"] and not a.smoke
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        if cuda:
            rep.run("cuda tests", [py, "-m", "pytest", "-q", "-x", "tests/test_cuda.py"], 150)
        else:
            rep.skip("cuda tests", "no CUDA device" if not a.smoke else "--smoke runs on CPU")
        scale = 0.002 if a.smoke else a.scale
        names = sorted({n for spec in PAPER.values() for n in spec[0]})
        t = time.perf_counter()
        roots = standins.make(a.standins or tmp / "standins", names, scale)
        rep.sections["stand-ins"] = {"status": "ok", "seconds": round(time.perf_counter() - t, 1), "scale": scale}
        for cfg, (_, overrides, small) in PAPER.items():
            over = [o.format(**{k: str(v) for k, v in roots.items()}) for o in overrides]
            shrink = SMOKE + small if a.smoke else []
            if cfg != "vggsound_resnet18":
                js = tmp / f"bench_{cfg}.json"
                extra = ["--steps", "1", "--repeats", "1", "--warmup", "0", "--workers", "0", "--skip-compile",
                         "--skip-scaling"] if a.smoke else ["--steps", "5", "--repeats", "2", "--skip-scaling"]
                rep.run(f"bench {cfg}", [py, "scripts/bench.py", "--config", f"configs/{cfg}.yaml", f"--out={js}", *extra,
                                         *over, *shrink], 120, js)
            js = tmp / f"rehearse_{cfg}.json"
            steps = ["--steps", "1"] if a.smoke else ["--steps", "3"]
            rep.run(f"rehearse {cfg}", [py, "scripts/rehearse.py", f"configs/{cfg}.yaml", "--rounds", "2", "--json",
                                        str(js), *steps, "--fresh-cache", *over, *shrink], 150, js)
    out = {"smoke": a.smoke, "env": env, "budget_s": a.budget_s, "sections": rep.sections,
           "seconds": round(time.perf_counter() - rep.t0, 1)}
    (a.out / "gpu_check.json").write_text(json.dumps(out, indent=1))
    (a.out / "gpu_check.md").write_text(markdown(out))
    print(f"written: {a.out / 'gpu_check.json'}, {a.out / 'gpu_check.md'} ({out['seconds']} s)")
    return out


if __name__ == "__main__":
    main()
