"""Conv2d and Linear with fake-quantized input and weight. Subclasses of the torch layers, so everything that
inspects a model (Ultralytics, torch-pruning, ONNX export) still sees a Conv2d / Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from act.blocks.quant.quantizers import ActivationQuantizer, WeightQuantizer


class QuantConv2d(nn.Conv2d):
    input_quantizer: ActivationQuantizer
    weight_quantizer: WeightQuantizer

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_quantizer: ActivationQuantizer, weight_quantizer: WeightQuantizer):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
        q.weight = conv.weight
        q.bias = conv.bias
        q.input_quantizer = input_quantizer
        q.weight_quantizer = weight_quantizer
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    input_quantizer: ActivationQuantizer
    weight_quantizer: WeightQuantizer

    @classmethod
    def from_float(cls, lin: nn.Linear, input_quantizer: ActivationQuantizer, weight_quantizer: WeightQuantizer):
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                dtype=lin.weight.dtype)
        q.weight = lin.weight
        q.bias = lin.bias
        q.input_quantizer = input_quantizer
        q.weight_quantizer = weight_quantizer
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


QUANT_MODULES = (QuantConv2d, QuantLinear)
