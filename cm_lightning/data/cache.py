"""The frozen-encoder latent cache: VAE posteriors and text embeddings, computed once, reused by every run.

A cache folder is named by a hash of its key (source fingerprint, encoder identity, resolution, format
version), so any change to what would be encoded lands in a new folder, and an unchanged key is reused
without loading or calling the encoders. Layout of ``root/<source.name>-<hash12>/``::

    key.json                 the full key (checked on every open, to rule out a hash collision)
    shard-00000.safetensors  latent_mean, latent_std [n,4,h,w] fp16; text_embeds [n,77,D] fp16
    shard-00000.json         the shard's key hash, index range, captions, keys, source indices, bad items
    null_text_embed.pt       encode_prompts([""])[0], [77,D] fp16 (for classifier-free guidance)
    COMPLETE                 JSON counts + summary line; written last, after every check passed

Every file is written to a temporary name and moved into place (``os.replace``), so a crash leaves whole
files only; a folder without ``COMPLETE`` is resumed shard by shard.

Reading (:meth:`LatentCache.open`) is lazy: a shard's rows sit at fixed offsets after its safetensors header, so a
batch is read with one ``preadv`` per row straight into the batch's tensors. The process holds no latents beyond the
batch in hand (the OS page cache does the caching, outside the process), so memory does not grow with the number of
pairs; :meth:`LatentCache.load` still reads a whole cache into RAM (small caches, tests).

The encoders follow this duck-typed interface (``cm_lightning.models.encoders.FrozenEncoders``)::

    scaling_factor: float; vae_scale: int; device: torch.device
    encode_images(pixels [B,3,H,W] in [-1,1]) -> (mean, std) [B,4,H/s,W/s], already scaled
    encode_prompts(prompts: list[str]) -> [B,77,D]
    identity() -> dict   # JSON-able; identifies the weights
    compile_image_encoder()   # only when the cache's compile_image_encoder is set
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cm_lightning.data.preprocess import bytes_to_unit_range, image_to_bytes
from cm_lightning.data.sources import BadSample, CaptionedImageSource
from cm_lightning.errors import UserError, check_switch

log = logging.getLogger(__name__)

# Bump when the on-disk layout or what is stored changes: old folders are then simply not found.
# 2: shards in safetensors (fixed row offsets, read lazily) instead of torch.save pickles.
CACHE_FORMAT_VERSION = 2
SHARD_SUFFIX = ".safetensors"


@dataclass
class CachedLatents:
    """A whole cache in RAM. N pairs; latents at h = w = resolution // vae_scale.

    ``latent_mean``/``latent_std`` are the VAE posterior (already multiplied by the scaling factor), so a
    training step draws ``mean + std * N(0, 1)``: a fresh latent each epoch, as SD itself was trained.
    """

    latent_mean: torch.Tensor  # [N, 4, h, w] float16
    latent_std: torch.Tensor  # [N, 4, h, w] float16
    text_embeds: torch.Tensor  # [N, 77, D] float16
    null_text_embed: torch.Tensor  # [77, D] float16, the embedding of the empty prompt
    captions: list[str]
    keys: list[str]  # the source's key of each pair
    indices: torch.Tensor  # [N] long: the source index of each pair (bad items leave gaps)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Encoded:
    """What the image DataLoader yields for one batch: the good items stacked, the bad ones listed."""

    indices: list[int]
    pixels: torch.Tensor  # [b, 3, R, R] uint8 (made [-1, 1] floats on the encoders' device)
    captions: list[str]
    keys: list[str]
    bad: list[tuple[str, str]]  # (key, reason)

    def pin_memory(self) -> "_Encoded":  # the DataLoader's pin_memory=True calls this: async copies to the GPU
        return replace(self, pixels=self.pixels.pin_memory()) if self.pixels.numel() else self


class _SourceImages(Dataset):
    """Decodes and preprocesses source items; a failing item becomes a (key, reason) marker, so that a
    worker never dies with a stack trace and the builder can count, skip and name it."""

    def __init__(self, source: CaptionedImageSource, resolution: int):
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple:
        key = f"{self.source.name}[{index}]"  # until the source tells us its key
        try:
            item = self.source[index]
            key = item.key
            return ("ok", index, image_to_bytes(item.image, self.resolution), item.caption, key)
        except BadSample as bad:
            return ("bad", index, bad.key, bad.reason)
        except Exception as error:  # noqa: BLE001 - any failure of one item is that item's problem
            log.debug("cache: %s unreadable: %r", key, error)
            return ("bad", index, key, "unreadable")


@contextmanager
def _cudnn_autotuner_off():
    """cuDNN's autotuner off inside (the cache build, whether `prepare` or `train` runs it), as it was after: on an
    H200 it found the VAE encoder no faster kernel and cost the first batch seconds (benchmarks/speed.md, call 13:
    133.0 images/s without it, 120.5 with it, one after the other on one GPU)."""
    autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = autotune


def _to_host_float16(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event | None]:
    """float16 copies on the host. From a GPU they are queued (cast on the device, then into pinned memory) and the
    returned event says when they have landed; read them only after ``event.synchronize()``."""
    if tensors[0].device.type != "cuda":
        return tuple(t.to("cpu", torch.float16) for t in tensors), None
    host = tuple(t.to(torch.float16).to("cpu", non_blocking=True) for t in tensors)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _collate(items: list[tuple]) -> _Encoded:
    good = [it for it in items if it[0] == "ok"]
    pixels = torch.stack([it[2] for it in good]) if good else torch.empty(0)
    return _Encoded([it[1] for it in good], pixels, [it[3] for it in good], [it[4] for it in good],
                    [(it[2], it[3]) for it in items if it[0] == "bad"])


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then move into place: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def key_hash(key: dict) -> str:
    """The folder suffix of a cache key: the first 12 hex digits of sha256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def summary_line(encoded: int, total: int, skipped: Counter, examples: list[str]) -> str:
    """E.g. "cache: 4,987 of 5,000 pairs encoded; skipped 13 (truncated image: 9, missing file: 4),
    e.g. images/000123.jpg"."""
    line = f"cache: {encoded:,} of {total:,} pairs encoded; skipped {sum(skipped.values()):,}"
    if skipped:
        line += " (" + ", ".join(f"{reason}: {n:,}" for reason, n in skipped.most_common()) + ")"
    if examples:
        line += ", e.g. " + ", ".join(examples[:3])
    return line


