"""Downstream evaluation of a pretrained FSSUAVL backbone: linear probe, kNN and (optionally) full
fine-tuning on image, audio and paired audio+image tasks, at several label fractions.

    python finetune.py --ckpt runs/default/last.pt                  # writes results.json + results.md beside it
    python finetune.py --ckpt runs/default/last.pt --random-init    # the same architecture untrained (the floor)
    python finetune.py --ckpt runs/default/last.pt --eval.protocols=[linear,knn,finetune] --eval.label_fractions=[1.0]

The backbone (stems + trunk) is taken from the checkpoint by explicit key prefix; the data section of the
checkpoint's config defines the tasks (overridable with --data.key=value). Every row has its bar beside it: the raw
input itself (standardised pixels / log-mel bins) through the same probe and kNN (--eval.raw_input=false skips it).
"""
import argparse
import sys

import runtime
from downstream import evaluate_checkpoint
from settings import parse_with_overrides


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="Override any key as --section.key=value (sections: eval, run, data).")
    p.add_argument("config", nargs="?", help="optional YAML with eval/run/data sections")
    p.add_argument("--ckpt", required=True, help="pretraining checkpoint (RUN_DIR/last.pt) or its run directory")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture untrained")
    return parse_with_overrides(p, argv)


def main(argv=None) -> dict:
    def run(a):
        args, overrides = parse_args(a)
        return evaluate_checkpoint(args.ckpt, args.config, overrides, args.random_init)
    return runtime.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
