"""Fake quantization of a model: `quantize(model, config, forward_loop)` in one line, like Model Optimizer.

Every Conv2d (and Linear) whose name matches no skip pattern becomes a QuantConv2d/QuantLinear with a per-channel
abs-max weight quantizer and a moving-average abs-max (+PACT) input quantizer. BatchNorm must already be folded.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from act.blocks.quant.modules import QUANT_MODULES, QuantConv2d, QuantLinear
from act.blocks.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "quantize",
    "calibrate",
    "set_quant_mode",
    "freeze",
    "quantized_modules",
    "activation_quantizers",
    "matches_any",
    "QuantConv2d",
    "QuantLinear",
    "ActivationQuantizer",
    "WeightQuantizer",
]


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Module-name glob (fnmatch), or a regex when the pattern starts with 're:'."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, config=None, forward_loop: Optional[Callable[[nn.Module], None]] = None,
             skip: Iterable[str] = ()) -> nn.Module:
    """Replace Conv2d/Linear layers in place with fake-quantized ones and return the model.

    config: an `act.core.config.QuantConfig` (or None for the defaults). skip: extra name patterns kept in float.
    forward_loop: if given, called once with the model to calibrate the activation ranges (see `calibrate`).
    """
    from act.core.config import QuantConfig

    cfg = config or QuantConfig()
    if cfg.skip == "auto":
        raise ValueError("quant.skip: 'auto' must be resolved to layer names first (act.orchestrate.analyze.resolve_auto_skip)")
    patterns = list(skip) + list(cfg.skip)
    act_cfg = cfg.activation
    alpha_init = None if act_cfg.alpha_init == "auto" else float(act_cfg.alpha_init)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_MODULES)]
    for name, m in targets:
        if matches_any(name, patterns):
            continue
        if isinstance(m, nn.Linear) and not cfg.quantize_linear:
            continue
        aq = ActivationQuantizer(ema_rate=act_cfg.ema_rate, pact=act_cfg.pact, alpha_init=alpha_init)
        wq = WeightQuantizer(per_channel=cfg.weight.granularity == "per_channel", axis=0,
                             max_int=cfg.weight.max_int)
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        _set_child(model, name, cls.from_float(m, aq, wq))
    if forward_loop is not None:
        calibrate(model, forward_loop, init_alpha=alpha_init is None)
    return model


def quantized_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}


def activation_quantizers(model: nn.Module) -> Dict[str, ActivationQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)}


def set_quant_mode(model: nn.Module, mode: str) -> None:
    assert mode in ("quant", "observe", "off"), mode
    for q in activation_quantizers(model).values():
        q.mode = mode
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            m.enabled = mode != "off"


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    """Fix every quantizer's scale as a constant (for export and deployment-exact evaluation): the ONNX then holds
    plain QuantizeLinear/DequantizeLinear pairs with constant scales and no range arithmetic."""
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            m.weight_quantizer.freeze(m.weight)
            m.input_quantizer.freeze()
    for q in activation_quantizers(model).values():  # also those placement added (Concat/Add/MaxPool inputs)
        q.freeze()
    return model


@torch.no_grad()
def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], None], init_alpha: bool = True) -> None:
    """Run `forward_loop(model)` with the activation quantizers observing float activations (EMA of the batch
    abs-max), then start the PACT clips at the calibrated ranges and switch fake-quant on."""
    was_training = model.training
    set_quant_mode(model, "observe")
    model.train()
    try:
        forward_loop(model)
    finally:
        set_quant_mode(model, "quant")
        model.train(was_training)
    for q in activation_quantizers(model).values():
        if init_alpha:
            q.init_alpha_from_range()
