"""Runs the real `act` CLI in a subprocess with faults injected from outside act's code (for tests/test_faults*.py).

    python tests/fault_launcher.py [--step-delay S] [--nan-loss 3,4,5] [--nan-grad 6] -- compress --config c.yaml

--step-delay: sleep S seconds after each training step (gives a test time to signal or kill mid-run).
--nan-loss / --nan-grad: 1-based training steps (counted in this process) whose loss / gradient is made NaN.
--kill-in-save N: SIGKILL this process halfway through writing the N-th last.pt (a kill -9 at the worst moment).
Each finished step prints `act-test: step N` (flushed), so a test can act at a known point.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _steps(spec):
    return {int(x) for x in spec.split(",") if x.strip()} if spec else set()


def main():
    argv = sys.argv[1:]
    if "--" in argv:
        i = argv.index("--")
        own, rest = argv[:i], argv[i + 1:]
    else:
        own, rest = [], argv
    p = argparse.ArgumentParser()
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--nan-loss", default="")
    p.add_argument("--nan-grad", default="")
    p.add_argument("--kill-in-save", type=int, default=0)
    a = p.parse_args(own)
    nan_loss, nan_grad = _steps(a.nan_loss), _steps(a.nan_grad)

    import torch

    from act.cli.main import main as act_main
    from act.run.trainer import Trainer
    from act.blocks.distill import DistillLoss

    state = {"step": 0}
    real_step = Trainer.train_step
    real_loss = DistillLoss.forward

    def train_step(self, images):
        state["step"] += 1
        out = real_step(self, images)
        print(f"act-test: step {state['step']}", flush=True)
        if a.step_delay:
            time.sleep(a.step_delay)
        return out

    def loss_forward(self, *args, **kwargs):
        loss, per_node = real_loss(self, *args, **kwargs)
        if state["step"] in nan_loss:
            loss = loss * float("nan")
        elif state["step"] in nan_grad and loss.requires_grad:
            loss.register_hook(lambda g: g * float("nan"))
        return loss, per_node

    if a.kill_in_save:
        import io
        import signal

        import act.blocks.checkpoint as ckpt_mod
        from act.core.fileio import atomic_write

        real_save = ckpt_mod.atomic_torch_save
        saves = {"n": 0}

        def save_then_die(obj, path, what="checkpoint"):
            if Path(path).name == "last.pt":
                saves["n"] += 1
                if saves["n"] == a.kill_in_save:
                    buf = io.BytesIO()
                    torch.save(obj, buf)
                    data = buf.getvalue()

                    def half_then_kill(f):
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                        print("act-test: killing myself while writing last.pt", flush=True)
                        os.kill(os.getpid(), signal.SIGKILL)

                    return atomic_write(path, half_then_kill, what)
            return real_save(obj, path, what)

        ckpt_mod.atomic_torch_save = save_then_die

    Trainer.train_step = train_step
    DistillLoss.forward = loss_forward
    sys.exit(act_main(rest))


if __name__ == "__main__":
    main()
