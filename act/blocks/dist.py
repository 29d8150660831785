"""Data-parallel compression on several GPUs (or CPU processes) with PyTorch's own engine: torch.distributed + DDP.

    torchrun --nproc_per_node 2 -m act compress --config X.yaml     # or: act compress --config X.yaml --devices 0,1

Every rank holds the whole teacher and student and trains on its own slice of each global batch
(data.batch_size images per rank). DDP averages the gradients (weights and PACT alphas alike), and every activation
quantizer max-reduces its batch abs-max across ranks before the moving-average update, so all quantizer states stay
identical on every rank. Rank 0 alone writes TensorBoard, checkpoints, evaluations and exports; the other ranks wait
at a barrier meanwhile.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as tdist
from torch import nn

from act.core.errors import ActError, ConfigError


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The quantizers' `reduce_fn` under DDP (a module-level function, so a model holding it still pickles)."""
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Dist:
    """This process's place in a torchrun job (or a single process: enabled False, rank 0 of 1)."""

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = env_world()
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        return cls(rank, local, world)

    def device(self, spec: str) -> torch.device:
        """ACT_DEVICES (set by `act compress --devices`) names each local rank's device; under a bare torchrun,
        cuda:LOCAL_RANK when CUDA is there (and train.device is not 'cpu'), else the CPU."""
        listed = os.environ.get("ACT_DEVICES")
        if listed:
            name = listed.split(",")[self.local_rank].strip()
            return torch.device("cpu" if name == "cpu" else f"cuda:{name.split(':')[-1]}")
        if spec != "cpu" and torch.cuda.is_available():
            return torch.device(f"cuda:{self.local_rank}")
        return torch.device("cpu")

    def init(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, gloo on CPU)."""
        if not self.enabled or tdist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        minutes = float(os.environ.get("ACT_DIST_TIMEOUT_MIN", "120"))  # rank 0 may evaluate a long while
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                 timeout=datetime.timedelta(minutes=minutes),
                                 device_id=device if device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: Dict[str, torch.Tensor], device) -> Dict[str, float]:
        """Rank-averaged floats of a dict of scalars (one collective; a device sync, so at log steps only)."""
        keys = sorted(values)
        if not keys:
            return {}
        t = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device).reshape(()) for k in keys])
        if self.enabled:
            tdist.all_reduce(t)
            t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            tdist.all_reduce(value)
        return value

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()


class NodeOutputs(nn.Module):
    """The student's forward returning its captured distillation-node outputs: what DDP sees as the output, so the
    parameters it waits gradients for are exactly those the loss depends on."""

    def __init__(self, model: nn.Module, capture):
        super().__init__()
        self.model = model
        self.capture = capture

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.model(x)
        return self.capture.pop()


def wrap_ddp(module: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect

    # buffers (quantizer moving averages) are kept equal by the abs-max all-reduce, not re-broadcast every forward
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})  # (the former name is deprecated from torch 2.14)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused, gradient_as_bucket_view=True, **no_sync)


def dump_state(student: nn.Module, rank: int, extra: Optional[Dict[str, Any]] = None) -> None:
    """Test hook: with ACT_DEBUG_STATE_DIR set, each rank saves its final student state there (rank{r}.pt)."""
    folder = os.environ.get("ACT_DEBUG_STATE_DIR")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    torch.save({"state": state, **(extra or {})}, Path(folder) / f"rank{rank}.pt")


def parse_devices(spec: str) -> List[str]:
    """'0,1' -> ['0', '1']; 'cpu,cpu' -> two CPU processes; 'cuda:0' -> ['0']."""
    out = []
    for d in spec.split(","):
        d = d.strip().lower()
        if not d:
            continue
        if d == "cpu":
            out.append("cpu")
        elif d.removeprefix("cuda:").isdigit():
            out.append(d.removeprefix("cuda:"))
        else:
            raise ConfigError(f"--devices: expected GPU indices or 'cpu' separated by commas (e.g. 0,1), got {d!r}")
    if not out:
        raise ConfigError("--devices: no device given")
    if "cpu" in out and len(set(out)) > 1:
        raise ConfigError("--devices: mixing 'cpu' with GPUs is not supported")
    if "cpu" not in out:
        n = torch.cuda.device_count()
        bad = [d for d in out if int(d) >= n]
        if bad:
            raise ConfigError(f"--devices: no GPU {', '.join(bad)} on this machine ({n} visible)")
    return out


def launch(devices: Sequence[str], argv: Sequence[str]) -> int:
    """Run `python -m act <argv>` on len(devices) local processes through torchrun (torch.distributed.run)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ["ACT_DEVICES"] = ",".join(devices)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if devices[0] == "cpu" else str(
        max(1, (os.cpu_count() or 1) // (2 * len(devices)))))
    args = ["--standalone", "--nproc_per_node", str(len(devices)), "-m", "act", *argv]
    try:
        torchrun(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        print(f"act: a DDP rank failed (exit codes {codes}); see its messages above", file=sys.stderr)
        return next((c for c in codes if c and c > 0), 1)
    return 0

