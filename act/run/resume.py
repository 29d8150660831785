"""The rules for reusing an output folder.

- A new run refuses a folder that already holds a run (last.pt, best.pt, ptq.pt or summary.json) unless
  `--exist-ok`.
- `--resume` needs the folder's last.pt, and refuses when the config differs from the one the run was started with
  (the diff is shown), unless `--force`. Keys that cannot change the result (device, workers, logging and checkpoint
  cadence, export settings, output_dir itself) may change freely.
- Temp files left by a process killed while writing are removed; the last complete checkpoint is what resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from act.core.errors import ActError, ConfigError

RUN_MARKERS = ("last.pt", "best.pt", "ptq.pt", "summary.json")

# Keys that may differ on resume without changing what is trained (prefixes of dotted paths).
FREE_ON_RESUME = ("output_dir", "train.device", "data.workers", "train.log_every", "train.checkpoint_every", "export.",
                  "eval.every", "eval.batch_size")


class ResumeError(ActError):
    """A resume that would not continue the same run. Exit code 2."""

    exit_code = 2


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_diff(old: Dict[str, Any], new: Dict[str, Any], ignore=FREE_ON_RESUME) -> List[Tuple[str, Any, Any]]:
    """(key, old value, new value) for every dotted key whose value differs, except the `ignore` prefixes."""
    a, b = flatten(old), flatten(new)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in ignore):
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            diffs.append((k, va, vb))
    return diffs


def format_diff(diffs: List[Tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {va!r} -> {vb!r}" for k, va, vb in diffs)


def existing_run(out: Path, markers=RUN_MARKERS) -> Optional[str]:
    """The first marker file of a run found in `out`, or None."""
    for m in markers:
        if (out / m).exists():
            return m
    return None


def check_new_run(out: Path, exist_ok: bool, markers=RUN_MARKERS) -> None:
    found = existing_run(out, markers)
    if found and not exist_ok:
        how = "Resume it with --resume, or pass" if (out / "last.pt").exists() else "Pass"
        raise ResumeError(f"output_dir {out} already holds a run ({found}). {how} --exist-ok to overwrite it, or set "
                          f"output_dir=... to a new folder")


def _refuse_or_show(out: Path, old: Dict[str, Any], new: Dict[str, Any], force: bool) -> None:
    diffs = config_diff(old, new)
    if diffs and not force:
        raise ResumeError(
            f"the config differs from the one {out} was started with:\n{format_diff(diffs)}\n"
            f"Resume with the run's own config ({out / 'config.yaml'}), or pass --force to continue with the new "
            f"values (the result then differs from an uninterrupted run)")
    if diffs:
        print(f"act: --force: resuming {out} with a changed config:\n{format_diff(diffs)}")


def check_resume_config(out: Path, cfg_dump: Dict[str, Any], force: bool) -> None:
    """Compare with the config.yaml the run wrote when it started (runs whose state is in sub-folders)."""
    import yaml

    f = out / "config.yaml"
    try:
        old = yaml.safe_load(f.read_text()) if f.is_file() else None
    except (OSError, yaml.YAMLError):
        old = None
    if isinstance(old, dict):
        _refuse_or_show(out, old, cfg_dump, force)


def check_resume(out: Path, cfg_dump: Dict[str, Any], force: bool) -> Dict[str, Any]:
    """Validate a --resume into `out` with config `cfg_dump`; returns last.pt's checkpoint (loaded on CPU)."""
    from act.blocks.checkpoint import load_checkpoint

    last = out / "last.pt"
    if not last.is_file():
        found = existing_run(out)
        extra = f" (it holds {found}, not a training state)" if found else ""
        raise ResumeError(f"nothing to resume: {last} does not exist{extra}. Start a new run without --resume")
    ckpt = load_checkpoint(last)
    st = ckpt["act"]
    if "optimizer" not in st or "iteration" not in st:
        raise ResumeError(f"{last} holds no training state to resume from")
    old = st.get("config")
    if isinstance(old, dict):
        _refuse_or_show(out, old, cfg_dump, force)
    return ckpt