# Measured on an H200 at 512 px, batch 64 (benchmarks/speed.md, call 16): the compiled VAE encode runs at 220
# images/s against 174 eager, after a first batch 12 s longer on a cold Inductor cache (3 s warm): it pays from
# about 10,000 images cold, so "auto" compiles from twice that (counted in 512 px images: the encode's cost is
# proportional to the pixels, the compile's is not).
AUTO_COMPILE_ENCODER_MIN_IMAGES = 20_000


def compiles_image_encoder(setting: bool | str, device: torch.device, images: int, resolution: int = 512) -> bool:
    """Whether a build of ``images`` at ``resolution`` compiles the VAE encode: ``setting`` true or false, or "auto"
    (on a GPU, for builds of at least ``AUTO_COMPILE_ENCODER_MIN_IMAGES`` images' worth of 512 px pixels)."""
    if setting == "auto":
        pixels_in_512px_images = images * (resolution / 512) ** 2
        return torch.device(device).type == "cuda" and pixels_in_512px_images >= AUTO_COMPILE_ENCODER_MIN_IMAGES
    return bool(setting)


class LatentCache:
    """VAE posteriors and text embeddings of one source at one resolution under ``root``.

    ``encoders`` may be None to open an existing cache without loading the encoders: the folder is then
    the unique complete cache of this source, resolution and format under ``root`` (any encoders).
    """

    def __init__(self, source: CaptionedImageSource, *, root: str | os.PathLike, resolution: int,
                 encoders: Any | None = None, encode_batch_size: int = 32, num_workers: int = 0,
                 max_bad_fraction: float = 0.05, progress: bool = True, shard_size: int = 512,
                 compile_image_encoder: bool | str = "auto"):
        if resolution <= 0:
            raise UserError(f"cache resolution={resolution} must be positive")
        if encode_batch_size <= 0 or shard_size <= 0:
            raise UserError(f"cache encode_batch_size={encode_batch_size} and shard_size={shard_size} "
                            "must be positive")
        check_switch(compile_image_encoder, "cache compile_image_encoder")
        if not 0 <= max_bad_fraction <= 1:
            raise UserError(f"cache max_bad_fraction={max_bad_fraction} must be between 0 and 1")
        self.source, self.root, self.resolution = source, Path(root), resolution
        self.encoders = encoders
        self.encode_batch_size, self.num_workers = encode_batch_size, num_workers
        self.max_bad_fraction, self.progress, self.shard_size = max_bad_fraction, progress, shard_size
        self.compile_image_encoder = compile_image_encoder
        self._key: dict | None = None

    # ---- where the cache lives -------------------------------------------------------------------

    def _partial_key(self) -> dict:
        return {"format": CACHE_FORMAT_VERSION, "source": self.source.fingerprint(),
                "resolution": self.resolution}

    @property
    def key(self) -> dict:
        """{format, source fingerprint, encoders identity, resolution}. Raises UserError when no
        encoders are attached and no unique complete cache matches the rest of the key."""
        if self._key is None:
            if self.encoders is not None:
                self._key = {**self._partial_key(), "encoders": self.encoders.identity()}
            else:
                self._key = self._find_complete_key()
        return self._key

    @property
    def path(self) -> Path:
        return self.root / f"{self.source.name}-{key_hash(self.key)}"

    def _find_complete_key(self) -> dict:
        partial = json.loads(json.dumps(self._partial_key()))  # as stored: tuples become lists
        found = []
        for key_file in sorted(self.root.glob(f"{self.source.name}-*/key.json")):
            key = _read_json(key_file)
            if (isinstance(key, dict) and (key_file.parent / "COMPLETE").exists()
                    and {k: v for k, v in key.items() if k != "encoders"} == partial):
                found.append((key_file.parent, key))
        if len(found) == 1:
            return found[0][1]
        if not found:
            raise UserError(f"cache: no complete latent cache for source {self.source.name!r} at resolution "
                            f"{self.resolution} under {self.root}, and no encoders to build one: attach "
                            "the encoders (e.g. run prepare.py) first")
        raise UserError(f"cache: {len(found)} complete caches match source {self.source.name!r} at "
                        f"resolution {self.resolution} under {self.root} (different encoders: "
                        f"{', '.join(p.name for p, _ in found)}); attach the encoders to choose one")

    def is_complete(self) -> bool:
        """True if the folder holds a finished cache for exactly this key."""
        try:
            path = self.path
        except UserError:
            return False
        if not (path / "COMPLETE").exists():
            return False
        stored = _read_json(path / "key.json")
        if stored != json.loads(json.dumps(self.key)):  # compare as JSON (tuples become lists)
            raise UserError(f"cache: {path}/key.json does not match the expected key (hash collision or an "
                            "edited folder); delete the folder to rebuild it")
        return True

    # ---- building --------------------------------------------------------------------------------

    def _shard_ranges(self) -> list[tuple[int, int]]:
        n = len(self.source)
        return [(start, min(start + self.shard_size, n)) for start in range(0, n, self.shard_size)]

    def _shard_done(self, shard: int, start: int, stop: int) -> dict | None:
        """The shard's metadata if it was finished under this key (resume), else None."""
        meta = _read_json(self.path / f"shard-{shard:05d}.json")
        if (isinstance(meta, dict) and meta.get("key_hash") == key_hash(self.key)
                and meta.get("start") == start and meta.get("stop") == stop
                and (self.path / f"shard-{shard:05d}{SHARD_SUFFIX}").exists()):
            return meta
        return None

    def build(self) -> str:
        """Build the cache if it is not complete; return (and log) the one-line summary.

        A complete cache is reused without calling the encoders. Raises UserError when no encoders are
        attached and building is needed, or when more than ``max_bad_fraction`` of the pairs are unusable
        (then no COMPLETE marker is written; finished shards are kept for the next attempt).
        """
        if self.is_complete():
            summary = _read_json(self.path / "COMPLETE")["summary"]
            log.info("cache: reusing %s (%s)", self.path, summary)
            return summary
        if self.encoders is None:
            raise UserError(f"cache: the latent cache for source {self.source.name!r} at resolution "
                            f"{self.resolution} is missing or unfinished under {self.root}, and no encoders "
                            "are attached to build it: attach them (datamodule.attach_encoders) first")
        skipped_by_source = self.source.skipped
        total = len(self.source) + skipped_by_source.total
        if total == 0:
            raise UserError(f"cache: source {self.source.name!r} is empty ({self.source.fingerprint()})")
        # The source's own drops are known before decoding anything: fail before hours of encoding.
        self._check_bad_fraction(skipped_by_source.total, total, self._source_examples())

        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.path / "key.json", self.key)
        ranges = self._shard_ranges()
        metas: dict[int, dict] = {}
        todo = []
        for shard, (start, stop) in enumerate(ranges):
            meta = self._shard_done(shard, start, stop)
            if meta is None:
                todo.append(shard)
            else:
                metas[shard] = meta
        if metas:
            log.info("cache: resuming %s: %d of %d shards already built", self.path, len(metas), len(ranges))
        if todo:
            metas.update(self._encode_shards(todo, ranges))
        if not (self.path / "null_text_embed.pt").exists():
            with torch.no_grad():
                null = self.encoders.encode_prompts([""])[0].to("cpu", torch.float16).contiguous()
            _write_atomic(self.path / "null_text_embed.pt", lambda tmp: torch.save(null, tmp))

        bad_reasons = Counter(skipped_by_source.counts)
        bad_keys = self._source_examples()
        for shard in range(len(ranges)):
            for key, reason in metas[shard]["bad"]:
                bad_reasons[reason] += 1
                bad_keys.append(key)
        encoded = sum(len(metas[s]["keys"]) for s in range(len(ranges)))
        summary = summary_line(encoded, total, bad_reasons, bad_keys)
        log.info(summary)
        self._check_bad_fraction(sum(bad_reasons.values()), total, bad_keys, summary)
        if encoded == 0:
            raise UserError(f"cache: no usable pairs in source {self.source.name!r} ({summary})")
        _write_json(self.path / "COMPLETE", {"encoded": encoded, "total": total, "shards": len(ranges),
                                             "skipped": dict(bad_reasons), "summary": summary})
        return summary

    def _source_examples(self) -> list[str]:
        return [key for keys in self.source.skipped.examples.values() for key in keys]

    def _check_bad_fraction(self, bad: int, total: int, keys: list[str], summary: str = "") -> None:
        if bad / total > self.max_bad_fraction:
            raise UserError(f"cache: {bad:,} of {total:,} pairs of source {self.source.name!r} are unusable "
                            f"({bad / total:.1%} > max_bad_fraction={self.max_bad_fraction}), e.g. "
                            f"{', '.join(keys[:5])}; fix or remove them, or raise max_bad_fraction"
                            + (f" [{summary}]" if summary else ""))

    def _encode_shards(self, todo: list[int], ranges: list[tuple[int, int]]) -> dict[int, dict]:
        """Decode in a DataLoader, encode in batches, write each shard as soon as its last batch is done."""
        # Batches never straddle a shard, so a shard is finished exactly when its last batch arrives.
        batches, last_batch_of = [], {}
        for shard in todo:
            start, stop = ranges[shard]
            batches += [list(range(i, min(i + self.encode_batch_size, stop)))
                        for i in range(start, stop, self.encode_batch_size)]
            last_batch_of[len(batches) - 1] = shard
        loader = DataLoader(_SourceImages(self.source, self.resolution), batch_sampler=batches,
                            num_workers=self.num_workers, collate_fn=_collate,
                            pin_memory=self.encoders.device.type == "cuda")
        h = self.resolution // self.encoders.vae_scale
        images = sum(len(b) for b in batches)
        if compiles_image_encoder(self.compile_image_encoder, self.encoders.device, images, self.resolution):
            # its posteriors equal the eager encode's within bf16 rounding (a GPU test): the cache key stays the same
            log.info("cache: compiling the VAE encoder at the first batch (seconds to a minute on a cold cache)")
            self.encoders.compile_image_encoder()
        metas, parts = {}, []
        bar = tqdm(total=images, desc=f"encoding {self.source.name}", unit="img",
                   disable=not self.progress)
        # where the build's time goes: decoding images (workers) or encoding (the device)
        waited = encoding = first_batch = 0.0
        batches_in = iter(loader)
        pending = None  # the previous batch: its results still on their way to the host

        def finish(b: int, batch: _Encoded, results: tuple | None, copied: torch.cuda.Event | None) -> None:
            nonlocal encoding, parts
            started = time.perf_counter()
            if copied is not None:
                copied.synchronize()  # its copies to the host are done (later batches may still be running)
            encoding += time.perf_counter() - started
            parts.append((batch, *results) if results is not None else (batch, None, None, None))
            bar.update(len(batch.indices) + len(batch.bad))
            if b in last_batch_of:
                shard = last_batch_of[b]
                metas[shard] = self._write_shard(shard, ranges[shard], parts)
                parts = []

        with torch.no_grad(), bar, _cudnn_autotuner_off():
            for b in range(len(batches)):
                results, copied = None, None
                try:
                    started = time.perf_counter()
                    batch = next(batches_in)
                    waited += time.perf_counter() - started
                    started = time.perf_counter()
                    if batch.indices:
                        text = self.encoders.encode_prompts(batch.captions)  # first: its tokenizer runs on the host
                        pixels = bytes_to_unit_range(batch.pixels.to(self.encoders.device, non_blocking=True))
                        mean, std = self.encoders.encode_images(pixels)
                        if mean.shape[1:] != (4, h, h) or std.shape != mean.shape or text.shape[0] != len(mean):
                            raise RuntimeError(
                                f"encoders returned latents {tuple(mean.shape)}/{tuple(std.shape)} and text "
                                f"{tuple(text.shape)} for {len(batch.indices)} images at resolution "
                                f"{self.resolution}; expected [b,4,{h},{h}] and [b,77,D]")
                        results, copied = _to_host_float16(mean, std, text)
                except BaseException:
                    if pending is not None:  # keep what was encoded: its shard is written if this batch was its last
                        finish(*pending)
                    raise
                encoding += time.perf_counter() - started
                if b == 0:  # the workers' start-up and, with compile_image_encoder, the compile are in it
                    first_batch = waited + encoding
                # The previous batch is finished (and its shard written) while the device encodes this one:
                # the host's work between batches no longer leaves the GPU idle.
                if pending is not None:
                    finish(*pending)
                pending = (b, batch, results, copied)
            if pending is not None:
                finish(*pending)
        bound = "decoding images: more data.datamodule.num_workers" if waited > encoding else "the encoders"
        log.info("cache: %.1f s waiting for decoded images, %.1f s encoding (bound by %s); the first batch %.1f s",
                 waited, encoding, bound, first_batch)
        return metas

    def _write_shard(self, shard: int, span: tuple[int, int], parts: list) -> dict:
        good = [p for p in parts if p[1] is not None]
        tensors = {name: torch.cat([p[k] for p in good]).contiguous() if good else torch.empty(0, dtype=torch.float16)
                   for k, name in ((1, "latent_mean"), (2, "latent_std"), (3, "text_embeds"))}
        meta = {"key_hash": key_hash(self.key), "start": span[0], "stop": span[1],
                "indices": [i for p in parts for i in p[0].indices],
                "keys": [k for p in parts for k in p[0].keys],
                "captions": [c for p in parts for c in p[0].captions],
                "bad": [list(kr) for p in parts for kr in p[0].bad]}
        # Tensors first, then the metadata that declares the shard finished.
        _write_atomic(self.path / f"shard-{shard:05d}{SHARD_SUFFIX}", lambda tmp: save_file(tensors, str(tmp)))
        _write_json(self.path / f"shard-{shard:05d}.json", meta)
        return meta

    # ---- reading ---------------------------------------------------------------------------------

    def open(self) -> "CacheReader":
        """The complete cache, read lazily (see the module notes): checks every shard's header, size and row
        count against its metadata first, so a damaged or half-written cache is refused here, not mid-run."""
        if not self.is_complete():
            raise UserError(f"cache: {self.path} is not complete; build it first (LatentCache.build or "
                            "the datamodule's prepare_data)")
        complete = _read_json(self.path / "COMPLETE")
        shards = []
        for shard in range(complete["shards"]):
            meta = _read_json(self.path / f"shard-{shard:05d}.json")
            index = _ShardIndex.read(self.path / f"shard-{shard:05d}{SHARD_SUFFIX}", self.path)
            if meta is None or len(meta["keys"]) != index.rows:
                raise UserError(f"cache: {self.path}/shard-{shard:05d} is damaged; delete {self.path} to "
                                "rebuild it")
            if index.rows:
                shards.append(index)
        null = torch.load(self.path / "null_text_embed.pt", map_location="cpu", weights_only=True)
        return CacheReader(self.path, shards, null, complete["shards"])

    def load(self) -> CachedLatents:
        """Read the complete cache into RAM (one file read per shard); :meth:`open` reads it lazily instead."""
        reader = self.open()
        everything = torch.arange(len(reader))
        return CachedLatents(latent_mean=reader.latent_mean[everything], latent_std=reader.latent_std[everything],
                             text_embeds=reader.text_embeds[everything], null_text_embed=reader.null_text_embed,
                             captions=reader.captions, keys=reader.keys, indices=reader.indices)


