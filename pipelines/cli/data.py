"""`vaepipe data prepare|inspect`: make a dataset (sharded Parquet + dataset.json) and look at one.

    vaepipe data prepare digits --out runs/data/digits16 --image-size 16
    vaepipe data prepare shapes --out runs/data/shapes64 --rgb --num-examples 50000
    vaepipe data prepare folder ~/pictures --out runs/data/pictures64 --image-size 64
    vaepipe data inspect runs/data/shapes64 [--png grid.png]
"""
from __future__ import annotations

import argparse
import typing
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError

if TYPE_CHECKING:
    from pipelines.config import DataConfig


def _sources() -> tuple[str, ...]:
    from pipelines.config import DataConfig

    return typing.get_args(typing.get_type_hints(DataConfig)["source"])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command (with `prepare` and `inspect`) to the top-level parser's subparsers."""
    data = subparsers.add_parser("data", help="prepare and inspect datasets (sharded Parquet + dataset.json)")
    sub = data.add_subparsers(dest="data_command", metavar="{prepare,inspect}", required=True)

    p = sub.add_parser(
        "prepare",
        help="make a dataset from a source and write it as Parquet shards",
        description="Make a dataset from SOURCE and write DIR/{train,val,test}/part-NNNNN.parquet and "
        "DIR/dataset.json. digits and shapes need no network; mnist, cifar10 and celeba64 use (or download "
        "into) --cache-dir; folder reads any image folder (sub-folders become labels).",
    )
    sources = _sources()
    p.add_argument("source", choices=sources, metavar="SOURCE", help=f"one of {', '.join(sources)}")
    p.add_argument("path", nargs="?", metavar="PATH", help="the image folder of source 'folder' (or --source-path)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (local path or s3://, gs://, ... URI)")
    p.add_argument("--image-size", type=int, metavar="N", help="image side after preparation (default: the source's)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the split (and of the shapes) (default 0)")
    p.add_argument("--num-examples", type=int, metavar="N", help="how many images to make (sources 'shapes', 'regions')")
    p.add_argument("--rgb", action="store_true", help="colour: shapes get a hue factor; folder always keeps 3 channels")
    p.add_argument("--source-path", metavar="P", help="the image folder for source 'folder'")
    p.add_argument("--cache-dir", metavar="D", help="where torchvision sources find (or download) their files")
    p.add_argument("--val-fraction", type=float, metavar="F", help="fraction of the examples for validation")
    p.add_argument("--test-fraction", type=float, metavar="F", help="fraction of the examples for testing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in DIR")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="source 'folder': read symlinks that point outside the folder (refused by default)")
    p.set_defaults(func=cmd_prepare)

    i = sub.add_parser(
        "inspect",
        help="print a dataset's summary, verify its checksums and draw example images",
        description="Print DIR's manifest summary, verify every shard's checksum and schema, and write a PNG grid "
        "of training examples.",
    )
    i.add_argument("dir", metavar="DIR", help="a prepared dataset directory")
    i.add_argument("--png", metavar="OUT", help="where to write the grid of examples (default DIR/examples.png)")
    i.set_defaults(func=cmd_inspect)


def data_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig the prepare arguments describe (ConfigError for an invalid combination)."""
    from pipelines.config import DataConfig

    if args.path and args.source_path and args.path != args.source_path:
        raise ConfigError(f"got two image folders, {args.path!r} and --source-path {args.source_path!r}; give one")
    if args.num_examples is not None and args.source not in ("shapes", "regions"):
        raise ConfigError(f"--num-examples applies to sources 'shapes' and 'regions' only; {args.source!r} has a "
                          f"fixed size")
    fields = {
        "path": args.out,
        "source": args.source,
        "image_size": args.image_size,
        "seed": args.seed,
        "rgb": args.rgb,
        "source_path": args.path or args.source_path,
        "num_examples": args.num_examples,
        "cache_dir": args.cache_dir,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "follow_symlinks": True if getattr(args, "follow_symlinks", False) else None,
    }
    # Unset options keep DataConfig's defaults; from_dict validates and names the bad key.
    return DataConfig.from_dict({k: v for k, v in fields.items() if v is not None})


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipelines.data.prepare import prepare_dataset

    cfg = data_config(args)
    prepare_dataset(cfg, out=args.out, overwrite=args.overwrite, progress=True)
    print(f"ready: train with data.path={args.out} (check it with `vaepipe data inspect {args.out}`)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.data.grid import write_grid
    from pipelines.data.manifest import join, read_manifest, verify

    manifest = read_manifest(args.dir)
    print(manifest.summary())
    print(f"  source config: {manifest.source.get('config')}")
    checked = verify(manifest, args.dir)
    print(
        f"verified {checked.shards} shard(s), {checked.bytes / 1e6:.1f} MB: checksums and schemas match dataset.json "
        f"({checked.seconds:.2f}s)"
    )
    out = args.png or join(args.dir, "examples.png")
    n = write_grid(args.dir, out)
    print(f"wrote a grid of {n} training examples to {out}")
    return 0


