"""Write the synthetic sealant beads to disk, to try the file-based sources on real files.

    python -m data.synth OUT --num-images N --format yolo|folder [--view segment|part] ...
    python -m data.synth --grid docs/synthetic_samples.png
"""

from __future__ import annotations

import argparse

from core.errors import UserError, run_cli
from data.synth.render import VIEWS
from data.synth.writer import write_dataset, write_grid

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="output folder of the dataset")
    p.add_argument("--num-images", type=int, help="how many images to write (>= 2)")
    p.add_argument("--format", choices=("yolo", "folder"), help="YOLO detection layout or class folders")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--view", choices=VIEWS, help="segment (default): the camera on the nozzle; part: the whole part")
    p.add_argument("--defect-ratio", type=float, default=0.2, help="fraction of defect images (default 0.2)")
    p.add_argument("--severity", type=float, nargs=2, default=(0.5, 1.0), metavar=("LO", "HI"),
                   help="range of defect severity, 1 = obvious (default 0.5 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--ext", choices=("png", "jpg"), default="png")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    p.add_argument("--grid", metavar="PATH", help="instead of a dataset, write a PNG grid of samples")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_cli(lambda: _write(args), debug=args.debug)


def _write(args: argparse.Namespace) -> int:
    if args.grid:
        write_grid(args.grid, (args.view,) if args.view else VIEWS, args.size, args.seed)
        print(f"wrote {args.grid}")
        return 0
    if args.out is None or args.num_images is None or args.format is None:
        raise UserError("give OUT, --num-images N and --format yolo|folder (or --grid PATH)")
    counts = write_dataset(args.out, args.num_images, args.format, size=args.size, view=args.view or "segment",
                           defect_ratio=args.defect_ratio, severity=tuple(args.severity), seed=args.seed,
                           split=tuple(args.split), ext=args.ext, overwrite=args.overwrite)
    total = {c: sum(v[c] for v in counts.values()) for c in ("normal", "defect")}
    print(f"wrote {args.num_images} {args.view or 'segment'} images ({total['defect']} defect, "
          f"{total['normal']} normal) at {args.size} px to {args.out} in {args.format} format")
    for sp, c in counts.items():
        print(f"  {sp:5s} {c['normal'] + c['defect']:6d} images: {c['defect']} defect, {c['normal']} normal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
