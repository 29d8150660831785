"""The frontier's files: frontier.json (every measurement), frontier.md (one table, the Pareto points marked, the
command that makes each point) and frontier.png (latency in the ranking runtime vs accuracy, the Pareto points
joined)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from act.core.fileio import atomic_write_text


def _ms(row: Dict[str, Any], runtime: str) -> Optional[float]:
    return ((row.get("latency") or {}).get(runtime) or {}).get("median_ms")


def _cell(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def frontier_table(result: Dict[str, Any]) -> str:
    rows: List[Dict[str, Any]] = result["points"]
    metric, runtime = result["metric"], result["runtime"]
    runtimes = [rt for rt in ("openvino", "onnxruntime", "tensorrt") if any(_ms(r, rt) for r in rows)]
    fid = "fidelity_pose_map50_95" if any("fidelity_pose_map50_95" in r["metrics"] for r in rows) else \
        "fidelity_box_map50_95"
    show_fid = fid != metric and any(fid in r["metrics"] for r in rows)
    head = ["point", "imgsz", "pruned to", "precision", "MACs", "params"] + [f"{rt} ms" for rt in runtimes] + \
           [f"{runtime} vs teacher"] + (["fidelity"] if show_fid else []) + [metric, "vs teacher", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        prec = r["precision"] if r["precision"] == "fp32" else f"int8 ({r['int8']})"
        if r["precision"] == "int8" and r.get("skip") is not None:
            prec += f", skip {r['skip'] if r['skip'] == 'auto' else len(r['skip'])}"
        cells = [r["name"], str(r["imgsz"]), "-" if r["prune"] == 1 else f"{r['prune']:g}x", prec,
                 f"{r['macs_ratio']:.2f}x ({r['macs_g']:.2f} G)", f"{r['params_m']:.2f} M"]
        cells += [_cell(_ms(r, rt), ".1f") for rt in runtimes]
        cells.append(_cell(r.get("latency_ratio"), ".2f") + ("x" if r.get("latency_ratio") else ""))
        if show_fid:
            cells.append(_cell(r["metrics"].get(fid), ".4f"))
        cells += [_cell(r.get("accuracy"), ".4f"),
                  "-" if r.get("drop") is None else f"{-r['drop'] * 100 + 0.0:+.1f}",
                  "**yes**" if r.get("pareto") else (f"no ({r['dominated_by']})" if r.get("dominated_by") else "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_markdown(result: Dict[str, Any]) -> str:
    rows = result["points"]
    host = (rows[0].get("host") or {}).get("cpu", "?") if rows else "?"
    out = ["# Accuracy-latency frontier\n",
           f"Accuracy: `{result['metric']}`; latency: batch 1, median, `{result['runtime']}` ranks the points "
           f"(measured on {host}). \"vs teacher\": points of the metric against the FP32 teacher at its own input "
           f"size (first row). A Pareto point has no other point at least as fast and as accurate.\n",
           "![accuracy vs latency](frontier.png)\n", frontier_table(result), ""]
    if result.get("skipped"):
        out.append("Not made: " + "; ".join(f"{s['name']} ({s['why']})" for s in result["skipped"]) + "\n")
    if result.get("decisions"):
        out.append("## Decision\n")
        out += [f"- {d}" for d in result["decisions"]]
        out.append("")
    out.append("## How each point is made\n")
    out += [f"- `{r['name']}`: `{r['command']}`" for r in rows]
    out.append("\nAll of them, made and measured again (resumes): "
               f"`act frontier --config {result.get('config') or 'CONFIG.yaml'}"
               + "".join(f" {o}" for o in result.get("overrides") or []) + "`")
    return "\n".join(out) + "\n"


def frontier_plot(result: Dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["points"] if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    x_of = (lambda r: r["latency_ms"]) if all(r.get("latency_ms") for r in rows) else (lambda r: r["macs_ratio"])
    xlabel = (f"{result['runtime']} latency, batch 1 (ms)" if all(r.get("latency_ms") for r in rows)
              else "MACs / teacher's")
    styles = {("fp32", False): ("o", "tab:gray"), ("int8", False): ("s", "tab:blue"),
              ("fp32", True): ("^", "tab:orange"), ("int8", True): ("D", "tab:red")}
    for (prec, pruned), (marker, color) in styles.items():
        pts = [r for r in rows if r["precision"] == prec and (r["prune"] < 1) == pruned]
        if pts:
            ax.scatter([x_of(r) for r in pts], [r["accuracy"] for r in pts], marker=marker, color=color, s=40,
                       label=f"{prec.upper()}{', pruned' if pruned else ''}", zorder=3)
    front = sorted((r for r in rows if r.get("pareto")), key=x_of)
    if front:
        ax.plot([x_of(r) for r in front], [r["accuracy"] for r in front], "-", color="black", lw=1, zorder=2,
                label="Pareto")
    for r in rows:
        ax.annotate(r["name"], (x_of(r), r["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(result["metric"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs latency")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_frontier(result: Dict[str, Any], out: Path) -> Dict[str, str]:
    out = Path(out)
    files = {"json": str(out / "frontier.json"), "md": str(out / "frontier.md"), "png": str(out / "frontier.png")}
    atomic_write_text(out / "frontier.json", json.dumps({**result, "files": files}, indent=2, default=str))
    atomic_write_text(out / "frontier.md", frontier_markdown(result))
    frontier_plot(result, out / "frontier.png")
    return files
