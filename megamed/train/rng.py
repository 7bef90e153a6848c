"""Every random draw of training, as a pure function of (seed, step, sample index).

Why not one global generator: a global stream makes sample i's noise depend on how many draws
came before it, so the result changes with the batch split across processes, with the number
of dataloader workers, and after a resume unless every RNG state is restored perfectly.
Keying each sample's generator by (seed, step, global sample index) makes the draws for one
sample the same whatever the batch layout, and a resumed run needs only (seed, step) to
continue bit-exactly.

Data order is a fresh permutation per epoch, keyed by (seed, epoch); the data position is
(epoch, offset into that epoch's permutation), saved in every checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import struct

import torch

# Domain tags keep the different streams independent even when their integers coincide.
_SAMPLE, _EPOCH, _STEP, _INIT = b"sample", b"epoch", b"step", b"init"


def derive_seed(tag: bytes, *ints: int) -> int:
    """A 63-bit seed from a tag and integers (blake2b; stable across Python runs and platforms).

    Python's hash() is salted per process, so it cannot be used for this.
    """
    h = hashlib.blake2b(tag, digest_size=8)
    for v in ints:
        h.update(struct.pack("<q", int(v)))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """CPU generator for one training sample (index = position in the global batch)."""
    return torch.Generator().manual_seed(derive_seed(_SAMPLE, seed, step, index))


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed for the global RNG during one step (model dropout etc.), reset every step so a
    resumed run does not need to restore the global RNG stream. Each rank of a multi-process
    run gets its own stream (rank 0's is the single-process one), so ranks do not draw the
    same dropout masks."""
    return derive_seed(_STEP, seed, step) if rank == 0 else derive_seed(_STEP, seed, step, rank)


def init_seed(seed: int) -> int:
    """Seed for the global RNG while the model's weights are initialised."""
    return derive_seed(_INIT, seed)


def draw_training_noise(seed: int, step: int, indices: range | list[int], shape: tuple[int, ...],
                        drop_prob: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample draws for one step.

    indices: global batch positions of the local samples (e.g. range(rank*B, (rank+1)*B)).
    shape: one sample's image shape (C, H, W).
    Returns z [B] ~ N(0,1) (mapped to sigma by the diffusion config), noise [B, C, H, W] ~ N(0,1),
    drop [B] bool (True -> drop the text condition, for classifier-free guidance). All on CPU;
    draws happen in a fixed order per sample (z, drop, noise) so each is reproducible alone.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    zs, drops, noises = [], [], []
    for i in indices:
        g = sample_generator(seed, step, i)
        zs.append(torch.randn((), generator=g))
        drops.append(torch.rand((), generator=g) < drop_prob)
        noises.append(torch.randn(shape, generator=g))
    return torch.stack(zs), torch.stack(drops), torch.stack(noises)


@functools.lru_cache(maxsize=4)  # batch_at asks for the same epoch once per batch
def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """Order of the n data-set items in `epoch` (LongTensor [n]; do not modify it, it is cached)."""
    if n <= 0:
        raise ValueError(f"n must be positive (data set is empty), got {n}")
    g = torch.Generator().manual_seed(derive_seed(_EPOCH, seed, epoch))
    return torch.randperm(n, generator=g)


def batch_at(seed: int, n: int, batch_size: int, epoch: int, offset: int) -> tuple[list[int], int, int]:
    """Data-set indices of the batch starting at data position (epoch, offset).

    A batch that runs past the end of an epoch continues into the next epoch's permutation,
    so no item is dropped and every batch is full (tiny data sets work).
    Returns (indices, next_epoch, next_offset).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= offset < n:
        raise ValueError(f"offset must be in [0, {n}), got {offset}")
    out: list[int] = []
    while len(out) < batch_size:
        perm = epoch_permutation(seed, epoch, n)
        take = perm[offset:offset + batch_size - len(out)].tolist()
        out += take
        offset += len(take)
        if offset == n:
            epoch, offset = epoch + 1, 0
    return out, epoch, offset


def local_slice(batch_size: int, rank: int, world: int) -> slice:
    """Which positions of a global batch of `batch_size` rank `rank` of `world` takes: the
    contiguous block [rank*b, (rank+1)*b) with b = batch_size / world (must divide)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the world size {world}")
    b = batch_size // world
    return slice(rank * b, (rank + 1) * b)


class BatchPlan:
    """Iterable of data-set index lists from a data position: a DataLoader `batch_sampler`.

    The order is a pure function of (seed, epoch, offset), so DataLoader workers (which only
    load items) cannot change it, and prefetching ahead of a checkpoint is harmless. With
    world > 1 each rank yields only its block of every global batch (local_slice), so the
    ranks together see exactly the single-process batches.
    """

    def __init__(self, seed: int, n: int, batch_size: int, epoch: int, offset: int, num_batches: int,
                 rank: int = 0, world: int = 1):
        self.seed, self.n, self.batch_size = seed, n, batch_size
        self.epoch, self.offset, self.num_batches = epoch, offset, num_batches
        self.part = local_slice(batch_size, rank, world)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        epoch, offset = self.epoch, self.offset
        for _ in range(self.num_batches):
            indices, epoch, offset = batch_at(self.seed, self.n, self.batch_size, epoch, offset)
            yield indices[self.part]
