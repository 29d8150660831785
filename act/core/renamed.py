"""Module names of act before its layer packages (2026-12-07), for checkpoints pickled then.

A checkpoint (best.pt, ptq.pt, last.pt) pickles the student's classes by module path (act.quant.modules.QuantConv2d,
...). `install()` (called by `import act`) lets Python find each old name as the module it now is, so that
`load_checkpoint` and Ultralytics' `YOLO("best.pt")` read checkpoints written before the move."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old -> new; act.run, act.deploy and act.cli are package names again (their old modules pickled nothing)
RENAMED = {
    "act.errors": "act.core.errors", "act.fileio": "act.core.fileio", "act.signals": "act.core.signals",
    "act.optional_deps": "act.core.optional_deps", "act.family": "act.core.family",
    "act.family_base": "act.core.family_base", "act.family_runner": "act.core.family_runner",
    "act.targets": "act.core.targets", "act.config": "act.core.config", "act.config.sections": "act.core.config.sections",
    "act.quant": "act.blocks.quant", "act.quant.calib": "act.blocks.quant.histograms",
    "act.quant.calibrators": "act.blocks.quant.calibrators", "act.quant.fused": "act.blocks.quant.fused",
    "act.quant.health": "act.blocks.quant.health", "act.quant.modules": "act.blocks.quant.modules",
    "act.quant.pact_triton": "act.blocks.quant.pact_triton", "act.quant.placement": "act.blocks.quant.placement",
    "act.quant.quantizers": "act.blocks.quant.quantizers", "act.quant.trace": "act.blocks.quant.trace",
    "act.losses": "act.blocks.losses", "act.distill": "act.blocks.distill", "act.prune": "act.blocks.prune",
    "act.prune_schedule": "act.blocks.prune_schedule", "act.sparsity": "act.blocks.sparsity",
    "act.data": "act.blocks.data", "act.pipeline": "act.blocks.pipeline", "act.fidelity": "act.blocks.fidelity",
    "act.evaluate": "act.blocks.evaluate", "act.checkpoint": "act.blocks.checkpoint",
    "act.recovery": "act.blocks.recovery", "act.monitor": "act.blocks.monitor", "act.dist": "act.blocks.dist",
    "act.ema": "act.blocks.ema",
}


class _RenamedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in RENAMED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=False)

    def create_module(self, spec):
        return importlib.import_module(RENAMED[spec.name])

    def exec_module(self, module):  # the module is the new one, already executed
        pass


def install() -> None:
    if not any(isinstance(f, _RenamedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RenamedFinder())  # first: an old name is never loaded again as a copy
