"""`AutoCompression`: the whole distillation-QAT run, from an Ultralytics checkpoint to a verified Q/DQ ONNX.

    from act import AutoCompression
    summary = AutoCompression("configs/demo_pose_qat.yaml").run()

The CLI (`act compress`) is a thin layer over this class. A script may pass its own `train_loader` (yielding image
batches, float in [0, 1], or (images, ...) tuples) and `eval_fn(model, context) -> dict`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch
import yaml
from torch import nn

from act import quant as Q
from act.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from act.config import RunConfig, load_config, validate_config
from act.data import (InfiniteLoader, as_model_input, build_loader, iterations_for, load_images, resolve_source,
                      split_holdout)
from act import dist as D
from act.pipeline import build_train_loader, close_loader, set_position
from act.distill import DistillLoss, FeatureCapture, channel_map, find_feature_nodes, find_nodes
from act.errors import ActError, ConfigError, DataError, Interrupted, ResourceError
from act.evaluate import CocoEvaluator, EvalContext, default_metric, load_callback
from act.export import export_onnx, lint_after_export, parity, qdq_summary
from act.fidelity import FidelityEvaluator
from act.fileio import atomic_write_text, check_writable, remove_stale_temps
from act.monitor import RunLogger
from act.quant.calib import get_ranges, set_ranges
from act.quant.health import collapsed_quantizers, format_report
from act.recovery import NanGuard, grads_finite
from act.resume import RUN_MARKERS, check_new_run, check_resume, check_resume_config
from act.signals import StopSignals
from teachers import family_for, resolve_teacher


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid config:\n  train.device: CUDA is not available on this machine (got {spec!r})")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_frozen(name: str):
    """(model fused/frozen/eval, family, source) for a teacher name or an Ultralytics .pt / model yaml."""
    src = resolve_teacher(name)
    family = family_for(None)
    model = family.load(src.path, src.kind)
    model.fuse(verbose=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, family, src


def load_teacher(cfg: RunConfig):
    """(teacher module fused/frozen/eval, family, source)."""
    model, family, src = load_frozen(cfg.model.teacher)
    task = family.task(model)
    if cfg.model.task != "auto" and cfg.model.task != task:
        raise ConfigError(f"invalid config:\n  model.task: {cfg.model.task!r}, but {src.path} is a {task} model")
    return model, family, src


def build_student(teacher: nn.Module, cfg: RunConfig, family) -> nn.Module:
    """Deep copy of the (BN-folded) teacher, fake-quantized per config. Not calibrated yet."""
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    if cfg.quant.enabled:
        Q.quantize(student, cfg.quant, skip=family.float_patterns)
        from act.quant.placement import apply_placement

        student.act_placement = apply_placement(student, cfg.quant, family, reference=teacher)
    return student


def _images_of(batch):
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 and isinstance(batch[1], list) else [])
    return batch, []


class AutoCompression:
    """One compression run. `run()` trains (or resumes), evaluates, exports and returns the summary dict."""

    def __init__(self, config: Union[RunConfig, str, Path, Dict], overrides: Optional[List[str]] = None,
                 train_loader: Optional[Iterable] = None, eval_fn: Optional[Callable] = None):
        if isinstance(config, RunConfig):
            self.cfg = validate_config(config.dump()) if overrides is None else load_config(raw=config.dump(),
                                                                                              overrides=overrides)
        elif isinstance(config, dict):
            self.cfg = load_config(raw=config, overrides=overrides)
        else:
            self.cfg = load_config(config, overrides)
        self.user_loader = train_loader
        self.user_eval = eval_fn
        self.out = Path(self.cfg.output_dir)

    # ------------------------------------------------------------------------------------------------------------
    def setup(self):
        self.setup_models()
        self.setup_data()
        self.setup_eval()
        self.setup_optimizer()

    def setup_models(self) -> None:
        """Teacher (frozen), fake-quantized student, distillation nodes and their capture hooks, on the device."""
        cfg = self.cfg
        self.dist = self._dist()
        self.device = self.dist.device(cfg.train.device) if self.dist.enabled else select_device(cfg.train.device)
        self.dist.init(self.device)
        if self.device.type == "cuda":
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.train.seed)
        if cfg.quant.enabled and cfg.quant.skip == "auto":
            from act.analyze import resolve_auto_skip

            resolve_auto_skip(self)  # the chosen layer names replace 'auto' in self.cfg (and config.yaml)
            cfg = self.cfg
            seed_everything(cfg.train.seed)
        self.teacher, self.family, self.source = load_teacher(cfg)
        self.task = self.family.task(self.teacher)
        self.student = self.build_student()
        self.nodes = find_nodes(self.teacher, self.family, cfg.distill.nodes)
        self.feature_nodes = find_feature_nodes(self.teacher, self.family, cfg.distill.features)
        head = self.family.head(self.teacher)
        self.loss_fn = DistillLoss(self.nodes + self.feature_nodes, cfg.distill, reg_max=getattr(head, "reg_max", 16))
        self.loss_fn.set_channel_maps(channel_map(self.student))
        self.teacher.to(self.device)
        self.student.to(self.device)
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        names = self.capture_names()
        self.t_capture = FeatureCapture(self.teacher, names)
        self.s_capture = FeatureCapture(self.student, names)
        if self.dist.enabled:
            for q in Q.activation_quantizers(self.student).values():
                q.reduce_fn = D.all_reduce_max  # identical moving averages on every rank
        self.setup_train_model()

    def capture_names(self) -> List[str]:
        """Modules whose outputs the loss reads: the distillation nodes, then the feature nodes."""
        return [n.name for n in self.nodes + self.feature_nodes]

    def _dist(self) -> "D.Dist":
        if getattr(self, "dist", None) is None:
            self.dist = D.Dist.from_env()
        return self.dist

    def setup_train_model(self) -> None:
        """What the step runs: the student returning its node outputs, wrapped in DDP under torchrun, optionally
        compiled (docs/scale.md)."""
        cfg = self.cfg
        model: nn.Module = D.NodeOutputs(self.student, self.s_capture)
        if self.dist.enabled:
            model = D.wrap_ddp(model, self.device, cfg.train.find_unused_parameters)
        from act.quant import fused

        fused.set_enabled(cfg.train.compile == "quantizers")
        if cfg.train.compile is True:
            if self.dist.enabled:
                if self.dist.is_main:
                    print("act: train.compile=true is not used under DDP (the quantizers all-reduce inside the graph; "
                          "train.compile=quantizers works)")
            else:
                model = torch.compile(model)
        self.train_model = model
        self.teacher_amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.train.teacher_amp or cfg.train.amp) if self.device.type == "cuda" else None

    def build_student(self) -> nn.Module:
        """The student before training (a staged run's stage starts from the previous stage's instead)."""
        return build_student(self.teacher, self.cfg, self.family)

    def before_iteration(self, it: int, batches) -> None:
        """Called before each training iteration (a prune stage prunes here)."""

    def setup_pool(self) -> None:
        """The unlabeled pool, less the held-out fidelity slice (its last eval.fidelity.images images)."""
        cfg = self.cfg
        fid = cfg.eval.fidelity
        self.fidelity_paths: List[Path] = []
        self.fidelity_held_out = True
        if fid.enabled and fid.source:
            self.pool = None
            self.fidelity_paths = resolve_source(fid.source)[: fid.images]
        elif fid.enabled:
            self.pool, self.fidelity_paths, self.fidelity_held_out = split_holdout(resolve_source(cfg.data.train),
                                                                                    fid.images)
        else:
            self.pool = None  # build_loader resolves data.train itself

    def setup_data(self) -> None:
        cfg = self.cfg
        self.setup_pool()
        dist = self._dist()
        self.global_batch = cfg.data.batch_size * dist.world_size  # data.batch_size is per rank
        self.samples_seen = 0  # global position in the sample stream (rank-independent; resumes on any world size)
        if self.user_loader is None:
            paths = self.pool if self.pool is not None else resolve_source(cfg.data.train)
            self.loader = build_train_loader(cfg.data, paths, seed=cfg.train.seed, rank=dist.rank,
                                             world_size=dist.world_size, device_type=self.device.type)
            n_images = len(self.loader.dataset)
        else:
            self.loader = self.user_loader
            n_images = len(getattr(self.user_loader, "dataset", [])) or cfg.data.batch_size
        self.total_iters = iterations_for(cfg.train, n_images, self.global_batch)

    def setup_eval(self) -> None:
        cfg = self.cfg
        imgsz = cfg.eval.imgsz or cfg.data.imgsz
        self.evaluators: List[Callable] = []
        self.metric = cfg.eval.metric or (default_metric(self.task) if cfg.eval.data else None)
        self.eval_time = 0.0
        if not self._dist().is_main:  # rank 0 evaluates; the others wait at a barrier
            self.eval_on = self.dist.broadcast(None)
            return
        if cfg.eval.data:
            self.evaluators.append(CocoEvaluator(cfg.eval.data, self.task, imgsz,
                                                 cfg.eval.batch_size, cfg.eval.max_images, cfg.eval.split,
                                                 workdir=self.out / "eval"))
        if cfg.eval.fidelity.enabled and self.fidelity_paths:
            fid = cfg.eval.fidelity
            self.evaluators.append(FidelityEvaluator.from_paths(
                self.teacher, self.fidelity_paths, imgsz, self.task, nodes=self.nodes,
                batch_size=fid.batch_size or cfg.eval.batch_size, teacher_conf=fid.teacher_conf,
                held_out=self.fidelity_held_out))
        if cfg.eval.callback:
            self.evaluators.append(load_callback(cfg.eval.callback))
        if self.user_eval is not None:
            self.evaluators.append(self.user_eval)
        self.eval_on = self.dist.broadcast(bool(self.evaluators))

    def setup_optimizer(self) -> None:
        """Weights/biases at lr, PACT alphas at their own lr; scheduler; AMP."""
        cfg = self.cfg
        alphas = [p for n, p in self.student.named_parameters() if n.endswith(".alpha")]
        weights = [p for n, p in self.student.named_parameters() if not n.endswith(".alpha")]
        groups = [{"params": weights, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "name": "weights"}]
        if alphas:
            groups.append({"params": alphas, "lr": cfg.quant.activation.alpha_lr,
                           "weight_decay": cfg.quant.activation.alpha_weight_decay, "name": "alpha"})
        opt = cfg.train.optimizer
        # On CUDA: fused optimizer kernels, which also skip a non-finite step on the device (no host sync per step)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if opt == "sgd":
            self.optimizer = torch.optim.SGD(groups, momentum=cfg.train.momentum, nesterov=True, **fused)
        elif opt == "adam":
            self.optimizer = torch.optim.Adam(groups, **fused)
        else:
            self.optimizer = torch.optim.AdamW(groups, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        amp = cfg.train.amp if self.device.type == "cuda" else "none"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        # sync_free: every step runs backward and lets the scaler skip non-finite updates (consistently on every
        # rank under DDP); the plain CPU path checks the loss on the host instead.
        self.sync_free = self.device.type == "cuda" or self.dist.enabled
        if amp == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=1.0, growth_interval=2**30,
                                               enabled=self.sync_free)

    def _lr_lambda(self, it: int) -> float:
        t = self.cfg.train
        if t.warmup_iters and it < t.warmup_iters:
            return (it + 1) / t.warmup_iters
        if t.scheduler == "constant":
            return 1.0
        span = max(1, self.total_iters - t.warmup_iters)
        p = min(1.0, (it - t.warmup_iters) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    # ------------------------------------------------------------------------------------------------------------
    def _batches(self):
        src = InfiniteLoader(self.loader) if isinstance(self.loader, torch.utils.data.DataLoader) else self.loader
        empty = 0  # batches in a row without a usable image
        n_pool = len(getattr(self.loader, "dataset", [])) or 0
        limit = (n_pool // max(1, self.cfg.data.batch_size) + 1) if n_pool else 1000
        while True:
            for batch in src:
                self.samples_seen += self.global_batch
                images, bad = _images_of(batch)
                if bad:
                    self._note_skipped(bad)
                if images is None or len(images) == 0:
                    empty += 1
                    if empty > limit:
                        self._inspect_all()
                        raise DataError(f"none of the {n_pool or 'training'} images could be used (data.train: "
                                        f"{self.cfg.data.train}); why each was skipped: "
                                        f"{self.out / 'skipped_images.txt'}")
                    continue
                empty = 0
                yield images
            if isinstance(src, InfiniteLoader):
                return

    def _close_data(self, batches) -> None:
        """End of training (or an error before it): drop the loader iterator and stop its workers now. They ignore
        the stop signals sent to the process group, so the run stops them rather than exit-time SIGTERMs."""
        batches.close()
        close_loader(self.loader)

    def _note_skipped(self, bad: List[str]) -> None:
        """Record unusable images ("path\treason"), once each, in the run state and in skipped_images.txt."""
        bad = [b if "\t" in b else f"{b}\t{getattr(b, 'reason', 'unreadable')}" for b in bad]
        seen = getattr(self, "_bad_seen", None)
        if seen is None:
            seen = self._bad_seen = set(self.bad_images)
        new = [b for b in bad if b not in seen]
        if not new:
            return
        seen.update(new)
        self.bad_images.extend(new)
        for b in new[: max(0, 5 - (len(self.bad_images) - len(new)))]:
            path, _, why = b.partition("\t")
            print(f"act: skipping image {path}: {why or 'unreadable'}")
        self.write_skipped()

    def _inspect_all(self) -> None:
        """Check every image of the pool (when none was usable) so that skipped_images.txt lists them all."""
        from act.data import inspect_image

        for p in getattr(getattr(self.loader, "dataset", None), "paths", []):
            if not any(b.startswith(f"{p}\t") for b in self.bad_images):
                im, why = inspect_image(p)
                if im is None:
                    self._note_skipped([f"{p}\t{why}"])  # (only when nothing at all was usable)

    def write_skipped(self) -> Optional[Path]:
        if not self.bad_images:
            return None
        path = self.out / "skipped_images.txt"
        lines = [b if "\t" in b else f"{b}\t{getattr(b, 'reason', 'unreadable')}" for b in self.bad_images]
        atomic_write_text(path, "# path<TAB>reason: images act could not use (skipped)\n" + "\n".join(lines) + "\n",
                          what="list")
        return path

    def calibrate(self, batches) -> None:
        """Initial activation ranges: from quant.init_from's checkpoint, else the moving average over calib_batches."""
        if self.cfg.quant.enabled and self.cfg.quant.init_from:
            self.init_ranges_from(Path(self.cfg.quant.init_from))
            return
        n = self.cfg.quant.calib_batches
        if not self.cfg.quant.enabled or n == 0:
            if self.cfg.quant.enabled:
                Q.calibrate(self.student, lambda m: None, init_alpha=False)
            return

        def loop(model):
            for i, images in zip(range(n), batches):
                model(as_model_input(images, self.device))
                self.s_capture.pop()

        init_alpha = self.cfg.quant.activation.alpha_init == "auto"
        Q.calibrate(self.student, loop, init_alpha=init_alpha)

    def init_ranges_from(self, path: Path) -> None:
        """Start every activation quantizer (moving average and PACT alpha) at the range it has in an act checkpoint
        of the same teacher, e.g. the ptq.pt of `act ptq`."""
        ckpt = load_checkpoint(path)
        theirs = Path(str(ckpt["act"].get("teacher", ""))).name
        if theirs != self.source.path.name:
            raise ConfigError(f"invalid config:\n  quant.init_from: {path} was calibrated for teacher {theirs!r}, this "
                              f"run's teacher is {self.source.path.name!r}")
        try:
            set_ranges(self.student, get_ranges(ckpt["model"]))
        except ActError as e:
            raise ConfigError(f"invalid config:\n  quant.init_from: {path}: {e}") from None

    def evaluate(self, model: nn.Module, iteration: int) -> Dict[str, float]:
        if not self.evaluators:
            return {}
        t0 = time.time()
        self._where = "eval"
        ctx = EvalContext(self.device, self.cfg.eval.imgsz or self.cfg.data.imgsz, iteration, self.out)
        was = model.training
        model.eval()
        results: Dict[str, float] = {}
        try:
            for fn in self.evaluators:
                r = fn(model, ctx)
                if not isinstance(r, dict):
                    raise ActError(f"eval callback {fn} returned {type(r).__name__}, expected a dict of floats")
                results.update({k: float(v) for k, v in r.items()})
        finally:
            model.train(was)
            self.eval_time += time.time() - t0
            self._where = "training"
        if self.metric and self.metric not in results and model is not self.teacher:
            # (the teacher has no label-free fidelity against itself, so it may lack the metric)
            raise ConfigError(f"invalid config:\n  eval.metric: {self.metric!r} is not among the eval results "
                              f"{sorted(results)}")
        return results

    # ------------------------------------------------------------------------------------------------------------
    def state(self, iteration: int, training_state: bool = True) -> Dict[str, Any]:
        st = {
            "iteration": iteration,
            "total_iters": self.total_iters,
            "best_metric": self.best_metric,
            "best_iteration": self.best_iteration,
            "history": self.history,
            "bad_images": self.bad_images,
            "config": self.cfg.dump(),
            "teacher": str(self.source.path),
            "nodes": [n.name for n in self.nodes],
            "data_position": getattr(self, "samples_seen", 0),
        }
        if training_state:
            st["data_images"] = len(getattr(self.loader, "dataset", []))
            if getattr(self, "guard", None) is not None:
                st["nan_guard"] = self.guard.state_dict()
            st.update({
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            })
        return st

    def save(self, name: str, iteration: int, training_state: bool = True) -> Path:
        """last.pt carries the optimizer/scheduler for --resume; best.pt only the student and its metrics."""
        path = self.out / name
        if not self._dist().is_main:
            return path
        train_args = {"task": self.task, "imgsz": self.cfg.data.imgsz, "model": str(self.source.path)}
        state = self.state(iteration, training_state)
        atomic_save(make_checkpoint(self.student, state, train_args), path)
        return path

    def resume_from(self, path: Path, ckpt: Optional[Dict[str, Any]] = None) -> int:
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)
        st = ckpt["act"]
        self.student.load_state_dict(ckpt["model"].state_dict())
        self.student.to(self.device)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if st["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(st["scaler"])
        self.best_metric = st["best_metric"]
        self.best_iteration = st["best_iteration"]
        self.history = st["history"]
        self.bad_images = st.get("bad_images", [])
        rng = st["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.samples_seen = int(st.get("data_position", 0))
        if isinstance(self.loader, torch.utils.data.DataLoader) and hasattr(self.loader.sampler, "start"):
            set_position(self.loader, self.samples_seen, self.cfg.train.seed, self.dist.rank)
        n_now = len(getattr(self.loader, "dataset", []))
        if st.get("data_images") and n_now and st["data_images"] != n_now and self.dist.is_main:
            print(f"act: warning: the image pool changed since the run started ({st['data_images']} -> {n_now} "
                  f"images); the data order differs from the interrupted run's")
        if st.get("nan_guard") and getattr(self, "guard", None) is not None:
            self.guard.load_state_dict(st["nan_guard"])
            self.nonfinite_steps = self.guard.skipped
        self._bad_seen = set(self.bad_images)
        return int(st["iteration"])

    # ------------------------------------------------------------------------------------------------------------
    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        x = as_model_input(images, self.device)
        return x.contiguous(memory_format=torch.channels_last) if getattr(self, "channels_last", False) else x

    def teacher_outputs(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The teacher's node outputs: no autograd graph, optionally under autocast (train.teacher_amp)."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.teacher_amp or torch.float32,
                                             enabled=self.teacher_amp is not None):
            self.teacher(images)
        return self.t_capture.pop()

    def train_step(self, images: torch.Tensor) -> Dict[str, Any]:
        """One distillation step. Returns the loss and per-node losses; on CUDA (and under DDP) as device tensors
        that the caller reads only at log steps, so the host never waits for the device inside a step."""
        images = self.model_input(images)
        t_out = self.teacher_outputs(images)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            s_out = self.train_model(images)
        loss, per_node = self.loss_fn(s_out, t_out)
        if self.sync_free:
            return self._step_sync_free(loss, per_node)
        if not torch.isfinite(loss):
            return self._skip_step("loss")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.grad_clip)
            finite = bool(torch.isfinite(norm))
        else:
            finite = grads_finite(self.student.parameters())
        if not finite:
            return self._skip_step("gradient")
        self._updating = True  # an interruption from here on leaves a half-updated state: never saved
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self._updating = False
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.good_step()
        out = {"loss": float(loss.detach())}
        out.update({f"node/{k}": float(v) for k, v in per_node.items()})
        return out

    def log_dir(self) -> Path:
        return self.out / "tensorboard"

    def _step_sync_free(self, loss: torch.Tensor, per_node: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)  # skipped on the device when a gradient is not finite
        self.scaler.update()
        self.scheduler.step()
        loss = loss.detach()
        bad = (~torch.isfinite(loss)).int()
        self._nonfinite_dev = bad if getattr(self, "_nonfinite_dev", None) is None else self._nonfinite_dev + bad
        # non-finite steps in a row, on the device (train.nan_policy reads it at log steps: no sync per step)
        consec = getattr(self, "_consec_dev", None)
        self._consec_dev = bad if consec is None else (consec + bad) * bad
        out: Dict[str, Any] = {"loss": loss}
        out.update({f"node/{k}": v for k, v in per_node.items()})
        return out

    def _read_nonfinite(self, iteration: Optional[int] = None) -> None:
        dev = getattr(self, "_nonfinite_dev", None)
        if dev is not None:
            both = torch.stack([dev, getattr(self, "_consec_dev", None) if getattr(self, "_consec_dev", None) is not None
                                else torch.zeros_like(dev)])
            new, consec = (int(v) for v in (D.all_reduce_max(both.clone()) if self.dist.enabled else both).tolist())
            self.nonfinite_steps += new
            self._nonfinite_dev = None
            guard = getattr(self, "guard", None)
            if guard is not None and new and iteration is not None:
                msg = guard.observe(new, consec, iteration)  # may restore (or raise DivergedError)
                if guard.consecutive == 0:
                    self._consec_dev = None
                if msg and self.dist.is_main:
                    print(f"act: warning: {msg}")

    def _skip_step(self, what: str) -> Dict[str, float]:
        """A step with a non-finite loss or gradient: nothing is applied (train.nan_policy, act.recovery)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        guard = getattr(self, "guard", None)
        if guard is not None:
            msg = guard.bad_step(getattr(self, "_iteration", 0) + 1, what)  # raises DivergedError past the limits
            self.nonfinite_steps = guard.skipped
            if msg:
                print(f"act: warning: {msg}")
        return {"loss": float("nan"), "skipped": 1.0}

    def _prepare_output(self, resume: bool, exist_ok: bool, marker_name: str = "last.pt",
                        force: bool = False) -> None:
        """Output folder rules (act.resume): refuse another run's folder unless exist_ok; on resume, check last.pt
        and that the config is the run's own unless force. Then write config.yaml."""
        self._resume_ckpt = None
        force = force or getattr(self, "force", False)
        if resume and marker_name == "last.pt":
            self._resume_ckpt = check_resume(self.out, self.cfg.dump(), force)
        elif resume:  # (a staged run: its stages' folders hold the last.pt files; compare with its config.yaml)
            check_resume_config(self.out, self.cfg.dump(), force)
        else:
            check_new_run(self.out, exist_ok, RUN_MARKERS if marker_name == "last.pt" else (marker_name,))
        if not self._dist().is_main:
            return
        check_writable(self.out)
        remove_stale_temps(self.out)
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.dump(), sort_keys=False), what="config")

    def resume_command(self) -> str:
        import shlex

        return f"act compress --config {shlex.quote(str(self.out / 'config.yaml'))} --resume"

    def _oom_error(self, e: BaseException, where: str) -> ResourceError:
        bs = self.cfg.eval.batch_size if where == "eval" else self.cfg.data.batch_size
        key = "eval.batch_size" if where == "eval" else "data.batch_size"
        half = max(1, bs // 2)
        how = (f"Try {key}={half}" if bs > 1 else f"Try a smaller data.imgsz (now {self.cfg.data.imgsz})")
        return ResourceError(
            f"CUDA out of memory during {where} at {key}={bs}, imgsz {self.cfg.data.imgsz} on {self.device}. {how}; "
            f"continue from the last checkpoint with: {self.resume_command()} --force {key}={half}")

    def run(self, resume: bool = False, exist_ok: bool = False, force: bool = False) -> Dict[str, Any]:
        if self.cfg.stages:
            from act.stages import run_stages

            self.force = force
            return run_stages(self, resume=resume, exist_ok=exist_ok)
        if self.cfg.strategy != "qat":  # auto (PTQ probe, QAT if needed) or ptq: act.strategy runs it
            from act.strategy import run_strategy

            return run_strategy(self.cfg, resume=resume, exist_ok=exist_ok)
        self.resuming = resume
        t0 = time.time()
        self._prepare_output(resume, exist_ok, force=force)
        try:
            return self._run(resume, t0)
        finally:
            self._dist().close()

    def _run(self, resume: bool, t0: float) -> Dict[str, Any]:
        from tqdm import tqdm

        self.setup()
        main = self.dist.is_main
        self.best_metric: Optional[float] = None
        self.best_iteration: Optional[int] = None
        self.history: List[Dict[str, Any]] = []
        self.bad_images: List[str] = []
        self.nonfinite_steps = 0
        self.loss_history: List[float] = []  # loss of every step of this process (for scripts and tests)
        self.calibrate_time = 0.0
        self.guard = NanGuard(self.cfg.train.nan_policy, self)
        self._updating = False
        self._in_step = False
        self._iteration = 0
        self._collapsed: Dict[str, str] = {}
        log = self.logger = RunLogger(self.log_dir(), enabled=main)
        start = 0
        batches = self._batches()
        before: Dict[str, Dict[str, float]] = {}
        stop = StopSignals()
        stop.__enter__()
        try:
            if resume:
                start = self.resume_from(self.out / "last.pt", self._resume_ckpt)
                self._resume_ckpt = None
                if main:
                    print(f"act: resuming {self.out} at iteration {start}/{self.total_iters}")
                before = self.history[0].get("before", {}) if self.history else {}
            else:
                t_cal = time.time()
                self.calibrate(batches)
                self.calibrate_time = time.time() - t_cal
                if getattr(self, "known_before", None):
                    before = dict(self.known_before)  # measured by an earlier stage (act.strategy)
                elif self.cfg.eval.before and self.evaluators and main:
                    before["teacher"] = self.evaluate(self.teacher, 0)
                    before["student_init"] = self.evaluate(self.student, 0)
                    log.scalars("eval_before/teacher", before["teacher"], 0)
                    log.scalars("eval_before/student", before["student_init"], 0)
                    head = f"act: teacher {_fmt(before['teacher'])} | " if before["teacher"] else "act: "
                    print(f"{head}student before training {_fmt(before['student_init'])}")
                self.history.append({"iteration": 0, "before": before})
                self.dist.barrier()
            self.guard.snapshot(start)
        except BaseException:
            stop.__exit__(None, None, None)
            self._close_data(batches)
            raise

        self.student.train()
        bar = tqdm(total=self.total_iters, initial=start, desc="act compress", unit="it", dynamic_ncols=True,
                   disable=os.environ.get("ACT_NO_PROGRESS") == "1" or not main)
        it = start
        seen, t_last = 0, time.time()
        step_time, step_images, data_wait = 0.0, 0, 0.0
        # per-step losses stay on the device (read at the end): no host sync inside a step
        losses = torch.full((max(0, self.total_iters - start),), float("nan"), device=self.device)
        interrupted = None  # why the loop stopped early: a signal name, or an exception
        try:
            while it < self.total_iters:
                if self._should_stop(stop, it, start):
                    interrupted = stop.name or "SIGTERM"
                    break
                self.before_iteration(it, batches)
                t_step = time.time()
                images = next(batches)
                data_wait += time.time() - t_step
                self._iteration = it
                if not self.sync_free:
                    self.guard.before_step()
                self._in_step = True
                stats = self.train_step(images)
                self._in_step = False
                losses[it - start] = stats["loss"]
                it += 1
                is_last = it == self.total_iters
                seen += len(images) * self.dist.world_size
                step_images += len(images) * self.dist.world_size
                bar.update(1)
                if it % self.cfg.train.log_every == 0 or is_last:
                    stats = self.dist.mean(stats, self.device)  # (a device sync: log steps only)
                    self._read_nonfinite(it)
                    dt = max(time.time() - t_last, 1e-9)
                    ips = seen / dt
                    seen, t_last = 0, time.time()
                    bar.set_postfix(loss=f"{stats['loss']:.4g}", img_s=f"{ips:.1f}")
                    log.train(stats, self.optimizer, it, ips)
                    log.quantizers(self.student, it)
                    if main:
                        self.check_quantizers(log, it, bar.write)
                step_time += time.time() - t_step
                if self.eval_on and (it % self.cfg.eval.every == 0 or is_last):
                    reached = False
                    if main:
                        res = self.evaluate(self.student, it)
                        log.scalars("eval", res, it)
                        self.history.append({"iteration": it, "eval": res})
                        bar.write(f"act: iteration {it}: {_fmt(res)}")
                        if self.metric and (self.best_metric is None or math.isnan(self.best_metric)
                                            or res[self.metric] > self.best_metric):
                            self.best_metric, self.best_iteration = res[self.metric], it
                            self.save("best.pt", it, training_state=False)
                        reached = self.early_stop(res, it)
                    self.dist.barrier()
                    if self.dist.enabled:  # every rank stops where the main one decided to
                        reached = bool(D.all_reduce_max(torch.tensor(int(reached), device=self.device)))
                    if reached:
                        if self.sync_free:
                            self._read_nonfinite(it)
                        self.save("last.pt", it)
                        break
                if it % self.cfg.train.checkpoint_every == 0 or is_last:
                    if self.sync_free:
                        self._read_nonfinite(it)  # (snapshot only a state known to be good)
                    self.save("last.pt", it)
                    self.guard.snapshot(it)
        except KeyboardInterrupt:
            interrupted = "SIGINT"
        except torch.cuda.OutOfMemoryError as e:
            interrupted = e
        except ActError:
            log.close()
            raise
        finally:
            stop.__exit__(None, None, None)
            bar.close()
            self._close_data(batches)
        self.loss_history = losses[: it - start].tolist()
        if interrupted is not None:
            self._stop_early(interrupted, it, log)
        D.dump_state(self.student, self.dist.rank, {"loss_history": self.loss_history, "iterations": it})
        if not self.metric:
            self.best_iteration = it
            self.save("best.pt", it, training_state=False)
        train_time = time.time() - t0
        extra = {
            "time_s": {"calibrate": round(self.calibrate_time, 2), "steps": round(step_time, 2),
                       "compress": round(self.calibrate_time + step_time, 2), "eval": round(self.eval_time, 2)},
            "speed": {"train_images_per_s": round(step_images / step_time, 2) if step_time > 0 else None,
                      "data_wait_share": round(data_wait / step_time, 3) if step_time > 0 else None,
                      "ranks": self.dist.world_size, "global_batch": self.global_batch},
            "quant_init": ({"from": self.cfg.quant.init_from} if self.cfg.quant.init_from
                           else {"ema_batches": self.cfg.quant.calib_batches}),
            "nan_policy": self.guard.state_dict(),
        }
        if not main:  # rank 0 exports and writes the summary
            log.close()
            self.dist.barrier()
            return {"rank": self.dist.rank, "iterations": it, **extra}
        summary = self.finish(log, before, it, train_time, extra=extra)
        log.close()
        self.dist.barrier()
        return summary

    def early_stop(self, results: Dict[str, float], iteration: int) -> bool:
        """Stop training after this eval? (act.strategy sets a target; a plain run trains all its iterations.)"""
        return False

    def _stop_early(self, why, it: int, log) -> None:
        """Save what the interrupted loop completed (unless it stopped inside an optimizer update) and raise."""
        saved = False
        # a step cut short inside the optimizer update (or anywhere in a device-side step) is never saved
        if not (self._updating or (self._in_step and self.sync_free)):
            if self._in_step:
                self.guard._undo_buffers()  # a forward pass cut short may have moved the quantizer ranges
            self.optimizer.zero_grad(set_to_none=True)
            try:
                if isinstance(why, BaseException) and self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.save("last.pt", it)
                saved = True
            except ActError as e:
                print(f"act: error: {e}", file=sys.stderr)
        log.close()
        last = self.out / "last.pt"
        state = (f"last.pt saved at iteration {it}/{self.total_iters}" if saved else
                 f"the last complete checkpoint is {last}" if last.exists() else "no checkpoint was written yet")
        if isinstance(why, BaseException):
            raise self._oom_error(why, getattr(self, "_where", "training")) from None
        code = 143 if why == "SIGTERM" else 130
        raise Interrupted(f"stopped by {why} at iteration {it}/{self.total_iters}; {state}. Resume with:\n"
                          f"  {self.resume_command()}", exit_code=code)

    def _should_stop(self, stop: StopSignals, it: int, start: int) -> bool:
        """A stop signal was received (by any rank: under DDP the ranks agree at log steps, so they stop together)."""
        if not self.dist.enabled:
            return stop.requested
        if it == start or it % self.cfg.train.log_every:
            return False
        flag = torch.tensor(float(stop.requested), device=self.device)
        return bool(D.all_reduce_max(flag) > 0)

    def check_quantizers(self, log, it: int, write=print) -> Dict[str, str]:
        """Warn (once per quantizer) about collapsed ranges; log their count to TensorBoard."""
        if not self.cfg.quant.enabled:
            return {}
        bad = collapsed_quantizers(self.student)
        new = {k: v for k, v in bad.items() if k not in self._collapsed}
        self._collapsed = bad
        if log.writer is not None:
            log.writer.add_scalar("quant/collapsed", len(bad), it)
        if new:
            write("\n".join([f"act: warning: {len(new)} quantizer range(s) collapsed at iteration {it}:"]
                            + format_report(new)))
        return bad

    def finish(self, log, before, it: int, train_time: float, checkpoint: str = "best.pt",
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Summary, Q/DQ ONNX export of `checkpoint` and its parity check; writes summary.json."""
        cfg = self.cfg
        best = load_checkpoint(self.out / checkpoint)
        best_student = best["model"].to(self.device)
        after = self.history[-1].get("eval", {}) if len(self.history) > 1 else {}
        bad_q = collapsed_quantizers(best_student) if cfg.quant.enabled else {}
        best_eval = next((h["eval"] for h in self.history if h.get("iteration") == self.best_iteration and "eval" in h),
                         after)
        summary: Dict[str, Any] = {
            "teacher": str(self.source.path),
            "task": self.task,
            "iterations": it,
            "best_iteration": self.best_iteration,
            "metric": self.metric,
            "metrics": {"before": before, "best": best_eval, "last": after},
            "time_s": {"train": round(train_time, 2)},
            "nodes": [n.name for n in self.nodes],
            "quantized_layers": len(Q.quantized_modules(self.student)),
            "bad_images": len(self.bad_images),
            "skipped_images": {"count": len(self.bad_images),
                               "file": str(self.write_skipped()) if self.bad_images else None},
            "nonfinite_steps": self.nonfinite_steps,
            "quant_health": {"collapsed": len(bad_q), "quantizers": bad_q} if cfg.quant.enabled else None,
            "settings": cfg.dump(),
        }
        if getattr(self.student, "act_placement", None):
            summary["placement"] = self.student.act_placement  # Q/DQ placement rules and shared-scale groups
        if self.fidelity_paths:
            summary["fidelity_images"] = {"count": len(self.fidelity_paths), "held_out": self.fidelity_held_out,
                                          "first": str(self.fidelity_paths[0])}
        if getattr(self, "auto_skip", None):
            summary["auto_skip"] = self.auto_skip
        if getattr(self, "decisions", None):
            summary["decisions"] = self.decisions
        for k, v in (extra or {}).items():
            if isinstance(v, dict) and isinstance(summary.get(k), dict):
                summary[k].update(v)
            else:
                summary[k] = v
        if self.bad_images:
            print(f"act: skipped {len(self.bad_images)} unusable image(s); list in {self.out / 'skipped_images.txt'}")
        if bad_q:
            print("\n".join([f"act: warning: {len(bad_q)} quantizer range(s) of the exported student collapsed:"]
                            + format_report(bad_q)))
        if cfg.export.onnx:
            t1 = time.time()
            onnx_path = export_onnx(best_student, self.out / "student.onnx", self.family, cfg.data.imgsz,
                                    cfg.export.batch, cfg.export.opset, cfg.export.dynamic,
                                    metadata={"act": json.dumps({"best_iteration": self.best_iteration})},
                                    simplify=cfg.export.simplify,
                                    skip=list(cfg.quant.skip) + list(self.family.float_patterns))
            images = self.parity_images()
            par = parity(best_student, onnx_path, self.family, images, cfg.export.parity_tolerance,
                         raise_on_fail=False)
            summary["onnx"] = {"path": str(onnx_path), "parity": par, "qdq": qdq_summary(onnx_path)}
            summary["onnx"]["lint"] = lint_after_export(onnx_path, quantized=cfg.quant.enabled)
            if cfg.export.tensorrt.enabled:
                from act.engine import build_engine

                summary["engine"] = build_engine(onnx_path, onnx_path.with_suffix(".engine"), cfg.export.tensorrt)
            summary["time_s"]["export"] = round(time.time() - t1, 2)
            self._write_summary(summary)
            if not par["passed"]:
                parity(best_student, onnx_path, self.family, images, cfg.export.parity_tolerance)  # raises
        if cfg.report.enabled:
            from act.report import write_report

            summary["report"] = write_report(self.out, summary, runner=self, log=log, student=best_student)
        self._write_summary(summary)
        if self.metric and self.best_metric is not None:
            print(f"act: done. best {self.metric}: {self.best_metric:.4f} at iteration {self.best_iteration}")
        else:
            print(f"act: done at iteration {self.best_iteration} (no eval.metric: best.pt is the last student)")
        print(f"act: outputs in {self.out}  (ONNX: {self.out / 'student.onnx'}; "
              f"TensorBoard: tensorboard --logdir {self.log_dir()})")
        return summary

    def parity_images(self) -> torch.Tensor:
        n = self.cfg.export.parity_images
        try:
            paths = resolve_source(self.cfg.data.train)[:n]
            return load_images(paths, self.cfg.data.imgsz)
        except ActError:
            return torch.rand(n, 3, self.cfg.data.imgsz, self.cfg.data.imgsz)

    def _write_summary(self, summary):
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2, default=str), what="summary")


def _fmt(d: Dict[str, float]) -> str:
    """The headline metrics; the per-node details (keys with a '/') go to TensorBoard and summary.json only."""
    return ", ".join(f"{k}={v:.4f}" for k, v in d.items() if "/" not in k) or "(no metrics)"
