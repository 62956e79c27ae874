"""`memstrata train ROOT ...`: arguments, validation and output (wired in memstrata/cli.py as `_setup_train`).

Under torchrun: ``torchrun --nproc_per_node N -m memstrata train ROOT ...`` (rank 0 prints).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..cli_args import nonneg_int, positive_int
from .config import RecipeConfig

__all__ = ["add_train_arguments", "config_from_args", "run_train"]


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="ImageFolder root holding train/ and val/ class folders")
    p.add_argument("--model", default="resnet18", help="torchvision classification model (default resnet18)")
    p.add_argument("--epochs", type=positive_int, default=90, help="epochs (default 90)")
    p.add_argument("--batch", type=positive_int, default=64, help="batch size per process (default 64)")
    p.add_argument("--res", type=positive_int, default=224, help="training crop / validation crop size (default 224)")
    p.add_argument("--lr", type=_float, default=None, help="peak learning rate (default 0.1 x global batch / 256)")
    p.add_argument("--momentum", type=_float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=_float, default=1e-4, help="weight decay (default 1e-4)")
    p.add_argument("--norm-weight-decay", type=_float, default=0.0,
                   help="weight decay of normalisation weights and biases (default 0)")
    p.add_argument("--label-smoothing", type=_float, default=0.1, help="label smoothing (default 0.1)")
    p.add_argument("--warmup-epochs", type=_float, default=None,
                   help="linear warm-up epochs (default: 5, at most a fifth of the run)")
    p.add_argument("--warmup-decay", type=_float, default=0.01, help="warm-up start factor of the lr (default 0.01)")
    p.add_argument("--auto-augment", default=None, choices=("ta_wide", "autoaugment", "randaugment"),
                   help="auto-augmentation policy (default: none; the new recipe uses ta_wide)")
    p.add_argument("--random-erase", type=_float, default=0.0, help="RandomErasing probability (default 0; new recipe 0.1)")
    p.add_argument("--mixup-alpha", type=_float, default=0.0, help="MixUp alpha (default 0: off; new recipe 0.2)")
    p.add_argument("--cutmix-alpha", type=_float, default=0.0, help="CutMix alpha (default 0: off; new recipe 1.0)")
    p.add_argument("--workers", type=nonneg_int, default=None, help="loader workers (default: the usable cores)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of init, order and augmentation (default 0)")
    p.add_argument("--baseline", action="store_true",
                   help="the reference pipeline: DataLoader(ImageFolder) with PIL transforms, no memstrata")
    p.add_argument("--budget", default=None,
                   help="manage activations with memstrata's Manager at this budget (50%%, 2GiB; default: none)")
    p.add_argument("--nvme-dir", default=None, metavar="DIR", help="with --budget: directory of the NVMe tier")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="sample stores under DIR/train and DIR/val (default: memstrata's cache directory)")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help="memstrata's stored short side in pixels (default: max(160, res x 256/224), the validation resize)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads of the training process (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="write DIR/checkpoint.pt after every epoch")
    p.add_argument("--resume", action="store_true", help="continue exactly from DIR/checkpoint.pt (--checkpoint DIR)")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="EPOCHS",
                   help="stop after this many epochs in this run (the schedule still spans --epochs; --resume later)")
    p.add_argument("--json", action="store_true", help="print one JSON object (stdout) instead of the table")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write validation top-1 vs wall time here")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    """Validated config (ValueError with a one-line message on bad input)."""
    from .loop import dist_context

    if args.plot is not None:
        parent = Path(args.plot).expanduser().resolve().parent
        if not parent.is_dir():
            raise ValueError(f"--plot: directory {str(parent)!r} does not exist")
    from .optim import known_models

    if args.model not in known_models():
        import difflib

        close = difflib.get_close_matches(args.model, known_models(), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown torchvision classification model {args.model!r}{hint}")
    from .data import check_root

    check_root(args.root)
    return RecipeConfig(
        root=str(Path(args.root).expanduser().resolve()), model=args.model, epochs=args.epochs, batch=args.batch,
        res=args.res, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        norm_weight_decay=args.norm_weight_decay, label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs, warmup_decay=args.warmup_decay, workers=args.workers, seed=args.seed,
        baseline=args.baseline, budget=args.budget, nvme_dir=args.nvme_dir, store=args.store,
        max_side=args.max_side, device=args.device, compile=args.compile, checkpoint=args.checkpoint,
        resume=args.resume, world_size=dist_context().world_size, auto_augment=args.auto_augment,
        random_erase=args.random_erase, mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha,
    )


def run_train(cfg: RecipeConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train; print the table (or JSON) on rank 0; returns the summary."""
    from .loop import dist_context, train

    rank0 = dist_context().rank == 0
    quiet = args.quiet or not rank0
    stream = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        if not quiet:
            print(line, file=stream, flush=True)

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # a process setting, not a hyperparameter: not in the config
    out = train(cfg, log=log, progress=not quiet, plot=args.plot, stop_after=args.stop_after)
    out.pop("_model", None)
    if rank0:
        if args.json:
            print(json.dumps(out, default=str))
        elif not args.quiet:
            from rich.console import Console

            from .report import epochs_table

            Console().print(epochs_table(out))
            if args.plot:
                print(f"plot: {args.plot}")
    return out
