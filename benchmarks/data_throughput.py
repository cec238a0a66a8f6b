"""Data-layer throughput: images/s through the pyarrow reader and through Ray Data, and Parquet bytes per image.

    .venv/bin/python benchmarks/data_throughput.py [--out runs/bench/shapes64] [--num-cpus 4] [--epochs 3]

Prepares 50,000 RGB 64x64 shapes (once; reused when --out already holds them), verifies every checksum, then reads
all of them as torch float32 batches in [0, 1]: with `ParquetImageReader` (in order and shuffled) and with
`ray_dataset` + `iter_torch_batches` on a local Ray of --num-cpus logical CPUs. Each reader runs --epochs passes;
the first Ray pass includes starting its workers, so the median pass (with min-max) is the steady-state figure.
Targets: >= 20,000 img/s (pyarrow) and >= 5,000 img/s (Ray Data).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

PYARROW_TARGET = 20_000
RAY_TARGET = 5_000


def _passes(make_iter, epochs: int) -> list[float]:
    """images/s of each pass; each batch's images are touched so lazy work cannot hide."""
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in make_iter():
            n += batch["image"].shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates


def _line(name: str, rates: list[float], target: float) -> str:
    """The median pass with its min-max; a Ray reader's first pass also starts its workers, so the median of 3 or
    more passes is the steady state."""
    median = statistics.median(rates)
    return (f"{name:<34} median {median:>9,.0f} img/s [{min(rates):,.0f}-{max(rates):,.0f}] "
            f"({median / target:.1f}x the {target:,} target; {len(rates)} passes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench/shapes64")
    parser.add_argument("--num-examples", type=int, default=50_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray (default 4)")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()

    from pipelines.config import DataConfig
    from pipelines.data import DatasetError, ParquetImageReader, prepare_dataset, read_manifest, verify

    # Every image in the train split, so one pass reads all of them.
    cfg = DataConfig(
        source="shapes", image_size=args.image_size, rgb=True, num_examples=args.num_examples,
        val_fraction=0.0, test_fraction=0.0, path=args.out,
    )
    try:
        manifest = read_manifest(args.out)
        reuse = manifest.source.get("config", {}) | {"path": args.out} == cfg.to_dict()
    except DatasetError:
        reuse = False
    if reuse:
        print(f"reusing {args.out}")
    else:
        start = time.perf_counter()
        manifest = prepare_dataset(cfg, overwrite=True, progress=False)
        print(f"prepared {args.num_examples:,} images in {time.perf_counter() - start:.1f}s into {args.out}")

    n = manifest.splits["train"]
    c, h, w = manifest.shape
    checked = verify(manifest, args.out)
    print(f"dataset   {manifest.name}: {n:,} images {c}x{h}x{w}, {len(manifest.shards['train'])} shards")
    print(
        f"on disk   {manifest.total_bytes / 1e6:.1f} MB = {manifest.total_bytes / n:,.0f} bytes/image "
        f"(raw {c * h * w:,}; zstd ratio {c * h * w * n / manifest.total_bytes:.1f}x)"
    )
    mb_s = checked.bytes / checked.seconds / 1e6
    print(f"verify    {checked.seconds:.3f}s for all {checked.shards} shards of {n:,} images ({mb_s:,.0f} MB/s)")

    results = {}
    for shuffle in (False, True):
        reader = ParquetImageReader(args.out, "train", batch_size=args.batch_size, shuffle=shuffle)
        rates = _passes(lambda: iter(reader), args.epochs)
        results[f"pyarrow{' shuffled' if shuffle else ''}"] = statistics.median(rates)
        print(_line(f"pyarrow reader{' (shuffled)' if shuffle else ''}", rates, PYARROW_TARGET))

    if not args.skip_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        from pipelines.data import iter_torch_batches, ray_dataset

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        try:
            start = time.perf_counter()
            ds = ray_dataset(args.out, "train")
            print(f"ray_dataset() on the driver (manifest + verify) {time.perf_counter() - start:.3f}s")
            rates = _passes(lambda: iter_torch_batches(ds, batch_size=args.batch_size), args.epochs)
            results["ray"] = statistics.median(rates)
            print(_line(f"Ray Data iter_torch_batches ({args.num_cpus} CPUs)", rates, RAY_TARGET))
        finally:
            ray.shutdown()
        print(f"ratio     Ray Data / pyarrow = {results['ray'] / results['pyarrow']:.2f}")


if __name__ == "__main__":
    main()
