"""The whole training step as one CUDA graph (`train.cuda_graph`).

Eager PyTorch launches every kernel of a step from Python: teacher forward, fake-quant student forward and backward,
loss, gradient clip, optimizer, some 5,000 launches per step on yolo11n-pose, which leaves the GPU waiting on one CPU
core (docs/scale.md). The step has what graph capture needs: fixed batch shape (square letterbox, full batches from
an endless sample stream), no host reads (losses stay on the device, the fused optimizer skips a non-finite step on
the device) and no data-dependent control flow. So `CapturedStep` records it once and replays it:

- the first `warmup` steps run eagerly on the capture's side stream (lazy initialisation: cuDNN plans, optimizer
  state, compiled quantizer kernels), then one step is captured and every later one is a copy of the batch into the
  graph's input buffer plus one replay;
- the learning rate stays a float in the param groups (the scheduler, logs and train.nan_policy work on it as
  before); the captured optimizer reads a device copy that is refreshed before each replay;
- a non-finite loss or gradient skips the update on the device (the optimizer's `found_inf`, as a GradScaler at scale
  1 does on the eager path); the trainer counts it from the loss as before;
- what is not in the graph runs eagerly after the replay: scheduler, hooks (sparsity masks, channel decay), weight
  EMA, logging;
- anything that replaces the optimizer, the step's model or their state (a pruning step, a resume, a train.nan_policy
  restore) calls `invalidate()`: the graph is dropped and captured again after `warmup` eager steps; a batch of
  another shape or dtype runs eagerly (with a message, once).

Values are those of the eager step (the same kernels, replayed); `tests/test_step_graph.py` compares the two on a GPU.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch


def unavailable_reason(device: torch.device, distributed: bool, compile_all: bool, amp: str,
                       host_sync: Optional[str] = None) -> Optional[str]:
    """Why the step cannot be captured here, or None. `host_sync`: what in the loss waits for the host (its reason)."""
    if device.type != "cuda":
        return f"it needs a CUDA device (this run is on {device.type})"
    if host_sync:
        return host_sync
    if distributed:
        return "not under DDP (its gradient all-reduce and the quantizers' range all-reduce run outside a graph)"
    if compile_all:
        return "train.compile=true compiles the student itself"
    if amp == "fp16":
        return "train.amp=fp16 needs the GradScaler's dynamic loss scale (bf16 and fp32 are captured)"
    return None


_SAID = set()  # (messages said once per process)


def captured_step(train_cfg, device: torch.device, distributed: bool, body, optimizer, params,
                  say: Callable[[str], None] = print, host_sync: Optional[str] = None) -> Optional["CapturedStep"]:
    """The CapturedStep that train.cuda_graph asks for, or None (eager): `false`; or where it cannot run, with a
    message when `true` was asked for."""
    if train_cfg.cuda_graph is False:
        return None
    why = unavailable_reason(device, distributed, train_cfg.compile is True, train_cfg.amp, host_sync)
    if why is not None:
        if why not in _SAID:
            _SAID.add(why)
            say(f"act: train.cuda_graph: the step runs eagerly: {why}")
        return None
    return CapturedStep(body, optimizer, params, train_cfg.grad_clip, device, train_cfg.cuda_graph_warmup, log=say)


def update_on_device(loss: torch.Tensor, params, optimizer: torch.optim.Optimizer, grad_clip: Optional[float],
                     found_inf: torch.Tensor, one: torch.Tensor) -> None:
    """Backward, gradient clip, non-finite check and optimizer step with no host sync: what the graph records, and
    what the eager step does through its GradScaler at scale 1 (tests/test_step_graph.py compares the two on the
    CPU). The optimizer must take `found_inf` (the fused AdamW / Adam / SGD do): a non-finite loss or gradient
    skips the update on the device."""
    loss.backward()
    with_grad = [p for p in params if p.grad is not None]
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(with_grad, grad_clip)  # (parameters: it reads their .grad)
    found_inf.zero_()
    torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in with_grad], found_inf, one)
    found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(loss.detach())).float()))
    optimizer.grad_scale, optimizer.found_inf = None, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


class CapturedStep:
    """Captures `body(images) -> (loss, {node: loss})` (forward, backward; no optimizer step) together with the
    clipping and the optimizer step, and replays it; `step(images, eager)` runs one training step either way."""

    def __init__(self, body: Callable[[torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
                 optimizer: torch.optim.Optimizer, params, grad_clip: Optional[float], device: torch.device,
                 warmup: int = 3, log: Callable[[str], None] = print):
        self.body = body
        self.optimizer = optimizer
        self.params = [p for p in params if p.requires_grad]
        self.grad_clip = grad_clip
        self.device = device
        self.warmup = max(1, int(warmup))
        self.log = log
        self.stream = torch.cuda.Stream(device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager_steps = 0
        self.captures = 0
        self.replays = 0
        self.failed: Optional[str] = None  # capture failed once: eager from then on
        self._said_shape = False
        self._input: Optional[torch.Tensor] = None
        self._outputs: Optional[torch.Tensor] = None
        self._found_inf: Optional[torch.Tensor] = None
        self._one: Optional[torch.Tensor] = None
        self._names: Tuple[str, ...] = ()
        self._lrs: list = []

    # ---- state ------------------------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """The optimizer, the model or their tensors changed: capture again after `warmup` eager steps."""
        self.graph = None
        self._input = self._outputs = self._found_inf = self._one = None
        self._lrs = []
        self.eager_steps = 0

    @property
    def active(self) -> bool:
        return self.graph is not None

    def info(self) -> Dict[str, Any]:
        return {"captures": self.captures, "replays": self.replays, "failed": self.failed}

    # ---- one step ---------------------------------------------------------------------------------------------
    def step(self, images: torch.Tensor, eager: Callable[[torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One training step: a replay when captured, else `eager(images)` (forward, backward, optimizer step:
        the warmup steps on the capture's stream, a batch of another shape on the current one). Returns (loss,
        per_node) as device tensors that survive the next replay."""
        if self.failed is None and self.graph is not None:
            if images.shape == self._input.shape and images.dtype == self._input.dtype:
                return self._replay(images)
            if not self._said_shape:
                self.log(f"act: train.cuda_graph: a batch of shape {tuple(images.shape)} {images.dtype} "
                         f"(captured: {tuple(self._input.shape)} {self._input.dtype}) runs eagerly")
                self._said_shape = True
            return eager(images)
        if self.failed is None and self.eager_steps >= self.warmup:
            out = self._capture(images)
            if out is not None:
                return out
        if self.failed is not None:
            return eager(images)
        self.eager_steps += 1
        with _OnStream(self.stream):  # lazy per-stream initialisation happens on the stream the capture uses
            return eager(images)

    def _replay(self, images):
        self._input.copy_(images, non_blocking=True)
        for t, g in zip(self._lrs, self.optimizer.param_groups):
            t.fill_(float(g["lr"]))
        self.graph.replay()
        self.replays += 1
        return self._unpack(self._outputs.clone())

    def _unpack(self, packed: torch.Tensor):
        return packed[0], {k: packed[i + 1] for i, k in enumerate(self._names)}

    def _capture(self, images):
        opt = self.optimizer
        floats = [g["lr"] for g in opt.param_groups]
        self._lrs = [torch.tensor(float(lr), dtype=torch.float32, device=self.device) for lr in floats]
        saved_capturable = [g.get("capturable") for g in opt.param_groups]
        self._input = torch.empty_like(images, device=self.device)
        self._input.copy_(images, non_blocking=True)
        # Every tensor the graph reads or writes must live as long as the graph: the replay uses its address.
        # (found_inf and one were locals once: freed after the capture, their memory was handed to other tensors,
        # and from the second replay on the gradients were multiplied by whatever lay there.)
        self._found_inf = found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
        self._one = one = torch.ones((), dtype=torch.float32, device=self.device)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # the backward allocates the gradients inside the graph's pool
        torch.cuda.current_stream(self.device).synchronize()
        try:
            for g, t in zip(opt.param_groups, self._lrs):
                g["lr"], g["capturable"] = t, True
            # thread_local: the loader's pin-memory thread may allocate page-locked memory while this thread captures
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                loss, per_node = self.body(self._input)
                self._names = tuple(per_node)
                update_on_device(loss, self.params, opt, self.grad_clip, found_inf, one)
                self._outputs = torch.stack([loss.detach().float()] +
                                            [v.detach().float().reshape(()) for v in per_node.values()])
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager step
            self.failed = f"{type(e).__name__}: {e}"
            self.log(f"act: train.cuda_graph: capture failed ({self.failed.splitlines()[0][:200]}); "
                     f"the step runs eagerly")
            self.invalidate()
            opt.zero_grad(set_to_none=True)
            return None
        finally:
            for g, lr, c in zip(opt.param_groups, floats, saved_capturable):
                g["lr"] = lr
                if c is None:
                    g.pop("capturable", None)
                else:
                    g["capturable"] = c
        self.graph = graph
        self.captures += 1
        graph.replay()  # capture records; this runs the step
        self.replays += 1
        return self._unpack(self._outputs.clone())


class _OnStream:
    """Run on `stream`, ordered after the current stream's work and before what follows it."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.prev = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(self.prev)
        self.ctx = torch.cuda.stream(self.stream)
        self.ctx.__enter__()

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        self.prev.wait_stream(self.stream)
        return False
