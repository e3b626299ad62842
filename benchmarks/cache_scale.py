"""The latent cache at scale, on the CPU: build rate, training read rate and memory for N synthetic pairs at SD1.5's
latent size (VAE posterior mean and std 4x64x64, text embeddings 77x768, fp16: 176 KiB per pair on disk).

The encoders are random (``cm_lightning.data.synthetic.RandomEncoders``) and the images 64 px solid colours, so the
build rate is the cache's own machinery (decode, collate, shard writes), not the VAE's (see data_rates.md for that).
Each size runs in a fresh process, so its peak RSS is its own. Read: the training path (``LatentDataModule``'s
``SampledLatents`` through a DataLoader, random order, batch 8, one torch thread), over every pair or
``--read-batches`` batches, in the main process and with ``--workers`` workers.

Usage: python benchmarks/cache_scale.py --pairs 1000,10000,100000 --out benchmarks/cache_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def anon_mib() -> float:
    """Resident anonymous memory (the process's own; the page cache of the files it reads is not counted)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_size(pairs: int, root: Path, workers: int, read_batches: int) -> dict:
    import torch

    from cm_lightning.data.cache import LatentCache
    from cm_lightning.data.datamodule import SampledLatents, _batch_as_is
    from cm_lightning.data.synthetic import RandomEncoders, SolidColorPairs

    source = SolidColorPairs(pairs, image_size=64)
    cache = LatentCache(source, root=root, resolution=64, encoders=RandomEncoders(vae_scale=1), encode_batch_size=64,
                        num_workers=workers, progress=False)
    started = time.perf_counter()
    cache.build()
    build_s = time.perf_counter() - started
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    disk = sum(f.stat().st_size for f in cache.path.iterdir())
    started = time.perf_counter()
    os.sync()  # training reads a cache written long before: its writes are on disk, not competing with the reads
    sync_s = time.perf_counter() - started

    before = anon_mib()
    started = time.perf_counter()
    reader = LatentCache(source, root=root, resolution=64).open()
    open_s = time.perf_counter() - started
    # One intra-op thread, as in DataLoader workers: on a small, busy machine, torch's thread pool fighting other
    # processes cost 7x here (370 vs 2,494 samples/s at batch 8 on 2 shared cores).
    torch.set_num_threads(1)
    rates, peak = {}, anon_mib()
    for w in (0, workers):
        loader = torch.utils.data.DataLoader(SampledLatents(reader), batch_size=8, shuffle=True, num_workers=w,
                                             collate_fn=_batch_as_is)
        seen, count = 0, 0
        for batch in loader:
            if count == 2:  # after warm-up (worker start)
                started, seen = time.perf_counter(), 0
            count += 1
            seen += batch["latents"].shape[0]
            peak = max(peak, anon_mib())
            if count >= read_batches + 2:
                break
        rates[f"workers{w}"] = round(seen / (time.perf_counter() - started))
    # the same read from RAM (the first 2,000 pairs loaded), in this process under the same load: what the lazy
    # read costs on top of SampledLatents' own work (float conversion and the latent noise)
    subset = torch.arange(min(pairs, 2000))
    ram = type("InRam", (), {"__len__": lambda self: len(subset), **reader.read_rows(subset)})()
    dataset, order = SampledLatents(ram), torch.randperm(len(subset)).tolist()
    started = time.perf_counter()
    for first in range(0, len(order) - 7, 8):
        dataset.__getitems__(order[first:first + 8])
    rates["in_ram_workers0"] = round((len(order) // 8 * 8) / (time.perf_counter() - started))
    return {"pairs": pairs, "build_pairs_per_s": round(pairs / build_s), "build_s": round(build_s, 1),
            "disk_gib": round(disk / 2**30, 2), "sync_s": round(sync_s, 1), "open_s": round(open_s, 2),
            "read_samples_per_s_batch8": rates, "read_batches": read_batches,
            "build_peak_rss_mib": round(build_peak), "read_rss_anon_growth_mib": round(peak - before, 1),
            "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", default="1000,10000,100000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--read-batches", type=int, default=2000)
    parser.add_argument("--root", default=None, help="where to build (default: a temporary folder, removed after)")
    parser.add_argument("--out", default="cache_scale.json")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a single size, in this process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, Path(args.root), args.workers, args.read_batches)))
        return
    import torch

    rows = []
    for pairs in [int(p) for p in args.pairs.split(",")]:
        root = Path(tempfile.mkdtemp(prefix="cm_cache_scale_", dir=args.root))
        try:
            done = subprocess.run([sys.executable, __file__, "--one", str(pairs), "--root", str(root), "--workers",
                                   str(args.workers), "--read-batches", str(args.read_batches)],
                                  check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    result = {"date": date.today().isoformat(), "load_average_after": os.getloadavg(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "torch": torch.__version__, "command": " ".join(sys.argv),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
