"""Unlabeled images for distillation and calibration.

Sources: a folder (searched recursively), a .txt list of paths (relative to the list), an Ultralytics data yaml (its
train split), or `pkg:PACKAGE/SUBFOLDER` for images shipped inside an installed package. Images are letterboxed
exactly as the model family does (Ultralytics: its own LetterBox; `letterbox_fn=` a family's `letterbox` method, default
act.core.family.default_family()'s), optionally flipped, scale-jittered, colour-jittered and mosaicked
(`AugmentConfig`). An image that cannot be used
(zero-byte, truncated, corrupt, huge) is skipped, counted and listed with its reason, never fatal; grayscale, RGBA,
palette and 16-bit images are converted (see `inspect_image`). Training batches come from act.blocks.pipeline (seeded,
resumable).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
import os
import random
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from act.core.errors import DataError

IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".dng", ".mpo", ".pfm", ".heic"}


def _pkg_folder(spec: str) -> Path:
    rest = spec[len("pkg:"):]
    pkg, _, sub = rest.partition("/")
    if importlib.util.find_spec(pkg) is None:
        raise DataError(f"{spec}: Python package {pkg!r} is not installed")
    return Path(str(importlib.resources.files(pkg))) / sub


def _list_folder(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_SUFFIXES and p.is_file())


def yaml_root(path: Path, data: dict) -> Path:
    """The dataset root of an Ultralytics data yaml: its `path`, relative to the working folder if it exists there,
    else to the yaml's own folder (so a repo's data/*.yaml works from anywhere)."""
    root = Path(data.get("path") or path.parent)
    if not root.is_absolute():
        root = (path.parent / root).resolve() if not (Path.cwd() / root).exists() else (Path.cwd() / root).resolve()
    return root


def _from_yaml(path: Path, split: str = "train") -> List[Path]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or split not in data:
        raise DataError(f"{path}: no '{split}' entry (expected an Ultralytics data yaml)")
    root = yaml_root(path, data)
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    out: List[Path] = []
    for e in entries:
        p = Path(e)
        p = p if p.is_absolute() else root / p
        out += resolve_source(str(p))
    return out


def resolve_source(spec: str) -> List[Path]:
    """All image paths of a source spec. Raises DataError if the source does not exist or holds no image."""
    if spec.startswith("pkg:"):
        p = _pkg_folder(spec)
    else:
        p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"image source not found: {spec}")
    if p.is_dir():
        paths = _list_folder(p)
    elif p.suffix.lower() in (".yaml", ".yml"):
        paths = _from_yaml(p)
    elif p.suffix.lower() == ".txt":
        paths = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line)
                paths.append(q if q.is_absolute() else (p.parent / q))
    elif p.suffix.lower() in IMG_SUFFIXES:
        paths = [p]
    else:
        raise DataError(f"image source {spec}: expected a folder, a .txt list, a data .yaml or an image")
    if not paths:
        raise DataError(f"image source {spec} holds no images (looked for {', '.join(sorted(IMG_SUFFIXES))})")
    return paths


def resolve_source_exists(spec: str) -> Optional[str]:
    """None if the source resolves to at least one path, else a one-line reason (for config validation)."""
    try:
        resolve_source(spec)
    except DataError as e:
        return str(e)
    return None


MAX_IMAGE_PIXELS = 100_000_000  # larger images (e.g. a 20000x20000 decompression bomb) are skipped, never decoded


def _pil_open(path: Path):
    """PIL's own Image.open (the family's library may patch it: Ultralytics pip-installs a HEIF plugin on any
    unidentified file)."""
    from act.core.family import default_family

    return default_family().pil_open(path)


def _header_problem(path: Path) -> Optional[str]:
    """A reason to skip `path` found without decoding it (size, dimensions in the header, JPEG end marker), or None.
    Formats Pillow cannot identify are left to OpenCV."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _pil_open(path) as im:
                w, h = im.size
                fmt = im.format
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({e})"
    except UnidentifiedImageError:
        return None
    except Exception as e:  # a header that Pillow recognises but cannot parse
        return f"corrupt header ({type(e).__name__}: {e})"
    if w * h > MAX_IMAGE_PIXELS:
        return f"too large to decode safely ({w}x{h} pixels > {MAX_IMAGE_PIXELS})"
    if w < 2 or h < 2:
        return f"too small ({w}x{h} pixels)"
    if fmt in ("JPEG", "MPO"):
        with open(path, "rb") as f:
            f.seek(max(0, size - 4096))
            tail = f.read().rstrip(b"\x00\r\n\t ")
        if b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
    return None


def inspect_image(path: Path) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(BGR uint8 HxWx3, None), or (None, why it cannot be used).

    Grayscale, RGBA, palette and 16-bit images that decode are converted to 8-bit BGR and used (OpenCV's
    IMREAD_COLOR: gray is replicated, alpha dropped, 16-bit scaled to 8-bit). Zero-byte, truncated, corrupt,
    undecodable and huge (more than MAX_IMAGE_PIXELS, checked from the header before decoding) images are refused.
    """
    path = Path(path)
    try:
        problem = _header_problem(path)
        if problem:
            return None, problem
        im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except Exception as e:
        return None, f"cannot read ({type(e).__name__}: {e})"
    if im is None:
        return None, "cannot decode (corrupt or not an image)"
    if im.ndim != 3 or im.shape[0] < 2 or im.shape[1] < 2:
        return None, f"unusable shape {tuple(im.shape)}"
    return im, None


def read_image(path: Path) -> Optional[np.ndarray]:
    """BGR uint8 HxWx3, or None if unusable (see `inspect_image`)."""
    return inspect_image(path)[0]


Letterbox = Callable[[np.ndarray, int], np.ndarray]  # (BGR uint8 HxWx3, imgsz) -> imgsz x imgsz: a family's letterbox


def letterbox(im: np.ndarray, imgsz: int, fn: Optional[Letterbox] = None) -> np.ndarray:
    """The square letterbox of `fn` (a model family's `letterbox`), by default the default family's."""
    if fn is None:
        from act.core.family import default_family

        fn = default_family().letterbox
    return fn(im, imgsz)


def to_uint8(im: np.ndarray) -> torch.Tensor:
    """BGR HWC uint8 -> RGB CHW uint8 (a quarter of the bytes of float: what loader workers hand over)."""
    return torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)))


def to_tensor(im: np.ndarray) -> torch.Tensor:
    """BGR HWC uint8 -> RGB CHW float in [0, 1] (the input convention of every model family)."""
    return to_uint8(im).float() / 255.0


def as_model_input(images: torch.Tensor, device) -> torch.Tensor:
    """A batch on `device` as float in [0, 1]: uint8 batches are moved first and scaled there."""
    images = images.to(device, non_blocking=True)
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _scale_jitter(im: np.ndarray, imgsz: int, s: float, rng: random.Random, fn: Optional[Letterbox] = None
                  ) -> np.ndarray:
    size = max(32, int(round(imgsz * s)))
    boxed = letterbox(im, size, fn)
    if size == imgsz:
        return boxed
    if size < imgsz:
        pad = imgsz - size
        top, left = rng.randint(0, pad), rng.randint(0, pad)
        return cv2.copyMakeBorder(boxed, top, pad - top, left, pad - left, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    y, x = rng.randint(0, size - imgsz), rng.randint(0, size - imgsz)
    return boxed[y:y + imgsz, x:x + imgsz]


def _hsv(im: np.ndarray, gains, rng: random.Random) -> np.ndarray:
    """Ultralytics' RandomHSV (hue, saturation and value scaled by 1 + U(-g, g), through lookup tables), drawn from
    `rng` so that a sample's view is a function of (seed, pass, index)."""
    r = np.array([rng.uniform(-g, g) for g in gains]) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=r.dtype)
    lut = [((x * r[0]) % 180).astype(np.uint8), np.clip(x * r[1], 0, 255).astype(np.uint8),
           np.clip(x * r[2], 0, 255).astype(np.uint8)]
    return cv2.cvtColor(cv2.merge([cv2.LUT(c, t) for c, t in zip((hue, sat, val), lut)]), cv2.COLOR_HSV2BGR)


def _mosaic(ims: Sequence[Optional[np.ndarray]], imgsz: int, rng: random.Random, scale, translate: float
            ) -> np.ndarray:
    """Ultralytics' 4-image mosaic followed by its RandomPerspective crop, for images without labels: each image,
    its long side resized to imgsz, fills one quadrant around a random centre of a 2 x imgsz canvas; the canvas is
    zoomed about its middle by U(scale), shifted by U(-translate, translate) x imgsz and cropped to imgsz. Drawn from
    `rng` (resumable, any worker); an unusable image (None) leaves its quadrant grey."""
    s = imgsz
    canvas = np.full((2 * s, 2 * s, 3), 114, np.uint8)
    xc, yc = int(rng.uniform(0.5 * s, 1.5 * s)), int(rng.uniform(0.5 * s, 1.5 * s))
    for k, im in enumerate(ims):
        if im is None:
            continue
        r = s / max(im.shape[:2])
        if r != 1:
            im = cv2.resize(im, (max(1, round(im.shape[1] * r)), max(1, round(im.shape[0] * r))),
                            interpolation=cv2.INTER_LINEAR if r > 1 else cv2.INTER_AREA)
        h, w = im.shape[:2]
        x1, x2 = (max(xc - w, 0), xc) if k in (0, 2) else (xc, min(xc + w, 2 * s))
        y1, y2 = (max(yc - h, 0), yc) if k in (0, 1) else (yc, min(yc + h, 2 * s))
        # the part of the image next to the centre: its right / bottom edge on the left / top of the centre
        bx = w - (x2 - x1) if k in (0, 2) else 0
        by = h - (y2 - y1) if k in (0, 1) else 0
        canvas[y1:y2, x1:x2] = im[by:by + (y2 - y1), bx:bx + (x2 - x1)]
    z = rng.uniform(*scale)
    tx, ty = (rng.uniform(-translate, translate) * s for _ in range(2))
    m = np.array([[z, 0, s / 2 - z * s + tx], [0, z, s / 2 - z * s + ty]], dtype=np.float64)
    return cv2.warpAffine(canvas, m, (s, s), flags=cv2.INTER_LINEAR, borderValue=(114, 114, 114))


class SkippedImage(str):
    """The path of an unusable image (a str, as before), carrying why it was skipped in `.reason`."""

    def __new__(cls, path, reason: str = "unreadable"):
        obj = super().__new__(cls, str(path))
        obj.reason = reason
        return obj

    def __reduce__(self):  # (through loader worker processes)
        return SkippedImage, (str(self), self.reason)


class UnlabeledImages(Dataset):
    """Letterboxed images as uint8 RGB CHW tensors (scaled to float on the device); an unusable image yields
    (None, SkippedImage(path, reason)).

    An index may be an int, or an (index, epoch) pair from act.blocks.pipeline.StreamSampler: then the augmentation of that sample is
    seeded by (seed, epoch, index) alone, so it is the same in any worker and after a resume."""

    def __init__(self, paths: Sequence[Path], imgsz: int, augment=None, cache: bool = False, seed: int = 0,
                 letterbox_fn: Optional[Letterbox] = None):
        self.paths = list(paths)
        self.letterbox_fn = letterbox_fn
        self.imgsz = imgsz
        self.augment = augment
        self.cache = {} if cache else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Tuple[Optional[np.ndarray], Optional[str]]:
        if self.cache is not None and i in self.cache:
            got = self.cache[i]  # (act.blocks.pipeline's RAM cache holds decoded images, or None for unusable ones)
            return got if isinstance(got, tuple) else (got, None if got is not None else "unreadable")
        got = inspect_image(self.paths[i])
        if self.cache is not None:
            self.cache[i] = got
        return got

    def __getitem__(self, i) -> Tuple[Optional[torch.Tensor], str]:
        epoch = None
        if isinstance(i, (tuple, list)):
            i, epoch = i
        im, why = self.load(i)
        if im is None:
            return None, SkippedImage(self.paths[i], why)
        if self.augment is None:
            return to_uint8(letterbox(im, self.imgsz, self.letterbox_fn)), str(self.paths[i])
        if epoch is not None:
            rng = random.Random(f"{self.seed}:{epoch}:{i}")  # a pure function of the sample: resumable, any worker
        else:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()))  # follows torch's seeded RNG (per worker)
        a = self.augment
        if a.mosaic and rng.random() < a.mosaic:
            others = [self.load(rng.randrange(len(self)))[0] for _ in range(3)]
            out = _mosaic([im, *others], self.imgsz, rng, a.scale, a.translate)
        else:
            out = _scale_jitter(im, self.imgsz, rng.uniform(*a.scale), rng, self.letterbox_fn)
        if any(a.hsv):
            out = _hsv(np.ascontiguousarray(out), a.hsv, rng)
        if rng.random() < a.flip:
            out = out[:, ::-1]
        return to_uint8(out), str(self.paths[i])


def collate(batch):
    """Stack the readable images; return the unusable ones alongside (SkippedImage: the path, with `.reason`)."""
    good = [t for t, _ in batch if t is not None]
    bad = [p for t, p in batch if t is None]
    images = torch.stack(good) if good else None
    return images, bad


class InfiniteLoader:
    """Cycles a DataLoader forever (a fresh shuffle each pass); yields (images, bad_paths)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.epoch = 0

    def __iter__(self) -> Iterator:
        while True:
            if hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                yield batch
            self.epoch += 1


def split_holdout(paths: Sequence[Path], n: int) -> Tuple[List[Path], List[Path], bool]:
    """(rest, held, held_out): the last `n` images of a pool, set aside from the rest when the pool has at least
    2n images; a smaller pool shares its first n images instead (held_out False)."""
    paths = list(paths)
    if n <= 0:
        return paths, [], True
    if len(paths) >= 2 * n:
        return paths[:-n], paths[-n:], True
    return paths, paths[:n], False


def build_loader(cfg, seed: int = 0, shuffle: bool = True, augment: bool = True, sampler=None,
                 paths: Optional[Sequence[Path]] = None, batch_size: Optional[int] = None,
                 letterbox_fn: Optional[Letterbox] = None) -> DataLoader:
    """DataLoader over the configured unlabeled source (act.core.config.DataConfig), or over `paths` if given."""
    paths = resolve_source(cfg.train) if paths is None else list(paths)
    if cfg.max_images:
        paths = paths[: cfg.max_images]
    batch_size = batch_size or cfg.batch_size
    ds = UnlabeledImages(paths, cfg.imgsz, cfg.augmentation if augment else None,
                         cache=bool(getattr(cfg, "cache_ram", cfg.cache)), seed=seed, letterbox_fn=letterbox_fn)
    g = torch.Generator()
    g.manual_seed(seed)
    drop_last = shuffle and len(ds) >= batch_size
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=_workers(cfg.workers),
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=g,
        persistent_workers=_workers(cfg.workers) > 0,
    )


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def resolve_workers(workers, world_size: int = 1) -> int:
    """'auto': half of this rank's share of the CPU cores, at most 8. The training process itself is bound by kernel
    launches (one core, at full speed), so the loader must not crowd it out: on an H200 with 16 cores, 15 workers
    fed the step with 0.5% wait yet the step ran 45% slower than on GPU-resident batches (docs/scale.md)."""
    if workers != "auto":
        return int(workers)
    share = cpu_cores() // max(1, world_size)
    return max(1, min(8, share // 2)) if share > 1 else 0


def _workers(w) -> int:
    return resolve_workers(w)


def iterations_for(cfg_train, n_images: int, batch_size: int) -> int:
    if cfg_train.iterations is not None:
        return cfg_train.iterations
    return max(1, math.ceil(cfg_train.epochs * n_images / batch_size))


def load_letterboxed(paths: Sequence[Path], imgsz: int, letterbox_fn: Optional[Letterbox] = None
                     ) -> Tuple[List[np.ndarray], List[Path]]:
    """Letterboxed BGR uint8 images (compact to keep in memory) and the paths that could be read."""
    ims, ok = [], []
    for p in paths:
        im = read_image(Path(p))
        if im is not None:
            ims.append(letterbox(im, imgsz, letterbox_fn))
            ok.append(Path(p))
    if not ims:
        raise DataError("none of the images could be read")
    return ims, ok


def load_images(paths: Sequence[Path], imgsz: int, letterbox_fn: Optional[Letterbox] = None) -> torch.Tensor:
    """A batch of letterboxed images (no augmentation), skipping unreadable ones."""
    ims = [read_image(Path(p)) for p in paths]
    ims = [to_tensor(letterbox(im, imgsz, letterbox_fn)) for im in ims if im is not None]
    if not ims:
        raise DataError("none of the images could be read")
    return torch.stack(ims)
