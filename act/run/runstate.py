"""A run's state in its checkpoints, and the output folder rules around them.

`run_state` is the `act` entry of every checkpoint (iteration, best metric, history, config, data position; in
last.pt also the optimizer, scheduler, scaler, NaN-guard and RNG states), `restore_training_state` puts a last.pt
back into a trainer so that `--resume` continues exactly, and `prepare_output` applies act.run.resume's folder rules
(refuse another run's folder, check the config on resume) and writes config.yaml.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import yaml

from act.blocks.checkpoint import atomic_save, make_checkpoint
from act.blocks.ema import WeightEMA
from act.core.fileio import atomic_write_text, check_writable, remove_stale_temps
from act.blocks.pipeline import set_position
from act.run.resume import RUN_MARKERS, check_new_run, check_resume, check_resume_config


def run_state(run, iteration: int, training_state: bool = True) -> Dict[str, Any]:
    stream = getattr(run, "stream", None)
    st = {
        "iteration": iteration,
        "total_iters": getattr(run, "total_iters", 0),
        "best_metric": run.best_metric,
        "best_iteration": run.best_iteration,
        "history": run.history,
        "bad_images": run.bad_images,
        "config": run.cfg.dump(),
        "teacher": str(run.source.path),
        "nodes": [n.name for n in run.nodes],
        "data_position": stream.samples_seen if stream is not None else 0,
    }
    for h in run.hooks:
        st.update(h.state_dict())
    if training_state:
        st["data_images"] = stream.pool_size if stream is not None else 0
        if getattr(run, "guard", None) is not None:
            st["nan_guard"] = run.guard.state_dict()
        if getattr(run, "ema", None) is not None:
            st["ema"] = run.ema.state_dict()
        st.update({
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        })
    return st


def save_checkpoint(run, path: Path, state: Dict[str, Any], model=None) -> Path:
    """The student (or `model`) with `state`, as an Ultralytics-loadable checkpoint, written atomically."""
    train_args = {"task": run.task, "imgsz": run.cfg.data.imgsz, "model": str(run.source.path)}
    atomic_save(make_checkpoint(run.student if model is None else model, state, train_args, family=run.family), path)
    return path


def restore_training_state(trainer, ckpt: Dict[str, Any]) -> int:
    """Put a last.pt back into `trainer` (student, optimizer, scheduler, scaler, metrics, RNG, data position, NaN
    guard). Returns the iteration to continue from."""
    st = ckpt["act"]
    trainer.student.load_state_dict(ckpt["model"].state_dict())
    trainer.student.to(trainer.device)
    trainer.optimizer.load_state_dict(st["optimizer"])
    getattr(trainer, "invalidate_step", lambda: None)()  # (new optimizer state tensors)
    trainer.scheduler.load_state_dict(st["scheduler"])
    if st["scaler"] and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(st["scaler"])
    trainer.best_metric = st["best_metric"]
    trainer.best_iteration = st["best_iteration"]
    trainer.history = st["history"]
    rng = st["rng"]
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    stream = trainer.stream
    stream.restore(int(st.get("data_position", 0)), st.get("bad_images", []))
    loader = stream.loader
    if isinstance(loader, torch.utils.data.DataLoader) and hasattr(loader.sampler, "start"):
        set_position(loader, stream.samples_seen, trainer.cfg.train.seed, trainer.dist.rank)
    n_now = stream.pool_size
    if st.get("data_images") and n_now and st["data_images"] != n_now and trainer.dist.is_main:
        print(f"act: warning: the image pool changed since the run started ({st['data_images']} -> {n_now} "
              f"images); the data order differs from the interrupted run's")
    if st.get("ema") is not None:  # the weight average goes on where it was
        trainer.ema = WeightEMA(trainer.student, trainer.cfg.train.ema or 0.999, trainer.cfg.train.ema_tau)
        trainer.ema.load_state_dict(st["ema"])
    if st.get("nan_guard") and getattr(trainer, "guard", None) is not None:
        trainer.guard.load_state_dict(st["nan_guard"])
        trainer.nonfinite_steps = trainer.guard.skipped
    return int(st["iteration"])


def prepare_output(run, resume: bool, exist_ok: bool, marker_name: str = "last.pt",
                   force: bool = False) -> Optional[Dict[str, Any]]:
    """Output folder rules (act.run.resume): refuse another run's folder unless exist_ok; on resume, check last.pt
    and that the config is the run's own unless force. Then write config.yaml. Returns the last.pt to resume from
    (already read), if any."""
    out = run.out
    ckpt = None
    if resume and marker_name == "last.pt":
        ckpt = check_resume(out, run.cfg.dump(), force)
    elif resume:  # (a staged run: its stages' folders hold the last.pt files; compare with its config.yaml)
        check_resume_config(out, run.cfg.dump(), force)
    else:
        check_new_run(out, exist_ok, RUN_MARKERS if marker_name == "last.pt" else (marker_name,))
    if not run._dist().is_main:
        return ckpt
    check_writable(out)
    remove_stale_temps(out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(run.cfg.dump(), sort_keys=False), what="config")
    return ckpt