TENSORS = ("latent_mean", "latent_std", "text_embeds")
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass
class _ShardIndex:
    """Where each tensor's rows are in one shard file: absolute byte offset of row 0, bytes per row, row shape."""

    file: str  # relative to the cache folder
    rows: int
    offsets: dict[str, int]
    row_bytes: dict[str, int]
    row_shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def read(cls, path: Path, folder: Path) -> "_ShardIndex":
        """Parse the safetensors header (8-byte length, JSON) and check the file holds every byte it declares."""
        def damaged(why: str) -> UserError:
            return UserError(f"cache: {path} is damaged ({why}); delete {folder} to rebuild it")

        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= size - 8:
                    raise damaged("bad header length")
                header = json.loads(f.read(length))
        except (OSError, ValueError) as error:
            raise damaged(str(error)) from None
        base, rows = 8 + length, None
        offsets, row_bytes, row_shapes, dtypes = {}, {}, {}, {}
        for name in TENSORS:
            entry = header.get(name)
            if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
                raise damaged(f"no {name}")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            n = shape[0] if len(shape) > 1 else 0  # an empty shard stores shape [0]
            if base + end > size:
                raise damaged(f"{name} ends past the end of the file (truncated)")
            if rows is not None and n != rows:
                raise damaged(f"{name} has {n} rows, not {rows}")
            rows = n
            offsets[name], row_shapes[name], dtypes[name] = base + begin, shape[1:], _DTYPES[entry["dtype"]]
            row_bytes[name] = (end - begin) // n if n else 0
        return cls(path.name, rows or 0, offsets, row_bytes, row_shapes, dtypes)


