#!/usr/bin/env python
"""Training-step speed of act vs plain FP32 training of the same model, in one command.

    python tools/bench_train.py --teacher yolo11n-pose --data ../shared/data/coco-pose-mini/images/train \
        --batch 64 --imgsz 640 --iters 30 --warmup 5 --out results/bench_train

Rows (images/s, GPU peak memory, data-loader wait share):
  plain        the same (BN-folded) model trained in eager FP32: forward + distillation loss against fixed targets +
               backward + AdamW step, on a batch already on the GPU.
  act:<v>      act's real `Trainer.train_step` (teacher forward, fake-quant student forward/backward, loss,
               optimizer) per speed variant <v> (a set of config overrides): 'synthetic' on uint8 batches already on
               the GPU (the step alone), 'real' with the real data loader over --data (the whole pipeline).
  ddp          with more than one visible GPU: the real pipeline on N GPUs through torchrun (global images/s).
Also writes a torch.profiler table of the act step (top ops by device time) for --profile variants.
Writes OUT/bench_train.md and OUT/bench_train.json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("ACT_NO_PROGRESS", "1")

# name -> overrides; each later variant adds one knob (docs/scale.md records each one's effect)
EAGER = ["train.cuda_graph=false"]
GRAPH = ["train.cuda_graph=true"]
VARIANTS: Dict[str, List[str]] = {
    # the eager step (train.cuda_graph=false)
    "fp32": ["train.amp=none", "train.channels_last=false"] + EAGER,
    "fp32_cl": ["train.amp=none", "train.channels_last=true"] + EAGER,
    "bf16": ["train.amp=bf16", "train.channels_last=false"] + EAGER,
    "bf16_cl": ["train.amp=bf16", "train.channels_last=true"] + EAGER,
    "tbf16_cl": ["train.amp=none", "train.teacher_amp=bf16", "train.channels_last=true"] + EAGER,
    "bf16_cl_compile": ["train.amp=bf16", "train.channels_last=true", "train.compile=true"],
    "fp32_compile": ["train.amp=none", "train.channels_last=false", "train.compile=true"],
    "fp32_qcompile": ["train.amp=none", "train.channels_last=false", "train.compile=quantizers"] + EAGER,
    # the captured step (act.run.step_graph)
    "fp32_graph": ["train.amp=none", "train.channels_last=false"] + GRAPH,
    "fp32_qcompile_graph": ["train.amp=none", "train.channels_last=false", "train.compile=quantizers"] + GRAPH,
    "fp32_cl_qcompile_graph": ["train.amp=none", "train.channels_last=true", "train.compile=quantizers"] + GRAPH,
    "tbf16_qcompile_graph": ["train.amp=none", "train.teacher_amp=bf16", "train.compile=quantizers"] + GRAPH,
    # the fused quantizer kernels by implementation (act.blocks.quant.fused; the default on CUDA is triton)
    "fp32_cl_qtriton": ["train.amp=none", "train.channels_last=true", "train.compile=quantizers",
                        "env:ACT_QUANT_KERNELS=triton"] + EAGER,
    "fp32_cl_qinductor_graph": ["train.amp=none", "train.channels_last=true", "train.compile=quantizers",
                                "env:ACT_QUANT_KERNELS=inductor"] + GRAPH,
    "fp32_cl_qtriton_graph": ["train.amp=none", "train.channels_last=true", "train.compile=quantizers",
                              "env:ACT_QUANT_KERNELS=triton"] + GRAPH,
    "fp32_qtriton_graph": ["train.amp=none", "train.channels_last=false", "train.compile=quantizers",
                           "env:ACT_QUANT_KERNELS=triton"] + GRAPH,
    # the defaults, whatever they are (what `act compress` runs on a GPU)
    "default": [],
    "default_distill": ["quant.enabled=false"],
    # FP32 distillation (no quantizers): the prune stage's step
    "distill_fp32": ["quant.enabled=false", "train.amp=none"] + EAGER,
    "distill_fp32_graph": ["quant.enabled=false", "train.amp=none"] + GRAPH,
    "distill_cl_graph": ["quant.enabled=false", "train.amp=none", "train.channels_last=true"] + GRAPH,
    "distill_tbf16_graph": ["quant.enabled=false", "train.amp=none", "train.teacher_amp=bf16"] + GRAPH,
}
# every named variant spells out the speed knobs whose defaults are 'auto' (all but default*), so a row means the
# same thing whatever the defaults are
for _name, _ov in VARIANTS.items():
    if not _name.startswith("default"):
        for _key, _off in (("train.compile", "false"), ("train.channels_last", "false")):
            if not any(o.startswith(_key + "=") for o in _ov):
                _ov.append(f"{_key}={_off}")
DATA_VARIANTS: Dict[str, List[str]] = {
    "workers2": ["data.workers=2", "data.cache=false"],
    "auto": ["data.workers=auto", "data.cache=false"],
    "auto_ram": ["data.workers=auto", "data.cache=ram"],
    "w4_ram": ["data.workers=4", "data.cache=ram"],
    "w8_ram": ["data.workers=8", "data.cache=ram"],
    "w15_ram": ["data.workers=15", "data.cache=ram"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="yolo11n-pose")
    p.add_argument("--data", required=True, help="image folder (the unlabeled pool)")
    p.add_argument("--batch", type=int, default=64, help="per GPU")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="results/bench_train")
    p.add_argument("--variants", nargs="*", default=["fp32", "fp32_graph", "fp32_cl_qinductor_graph",
                                                     "fp32_qtriton_graph", "default", "distill_fp32",
                                                     "default_distill"],
                   help=f"act speed variants, synthetic batches (known: {', '.join(VARIANTS)}; or NAME=ov1,ov2)")
    p.add_argument("--real", nargs="*", default=["default+auto_ram", "default_distill+auto_ram"],
                   help=f"VARIANT+DATA pairs run with the real loader (data: {', '.join(DATA_VARIANTS)})")
    p.add_argument("--profile", nargs="*", default=["default"], help="variants to profile (synthetic)")
    p.add_argument("--compile-timeout", type=int, default=240, help="s; the compile variant runs in a subprocess")
    p.add_argument("--ddp", type=int, default=None, help="GPUs for the DDP row (default: all visible if > 1)")
    p.add_argument("--ddp-variant", default="fp32+auto_ram")
    p.add_argument("--plain-amp", action="store_true", help="also a plain bf16 channels_last row")
    p.add_argument("--device", default="cuda")
    p.add_argument("--time-budget", type=float, default=None, help="s; rows that would start later are skipped")
    p.add_argument("--_only", default=None, help=argparse.SUPPRESS)  # internal: one variant in a subprocess
    p.add_argument("--_ddp_worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def split_custom(spec: str):
    """'name' or 'name=key=v,key=v' -> (name, overrides)."""
    if spec in VARIANTS:
        return spec, VARIANTS[spec]
    name, _, rest = spec.partition("=")
    if not rest:
        raise SystemExit(f"unknown variant {spec!r}; known: {', '.join(VARIANTS)}")
    return name, [o for o in rest.split(",") if o]


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_config(args, out_dir: str) -> Dict[str, Any]:
    return {
        "model": {"teacher": args.teacher},
        "data": {"train": args.data, "imgsz": args.imgsz, "batch_size": args.batch, "augment": True},
        "train": {"iterations": 10**6, "device": args.device, "log_every": 10**6, "checkpoint_every": 10**6},
        "quant": {"calibrator": "ema", "calib_batches": 2},
        "eval": {"before": False, "fidelity": {"enabled": False}},
        "export": {"onnx": False},
        "output_dir": out_dir,
    }


def split_env(overrides: List[str]):
    """'env:NAME=VALUE' items of a variant set an environment variable for its row (e.g. ACT_QUANT_KERNELS)."""
    env = dict(o[4:].split("=", 1) for o in overrides if o.startswith("env:"))
    return [o for o in overrides if not o.startswith("env:")], env


def make_ac(args, overrides: List[str]):
    from act.run.trainer import Trainer

    overrides, env = split_env(overrides)
    os.environ.pop("ACT_QUANT_KERNELS", None)  # (a row sets it only for itself)
    os.environ.update(env)
    out = tempfile.mkdtemp(prefix="act_bench_")
    ac = Trainer(base_config(args, out), overrides=overrides)
    ac.setup()
    return ac


def peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def synthetic_batch(args, device, seed=0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (args.batch, 3, args.imgsz, args.imgsz), dtype=torch.uint8, generator=g,
                         device=device)


# ------------------------------------------------------------------------------------------------------------------
def bench_plain(args, amp: bool = False) -> Dict[str, Any]:
    """Eager training of the same model: forward, the distillation loss against fixed targets, backward, AdamW."""
    import torch

    from act.run.build import load_frozen
    from act.core.config import DistillConfig
    from act.blocks.distill import DistillLoss, FeatureCapture, find_nodes

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model, family, _ = load_frozen(args.teacher)
    nodes = find_nodes(model, family, "auto")
    for p in model.parameters():
        p.requires_grad_(True)
    model.to(device).train()
    if amp:
        model.to(memory_format=torch.channels_last)
    cap = FeatureCapture(model, [n.name for n in nodes])
    loss_fn = DistillLoss(nodes, DistillConfig(), reg_max=family.dfl_bins(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    x = synthetic_batch(args, device).float().div_(255)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
        target = {k: v.detach().clone() for k, v in cap.pop().items()}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)
        loss, _ = loss_fn(cap.pop(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(device)
    peak_reset(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    dt = time.perf_counter() - t
    return {"row": "plain bf16 channels_last" if amp else "plain fp32", "mode": "synthetic",
            "images_per_s": round(args.iters * args.batch / dt, 1), "step_ms": round(dt / args.iters * 1e3, 2),
            "peak_gib": peak_gib(device)}


def teacher_ms(ac, x, n=10) -> float:
    for _ in range(2):
        ac.teacher_outputs(x)
    sync(ac.device)
    t = time.perf_counter()
    for _ in range(n):
        ac.teacher_outputs(x)
    sync(ac.device)
    return round((time.perf_counter() - t) / n * 1e3, 2)


def bench_act_synthetic(args, name: str, overrides: List[str], profile: bool) -> Dict[str, Any]:
    import torch

    ac = make_ac(args, overrides)
    t0 = time.perf_counter()
    ac.calibrate(iter([synthetic_batch(args, ac.device, s) for s in range(ac.cfg.quant.calib_batches)]))
    ac.student.train()
    xs = [synthetic_batch(args, ac.device, s) for s in range(2)]
    for i in range(args.warmup):
        ac.train_step(xs[i % 2])
    sync(ac.device)
    first = time.perf_counter() - t0
    peak_reset(ac.device)
    t = time.perf_counter()
    for i in range(args.iters):
        stats = ac.train_step(xs[i % 2])
    float(stats["loss"])
    sync(ac.device)
    dt = time.perf_counter() - t
    row = {"row": f"act {name}", "mode": "synthetic", "overrides": overrides,
           "images_per_s": round(args.iters * args.batch / dt, 1), "step_ms": round(dt / args.iters * 1e3, 2),
           "peak_gib": peak_gib(ac.device), "teacher_fwd_ms": teacher_ms(ac, ac.model_input(xs[0])),
           "warmup_s": round(first, 1), "graph": ac.step_graph.info() if ac.step_graph is not None else None}
    if profile:
        row["profile"] = write_profile(args, ac, xs, name)
    return row


def write_profile(args, ac, xs, name: str) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ac.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(3):
            ac.train_step(xs[i % 2])
        sync(ac.device)
    path = Path(args.out) / f"profile_{name}.txt"
    ka = prof.key_averages()
    parts = []
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            parts.append(f"## sorted by {key} (3 steps, batch {args.batch}, {args.imgsz} px)\n"
                         + ka.table(sort_by=key, row_limit=35, max_name_column_width=60))
            if "cpu" not in key:
                parts.append("## CPU time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=15,
                                                         max_name_column_width=60))
            break
        except Exception:  # key names differ across torch versions
            continue
    path.write_text("\n\n".join(parts))
    return str(path.name)


def bench_act_real(args, name: str, overrides: List[str]) -> Dict[str, Any]:
    """The whole pipeline: real loader over --data (workers decode, letterbox, augment), step on each batch."""
    ac = make_ac(args, overrides)
    batches = ac.stream.batches()
    t0 = time.perf_counter()
    ac.calibrate(batches)
    ac.student.train()
    for _ in range(args.warmup):
        ac.train_step(next(batches))
    sync(ac.device)
    setup_s = time.perf_counter() - t0
    peak_reset(ac.device)
    wait = 0.0
    n = 0
    t = time.perf_counter()
    for _ in range(args.iters):
        tw = time.perf_counter()
        images = next(batches)
        wait += time.perf_counter() - tw
        stats = ac.train_step(images)
        n += len(images)
    float(stats["loss"])
    sync(ac.device)
    dt = time.perf_counter() - t
    # the loader alone (no GPU work): what the CPU side can deliver. The prefetch queue is full at first, so
    # drain it for workers x prefetch_factor batches, then time as many again
    from act.blocks.pipeline import resolve_workers

    ahead = max(1, resolve_workers(ac.cfg.data.workers, 1)) * ac.cfg.data.prefetch_factor
    for _ in range(ahead):
        next(batches)
    t = time.perf_counter()
    m = 0
    for _ in range(max(8, ahead)):
        m += len(next(batches))
    loader_ips = m / (time.perf_counter() - t)
    ac.stream.close(batches)  # stop the loader workers (they ignore group stop signals; exit would wait on them)
    return {"row": f"act {name}", "mode": "real", "overrides": overrides,
            "images_per_s": round(n / dt, 1), "step_ms": round(dt / args.iters * 1e3, 2),
            "data_wait_share": round(wait / dt, 3), "loader_only_images_per_s": round(loader_ips, 1),
            "workers": resolve_workers(ac.cfg.data.workers, ac.dist.world_size), "peak_gib": peak_gib(ac.device),
            "setup_s": round(setup_s, 1), "graph": ac.step_graph.info() if ac.step_graph is not None else None}


# ------------------------------------------------------------------------------------------------------------------
def ddp_worker(args) -> None:
    """One torchrun rank: the real pipeline; rank 0 writes the global images/s."""
    import torch

    name, _, data = args.ddp_variant.partition("+")
    _, ov = split_custom(name)
    overrides = ov + DATA_VARIANTS.get(data or "auto", [])
    os.environ.pop("ACT_DEVICES", None)
    ac = make_ac(args, overrides)
    batches = ac.stream.batches()
    ac.calibrate(batches)
    ac.student.train()
    for _ in range(args.warmup):
        ac.train_step(next(batches))
    sync(ac.device)
    ac.dist.barrier()
    peak_reset(ac.device)
    wait, t = 0.0, time.perf_counter()
    for _ in range(args.iters):
        tw = time.perf_counter()
        images = next(batches)
        wait += time.perf_counter() - tw
        stats = ac.train_step(images)
    float(stats["loss"])
    sync(ac.device)
    ac.dist.barrier()
    dt = time.perf_counter() - t
    if ac.dist.is_main:
        row = {"row": f"ddp x{ac.dist.world_size} {args.ddp_variant}", "mode": "real", "overrides": overrides,
               "images_per_s": round(args.iters * args.batch * ac.dist.world_size / dt, 1),
               "step_ms": round(dt / args.iters * 1e3, 2), "data_wait_share": round(wait / dt, 3),
               "peak_gib": peak_gib(ac.device), "gpus": ac.dist.world_size}
        Path(args.out, "ddp_row.json").write_text(json.dumps(row))
    ac.dist.close()


def run_ddp(args, n: int) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           str(Path(__file__).resolve()), "--_ddp_worker", "--teacher", args.teacher, "--data", args.data,
           "--batch", str(args.batch), "--imgsz", str(args.imgsz), "--iters", str(args.iters), "--warmup",
           str(args.warmup), "--out", args.out, "--ddp-variant", args.ddp_variant]
    r = subprocess.run(cmd, capture_output=True, text=True)
    f = Path(args.out, "ddp_row.json")
    if r.returncode or not f.is_file():
        return {"row": f"ddp x{n}", "error": (r.stderr or r.stdout)[-1500:]}
    return json.loads(f.read_text())


def run_isolated(args, spec: str) -> Dict[str, Any]:
    """A variant in a subprocess with a time limit (torch.compile can take long)."""
    tmp = tempfile.mkdtemp(prefix="act_bench_row_")
    out = Path(tmp, f"row_{spec.split('=')[0]}.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_only", spec, "--teacher", args.teacher, "--data",
           args.data, "--batch", str(args.batch), "--imgsz", str(args.imgsz), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--out", tmp, "--device", args.device]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        return {"row": f"act {spec}", "error": f"over --compile-timeout {args.compile_timeout}s"}
    if r.returncode or not out.is_file():
        return {"row": f"act {spec}", "error": (r.stderr or r.stdout)[-1500:]}
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------------------
COLS = [("row", "row"), ("mode", "data"), ("images_per_s", "img/s"), ("vs_plain", "x plain fp32"),
        ("step_ms", "step ms"), ("teacher_fwd_ms", "teacher fwd ms"), ("peak_gib", "GPU peak GiB"),
        ("data_wait_share", "loader wait share"), ("loader_only_images_per_s", "loader alone img/s"),
        ("workers", "workers"), ("graph_s", "CUDA graph")]


def write(args, meta, rows):
    plain = next((r["images_per_s"] for r in rows if r.get("row") == "plain fp32" and "images_per_s" in r), None)
    for r in rows:
        if plain and "images_per_s" in r:
            r["vs_plain"] = round(r["images_per_s"] / plain, 2)
        g = r.get("graph")
        if g:
            r["graph_s"] = f"failed: {g['failed'][:60]}" if g.get("failed") else f"{g['replays']} replays"
    out = Path(args.out)
    (out / "bench_train.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# act training-step benchmark ({meta['date']})", "",
             f"{meta['gpu']}; torch {meta['torch']}; {meta['cpus']} CPU cores; teacher {args.teacher}; batch "
             f"{args.batch} per GPU; {args.imgsz} px; {args.iters} timed iterations after {args.warmup} warm-up", "",
             f"command: `{meta['command']}`", "",
             "| " + " | ".join(h for _, h in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error'].splitlines()[-1][:120] if r['error'] else ''} |")
            continue
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k, _ in COLS) + " |")
    lines += ["", "Variants: " + "; ".join(f"`{r['row']}`: {' '.join(r.get('overrides', []))}" for r in rows
                                            if r.get("overrides"))]
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    import torch

    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args._ddp_worker:
        return ddp_worker(args)
    if args._only:
        name, ov = split_custom(args._only)
        row = bench_act_synthetic(args, name, ov, profile=False)
        Path(args.out, f"row_{name}.json").write_text(json.dumps(row))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    from act.blocks.pipeline import cpu_cores

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu, "torch": torch.__version__,
            "cpus": cpu_cores(), "command": "python tools/bench_train.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv)}
    rows: List[Dict[str, Any]] = []

    t_start = time.time()

    def add(fn, *a):
        t = time.time()
        if args.time_budget and t - t_start > args.time_budget:
            rows.append({"row": f"{fn.__name__} {a[1:] if len(a) > 1 else ''}", "error": "skipped: --time-budget"})
            write(args, meta, rows)
            return
        try:
            row = fn(*a)
        except Exception as e:
            traceback.print_exc()
            row = {"row": f"{fn.__name__} {a[1:] if len(a) > 1 else ''}", "error": f"{type(e).__name__}: {e}"}
        row["wall_s"] = round(time.time() - t, 1)
        rows.append(row)
        write(args, meta, rows)
        print(json.dumps(row), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    add(bench_plain, args)
    if args.plain_amp:
        add(bench_plain, args, True)
    compiled = []
    for spec in args.variants:
        name, ov = split_custom(spec)
        if "train.compile=true" in ov:
            compiled.append(spec)  # last: compiling can take minutes
        else:
            add(bench_act_synthetic, args, name, ov, name in args.profile)
    for spec in args.real:
        v, _, d = spec.partition("+")
        name, ov = split_custom(v)
        add(bench_act_real, args, f"{name}+{d or 'auto'}", ov + DATA_VARIANTS[d or "auto"])
    for spec in compiled:
        add(run_isolated, args, spec)
    n = args.ddp if args.ddp is not None else torch.cuda.device_count()
    if n > 1:
        add(run_ddp, args, n)
    print(Path(args.out, "bench_train.md").read_text())


if __name__ == "__main__":
    main()
