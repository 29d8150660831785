"""`Trainer`: distillation training of the student against the frozen teacher, on unlabeled images.

    summary = Trainer("configs/demo_pose_qat.yaml").run()      # what `act compress` runs for strategy: qat

The loop: calibrate the activation quantizers (or start from quant.init_from's ranges), then per iteration a
teacher forward, a student forward/backward on the distillation loss and an optimizer step; log, evaluate every
eval.every iterations (best.pt by eval.metric), write last.pt every train.checkpoint_every; stop cleanly on
SIGINT/SIGTERM, skip and roll back non-finite steps; then deliver (act.run.deliver). A script may pass its own
`train_loader` (image batches, float in [0, 1], or (images, ...) tuples) and `eval_fn(model, context) -> dict`.
Stage kinds, the strategy's target and quant.skip auto plug in as act.run.hooks.RunHooks.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from act.blocks import dist as D
from act.run import runstate
from act.run.initial_ranges import initial_ranges
from act.blocks.ema import WeightEMA
from act.blocks.checkpoint import load_checkpoint
from act.blocks.data import as_model_input, iterations_for, resolve_source
from act.core.errors import ActError, Interrupted
from act.blocks.monitor import RunLogger
from act.blocks.pipeline import build_train_loader
from act.blocks.quant.health import CollapseWatch
from act.blocks.recovery import NanGuard, grads_finite
from act.run.runner import Run, fmt_metrics
from act.core.signals import StopSignals
from act.run.step_graph import captured_step
from act.run.stream import ImageStream


class Trainer(Run):
    """One distillation run (see the module doc). `run()` trains (or resumes), evaluates, exports, returns the
    summary dict."""

    # ---- setup ------------------------------------------------------------------------------------------------------
    def setup(self):
        self.setup_models()
        self.setup_train_model()
        self.setup_data()
        self.setup_eval(keeps_best=True)
        self.setup_optimizer()
        self.calibrate_time = 0.0
        self.guard = NanGuard(self.cfg.train.nan_policy, self)
        self._updating = self._in_step = False  # where an interruption found the step (act.blocks.recovery)
        self._iteration = 0
        self._nonfinite_dev = self._consec_dev = None  # non-finite steps counted on the device (sync-free path)
        self.collapse = CollapseWatch()  # warns about quantizer ranges that collapse
        self.quant_init: Dict[str, Any] = {}  # how the activation ranges started (summary.json)
        self.ema: Optional[WeightEMA] = None  # train.ema: made at the first step (from the calibrated student)
        for h in self.hooks:
            h.setup(self.context)

    def setup_train_model(self) -> None:
        """What the step runs: the student returning its node outputs, wrapped in DDP under torchrun, optionally
        compiled (docs/scale.md)."""
        cfg = self.cfg
        model: nn.Module = D.NodeOutputs(self.student, self.s_capture)
        if self.dist.enabled:
            model = D.wrap_ddp(model, self.device, cfg.train.find_unused_parameters)
        from act.blocks.quant import fused

        fused.set_enabled(fused.wanted(cfg.train.compile, self.device))
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

    def setup_data(self) -> None:
        cfg = self.cfg
        self.setup_pool()
        dist = self._dist()
        global_batch = cfg.data.batch_size * dist.world_size  # data.batch_size is per rank
        if self.user_loader is None:
            paths = self.pool if self.pool is not None else resolve_source(cfg.data.train)
            loader = build_train_loader(cfg.data, paths, seed=cfg.train.seed, rank=dist.rank,
                                        world_size=dist.world_size, device_type=self.device.type,
                                        letterbox_fn=self.family.letterbox)
            n_images = len(loader.dataset)
        else:
            loader = self.user_loader
            n_images = len(getattr(self.user_loader, "dataset", [])) or cfg.data.batch_size
        self.stream = ImageStream(loader, self.out, cfg.data.batch_size, global_batch, source=str(cfg.data.train),
                                  bad_images=self.bad_images)
        self.loader = loader
        self.global_batch = global_batch
        self.total_iters = iterations_for(cfg.train, n_images, global_batch)

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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        amp = cfg.train.amp if self.device.type == "cuda" else "none"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        # sync_free: every step runs backward and lets the scaler skip non-finite updates (consistently on every
        # rank under DDP); the plain CPU path checks the loss on the host instead.
        self.sync_free = self.device.type == "cuda" or self.dist.enabled
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else torch.amp.GradScaler(
            self.device.type, init_scale=1.0, growth_interval=2**30, enabled=self.sync_free)
        # train.cuda_graph (act.run.step_graph): bound to this optimizer; made again with each new one (a pruning step)
        self.step_graph = captured_step(self.cfg.train, self.device, self.dist.enabled, self.forward_loss, self.optimizer,
                                        self.student.parameters(), say=print if self.dist.is_main else lambda m: None,
                                        host_sync=self.loss_fn.host_sync)

    def invalidate_step(self) -> None:
        """The optimizer's or the model's tensors were replaced (a restore, a resume): capture the step again."""
        if getattr(self, "step_graph", None) is not None:
            self.step_graph.invalidate()

    def lr_factor(self, it: int) -> float:
        """The learning rate at iteration `it`, as a factor of train.lr: linear warmup, then constant or cosine."""
        t = self.cfg.train
        if t.warmup_iters and it < t.warmup_iters:
            return (it + 1) / t.warmup_iters
        if t.scheduler == "constant":
            return 1.0
        span = max(1, self.total_iters - t.warmup_iters)
        p = min(1.0, (it - t.warmup_iters) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    # ---- calibration ------------------------------------------------------------------------------------------------
    def calibrate(self, batches) -> None:
        """Initial activation ranges (act.run.initial_ranges.initial_ranges: quant.init_from, quant.calibrator)."""
        self.quant_init = initial_ranges(self, batches)
        for h in self.hooks:
            h.calibrated(self.context)

    # ---- one step ---------------------------------------------------------------------------------------------------
    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        x = as_model_input(images, self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def teacher_outputs(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The teacher's node outputs: no autograd graph, optionally under autocast (train.teacher_amp)."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.teacher_amp or torch.float32,
                                             enabled=self.teacher_amp is not None):
            self.teacher(images)
        return self.t_capture.pop()

    def distill_loss(self, images) -> torch.Tensor:
        """The distillation loss of one batch with the plain student (no DDP/compile wrapper, no optimizer step):
        what a Taylor importance accumulates gradients of."""
        images = self.model_input(images)
        with torch.no_grad():
            self.teacher(images)
        t_out = {k: v.clone() for k, v in self.t_capture.pop().items()}
        self.student(images)
        loss, _ = self.loss_fn(self.s_capture.pop(), t_out)
        return loss

    def forward_loss(self, images: torch.Tensor):
        """Teacher and student forward on one batch -> (loss, {node: loss}); no autocast weight cache (a captured
        step must not keep casts across replays)."""
        t_out = self.teacher_outputs(images := self.model_input(images))
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            s_out = self.train_model(images)
        return self.loss_fn(s_out, t_out)

    def train_step(self, images: torch.Tensor) -> Dict[str, Any]:
        """One distillation step (with train.cuda_graph: a replay). Returns the loss and per-node losses; on CUDA
        (and under DDP) as device tensors read at log steps only: the host never waits for the device in a step."""
        if self.step_graph is not None:
            stats = self._after_update(*self.step_graph.step(images, self._eager_update))
        elif self.sync_free:
            stats = self._after_update(*self._eager_update(images))
        else:
            stats = self._step_checked(*self.forward_loss(images))
        for h in self.hooks:
            h.after_step(self.context)
        if self.cfg.train.ema:
            if self.ema is None or self.ema.model is not self.student:  # (pruning steps drop it; a new stage's student)
                self.ema = WeightEMA(self.student, self.cfg.train.ema, self.cfg.train.ema_tau)
            self.ema.update()
        return stats

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated, kept as best.pt and exported: the weight EMA with train.ema, else the student."""
        return self.ema.module if self.ema is not None else self.student

    def _step_checked(self, loss: torch.Tensor, per_node: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The host-checked step (CPU, one process): a non-finite loss or gradient skips the update."""
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
        self.guard.good_step()
        out = {"loss": float(loss.detach())}
        out.update({f"node/{k}": float(v) for k, v in per_node.items()})
        return out

    def _eager_update(self, images: torch.Tensor):
        """Forward, backward and optimizer step with no host sync (what the captured step records)."""
        loss, per_node = self.forward_loss(images)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)  # skipped on the device when a gradient is not finite
        self.scaler.update()
        return loss, per_node

    def _after_update(self, loss: torch.Tensor, per_node: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The sync-free step's bookkeeping: scheduler, non-finite steps counted on the device."""
        self.scheduler.step()
        loss = loss.detach()
        bad = (~torch.isfinite(loss)).int()
        self._nonfinite_dev = bad if self._nonfinite_dev is None else self._nonfinite_dev + bad
        # non-finite steps in a row, on the device (train.nan_policy reads it at log steps: no sync per step)
        self._consec_dev = bad if self._consec_dev is None else (self._consec_dev + bad) * bad
        out: Dict[str, Any] = {"loss": loss}
        out.update({f"node/{k}": v for k, v in per_node.items()})
        return out

    def _read_nonfinite(self, iteration: Optional[int] = None) -> None:
        dev = self._nonfinite_dev
        if dev is None:
            return
        both = torch.stack([dev, self._consec_dev if self._consec_dev is not None else torch.zeros_like(dev)])
        new, consec = (int(v) for v in (D.all_reduce_max(both.clone()) if self.dist.enabled else both).tolist())
        self.nonfinite_steps += new
        self._nonfinite_dev = None
        if new and iteration is not None:
            msg = self.guard.observe(new, consec, iteration)  # may restore (or raise DivergedError)
            if self.guard.consecutive == 0:
                self._consec_dev = None
            if msg and self.dist.is_main:
                print(f"act: warning: {msg}")

    def _skip_step(self, what: str) -> Dict[str, float]:
        """A step with a non-finite loss or gradient: nothing is applied (train.nan_policy, act.blocks.recovery)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        msg = self.guard.bad_step(self._iteration + 1, what)  # raises DivergedError past the limits
        self.nonfinite_steps = self.guard.skipped
        if msg:
            print(f"act: warning: {msg}")
        return {"loss": float("nan"), "skipped": 1.0}

    # ---- the run ----------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False, exist_ok: bool = False, force: bool = False,
            close_dist: bool = True) -> Dict[str, Any]:
        """Train (or resume from last.pt), evaluate, deliver. close_dist=False keeps the process group up (a staged
        run's next stage uses it)."""
        self.resuming = resume
        self.force = force or self.force
        t0 = time.time()
        self.prepare_output(resume, exist_ok)
        try:
            return self._run(resume, t0)
        finally:
            if close_dist:
                self._dist().close()

    def _start(self, resume: bool, batches, log) -> tuple:
        """Resume from last.pt, or calibrate and measure 'before'. Returns (start iteration, before metrics)."""
        main = self.dist.is_main
        if resume:
            start = self.resume_from(self.out / "last.pt", self._resume_ckpt)
            self._resume_ckpt = None
            self.quant_init = {"resumed": True}
            if main:
                print(f"act: resuming {self.out} at iteration {start}/{self.total_iters}")
            return start, (self.history[0].get("before", {}) if self.history else {})
        before: Dict[str, Dict[str, float]] = {}
        t_cal = time.time()
        self.calibrate(batches)
        self.calibrate_time = time.time() - t_cal
        if self.known_before:
            before = dict(self.known_before)  # measured by an earlier run (act.orchestrate.strategy)
        elif self.cfg.eval.before and self.evaluators and main:
            before["teacher"] = self.evaluate(self.teacher, 0)
            before["student_init"] = self.evaluate(self.student, 0)
            log.scalars("eval_before/teacher", before["teacher"], 0)
            log.scalars("eval_before/student", before["student_init"], 0)
            head = f"act: teacher {fmt_metrics(before['teacher'])} | " if before["teacher"] else "act: "
            print(f"{head}student before training {fmt_metrics(before['student_init'])}")
        self.history.append({"iteration": 0, "before": before})
        self.dist.barrier()
        return 0, before

    def _run(self, resume: bool, t0: float) -> Dict[str, Any]:
        from tqdm import tqdm

        self.setup()
        main = self.dist.is_main
        self.loss_history: List[float] = []  # loss of every step of this process (for scripts and tests)
        log = self.logger = RunLogger(self.log_dir(), enabled=main)
        batches = self.stream.batches()
        stop = StopSignals()
        stop.__enter__()
        try:
            start, before = self._start(resume, batches, log)
            self.guard.snapshot(start)
        except BaseException:
            stop.__exit__(None, None, None)
            self.stream.close(batches)
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
                for h in self.hooks:
                    h.before_iteration(self.context, it, batches)
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
                    if main and self.cfg.quant.enabled:
                        self.collapse.check(self.student, log.writer, it, bar.write)
                step_time += time.time() - t_step
                if self.eval_on and (it % self.cfg.eval.every == 0 or is_last):
                    if self._eval_and_maybe_stop(it, log, bar):
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
            self.stream.close(batches)
        self.loss_history = losses[: it - start].tolist()
        if interrupted is not None:
            self._stop_early(interrupted, it, log)
        D.dump_state(self.student, self.dist.rank, {"loss_history": self.loss_history, "iterations": it})
        if not self.metric:
            self.best_iteration = it
            self.save("best.pt", it, training_state=False, model=self.eval_model)
        train_time = time.time() - t0
        extra = {
            "time_s": {"calibrate": round(self.calibrate_time, 2), "steps": round(step_time, 2),
                       "compress": round(self.calibrate_time + step_time, 2), "eval": round(self.eval_time, 2)},
            "speed": {"train_images_per_s": round(step_images / step_time, 2) if step_time > 0 else None,
                      "data_wait_share": round(data_wait / step_time, 3) if step_time > 0 else None,
                      "ranks": self.dist.world_size, "global_batch": self.global_batch, "images": step_images},
            "quant_init": self.quant_init,
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

    def _eval_and_maybe_stop(self, it: int, log, bar) -> bool:
        """Evaluate (rank 0), keep best.pt, ask the hooks whether to stop; every rank stops where rank 0 decided.
        Returns True to stop (last.pt is written then)."""
        reached = False
        if self.dist.is_main:
            res = self.evaluate(self.eval_model, it)
            log.scalars("eval", res, it)
            self.history.append({"iteration": it, "eval": res})
            bar.write(f"act: iteration {it}: {fmt_metrics(res)}")
            if self.metric and (self.best_metric is None or math.isnan(self.best_metric)
                                or res[self.metric] > self.best_metric):
                self.best_metric, self.best_iteration = res[self.metric], it
                self.save("best.pt", it, training_state=False, model=self.eval_model)
            reached = any([h.should_stop(self.context, res, it) for h in self.hooks])
        self.dist.barrier()
        if self.dist.enabled:  # every rank stops where the main one decided to
            reached = bool(D.all_reduce_max(torch.tensor(int(reached), device=self.device)))
        if reached:
            if self.sync_free:
                self._read_nonfinite(it)
            self.save("last.pt", it)
        return reached

    def resume_from(self, path: Path, ckpt: Optional[Dict[str, Any]] = None) -> int:
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)
        for h in self.hooks:
            h.resume(self.context, ckpt)
        it = runstate.restore_training_state(self, ckpt)
        for h in self.hooks:
            h.resumed(self.context, ckpt)
        return it

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
            raise self.oom_error(why, self._where) from None
        code = 143 if why == "SIGTERM" else 130
        raise Interrupted(f"stopped by {why} at iteration {it}/{self.total_iters}; {state}. Resume with:\n"
                          f"  {self.resume_command()}", exit_code=code, iteration=it, state=state)

    def _should_stop(self, stop: StopSignals, it: int, start: int) -> bool:
        """A stop signal was received (by any rank: under DDP the ranks agree at log steps, so they stop together)."""
        if not self.dist.enabled:
            return stop.requested
        if it == start or it % self.cfg.train.log_every:
            return False
        flag = torch.tensor(float(stop.requested), device=self.device)
        return bool(D.all_reduce_max(flag) > 0)
