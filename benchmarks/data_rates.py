"""Latent-cache build rate and training read rate at SD1.5 scale (issue: COCO-5k data path).

A generated COCO-layout folder of JPEGs (640x480, like COCO's), SD1.5's VAE and text-encoder architectures
with random weights (timing does not depend on weight values), 512 px. Measures:
  - build: images/s through decode + preprocess (DataLoader workers) + VAE encode + text encode + write;
  - read: samples/s of the training DataLoader over the loaded cache (batch 8 and 64).
Usage: python benchmarks/data_rates.py --images 5000 --workers 12 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from cm_lightning.data.cache import LatentCache
from cm_lightning.data.coco import CocoCaptions
from cm_lightning.data.datamodule import SampledLatents, _batch_as_is
from cm_lightning.data.synthetic import write_coco_folder
from cm_lightning.models.encoders import FrozenEncoders
from cm_lightning.models.sd15_architecture import random_sd15
from cm_lightning.models.tokenizer import write_clip_tokenizer


def read_rate(data, batch_size: int, workers: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(SampledLatents(data), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, collate_fn=_batch_as_is,
                                         persistent_workers=workers > 0)
    seen, count, started = 0, 0, time.perf_counter()
    while count < batches + 2:  # as many epochs as it takes
        for batch in loader:
            count += 1
            if count == 2:  # after warm-up (worker start)
                started, seen = time.perf_counter(), 0
            seen += batch["latents"].shape[0]
            if count >= batches + 2:
                break
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--encode-batch", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--out", default="data_rates.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="cm_rates_"))
    started = time.perf_counter()
    write_coco_folder(work / "coco", args.images, image_size=(640, 480), captions_per_image=5)
    write_seconds = time.perf_counter() - started

    nets = random_sd15(("vae", "text_encoder"))
    tokenizer_dir = write_clip_tokenizer(work / "tokenizer")
    from transformers import CLIPTokenizer

    encoders = FrozenEncoders(nets["vae"], nets["text_encoder"], CLIPTokenizer.from_pretrained(tokenizer_dir),
                              device=device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                              identity_source="random-sd15")
    source = CocoCaptions(str(work / "coco"), num_pairs=args.images)
    cache = LatentCache(source, root=work / "cache", resolution=args.resolution, encoders=encoders,
                        encode_batch_size=args.encode_batch, num_workers=args.workers, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    summary = cache.build()
    build_seconds = time.perf_counter() - started
    disk = sum(f.stat().st_size for f in cache.path.rglob("*") if f.is_file())
    started = time.perf_counter()
    data = cache.open()  # what training reads through: rows read lazily from the shard files
    load_seconds = time.perf_counter() - started
    result = {
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "images": args.images, "resolution": args.resolution, "workers": args.workers,
        "encode_batch": args.encode_batch, "encoder_dtype": args.dtype, "summary": summary,
        "write_jpegs_seconds": round(write_seconds, 1),
        "build_seconds": round(build_seconds, 2), "build_images_per_s": round(args.images / build_seconds, 1),
        "cache_bytes": disk, "cache_mib_per_1000_pairs": round(disk / 2**20 / args.images * 1000, 1),
        "load_seconds": round(load_seconds, 2),
        "read_samples_per_s": {
            f"batch{b}_workers{w}": round(read_rate(data, b, w, batches=200 if b == 8 else 60), 0)
            for b in (8, 64) for w in (0, 4)
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
