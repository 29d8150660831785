"""Helpers of the fault suite: small image folders, fast configs, the CLI in a subprocess, checkpoint comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from conftest import REPO, cli_env, tiny_config

LAUNCHER = REPO / "tests" / "fault_launcher.py"


def make_images(folder: Path, n: int = 6, size: int = 128) -> Path:
    """`n` distinct small JPEGs cut from the two images Ultralytics ships (crops, flips)."""
    import cv2

    from act.blocks.data import _pkg_folder

    folder.mkdir(parents=True, exist_ok=True)
    src = [cv2.imread(str(p)) for p in sorted(_pkg_folder("pkg:ultralytics/assets").glob("*.jpg"))]
    for i in range(n):
        im = src[i % len(src)]
        h, w = im.shape[:2]
        k = i // len(src)
        crop = im[k * h // 8: h - k * h // 10, k * w // 10: w - k * w // 8]
        if k % 2:
            crop = crop[:, ::-1]
        scale = size / max(crop.shape[:2])
        crop = cv2.resize(crop, (max(2, int(crop.shape[1] * scale)), max(2, int(crop.shape[0] * scale))))
        cv2.imwrite(str(folder / f"img{i}.jpg"), crop)
    return folder


def fault_config(out: Path, images: Path, iterations: int = 8, **sections) -> Dict:
    """A fast CPU run: 96 px, batch 2, no fidelity/export, a checkpoint every 2 iterations."""
    cfg = tiny_config(out, data={"train": str(images), "imgsz": 96, "augment": True},
                      train={"iterations": iterations, "checkpoint_every": 2, "log_every": 2},
                      eval={"fidelity": {"enabled": False}}, export={"onnx": False})
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.__setitem__(k, v)
    return cfg


def write_config(path: Path, cfg: Dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> Dict[str, str]:
    e = cli_env()
    e["OMP_NUM_THREADS"] = "1"  # the same thread count in every process: bit-identical CPU results
    e["PYTHONUNBUFFERED"] = "1"
    return e


def act_cmd(*args: str, launcher: Optional[List[str]] = None) -> List[str]:
    if launcher is not None:
        return [sys.executable, str(LAUNCHER), *launcher, "--", *args]
    return [sys.executable, "-m", "act", *args]


def run(cmd: List[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd, timeout=timeout)


def popen(cmd: List[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """new_session: the child leads its own process group (to signal it and its loader workers together)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=cwd,
                            start_new_session=new_session)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 240) -> List[str]:
    """Read the child's stdout until a line contains `needle`; returns the lines read."""
    import select
    import time

    lines: List[str] = []
    end = time.time() + timeout
    while time.time() < end:
        r, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not r:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"never saw {needle!r}; got {lines[-5:]}, rc={proc.poll()}")


def state_of(path: Path) -> Dict:
    from act.blocks.checkpoint import load_checkpoint

    return load_checkpoint(path)


