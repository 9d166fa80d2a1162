"""Train a vpdml adapter for image retrieval: a thin script over :mod:`vpdml.training` (same flags as `vpdml train`).

Single GPU or CPU::

    python examples/train_dml.py --dataset cub200 --recipe cub200 \
        --backbone google/vit-base-patch16-224-in21k --output-dir runs/cub --validation-classes 0.1

Several GPUs (each global batch is split between the processes; --classes-per-batch must be divisible by their
number)::

    accelerate launch --multi_gpu --num_processes 4 examples/train_dml.py --dataset cub200 --recipe cub200 \
        --output-dir runs/cub --push-to-hub me/vit-b-cub-vptsp

Your own data (one sub-folder per class; half of the classes train, the other half test)::

    python examples/train_dml.py --dataset imagefolder --data-dir ./my_products --method vptsp-g \
        --output-dir runs/products --epochs 30 --head-warmup-epochs 50

Resume an interrupted run with ``--resume-from-checkpoint latest`` (checkpoints: ``--checkpoint-every-steps``).
"""

from __future__ import annotations

import argparse

from vpdml.cli import add_train_arguments, run_train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run_train(add_train_arguments(parser).parse_args())


if __name__ == "__main__":
    main()