class _Column:
    """``reader.latent_mean[index]``: rows of one tensor, read from the shards on demand (int, slice or 1-D index)."""

    def __init__(self, reader: "CacheReader", name: str):
        self.reader, self.name = reader, name

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.reader), *self.reader.row_shape(self.name))

    @property
    def dtype(self) -> torch.dtype:
        return self.reader.dtype(self.name)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.reader.read(self.name, torch.tensor([index]))[0]
        if isinstance(index, slice):
            index = torch.arange(len(self.reader))[index]
        return self.reader.read(self.name, torch.as_tensor(index, dtype=torch.long).reshape(-1))


class CacheReader:
    """A complete latent cache opened for reading, without loading it: ``latent_mean``, ``latent_std`` and
    ``text_embeds`` are :class:`_Column` s whose rows are read from the shard files when indexed. What it holds is
    the shard table (a few numbers per shard) and the null text embedding; captions, keys and source indices are
    read from the shards' metadata on first use. Safe to send to DataLoader workers (files are opened per read)."""

    def __init__(self, folder: Path, shards: list[_ShardIndex], null_text_embed: torch.Tensor, shard_count: int):
        self.folder, self.shards, self.null_text_embed = str(folder), shards, null_text_embed  # shards: non-empty
        self._metas = [f"shard-{s:05d}.json" for s in range(shard_count)]
        counts = [s.rows for s in shards]
        self._starts = torch.tensor([0] + counts, dtype=torch.long).cumsum(0)  # [S+1]
        self.latent_mean, self.latent_std, self.text_embeds = (_Column(self, name) for name in TENSORS)
        self._info: dict[str, list] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row_shape(self, name: str) -> tuple[int, ...]:
        return self.shards[0].row_shapes[name] if self.shards else ()

    def dtype(self, name: str) -> torch.dtype:
        return self.shards[0].dtypes[name] if self.shards else torch.float16

    def read(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (1-D long, any order, repeats allowed) of tensor ``name``, as one new tensor."""
        return self.read_rows(index, (name,))[name]

    def read_rows(self, index: torch.Tensor, names: tuple[str, ...] = TENSORS) -> dict[str, torch.Tensor]:
        """Rows ``index`` of each tensor in ``names`` ({name: [len(index), ...] fp16}), one ``preadv`` per row and
        tensor straight into the result, each shard's file opened once per process (a small LRU of descriptors)."""
        n = len(self)
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(index) and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"cache index out of range for {n} pairs")
        index = torch.where(index < 0, index + n, index)
        out = {name: torch.empty((len(index), *self.row_shape(name)), dtype=self.dtype(name)) for name in names}
        if not len(index):
            return out
        rows = {name: t.view(torch.uint8).reshape(len(index), -1).numpy() for name, t in out.items()}  # writable bytes
        shard_of = (torch.searchsorted(self._starts, index, right=True) - 1).tolist()
        local = (index - self._starts[shard_of]).tolist()
        for j, (shard, row) in enumerate(zip(shard_of, local)):
            info = self.shards[shard]
            fd = self._fd(shard)
            for name in names:
                step = info.row_bytes[name]
                if _preadv(fd, rows[name][j], info.offsets[name] + row * step) != step:
                    raise UserError(f"cache: {self.folder}/{info.file} was truncated while in use; delete "
                                    f"{self.folder} to rebuild it")
        return out

    _MAX_OPEN = 64

    def _fd(self, shard: int) -> int:
        """An open descriptor of the shard's file, for this process (a DataLoader worker opens its own)."""
        fds = self.__dict__.get("_fds")
        if fds is None or self.__dict__.get("_fds_pid") != os.getpid():
            fds, self._fds_pid = {}, os.getpid()
            self._fds = fds
        fd = fds.pop(shard, None)
        if fd is None:
            if len(fds) >= self._MAX_OPEN:  # the least recently used one (dicts keep insertion order)
                os.close(fds.pop(next(iter(fds))))
            fd = os.open(os.path.join(self.folder, self.shards[shard].file), os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # rows are read in random order: the kernel's readahead (MiBs) is waste
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        fds[shard] = fd  # most recently used last
        return fd

    def close(self) -> None:
        """Close the open shard files (also done when the reader is garbage-collected)."""
        if self.__dict__.get("_fds_pid") == os.getpid():
            for fd in self.__dict__.get("_fds", {}).values():
                os.close(fd)
        self.__dict__["_fds"] = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _read_info(self) -> dict[str, list]:
        if self._info is None:
            info: dict[str, list] = {"captions": [], "keys": [], "indices": []}
            for name in self._metas:
                meta = _read_json(Path(self.folder, name))
                for field in info:
                    info[field] += meta[field]
            self._info = info
        return self._info

    @property
    def captions(self) -> list[str]:
        return self._read_info()["captions"]

    @property
    def keys(self) -> list[str]:
        return self._read_info()["keys"]

    @property
    def indices(self) -> torch.Tensor:
        return torch.tensor(self._read_info()["indices"], dtype=torch.long)

    def __getstate__(self) -> dict:  # to DataLoader workers: no metadata lists, no open files (each opens its own)
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_fds_pid")} | {"_info": None}


def _preadv(fd: int, buffer, offset: int) -> int:
    """Read len(buffer) bytes at offset straight into buffer (os.pread and a copy where preadv is missing)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    data = os.pread(fd, len(buffer), offset)
    buffer[: len(data)] = memoryview(data)
    return len(data)
