"""`act ptq`: post-training quantization, the baseline that distillation QAT has to beat.

The same student as `act compress` (same quantizers, same Q/DQ placement), no training: activation ranges come from
a calibrator (minmax | percentile | mse | entropy, see act.quant.calib) over the first `ptq.num_images` images of the
unlabeled pool, without augmentation; weights keep their per-channel abs-max. Then the same evaluation (built-in mAP
if eval.data is set, label-free fidelity) and the same export + parity as `compress` (AutoCompression.finish).

Outputs in output_dir: ptq.pt (an act checkpoint; `quant.init_from: <dir>/ptq.pt` starts a `compress` run from its
ranges), student.onnx, summary.json, config.yaml, tensorboard/.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import torch

from act.compress import AutoCompression, _fmt
from act.data import as_model_input, build_loader, resolve_source
from act.errors import ConfigError
from act.monitor import RunLogger
from act.quant.calib import CalibrationResult, calibrate_ranges, set_ranges


class PostTrainingQuantization(AutoCompression):
    """`PostTrainingQuantization(config).run()` -> summary dict. Config: a RunConfig; its `ptq` section applies."""

    CHECKPOINT = "ptq.pt"

    def setup(self):
        if not self.cfg.quant.enabled:
            raise ConfigError("invalid config:\n  quant.enabled: false, but act ptq quantizes")
        self.setup_models()
        self.setup_pool()
        self.setup_eval()
        self.total_iters = 0

    def calibration_loader(self):
        cfg = self.cfg
        p = cfg.ptq
        if p.source:
            paths = resolve_source(p.source)
        elif self.pool is not None:
            paths = self.pool  # the pool less the held-out fidelity slice
        else:
            paths = resolve_source(cfg.data.train)
        data = cfg.data.model_copy(update={"max_images": None, "cache": False})
        return build_loader(data, seed=cfg.train.seed, shuffle=False, augment=False, paths=paths[: p.num_images],
                            batch_size=p.batch_size or cfg.data.batch_size)

    def forward_loop(self, loader):
        """The calibration pass over `loader`: unreadable images counted, the distillation captures dropped."""
        def loop(model):
            for images, bad in loader:
                if bad:
                    self.bad_images.extend(b for b in bad if b not in self.bad_images)
                if images is not None and len(images):
                    model(as_model_input(images, self.device))
            self.s_capture.pop()

        return loop

    def calibrate_ptq(self) -> CalibrationResult:
        loader = self.calibration_loader()
        p = self.cfg.ptq
        result = calibrate_ranges(self.student, self.forward_loop(loader), p.calibrator, p.percentile, p.bins)
        set_ranges(self.student, result.ranges)
        self.calibration_images = len(loader.dataset)
        return result

    def run(self, resume: bool = False, exist_ok: bool = False) -> Dict[str, Any]:
        t0 = time.time()
        self._prepare_output(False, exist_ok, marker_name=self.CHECKPOINT)
        self.setup()
        self.best_metric = None
        self.best_iteration = 0
        self.history: List[Dict[str, Any]] = []
        self.bad_images: List[str] = []
        self.nonfinite_steps = 0
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
