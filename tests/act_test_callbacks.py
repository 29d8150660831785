"""Eval callbacks used by the tests (importable as `act_test_callbacks:...` with tests/ on sys.path)."""

import torch

from act.blocks.data import load_images, resolve_source


def output_energy(model, context):
    """A cheap deterministic metric: mean |decoded output| on the packaged images (changes as the student trains)."""
    x = load_images(resolve_source("pkg:ultralytics/assets"), context.imgsz).to(context.device)
    with torch.no_grad():
        y = model(x)
    y = y[0] if isinstance(y, (list, tuple)) else y
    return {"energy": float(y.abs().mean()), "iteration": float(context.iteration)}
