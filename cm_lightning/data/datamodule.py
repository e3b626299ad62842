"""LightningDataModule over the latent cache: batches of sampled VAE latents and text embeddings."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from cm_lightning.data.cache import CachedLatents, LatentCache
from cm_lightning.data.sources import CaptionedImageSource
from cm_lightning.errors import UserError


class SampledLatents(Dataset):
    """Index -> a fresh latent sample ``mean + std * N(0, 1)`` and its text embedding, from RAM.

    Implements ``__getitems__`` so the DataLoader fetches a whole batch with one tensor index (no
    per-item Python work). Noise comes from the global torch RNG, which Lightning seeds per worker, so
    workers do not repeat each other's noise.
    """

    def __init__(self, data: CachedLatents):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        mean = self.data.latent_mean[index].float()
        std = self.data.latent_std[index].float()
        return {"latents": mean + std * torch.randn_like(mean),
                "text_embeds": self.data.text_embeds[index].float(),
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
                 progress: bool = True, seed: int = 0):
        super().__init__()
        if batch_size <= 0:
            raise UserError(f"data batch_size={batch_size} must be positive")
        if num_workers < 0:
            raise UserError(f"data num_workers={num_workers} must be >= 0")
        self.source, self.cache_root, self.resolution = source, os.fspath(cache_root), resolution
        self.batch_size, self.num_workers, self.encode_batch_size = batch_size, num_workers, encode_batch_size
        self.max_bad_fraction, self.progress, self.seed = max_bad_fraction, progress, seed
        self.encoders: Any | None = None
        self._cache: LatentCache | None = None
        self.cache_data: CachedLatents | None = None

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
                                      progress=self.progress)
        return self._cache

    def prepare_data(self) -> None:
        """Build the cache if needed (Lightning calls this on one process per node)."""
        self.cache.build()

    def setup(self, stage: str | None = None) -> None:
        """Load the cache into RAM (building it first when prepare_data was not called)."""
        if self.cache_data is None:
            if not self.cache.is_complete():
                self.cache.build()
            self.cache_data = self.cache.load()

    @property
    def null_text_embed(self) -> torch.Tensor | None:
        """Embedding of the empty prompt, [77, D] float32 (for classifier-free guidance); None before
        setup() (so ``getattr(dm, "null_text_embed", None)`` probes work)."""
        return None if self.cache_data is None else self.cache_data.null_text_embed.float()

    def train_dataloader(self) -> DataLoader:
        if self.cache_data is None:
            raise RuntimeError("LatentDataModule.train_dataloader() called before setup()")
        return DataLoader(SampledLatents(self.cache_data), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=_batch_as_is, pin_memory=torch.cuda.is_available())
