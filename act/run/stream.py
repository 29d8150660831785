"""The training image stream: batches from the loader, forever, with the unusable images set aside.

`ImageStream` counts the global position in the sample stream (what resume restores), records every image that
could not be used once ("path<TAB>reason", in `bad_images` and skipped_images.txt) and fails with one clear message
when no image of the pool is usable at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional

import torch

from act.blocks.data import InfiniteLoader
from act.core.errors import DataError
from act.core.fileio import atomic_write_text
from act.blocks.pipeline import close_loader

SKIPPED_FILE = "skipped_images.txt"


def images_of(batch):
    """(images, unusable image records) of a loader batch: act's loaders yield (images, bad), a user's loader may
    yield images or (images, ...) tuples."""
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 and isinstance(batch[1], list) else [])
    return batch, []


class ImageStream:
    def __init__(self, loader: Iterable, out: Path, batch_size: int, global_batch: int, source: str = "",
                 bad_images: Optional[List[str]] = None):
        self.loader = loader
        self.out = Path(out)
        self.batch_size = batch_size
        self.global_batch = global_batch  # images per step over all ranks
        self.source = source  # data.train, for the message when nothing is usable
        self.samples_seen = 0  # global position in the sample stream (rank-independent; resumes on any world size)
        self.bad_images: List[str] = [] if bad_images is None else bad_images  # (the run's own list)
        self._bad_seen = set(self.bad_images)

    @property
    def pool_size(self) -> int:
        return len(getattr(self.loader, "dataset", [])) or 0

    def restore(self, samples_seen: int, bad_images: List[str]) -> None:
        self.samples_seen = int(samples_seen)
        self.bad_images[:] = list(bad_images)
        self._bad_seen = set(self.bad_images)

    def batches(self):
        """Image batches, without end for a DataLoader (a user's iterable ends when it ends)."""
        src = InfiniteLoader(self.loader) if isinstance(self.loader, torch.utils.data.DataLoader) else self.loader
        empty = 0  # batches in a row without a usable image
        n_pool = self.pool_size
        limit = (n_pool // max(1, self.batch_size) + 1) if n_pool else 1000
        while True:
            for batch in src:
                self.samples_seen += self.global_batch
                images, bad = images_of(batch)
                if bad:
                    self.note_skipped(bad)
                if images is None or len(images) == 0:
                    empty += 1
                    if empty > limit:
                        self._inspect_all()
                        raise DataError(f"none of the {n_pool or 'training'} images could be used (data.train: "
                                        f"{self.source}); why each was skipped: {self.out / SKIPPED_FILE}")
                    continue
                empty = 0
                yield images
            if isinstance(src, InfiniteLoader):
                return

    def close(self, batches) -> None:
        """End of training (or an error before it): drop the loader iterator and stop its workers now. They ignore
        the stop signals sent to the process group, so the run stops them rather than exit-time SIGTERMs."""
        batches.close()
        close_loader(self.loader)

    def note_skipped(self, bad: List[str]) -> None:
        """Record unusable images ("path\treason"), once each, in the run state and in skipped_images.txt."""
        bad = [b if "\t" in b else f"{b}\t{getattr(b, 'reason', 'unreadable')}" for b in bad]
        new = [b for b in bad if b not in self._bad_seen]
        if not new:
            return
        self._bad_seen.update(new)
        self.bad_images.extend(new)
        for b in new[: max(0, 5 - (len(self.bad_images) - len(new)))]:
            path, _, why = b.partition("\t")
            print(f"act: skipping image {path}: {why or 'unreadable'}")
        self.write_skipped()

    def _inspect_all(self) -> None:
        """Check every image of the pool (when none was usable) so that skipped_images.txt lists them all."""
        from act.blocks.data import inspect_image

        for p in getattr(getattr(self.loader, "dataset", None), "paths", []):
            if not any(b.startswith(f"{p}\t") for b in self.bad_images):
                im, why = inspect_image(p)
                if im is None:
                    self.note_skipped([f"{p}\t{why}"])  # (only when nothing at all was usable)

    def write_skipped(self) -> Optional[Path]:
        return write_skipped(self.out, self.bad_images)


def write_skipped(out: Path, bad_images: List[str]) -> Optional[Path]:
    """skipped_images.txt of a run (None when every image was usable)."""
    if not bad_images:
        return None
    path = Path(out) / SKIPPED_FILE
    lines = [b if "\t" in b else f"{b}\t{getattr(b, 'reason', 'unreadable')}" for b in bad_images]
    atomic_write_text(path, "# path<TAB>reason: images act could not use (skipped)\n" + "\n".join(lines) + "\n",
                      what="list")
    return path
