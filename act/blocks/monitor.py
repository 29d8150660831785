"""TensorBoard logging of a run: losses per node, learning rates, PACT alphas, activation ranges, metrics.

Every scalar group also goes to `history.jsonl` next to the event files (one JSON line per call: kind, step,
values), which `act.run.report` turns into loss and metric curves without parsing TensorBoard events."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

import torch

from act.blocks.quant import activation_quantizers


class RunLogger:
    def __init__(self, logdir: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir))
        self.history_path = Path(logdir) / "history.jsonl" if enabled else None

    def record(self, kind: str, values: Dict[str, float], step: int) -> None:
        if self.history_path is None:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in values.items()}
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": int(step), "values": clean}) + "\n")

    def scalars(self, prefix: str, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        self.record(prefix, values, step)
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def train(self, stats: Dict[str, float], optimizer, step: int, images_per_s: float) -> None:
        if self.writer is None:
            return
        self.record("train", {**stats, "images_per_s": images_per_s}, step)
        self.writer.add_scalar("loss/total", stats["loss"], step)
        for k, v in stats.items():
            if k.startswith("node/"):
                self.writer.add_scalar(f"loss/{k[5:]}", v, step)
        for g in optimizer.param_groups:
            self.writer.add_scalar(f"lr/{g.get('name', 'group')}", g["lr"], step)
        self.writer.add_scalar("speed/images_per_s", images_per_s, step)

    def quantizers(self, model, step: int) -> None:
        if self.writer is None:
            return
        qs = activation_quantizers(model)
        if not qs:
            return
        ranges = torch.stack([q.running_absmax.detach().float().cpu() for q in qs.values()])
        self.writer.add_histogram("quant/activation_range", ranges, step)
        self.writer.add_scalar("quant/activation_range_mean", float(ranges.mean()), step)
        alphas = [q.alpha.detach().float().abs().cpu() for q in qs.values() if q.pact]
        if alphas:
            a = torch.stack(alphas)
            self.writer.add_histogram("quant/pact_alpha", a, step)
            self.writer.add_scalar("quant/pact_alpha_mean", float(a.mean()), step)
            self.writer.add_scalar("quant/pact_clipping_share", float((a < ranges).float().mean()), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
