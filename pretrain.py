"""Federated self-supervised pretraining of one vision backbone on unpaired images and audio (FSSUAVL).

    python pretrain.py                                   # the default experiment (configs/default.yaml)
    python pretrain.py configs/smoke.yaml --fed.rounds=3 --run.out_dir=runs/x
    python pretrain.py --resume --run.out_dir=runs/x     # continue a stopped run from its last round
    torchrun --standalone --nproc_per_node=2 pretrain.py CONFIG   # the same run, clients spread over 2 ranks/GPUs
    python -m fedengines.flower_app CONFIG --supernodes 2           # the same run under Flower (see fedengines/flower_app.py)

Writes to run.out_dir: config.yaml (resolved), log.jsonl (one JSON object per round), last.pt (the
checkpoint, rewritten atomically after every round; the one before it is kept as last.pt.prev).
The run itself is pretraining.pretrain (from Python: `pretraining.pretrain("configs/smoke.yaml", ["--fed.rounds=3"])`).
"""
import sys

import pretraining
import runtime


def main(argv=None) -> dict:
    return runtime.run_main(pretraining.cli, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
