"""LightningDataModule over the latent cache: batches of sampled VAE latents and text embeddings."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from cm_lightning import rng
from cm_lightning.data.cache import CachedLatents, CacheReader, LatentCache
from cm_lightning.data.sources import CaptionedImageSource
from cm_lightning.errors import UserError, check_switch


class SeededIndex(int):
    """A dataset index that carries the seed of its latent noise (set by :class:`ResumableSampler`)."""

    noise_seed: int

    def __new__(cls, index: int, noise_seed: int) -> "SeededIndex":
        value = super().__new__(cls, index)
        value.noise_seed = noise_seed
        return value

    def __reduce__(self):  # to worker processes and back
        return SeededIndex, (int(self), self.noise_seed)


class ResumableSampler(Sampler[int]):
    """A seeded shuffle per epoch, sharded over ranks, that can start mid-epoch (exact resume).

    Epoch e's order is ``randperm(n)`` seeded by (seed, e). Global batch g = ``batch_size * world_size``: rank r
    takes slice r of each global batch, so R ranks at batch b see exactly the samples of 1 rank at batch R b, and
    each sample's latent noise is seeded by (seed, epoch, its position in the global order), so it is the same
    whatever the rank count, the worker count, or a resume. The order is padded (by wrapping) to a multiple of
    ``world_size``, as DistributedSampler does. ``set_epoch`` is called by Lightning at every epoch start; an
    iteration run to its end also moves to the next epoch (plain loops reshuffle too).
    """

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """The next iteration starts after ``count`` of this rank's batches (once)."""
        self.skip = count

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def __iter__(self):
        epoch, start, self.skip = self.epoch, self.skip * self.batch_size, 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        positions = torch.arange(len(order) + (-len(order)) % self.world_size)
        order = order[positions % len(order)]
        global_batch = self.batch_size * self.world_size
        mine = []
        for first in range(0, len(order), global_batch):
            share = min(global_batch, len(order) - first) // self.world_size
            mine.extend(range(first + self.rank * share, first + (self.rank + 1) * share))
        base = (self.seed * 1_000_003 + epoch) * 1_000_000_007
        for position in mine[start:]:
            yield SeededIndex(int(order[position]), (base + position) % 2**63)
        self.epoch = epoch + 1


class SampledLatents(Dataset):
    """Index -> a fresh latent sample ``mean + std * N(0, 1)`` and its text embedding, from the cache (read lazily
    from its files by a :class:`CacheReader`, or from RAM for a loaded :class:`CachedLatents`).

    Implements ``__getitems__`` so the DataLoader fetches a whole batch with one read per tensor and row. Indices from :class:`ResumableSampler` carry their noise seed (the noise then depends
    on nothing else: not the global RNG, the workers or a resume); plain indices draw from the global torch RNG.
    """

    def __init__(self, data: CachedLatents | CacheReader):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        if isinstance(self.data, CacheReader):  # one pass over the shard files for all three tensors
            rows = self.data.read_rows(index)
        else:
            rows = {name: getattr(self.data, name)[index] for name in ("latent_mean", "latent_std", "text_embeds")}
        mean, std = rows["latent_mean"].float(), rows["latent_std"].float()
        if all(isinstance(i, SeededIndex) for i in indices):
            noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(i.noise_seed))
                                 for i in indices])
        else:
            noise = torch.randn_like(mean)
        return {"latents": mean + std * noise,
                "text_embeds": rows["text_embeds"].float(),
                "index": index}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def _batch_as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collate for ``__getitems__``: the dataset already returns the stacked batch."""
    return batch


class LatentDataModule(LightningDataModule):
    """Training batches from the latent cache of ``source``, built on first use with the attached encoders.

    Batches: ``latents`` [B,4,h,w] float32 (drawn afresh each time), ``text_embeds`` [B,77,D] float32,
    ``index`` [B] long (position in the cache; ``cache_data.indices[index]`` is the source index).
    """

    def __init__(self, source: CaptionedImageSource, *, cache_root: str, resolution: int, batch_size: int = 8,
                 num_workers: int = 0, encode_batch_size: int = 32, max_bad_fraction: float = 0.05,
                 progress: bool = True, seed: int = 0, compile_image_encoder: bool | str = "auto"):
        super().__init__()
        if batch_size <= 0:
            raise UserError(f"data batch_size={batch_size} must be positive")
        if num_workers < 0:
            raise UserError(f"data num_workers={num_workers} must be >= 0")
        check_switch(compile_image_encoder, "data.datamodule.compile_image_encoder")  # before any weights
        self.source, self.cache_root, self.resolution = source, os.fspath(cache_root), resolution
        self.batch_size, self.num_workers, self.encode_batch_size = batch_size, num_workers, encode_batch_size
        self.max_bad_fraction, self.progress, self.seed = max_bad_fraction, progress, seed
        self.compile_image_encoder = compile_image_encoder
        self.encoders: Any | None = None
        self._cache: LatentCache | None = None
        self.cache_data: CacheReader | None = None
        self.sampler: ResumableSampler | None = None  # the training loader's (resume skips batches through it)

    def attach_encoders(self, encoders: Any) -> None:
        """Give the datamodule the frozen encoders (needed only to build a missing cache)."""
        self.encoders = encoders
        self._cache = None  # the key depends on the encoders' identity

    @property
    def cache(self) -> LatentCache:
        if self._cache is None:
            self._cache = LatentCache(self.source, root=self.cache_root, resolution=self.resolution,
                                      encoders=self.encoders, encode_batch_size=self.encode_batch_size,
                                      num_workers=self.num_workers, max_bad_fraction=self.max_bad_fraction,
                                      progress=self.progress, compile_image_encoder=self.compile_image_encoder)
        return self._cache

    def prepare_data(self) -> None:
        """Build the cache if needed (Lightning calls this on one process per node). The build draws random
        numbers (its image loader): it must not move the training's generators, or a cache built inside a run
        would change that run's weights."""
        with rng.preserved():
            self.cache.build()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache for lazy reading (building it first when prepare_data was not called)."""
        if self.cache_data is None:
            if not self.cache.is_complete():
                with rng.preserved():
                    self.cache.build()
            self.cache_data = self.cache.open()

    @property
    def null_text_embed(self) -> torch.Tensor | None:
        """Embedding of the empty prompt, [77, D] float32 (for classifier-free guidance); None before
        setup() (so ``getattr(dm, "null_text_embed", None)`` probes work)."""
        return None if self.cache_data is None else self.cache_data.null_text_embed.float()

    def train_dataloader(self) -> DataLoader:
        if self.cache_data is None:
            raise RuntimeError("LatentDataModule.train_dataloader() called before setup()")
        trainer = self.trainer
        self.sampler = ResumableSampler(len(self.cache_data), self.batch_size, seed=self.seed,
                                        rank=trainer.global_rank if trainer else 0,
                                        world_size=trainer.world_size if trainer else 1)
        return DataLoader(SampledLatents(self.cache_data), batch_size=self.batch_size, sampler=self.sampler,
                          generator=torch.Generator().manual_seed(self.seed), drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=_batch_as_is, pin_memory=torch.cuda.is_available())