def assert_same_state(a: Path, b: Path) -> None:
    """Weights, quantizer buffers (ranges, PACT alphas), optimizer and scheduler state, data position: all equal."""
    import torch

    ca, cb = state_of(a), state_of(b)
    sa, sb = ca["model"].state_dict(), cb["model"].state_dict()
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"
    assert any(k.endswith("running_absmax") for k in sa) and any(k.endswith(".alpha") for k in sa)
    oa, ob = ca["act"]["optimizer"], cb["act"]["optimizer"]
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for name, v in oa["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][k][name])), (k, name)
    for key in ("iteration", "scheduler", "data_position"):
        assert ca["act"][key] == cb["act"][key], key


def inject_nan(monkeypatch, nan_loss=(), nan_grad=()):
    """Make the loss (or, through a backward hook, the gradient) NaN at the given 1-based training steps of this
    process. Returns the step counter dict."""
    from act.run.trainer import Trainer
    from act.blocks.distill import DistillLoss

    state = {"step": 0}
    real_step, real_loss = Trainer.train_step, DistillLoss.forward

    def train_step(self, images):
        state["step"] += 1
        return real_step(self, images)

    def forward(self, *a, **k):
        loss, per_node = real_loss(self, *a, **k)
        if state["step"] in set(nan_loss):
            loss = loss * float("nan")
        elif state["step"] in set(nan_grad) and loss.requires_grad:
            loss.register_hook(lambda g: g * float("nan"))
        return loss, per_node

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(DistillLoss, "forward", forward)
    return state


def cli(args, capsys=None, capfd=None):
    """act's CLI in this process: (exit code, stdout, stderr)."""
    from act.cli.main import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own usage errors (exit 2, a usage line, no traceback)
        code = e.code
    cap = capfd or capsys
    out, err = cap.readouterr() if cap is not None else ("", "")
    return code, out, err


class ReadOnly:
    """A folder made read-only for real: a read-only bind mount (root: EROFS), else chmod 0o555 (EACCES).
    `how` says which; None when neither works (then the test simulates it)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.how: Optional[str] = None

    def __enter__(self):
        f = str(self.folder)
        if os.geteuid() == 0:
            ok = subprocess.run(["mount", "--bind", f, f], capture_output=True).returncode == 0
            if ok and subprocess.run(["mount", "-o", "remount,bind,ro", f], capture_output=True).returncode == 0:
                self.how = "read-only mount"
            elif ok:
                subprocess.run(["umount", f], capture_output=True)
        else:
            os.chmod(f, 0o555)
            self.how = "chmod 555"
        return self

    def __exit__(self, *exc):
        if self.how == "read-only mount":
            subprocess.run(["umount", str(self.folder)], capture_output=True)
        elif self.how == "chmod 555":
            os.chmod(str(self.folder), 0o755)


def make_broken_images(folder: Path) -> Dict[str, Dict[str, Path]]:
    """Images act must use after converting ("used") and images it must skip ("skipped"), in one folder."""
    import struct
    import zlib

    import cv2
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = make_images(folder / "good", n=2)
    base = cv2.imread(str(good / "img0.jpg"))
    used = {}

    def put(name, write):
        p = folder / name
        write(p)
        return p

    used["grayscale"] = put("gray.png", lambda p: cv2.imwrite(str(p), base[..., 0]))
    used["RGBA"] = put("rgba.png", lambda p: cv2.imwrite(str(p), np.dstack([base, np.full(base.shape[:2], 200,
                                                                                          np.uint8)])))
    used["16-bit"] = put("deep16.png", lambda p: cv2.imwrite(str(p), base.astype(np.uint16) * 257))
    used["palette"] = put("palette.png", lambda p: Image.fromarray(base[..., ::-1]).convert("P").save(p))
    used["good1"], used["good2"] = good / "img0.jpg", good / "img1.jpg"
    jpg = (good / "img0.jpg").read_bytes()
    png = cv2.imencode(".png", base)[1].tobytes()

    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    side = 20000  # a valid 20000x20000 1-bit PNG of 50 KB: decoded as RGB it would take 1.2 GB
    co = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)
    idat = b"".join(co.compress(row) for _ in range(side)) + co.flush()
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    skipped = {
        "zero-byte": put("empty.jpg", lambda p: p.write_bytes(b"")),
        "truncated JPEG": put("cut.jpg", lambda p: p.write_bytes(jpg[: len(jpg) // 2])),
        "truncated PNG": put("cut.png", lambda p: p.write_bytes(png[: len(png) // 2])),
        "corrupt bytes": put("noise.jpg", lambda p: p.write_bytes(os.urandom(3000))),
        "text named .png": put("notes.png", lambda p: p.write_text("not an image")),
        "decompression bomb": put("bomb.png", lambda p: p.write_bytes(bomb)),
        "1x1 pixel": put("dot.png", lambda p: cv2.imwrite(str(p), base[:1, :1])),
    }
    return {"used": used, "skipped": skipped}
