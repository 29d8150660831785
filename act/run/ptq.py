"""`act ptq`: post-training quantization, the baseline that distillation QAT has to beat.

The same student as `act compress` (same quantizers, same Q/DQ placement), no training: activation ranges come from
a calibrator (minmax | percentile | mse | entropy, see act.blocks.quant.histograms) over the first `ptq.num_images` images of the
unlabeled pool, without augmentation; weights keep their per-channel abs-max. Then the same evaluation (built-in mAP
if eval.data is set, label-free fidelity) and the same export + parity as `compress` (act.run.deliver).

Outputs in output_dir: ptq.pt (an act checkpoint; `quant.init_from: <dir>/ptq.pt` starts a `compress` run from its
ranges), student.onnx, summary.json, config.yaml, tensorboard/.
"""

from __future__ import annotations

import time
from typing import Any, Dict

import torch

from act.run.initial_ranges import calibrate, calibration_loader
from act.core.errors import ConfigError
from act.blocks.monitor import RunLogger
from act.blocks.quant.histograms import CalibrationResult
from act.run.runner import Run, fmt_metrics as _fmt


class PostTrainingQuantization(Run):
    """`PostTrainingQuantization(config).run()` -> summary dict. Config: a RunConfig; its `ptq` section applies."""

    CHECKPOINT = "ptq.pt"

    def setup(self):
        if not self.cfg.quant.enabled:
            raise ConfigError("invalid config:\n  quant.enabled: false, but act ptq quantizes")
        self.setup_models()
        self.setup_pool()
        self.setup_eval()
        self.total_iters = 0

    def calibrate_ptq(self) -> CalibrationResult:
        loader = calibration_loader(self)
        p = self.cfg.ptq
        result = calibrate(self, loader, p.calibrator, p.percentile)
        self.calibration_images = len(loader.dataset)
        return result

    def run(self, resume: bool = False, exist_ok: bool = False) -> Dict[str, Any]:
        t0 = time.time()
        self.prepare_output(False, exist_ok, marker_name=self.CHECKPOINT)
        self.setup()
        self.best_iteration = 0
        log = RunLogger(self.out / "tensorboard")
        p = self.cfg.ptq
        print(f"act: PTQ calibration ({p.calibrator}) on {p.num_images} images")
        t_cal = time.time()
        result = self.calibrate_ptq()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        calibrate_time = time.time() - t_cal
        log.quantizers(self.student, 0)
        before: Dict[str, Dict[str, float]] = {}
        if self.cfg.eval.before and self.evaluators:
            before["teacher"] = self.evaluate(self.teacher, 0)
            log.scalars("eval_before/teacher", before["teacher"], 0)
            print(f"act: teacher {_fmt(before['teacher'])}")
        self.history.append({"iteration": 0, "before": before})
        res = self.evaluate(self.student, 0)
        if res:
            log.scalars("eval", res, 0)
            print(f"act: PTQ student ({p.calibrator}) {_fmt(res)}")
        self.history.append({"iteration": 0, "eval": res})
        if self.metric:
            self.best_metric = res.get(self.metric)
        self.save(self.CHECKPOINT, 0, training_state=False)
        extra = {
            "mode": "ptq",
            "ptq": {"calibrator": p.calibrator, "percentile": p.percentile if p.calibrator == "percentile" else None,
                    "images": self.calibration_images, "bins": p.bins, **result.summary()},
            "time_s": {"calibrate": round(calibrate_time, 2), "compress": round(calibrate_time, 2),
                       "eval": round(self.eval_time, 2)},
        }
        summary = self.finish(log, before, 0, time.time() - t0, checkpoint=self.CHECKPOINT, extra=extra)
        log.close()
        return summary
