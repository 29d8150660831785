"""A seeded, resumable stream of training batches.

The order of epoch e is a permutation seeded by (seed, e) alone, and each sample's augmentation is seeded by
(seed, e, index) (see `act.data.UnlabeledImages`), so the whole stream is a pure function of the seed and the
position in it: the number of batches the training loop has taken. That position is stored in last.pt; a resumed
run continues the stream exactly where the interrupted one stopped, whatever the number of loader workers, and
reaches the bit-identical final state on CPU.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The sample order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1 without shuffle."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(n, generator=g).tolist()


class ResumableBatchSampler(Sampler):
    """Endless batches of (index, epoch) pairs, starting at batch number `start` of the stream."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 start: int = 0):
        if n <= 0:
            raise ValueError("empty dataset")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.drop_last = drop_last and n >= batch_size
        self.start = start

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        k = self.start
        cached: Tuple[int, Optional[List[int]]] = (-1, None)
        while True:
            epoch, j = divmod(k, self.batches_per_epoch)
            if cached[0] != epoch:
                cached = (epoch, epoch_order(self.n, self.seed, epoch, self.shuffle))
            order = cached[1]
            yield [(i, epoch) for i in order[j * self.batch_size:(j + 1) * self.batch_size]]
            k += 1


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: workers keep serving while the main process finishes its step and
    # saves; the main process shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ResumableLoader:
    """Endless loader over `dataset` whose position (batches handed out) is saved and restored with the run.

    Iterating it yields the collated batches from the current position on; `state_dict()` / `load_state_dict()`
    carry the position (and what it depends on, so a resume over a different dataset is caught).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, workers: int = 0, collate_fn: Optional[Callable] = None,
                 pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.workers = workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return self._sampler(0).batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def _sampler(self, start: int) -> ResumableBatchSampler:
        return ResumableBatchSampler(len(self.dataset), self.batch_size, self.seed, self.shuffle, self.drop_last,
                                     start)

    def __iter__(self) -> Iterator[Any]:
        loader = DataLoader(self.dataset, batch_sampler=self._sampler(self.position), num_workers=self.workers,
                            collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                            worker_init_fn=_ignore_sigint if self.workers > 0 else None)
        for batch in loader:
            self.position += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "images": len(self.dataset),
                "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.position = int(state["position"])

    def describe_mismatch(self, state: Dict[str, Any]) -> Optional[str]:
        """Why a saved position does not apply to this loader (a different image pool), or None."""
        mine = self.state_dict()
        diffs = [f"{k} {state.get(k)!r} -> {mine[k]!r}" for k in ("images", "batch_size", "seed", "shuffle")
                 if k in state and state[k] != mine[k]]
        return ", ".join(diffs) or None


def build_train_loader(data_cfg, seed: int = 0, paths=None) -> ResumableLoader:
    """The training stream over the configured unlabeled source (act.config.DataConfig), or over `paths`."""
    from act.data import UnlabeledImages, collate, resolve_source

    paths = resolve_source(data_cfg.train) if paths is None else list(paths)
    if data_cfg.max_images:
        paths = paths[: data_cfg.max_images]
    ds = UnlabeledImages(paths, data_cfg.imgsz, data_cfg.augmentation, cache=data_cfg.cache, seed=seed)
    return ResumableLoader(ds, data_cfg.batch_size, seed=seed, shuffle=True, drop_last=True,
                           workers=data_cfg.workers, collate_fn=collate, pin_memory=torch.cuda.is_available())
