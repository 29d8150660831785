"""The run report: `report.md` and `report.html` (self-contained, images embedded) in every run directory.

* before / after table: teacher vs the student as exported, with the eval metrics, parameters, MACs (torch-pruning's
  counter on the float network), weight size (INT8 weights for quantized layers), ONNX file size and onnxruntime CPU
  latency (batch 1, median of `report.latency_runs`);
* curves from the run's own history (`tensorboard/history.jsonl`, written by act.blocks.monitor.RunLogger): the distillation
  loss (total and per node) and every eval metric over the iterations;
* the PTQ probe of `strategy: auto` (calibrators vs target), the sensitivity chart when an analysis ran, and the
  decisions the strategy took with their numbers.

The same figures go to TensorBoard (`report/...`, add_figure). Written at the end of `compress`, `ptq` and `auto`
runs (AutoCompression.finish); `act report RUN_DIR` rewrites it from the files of a finished run.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from act.run.artifacts import format_cell

HEADLINE = ["pose_map50_95", "pose_map50", "box_map50_95", "box_map50", "fidelity_pose_map50_95",
            "fidelity_box_map50_95", "fidelity_snr_db_mean", "fidelity_cos_min"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- model numbers ------------------------------------------------------------------------------------------------
def float_copy(model: nn.Module) -> nn.Module:
    """A CPU float copy with every fake-quantized layer back to a plain Conv2d / Linear (for counting MACs)."""
    from act.blocks.quant import QuantConv2d, QuantLinear

    m = copy.deepcopy(model).cpu().float().eval()
    for sub in m.modules():
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
    for name, q in list(m.named_modules()):
        if isinstance(q, (QuantConv2d, QuantLinear)):
            if isinstance(q, QuantConv2d):
                new = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation,
                                q.groups, q.bias is not None, q.padding_mode)
            else:
                new = nn.Linear(q.in_features, q.out_features, q.bias is not None)
            new.weight, new.bias = q.weight, q.bias
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, new)
    return m


def model_numbers(model: nn.Module, imgsz: int) -> Dict[str, Any]:
    """params, MACs (torch-pruning's counter), weight bytes (1 per INT8-quantized weight, 4 per float one)."""
    from act.blocks.quant import quantized_modules

    out: Dict[str, Any] = {}
    qnames = {n + ".weight" for n in quantized_modules(model)}
    params = 0
    wbytes = 0
    for n, p in model.named_parameters():
        if n.endswith(".alpha"):
            continue  # PACT clips become the Q/DQ scales
        params += p.numel()
        wbytes += p.numel() * (1 if n in qnames else 4)
    out["params_m"] = params / 1e6
    out["weights_mb"] = wbytes / 2**20
    try:
        import torch_pruning as tp

        m = float_copy(model)
        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(m, torch.zeros(1, 3, imgsz, imgsz))
        out["gmacs"] = float(macs) / 1e9
    except Exception as e:  # a model the counter cannot trace: no MACs, the rest of the report stands
        out["gmacs_error"] = f"{type(e).__name__}: {e}"
    return out


def _speed_row(row: Dict[str, Any], ort_ms: Optional[float], ov: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """One model's latency entry of summary.json (and its report-table cells)."""
    out: Dict[str, Any] = {}
    if ort_ms is not None:
        out["onnxruntime_cpu"] = {"median_ms": ort_ms}
    if ov:
        out["openvino_cpu"] = ov
        row["openvino_ms"], row["openvino_images_per_s"] = ov["median_ms"], ov["throughput_images_per_s"]
    return out


from act.deploy.latency import openvino_latency  # noqa: E402


def ort_latency_ms(path: Path, runs: int = 20, warmup: int = 3) -> Optional[float]:
    """Median onnxruntime CPU latency (ms) of one batch-1 (or the file's fixed batch) inference (act.deploy.latency)."""
    from act.deploy.latency import ort_latency

    if runs <= 0 or not Path(path).is_file():
        return None
    return float(ort_latency(Path(path), runs=runs, warmup=warmup)["median_ms"])


# ---- history ------------------------------------------------------------------------------------------------------
def load_history(path: Path) -> Dict[str, List[Dict[str, Any]]]:
    """{kind: [{step, values}]} from history.jsonl; a step logged twice (after a resume) keeps its last values."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    if not Path(path).is_file():
        return {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        vals = {k: (float(v) if not isinstance(v, str) else float(v)) for k, v in rec.get("values", {}).items()}
        out.setdefault(rec["kind"], {})[int(rec["step"])] = vals
    return {k: [{"step": s, "values": v} for s, v in sorted(d.items())] for k, d in out.items()}


def _figure_curves(hist: Dict[str, List[Dict[str, Any]]]):
    train = hist.get("train", [])
    evals = hist.get("eval", [])
    if not train and len(evals) < 2:
        return None
    plt = _plt()
    keys = [k for k in HEADLINE if any(k in e["values"] for e in evals)]
    ncols = 1 + (1 if evals else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["values"].get("loss", float("nan")) for r in train], label="total", lw=2, color="k")
        nodes = sorted({k for r in train for k in r["values"] if k.startswith("node/")})
        for k in nodes:
            ax.plot(steps, [r["values"].get(k, float("nan")) for r in train], label=k[5:], lw=0.8, alpha=0.8)
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.text(0.5, 0.5, "no training steps (PTQ)", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("distillation loss")
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        steps = [e["step"] for e in evals]
        for k in keys:
            if "snr" in k:
                continue
            ax.plot(steps, [e["values"].get(k, float("nan")) for e in evals], marker="o", label=k)
        ax.set_title("eval metrics")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        snr = [e["values"].get("fidelity_snr_db_mean") for e in evals]
        if any(v is not None and math.isfinite(v) for v in snr):
            ax2 = ax.twinx()
            ax2.plot(steps, [v if v is not None else float("nan") for v in snr], ls="--", color="gray",
                     label="head SNR dB")
            ax2.set_ylabel("head SNR (dB)", color="gray")
    fig.tight_layout()
    return fig


def _figure_before_after(rows: List[Dict[str, Any]]):
    plt = _plt()
    metric_keys = [k for k in HEADLINE if "snr" not in k and "cos" not in k and any(
        isinstance(r.get(k), float) and math.isfinite(r[k]) for r in rows)]
    cost_keys = [k for k in ("onnx_mb", "weights_mb", "gmacs", "latency_ms", "openvino_ms") if any(r.get(k) for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(len(rows), 1)
    for ax, keys, title in ((axes[0], metric_keys, "accuracy (higher is better)"),
                            (axes[1], cost_keys, "cost, relative to the teacher (lower is better)")):
        x = np.arange(len(keys))
        for i, r in enumerate(rows):
            if keys is cost_keys:
                ref = rows[0]
                vals = [(r.get(k) or 0) / ref[k] if ref.get(k) else 0 for k in keys]
            else:
                vals = [r.get(k) if isinstance(r.get(k), float) else 0 for k in keys]
            bars = ax.bar(x + i * width, vals, width, label=r["model"])
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.3g}", ha="center", va="bottom",
                        fontsize=6)
        ax.set_xticks(x + width * (len(rows) - 1) / 2)
        ax.set_xticklabels(keys, rotation=15, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _figure_probe(probe: List[Dict[str, Any]]):
    if not probe:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = [p["calibrator"] for p in probe]
    vals = [p["value"] for p in probe]
    colors = ["tab:green" if p["met"] else "tab:gray" for p in probe]
    ax.bar(names, vals, color=colors)
    thr = probe[0]["threshold"]
    ax.axhline(thr, color="tab:red", ls="--", label=f"target {thr:.4g}")
    lo = min(min(vals), thr)
    ax.set_ylim(max(0.0, lo - 0.1 * abs(lo) - 0.02), max(max(vals), thr) * 1.02 + 1e-6)
    ax.set_ylabel(probe[0]["metric"])
    ax.set_title("PTQ probe: calibrators vs target (green: met)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# ---- tables -------------------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    return html.escape(v) if isinstance(v, str) else format_cell(v)


COST_COLUMNS = [("params_m", "params (M)"), ("gmacs", "GMACs"), ("weights_mb", "weights MB"),
                ("onnx_mb", "ONNX MB"), ("latency_ms", "ORT CPU ms (b1, median)"),
                ("openvino_ms", "OpenVINO CPU ms (b1, LATENCY, median)"),
                ("openvino_images_per_s", "OpenVINO CPU img/s (THROUGHPUT)")]


def _table(rows: List[Dict[str, Any]]) -> List[List[str]]:
    metric_cols = [(k, k) for k in HEADLINE if any(k in r for r in rows)]
    cols = [("model", "model")] + metric_cols + [c for c in COST_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    return [[h for _, h in cols]] + [[_cell(r.get(k)) for k, _ in cols] for r in rows]


def _md_table(t: List[List[str]]) -> str:
    return "\n".join(["| " + " | ".join(t[0]) + " |", "|" + "|".join("---" for _ in t[0]) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in t[1:]])


def _html_table(t: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in t[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _decision_text(d: Dict[str, Any]) -> str:
    extra = {k: v for k, v in d.items() if k not in ("stage", "decision", "why")}
    nums = ", ".join(f"{k}={_cell(v) if not isinstance(v, (dict, list)) else json.dumps(v, default=str)}"
                     for k, v in extra.items())
    return f"[{d.get('stage')}] {d.get('decision')}" + (f" — {d['why']}" if d.get("why") else "") + \
        (f" ({nums})" if nums else "")


# ---- the report ---------------------------------------------------------------------------------------------------
def write_report(out: Path, summary: Dict[str, Any], runner=None, log=None, student: Optional[nn.Module] = None,
                 teacher: Optional[nn.Module] = None, family=None) -> Dict[str, Any]:
    """Write report.md / report.html (+ report/*.png) for a finished run; returns paths and the table rows.
    Never fails the run: an error is printed and returned."""
    try:
        return _write_report(Path(out), summary, runner, log, student, teacher, family)
    except Exception as e:  # the report is a view of the run, not the run
        import traceback

        traceback.print_exc()
        print(f"act: warning: the report could not be written: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}


def _write_report(out: Path, summary, runner, log, student, teacher, family) -> Dict[str, Any]:
    from act.core.config import validate_config

    plt = _plt()
    cfg = validate_config(summary["settings"])
    rep = cfg.report
    imgsz = cfg.data.imgsz
    figdir = out / "report"
    figdir.mkdir(parents=True, exist_ok=True)
    teacher = teacher if teacher is not None else getattr(runner, "teacher", None)
    family = family if family is not None else getattr(runner, "family", None)
    if teacher is None or family is None:
        from act.run.build import load_frozen

        teacher, family, _ = load_frozen(summary["teacher"], cfg.model.family)

    # before / after
    metrics = summary.get("metrics", {})
    t_row: Dict[str, Any] = {"model": "teacher (FP32)", **metrics.get("before", {}).get("teacher", {})}
    s_row: Dict[str, Any] = {"model": f"student ({summary.get('mode', 'qat')})", **(metrics.get("best") or {})}
    rows = [t_row]
    init = metrics.get("before", {}).get("student_init")
    if init and summary.get("mode") != "ptq":
        rows.append({"model": "student before training", **init})
    rows.append(s_row)
    t_row.update(model_numbers(teacher, imgsz))
    if student is not None:
        s_row.update(model_numbers(student, imgsz))
    onnx_path = Path(summary.get("onnx", {}).get("path", out / "student.onnx"))
    latency: Dict[str, Any] = {}
    if onnx_path.is_file():
        s_row["onnx_mb"] = onnx_path.stat().st_size / 2**20
        s_row["latency_ms"] = ort_latency_ms(onnx_path, rep.latency_runs)
        latency.update(_speed_row(s_row, s_row["latency_ms"], openvino_latency(onnx_path, rep.latency_runs)))
        if rep.teacher_onnx:
            from act.deploy.export import export_onnx

            t_onnx = export_onnx(teacher, figdir / "teacher.onnx", family, imgsz, 1, cfg.export.opset)
            t_row["onnx_mb"] = t_onnx.stat().st_size / 2**20
            t_row["latency_ms"] = ort_latency_ms(t_onnx, rep.latency_runs)
            latency["teacher"] = _speed_row(t_row, t_row["latency_ms"], openvino_latency(t_onnx, rep.latency_runs))
    if latency:
        # summary.json: batch-1 latency of the student (and the FP32 teacher) on this machine's CPU, per runtime:
        # onnxruntime runs the Q/DQ literally (INT8 is slower there), OpenVINO fuses them into INT8 kernels
        t_ov = (latency.get("teacher") or {}).get("openvino_cpu") or {}
        s_ov = latency.get("openvino_cpu") or {}
        if t_ov.get("median_ms") and s_ov.get("median_ms"):
            latency["openvino_student_vs_teacher"] = round(s_ov["median_ms"] / t_ov["median_ms"], 3)
        summary["latency"] = {**(summary.get("latency") or {}), **latency}
    for r in rows[1:-1]:
        r.update({k: v for k, v in s_row.items() if k in dict(COST_COLUMNS)})
    from act.core.targets import teacher_value

    for k in {k for r in rows[1:] for k in r if k.startswith("fidelity_")}:
        t_row.setdefault(k, teacher_value(k, None))  # the teacher against itself: 1.0 (SNR inf)
    table = _table(rows)

    # figures
    figs: Dict[str, Any] = {}
    figs["before_after"] = _figure_before_after(rows)
    hist_path = getattr(log, "history_path", None) or out / "tensorboard" / "history.jsonl"
    curves = _figure_curves(load_history(hist_path))
    if curves is not None:
        figs["curves"] = curves
    probe = (summary.get("strategy") or {}).get("probe")
    pfig = _figure_probe(probe) if probe else None
    if pfig is not None:
        figs["ptq_probe"] = pfig
    images: Dict[str, Path] = {}
    writer = getattr(log, "writer", None)
    own_writer = None
    if writer is None:
        from torch.utils.tensorboard import SummaryWriter

        writer = own_writer = SummaryWriter(str(out / "tensorboard"))
    step = int(summary.get("iterations") or 0)
    for name, fig in figs.items():
        p = figdir / f"{name}.png"
        fig.savefig(p, dpi=90)
        writer.add_figure(f"report/{name}", fig, step)  # closes the figure
        plt.close(fig)
        images[name] = p
    sens = out / "sensitivity.png"
    if sens.is_file():
        images["sensitivity"] = sens
        from PIL import Image

        writer.add_image("report/sensitivity", np.asarray(Image.open(sens).convert("RGB")), step, dataformats="HWC")
    writer.flush()
    if own_writer is not None:
        own_writer.close()

    # text
    decisions = summary.get("decisions") or []
    title = f"act report: {Path(summary['teacher']).name} -> INT8 ({summary.get('mode', 'qat')})"
    strategy = summary.get("strategy") or {}
    facts = [f"run: `{out}`", f"teacher: `{summary['teacher']}`, task {summary.get('task')}, imgsz {imgsz}",
             f"strategy: {strategy.get('name', cfg.strategy)}"
             + (f" (finished at stage {strategy.get('stage')})" if strategy else ""),
             f"iterations: {summary.get('iterations')} (best {summary.get('best_iteration')})",
             f"quantized layers: {summary.get('quantized_layers')}"]
    if summary.get("auto_skip"):
        facts.append("kept in float by quant.skip auto: " + ", ".join(f"`{n}`" for n in summary["auto_skip"]["layers"]))
    elif cfg.quant.skip:
        facts.append("kept in float (quant.skip): " + ", ".join(f"`{n}`" for n in cfg.quant.skip))
    for where, par in (("ONNX in onnxruntime", (summary.get("onnx") or {}).get("parity")),
                       ("OpenVINO IR" if (summary.get("openvino") or {}).get("required") else
                        "OpenVINO (a check, not a deliverable)", (summary.get("openvino") or {}).get("parity"))):
        if par:
            branches = ", ".join(f"{k} {v:.2e}" for k, v in (par.get("branches") or {}).items())
            facts.append(f"{where} vs the torch student: rel L2 {par.get('rel_l2', float('nan')):.2e}"
                         + (f" (per branch: {branches})" if branches else "")
                         + f" ({'passed' if par.get('passed') else 'FAILED'})")
    if summary.get("onnx", {}).get("target"):
        facts.append(f"export target: {summary['onnx']['target']}")
    captions = {"before_after": "Before / after (chart)", "curves": "Loss and metrics during training",
                "ptq_probe": "PTQ probe", "sensitivity": "Quantization sensitivity (act analyze)"}
    md = [f"# {title}", ""] + [f"- {f}" for f in facts] + ["", "## Before / after", "", _md_table(table), ""]
    if decisions:
        md += ["## Decisions", ""] + [f"{i}. {_decision_text(d)}" for i, d in enumerate(decisions, 1)] + [""]
    for name, p in images.items():
        rel = p.relative_to(out) if p.is_relative_to(out) else p
        md += [f"## {captions.get(name, name)}", "", f"![{name}]({rel})", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    def img(p: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()

    body = [f"<h1>{html.escape(title)}</h1>", "<ul>" + "".join(
        f"<li>{html.escape(f).replace('`', '')}</li>" for f in facts) + "</ul>", "<h2>Before / after</h2>",
        _html_table(table)]
    if decisions:
        body += ["<h2>Decisions</h2><ol>" + "".join(f"<li>{html.escape(_decision_text(d))}</li>" for d in decisions)
                 + "</ol>"]
    for name, p in images.items():
        body += [f"<h2>{html.escape(captions.get(name, name))}</h2>", f'<img alt="{name}" src="{img(p)}">']
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    html_path = out / "report.html"
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    print(f"act: report: {md_path} ({html_path.name})")
    return {"md": str(md_path), "html": str(html_path), "images": {k: str(v) for k, v in images.items()},
            "rows": rows}


def write_report_from_dir(run_dir) -> Dict[str, Any]:
    """`act report RUN_DIR`: rewrite the report of a finished run from its summary.json and checkpoint."""
    from act.blocks.checkpoint import load_checkpoint
    from act.core.errors import ActError

    out = Path(run_dir)
    sj = out / "summary.json"
    if not sj.is_file():
        raise ActError(f"{out} has no summary.json (not a finished act run)")
    summary = json.loads(sj.read_text())
    student = None
    for name in ("best.pt", "ptq.pt", "last.pt"):
        if (out / name).is_file():
            student = load_checkpoint(out / name)["model"]
            break
    res = _write_report(out, summary, None, None, student, None, None)
    return {"md": Path(res["md"]), "html": Path(res["html"])}
