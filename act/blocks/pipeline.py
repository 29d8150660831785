"""The training data pipeline: an endless, rank-sharded sample stream, a decoded-image RAM cache shared by the loader
workers, and the DataLoader knobs (workers, pinned memory, prefetch) that keep the GPU fed.

The stream is one global order of the pool (a fresh seeded permutation per pass, passes concatenated); global batch k
is stream[k*W*B : (k+1)*W*B] for W ranks of batch B, and rank r takes its r-th slice. A position is therefore a count
of samples, independent of the number of ranks: a run resumed on another number of GPUs continues the same stream.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from act.blocks.data import UnlabeledImages, collate, cpu_cores, read_image, resolve_workers  # noqa: F401 (re-exported)
from act.core.errors import ConfigError
from act.core.signals import worker_ignore_stop_signals


class StreamSampler(Sampler):
    """Endless indices of rank `rank`'s slice of the global sample stream, from global sample `start`.

    with_epoch: yield (index, pass) pairs, so that act.blocks.data.UnlabeledImages seeds each sample's augmentation by
    (seed, pass, index) alone: the same in any loader worker, on any rank, and after a resume (bit-identical on CPU).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0,
                 with_epoch: bool = False):
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.start = start
        self.with_epoch = with_epoch

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        gb = self.batch_size * self.world_size
        k = self.start // gb  # first global batch not yet consumed (positions are whole global batches)
        epoch, perm = -1, None
        while True:
            lo = k * gb + self.rank * self.batch_size
            for i in range(lo, lo + self.batch_size):
                e = i // self.n
                if e != epoch:
                    epoch, perm = e, self._perm(e)
                yield (int(perm[i % self.n]), e) if self.with_epoch else int(perm[i % self.n])
            k += 1


def _fit(im: np.ndarray, longest: int) -> np.ndarray:
    h, w = im.shape[:2]
    r = longest / max(h, w)
    if r >= 1:
        return im
    return cv2.resize(im, (max(1, round(w * r)), max(1, round(h * r))), interpolation=cv2.INTER_AREA)


def fill_ram_cache(paths: Sequence[Path], imgsz: int, scale_hi: float, max_gb: float,
                   threads: Optional[int] = None) -> Dict[int, Optional[np.ndarray]]:
    """Decode every image once (threads: OpenCV releases the GIL), downscaled to the largest size training can ask
    for (imgsz x the top of the scale jitter), so the cache loses nothing. Filled before the loader workers fork, so
    they share it copy-on-write instead of each holding its own copy."""
    longest = int(round(imgsz * max(1.0, scale_hi)))

    def load(p):
        im = read_image(Path(p))
        return None if im is None else _fit(im, longest)

    cache: Dict[int, Optional[np.ndarray]] = {}
    total = 0
    limit = max_gb * 2**30
    with ThreadPoolExecutor(threads or max(1, cpu_cores())) as ex:
        for i, im in enumerate(ex.map(load, paths)):
            cache[i] = im
            total += 0 if im is None else im.nbytes
            if total > limit:
                raise ConfigError(f"invalid config:\n  data.cache: the pool needs more than data.cache_max_gb="
                                  f"{max_gb} GiB decoded (after {i + 1} of {len(paths)} images); raise "
                                  f"data.cache_max_gb or set data.cache=false")
    return cache


def build_train_loader(cfg, paths: Sequence[Path], seed: int = 0, rank: int = 0, world_size: int = 1,
                       device_type: str = "cpu", start: int = 0, letterbox_fn=None) -> DataLoader:
    """Endless DataLoader of this rank's batches (uint8 RGB CHW; (images, bad_paths) per batch). letterbox_fn: the
    model family's letterbox (act.blocks.data; default: the default family's)."""
    paths = list(paths)
    if cfg.max_images:
        paths = paths[: cfg.max_images]
    aug = cfg.augmentation
    ds = UnlabeledImages(paths, cfg.imgsz, aug, cache=False, seed=seed, letterbox_fn=letterbox_fn)
    if cfg.cache_ram:
        ds.cache = fill_ram_cache(paths, cfg.imgsz, aug.scale[1] if aug else 1.0, cfg.cache_max_gb)
    workers = resolve_workers(cfg.workers, world_size)
    sampler = StreamSampler(len(ds), cfg.batch_size, rank, world_size, seed, start, with_epoch=True)
    g = torch.Generator()
    g.manual_seed(seed * 7919 + rank * 104729 + start)
    pin = cfg.pin_memory if cfg.pin_memory is not None else device_type == "cuda"
    extra = {"prefetch_factor": cfg.prefetch_factor, "persistent_workers": cfg.persistent_workers,
             "worker_init_fn": worker_ignore_stop_signals} if workers else {}
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=pin and torch.cuda.is_available(), drop_last=False, generator=g, **extra)
    return loader


def close_loader(loader) -> None:
    """Stop a DataLoader's worker processes now (they keep running with persistent_workers until the loader is
    collected). The workers ignore SIGINT/SIGTERM sent to the whole process group (signals.worker_ignore_stop_signals),
    so they must be told to exit through the loader's own shutdown rather than by multiprocessing's exit-time SIGTERM.
    torch has no public call for this: `_shutdown_workers` is what the iterator's own __del__ runs."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    if isinstance(loader, DataLoader):
        loader._iterator = None


def set_position(loader: DataLoader, start: int, seed: int = 0, rank: int = 0) -> None:
    """Move a not-yet-iterated train loader to global sample `start` (resume)."""
    loader.sampler.start = start
    loader.generator.manual_seed(seed * 7919 + rank * 104729 + start)
