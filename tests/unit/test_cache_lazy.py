"""The latent cache is read lazily: memory does not grow with the number of pairs, rows read are the rows written,
and a damaged shard is refused when the cache is opened."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from cm_lightning.data.cache import SHARD_SUFFIX, LatentCache
from cm_lightning.data.datamodule import SampledLatents
from cm_lightning.data.synthetic import RandomEncoders, SolidColorPairs
from cm_lightning.errors import UserError

# 4 x 32 x 32 latents (mean and std) and 77 x 64 text embeddings in fp16: 26 KiB per pair
RESOLUTION, VAE_SCALE, TEXT_DIM = 64, 2, 64


def built(root, pairs: int, shard_size: int = 256) -> LatentCache:
    cache = LatentCache(SolidColorPairs(pairs), root=root, resolution=RESOLUTION, shard_size=shard_size,
                        encoders=RandomEncoders(vae_scale=VAE_SCALE, text_dim=TEXT_DIM), encode_batch_size=64,
                        progress=False)
    cache.build()
    return LatentCache(SolidColorPairs(pairs), root=root, resolution=RESOLUTION)  # opened without encoders


def test_lazy_rows_equal_the_whole_load_and_the_reader_holds_no_latents(tmp_path):
    cache = built(tmp_path, 600, shard_size=128)  # 5 shards, the last one partial
    reader, whole = cache.open(), cache.load()
    assert len(reader) == 600 and reader.latent_mean.shape == (600, 4, 32, 32) and whole.latent_mean.shape[0] == 600
    index = torch.tensor([599, 0, 127, 128, 300, 0, -1])
    for name in ("latent_mean", "latent_std", "text_embeds"):
        torch.testing.assert_close(getattr(reader, name)[index], getattr(whole, name)[index], rtol=0, atol=0)
    assert reader.captions[130] == "pair 130" and reader.indices[130] == 130
    with pytest.raises(IndexError):
        reader.latent_mean[torch.tensor([600])]
    # what a DataLoader worker is sent: the shard table, not the 15 MiB of rows
    assert len(pickle.dumps(SampledLatents(reader))) < 100_000
    batch = SampledLatents(reader).__getitems__([5, 6, 7])
    assert batch["latents"].shape == (3, 4, 32, 32) and batch["text_embeds"].shape == (3, 77, TEXT_DIM)


MEASURE = r"""
import sys, torch
from cm_lightning.data.cache import LatentCache
from cm_lightning.data.synthetic import SolidColorPairs

def anon_kib():  # resident anonymous memory: the process's own, not the page cache of the files it reads
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

for root, pairs in zip(sys.argv[1::2], map(int, sys.argv[2::2])):
    before, peak = anon_kib(), 0
    reader = LatentCache(SolidColorPairs(pairs), root=root, resolution=64).open()
    order = torch.randperm(len(reader))

    def batch(index):  # what SampledLatents reads per batch (it imports lightning: seconds of startup)
        return [column[index].float() for column in (reader.latent_mean, reader.latent_std, reader.text_embeds)]

    for start in range(0, len(order), 8):
        batch(order[start:start + 8])
        peak = max(peak, anon_kib())
    print(pairs, peak - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_does_not_grow_with_the_number_of_pairs(tmp_path):
    """Open and read every pair of a 1,600-pair and then a 160-pair cache (41 MiB and 4 MiB of rows) at batch 8:
    the resident memory added is small and the same for both (a whole load would add 41 MiB)."""
    args = []
    for pairs in (1600, 160):
        built(tmp_path / str(pairs), pairs)
        args += [str(tmp_path / str(pairs)), str(pairs)]
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, check=True)
    growth = {int(pairs): int(kib) for pairs, kib in (line.split() for line in done.stdout.splitlines())}
    data_kib = 1600 * (2 * 4 * 32 * 32 + 77 * TEXT_DIM) * 2 // 1024
    assert growth[1600] < data_kib / 10, (growth, data_kib)
    assert growth[1600] < growth[160] + 4096, growth


def test_a_damaged_shard_is_refused_on_open(tmp_path):
    cache = built(tmp_path, 300, shard_size=128)
    shard = cache.path / f"shard-00001{SHARD_SUFFIX}"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])  # truncated
    with pytest.raises(UserError, match="shard-00001.safetensors is damaged .*truncated.*delete"):
        cache.open()
    shard.write_bytes(b"\xff" * 64)  # not a safetensors header
    with pytest.raises(UserError, match="damaged"):
        cache.open()
