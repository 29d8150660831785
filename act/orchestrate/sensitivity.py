"""The result of `act analyze` (per-layer quantization sensitivity) and how it is shown: sensitivity.json,
sensitivity.md (the ranked table) and sensitivity.png (bar charts)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from act.run.artifacts import format_cell

RANK_KEYS = {"snr_db": "fidelity_snr_db_mean", "fidelity": "fidelity_map"}


# ---- results ----------------------------------------------------------------------------------------------------
@dataclass
class SensitivityResult:
    layers: List[Dict[str, Any]]  # ranked, most sensitive first: name, params, alone{}, float{}, gain, alone_error
    baseline: Dict[str, Dict[str, float]]  # "int8": all quantized; "labeled": mAP rows when eval.data was given
    rank_by: str
    images: int
    calibrator: str
    time_s: float = 0.0
    auto_skip: Optional[Dict[str, Any]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def top(self, n: int) -> List[str]:
        return [r["name"] for r in self.layers[:n]]

    def to_json(self) -> Dict[str, Any]:
        return {"rank_by": self.rank_by, "images": self.images, "calibrator": self.calibrator,
                "time_s": round(self.time_s, 2), "baseline": self.baseline, "layers": self.layers,
                "auto_skip": self.auto_skip, **self.info}


def _num(v) -> str:
    return format_cell(v, big=".2f")


def markdown(res: SensitivityResult) -> str:
    key = RANK_KEYS[res.rank_by]
    base = res.baseline.get("int8", {})
    lines = [
        "# Quantization sensitivity",
        "",
        f"{len(res.layers)} layers, measured on {res.images} held-out images against the teacher (calibrator: "
        f"{res.calibrator}). All layers INT8: head SNR {_num(base.get('fidelity_snr_db_mean'))} dB, cos_min "
        f"{_num(base.get('cos_min'))}"
        + (f", fidelity mAP {_num(base.get('fidelity_map'))}" if "fidelity_map" in base else "") + ".",
        "",
        f"Ranked by **gain**: the rise of `{key}` when only that layer stays in float (all others INT8)"
        + (", predicted from the layer's own noise when it alone is quantized (*gain alone*; the noises of the "
           "layers add up); *gain float* is the rise measured directly" if key == "fidelity_snr_db_mean"
           else "") + ". *alone*: only that layer quantized (all others float).",
        "",
    ]
    has_map = any("fidelity_map" in r["float"] for r in res.layers)
    has_lab = any("labeled" in r for r in res.layers)
    head = ["rank", "layer", "params", "gain", "gain float", "gain alone", "float: head SNR dB", "alone: snr_db",
            "alone: cos_min"]
    if has_map:
        head += ["float: fidelity mAP", "alone: fidelity mAP"]
    if has_lab:
        head += ["float: labeled mAP"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, r in enumerate(res.layers, 1):
        row = [str(i), f"`{r['name']}`", str(r["params"]), _num(r["gain"]), _num(r.get("gain_float")),
               _num(r.get("gain_alone")), _num(r["float"].get("fidelity_snr_db_mean")),
               _num(r["alone"].get("snr_db")), _num(r["alone"].get("cos_min"))]
        if has_map:
            row += [_num(r["float"].get("fidelity_map")), _num(r["alone"].get("fidelity_map"))]
        if has_lab:
            row += [_num(r.get("labeled", {}).get("map"))]
        lines.append("| " + " | ".join(row) + " |")
    if res.baseline.get("labeled"):
        lines += ["", "Labeled mAP: " + ", ".join(f"{k} {_num(v)}" for k, v in res.baseline["labeled"].items())]
    if res.auto_skip:
        a = res.auto_skip
        lines += ["", "## quant.skip: auto", "", f"Kept in float: {', '.join(f'`{n}`' for n in a['chosen']) or 'none'}"
                  f" ({a['reason']})."]
    return "\n".join(lines) + "\n"


def plot(res: SensitivityResult, path: Optional[Path] = None, top: int = 40):
    """Horizontal bars of the ranked gains (top `top` layers) and the 'alone' SNR; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.layers[:top]
    key = RANK_KEYS[res.rank_by]
    n = max(len(rows), 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.5 + 0.28 * n), sharey=True)
    names = [r["name"] for r in rows][::-1]
    gains = [r["gain"] if math.isfinite(r["gain"]) else 0.0 for r in rows][::-1]
    alone = [min(r["alone"].get("snr_db", 0.0), 99.0) for r in rows][::-1]
    chosen = set((res.auto_skip or {}).get("chosen", []))
    colors = ["tab:red" if nm in chosen else "tab:blue" for nm in names]
    axes[0].barh(names, gains, color=colors)
    axes[0].set_xlabel(f"gain in {key} when kept in float")
    axes[0].set_title("leave one layer in float (others INT8)")
    axes[0].axvline(0, color="k", lw=0.5)
    axes[1].barh(names, alone, color="tab:orange")
    axes[1].set_xlabel("head SNR (dB) with only this layer INT8 (lower = more sensitive)")
    axes[1].set_title("quantize one layer alone")
    for ax in axes:
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Quantization sensitivity ({len(res.layers)} layers, top {len(rows)} shown"
                 + ("; red: kept in float by quant.skip: auto" if chosen else "") + ")")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def write_outputs(res: SensitivityResult, out: Path, writer=None) -> Dict[str, Path]:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "sensitivity.md", "json": out / "sensitivity.json", "png": out / "sensitivity.png"}
    tmp = out / ".sensitivity.json.tmp"
    tmp.write_text(json.dumps(res.to_json(), indent=2, default=str))
    os.replace(tmp, paths["json"])
    paths["md"].write_text(markdown(res))
    fig = plot(res, paths["png"])
    if writer is not None:
        writer.add_figure("report/sensitivity", fig, 0)
    plt.close(fig)
    return paths
