"""`OnnxRunner`: an exported .onnx run with onnxruntime on CPU, callable like a model (FamilyBase's default
`load_for_inference`; a family with its own runtime, e.g. Ultralytics' AutoBackend, overrides it)."""

from __future__ import annotations

from pathlib import Path

import torch


class OnnxRunner:
    def __init__(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k: v for k, v in meta.items()}
        self.format = "onnx"
        self.device = torch.device("cpu")
        b = self.input.shape[0]
        self.dynamic = not isinstance(b, int)
        self.batch = None if self.dynamic else b
        self.task = self.metadata.get("task")
        size = self.input.shape[2]
        self.imgsz = [size, size] if isinstance(size, int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input.name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)
