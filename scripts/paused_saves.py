"""Run an entry script with every checkpoint write paused between writing last.pt.tmp and renaming it, so a test can
kill a run inside that window (scripts/kill_resume.py's `ckpt` kills, tests/test_resume.py's SIGTERM test):

    python scripts/paused_saves.py SECONDS pretrain.py ARGS...
    python -m torch.distributed.run ... scripts/paused_saves.py SECONDS pretrain.py ARGS...

The pause is save_checkpoint's `before_replace` callback, given here: the checkpoint code itself reads no test
setting.
"""
import functools
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pretraining  # noqa: E402


def main() -> None:
    seconds, script, *args = sys.argv[1:]
    pretraining.save_checkpoint = functools.partial(pretraining.save_checkpoint,
                                                    before_replace=lambda: time.sleep(float(seconds)))
    sys.argv = [str(ROOT / script), *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main()
