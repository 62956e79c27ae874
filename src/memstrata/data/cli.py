"""`memstrata data …` — the data side's command line (registered in memstrata/cli.py's SUBCOMMANDS).

    memstrata data synth DIR --images N --classes C [--seed S] [--size 500x375] [--workers K]
    memstrata data build ROOT [--out DIR] [--max-side 160] [--on-corrupt raise|skip] [--workers K] [--verify]

`synth` writes the deterministic ImageNet-like ImageFolder of JPEGs (resumable:
existing files are kept); `build` decodes ROOT into the tiered sample store ahead
of time (resumable: a killed build continues where it stopped).  Both show
progress on stderr's terminal and print one summary line.  Bad input (a missing
root, no class folders, a corrupt JPEG with --on-corrupt raise, a store built
from other settings, a full disk) is one line on stderr and exit status 2, as
for every memstrata subcommand (see [Note: subcommand registry] in memstrata/cli.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

from ..cli_args import UsageError, int_at_least, nonneg_int, positive_int, stderr_console

Handler = Callable[[argparse.Namespace], int]

__all__ = ["setup_data", "cmd_data"]


def _max_side(text: str) -> int:
    from .store import MIN_MAX_SIDE  # here, not at import: the store pulls in numpy and PIL

    return int_at_least(MIN_MAX_SIDE)(text)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 500x375, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return w, h


def setup_data(p: argparse.ArgumentParser) -> Handler:
    """Add `synth` and `build` to the `data` subcommand's parser; returns the handler."""
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    s = sub.add_parser("synth", help="write a deterministic synthetic ImageFolder of JPEGs",
                       description="Write a deterministic, learnable, ImageNet-like ImageFolder of JPEGs "
                                   "(image i is in class i % C; rerunning completes a partial set).")
    s.add_argument("dir", metavar="DIR", help="root directory to write (created if missing)")
    s.add_argument("--images", type=positive_int, required=True, help="number of images")
    s.add_argument("--classes", type=positive_int, required=True, help="number of classes (<= images)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="content seed (default 0)")
    s.add_argument("--size", type=_size, default=(500, 375),
                   help="nominal WIDTHxHEIGHT, jittered +-20%% per image (default 500x375)")
    s.add_argument("--workers", type=positive_int, default=None, help="generating processes (default: cores, at most 8)")
    b = sub.add_parser("build", help="decode an ImageFolder into the sample store ahead of time",
                       description="Decode ROOT (ImageFolder layout) into a checksummed, resumable sample store.")
    b.add_argument("root", metavar="ROOT", help="ImageFolder root (class folders of images)")
    b.add_argument("--out", metavar="DIR", default=None,
                   help="store directory (default: ~/.cache/memstrata/data/<fingerprint of ROOT and settings>)")
    b.add_argument("--max-side", type=_max_side, default=160, help="stored short side at most this (default 160)")
    b.add_argument("--on-corrupt", choices=("raise", "skip"), default="raise",
                   help="a corrupt source image: fail naming it (raise, default) or skip it (skip)")
    b.add_argument("--workers", type=positive_int, default=None, help="decode threads (default: all cores)")
    b.add_argument("--verify", action="store_true", help="also re-read and check every stored sample")
    return cmd_data


def _usage(msg: str) -> Exception:
    return UsageError(f"memstrata data: error: {' '.join(str(msg).split())}")


def cmd_data(args: argparse.Namespace) -> int:
    action = getattr(args, "data_command", None)
    if action == "synth":
        return _synth(args)
    if action == "build":
        return _build(args)
    raise _usage("choose an action: synth DIR --images N --classes C, or build ROOT [--out DIR] "
                 "(see memstrata data --help)")


def _count_jpegs(root: Path) -> int:
    return sum(1 for _ in root.glob("*/img_*.jpg")) if root.is_dir() else 0


def _synth(args: argparse.Namespace) -> int:
    from .synth import synth_imagefolder

    root = Path(args.dir).expanduser()
    if root.exists() and not root.is_dir():
        raise _usage(f"{str(root)!r} exists and is not a directory")
    if args.classes > args.images:
        raise _usage(f"--classes {args.classes} exceeds --images {args.images}: every class needs an image")
    before = _count_jpegs(root)
    t0 = time.perf_counter()
    try:
        synth_imagefolder(root, args.images, args.classes, seed=args.seed, size=args.size, workers=args.workers,
                          progress=stderr_console().is_terminal)
    except ValueError as e:
        raise _usage(str(e)) from e
    except OSError as e:
        raise _usage(f"cannot write {root}: {e.strerror or e}") from e
    new = _count_jpegs(root) - before
    print(f"synth: {args.images} images in {args.classes} classes at {root.resolve()} "
          f"({max(new, 0)} written, {args.images - max(new, 0)} already there; seed {args.seed}; "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _build(args: argparse.Namespace) -> int:
    from .errors import DataError
    from .store import build_store

    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise _usage(f"ImageFolder root {str(root)!r} is not a directory")
    if args.out is not None:
        out = Path(args.out).expanduser()
        if out.exists() and not out.is_dir():
            raise _usage(f"--out {str(out)!r} exists and is not a directory")
    try:
        rep = build_store(root, args.out, max_side=args.max_side, on_corrupt=args.on_corrupt, workers=args.workers,
                          progress=stderr_console().is_terminal, verify=args.verify)
    except DataError as e:  # corrupt source (raise), store of other settings, full disk: named, one line
        raise _usage(str(e).replace("pass on_corrupt='skip'", "pass --on-corrupt skip")) from e
    except FileNotFoundError as e:  # no class folders / no images (torchvision's scan)
        raise _usage(str(e)) from e
    except PermissionError as e:
        raise _usage(f"permission denied: {e.filename or e}") from e
    print(str(rep))
    if rep.verified is not None:
        print(_verify_line(rep))
    if rep.skipped:
        print(f"skipped {len(rep.skipped)} corrupt source sample(s): indices {list(rep.skipped)[:10]}"
              + (" ..." if len(rep.skipped) > 10 else ""))
    return 0


def _verify_line(rep) -> str:
    """What --verify found: passed, or which stored samples failed their check (and were rebuilt)."""
    if not rep.verify_failed:
        return f"verify: passed: all {rep.verified} stored samples read back intact (checksums match)"
    bad = list(rep.verify_failed)
    return (f"verify: FAILED for {len(bad)} of {rep.verified} stored samples (indices {bad[:10]}"
            + (" ..." if len(bad) > 10 else "") + "); they were rebuilt from the source")
