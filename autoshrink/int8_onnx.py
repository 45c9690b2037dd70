"""PyTorch int8 models as the quantize / dequantize graphs ONNX runtimes execute in int8.

PyTorch exports no int8 layer faithfully: ``torch.export`` refuses them, and the TorchScript
exporter's file of an int8 ghost + se plan scored 50 % where the model scored 90 %. So an
FX-converted int8 model is rewritten as the float graph it stands for, which the ordinary
exporter writes: each int8 tensor becomes its dequantized values followed by a
QuantizeLinear / DequantizeLinear pair with the tensor's own scale and zero point, and each
int8 weight an int8 initializer read through DequantizeLinear (so the file keeps int8
weights). Run in float, the graph reproduces PyTorch's int8 outputs up to float rounding;
ONNX Runtime fuses the pairs around a layer into its int8 kernels (QLinearConv, QGemm...),
whose arithmetic rounds differently, so exports are checked by their predictions
(:mod:`autoshrink.export`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import fx, nn

from autoshrink.errors import UsageError

PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
# ONNX Runtime's int8 kernels add a layer's bias as an int32 count of input scale x weight
# scale; a bias held to this many steps leaves room in int32 for the products added to it
BIAS_STEPS = 2**30


def is_int8(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def _decomposed_ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

    return torch.ops.quantized_decomposed


class _Int8Weight(nn.Module):
    """An int8 weight kept as int8 and dequantized when read (DequantizeLinear in ONNX)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        ints = weight.int_repr()
        if weight.qscheme() in PER_CHANNEL:
            self.axis = weight.q_per_channel_axis()
            scales = weight.q_per_channel_scales().float()
            zero_points = weight.q_per_channel_zero_points()
        else:
            self.axis = None
            scales = torch.tensor(weight.q_scale(), dtype=torch.float32)
            zero_points = torch.tensor(weight.q_zero_point())
        self.register_buffer("ints", ints)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)

    def hold_bias(self, bias: torch.Tensor | None, input_scale: float) -> None:
        """Coarsen the scale of each output channel whose ``bias`` would not fit ONNX
        Runtime's int32 count of ``input_scale`` x weight scale (``BIAS_STEPS``), and round
        its weights to the new scale. Such a channel's weights are zeros or tiny: an se
        gate's linear layer with channels pruned to zeros read ~3 where it held 0.95 (58 %
        accuracy instead of 95 %), and a pruned se layer of a search held weights of 1.5e-5
        at PyTorch's smallest scale (1.2e-7) and a bias of 2.8 behind an input scale of
        1.3e-4, so ONNX Runtime's kernels lost the bias and the file scored 78 % where the
        model scored 99 %. Rounded to the coarser scale, a weight moves by at most half of
        it, which moves the layer's output by about 1e-7 of the bias per input."""
        if bias is None or self.axis not in (None, 0):
            return
        needed = bias.detach().abs().float() / (input_scale * BIAS_STEPS)
        scales = torch.maximum(self.scales, needed if self.axis == 0 else needed.max())
        if torch.equal(scales, self.scales):
            return
        shape = [-1] + [1] * (self.ints.dim() - 1) if self.axis == 0 else []
        zero_points = self.zero_points.reshape(shape)
        ints = (self.ints.int() - zero_points) * (self.scales / scales).reshape(shape)
        self.ints = (ints.round() + zero_points).clamp(-128, 127).to(torch.int8)
        self.scales = scales

    def forward(self) -> torch.Tensor:
        ops, bounds = _decomposed_ops(), (-128, 127, torch.int8)
        if self.axis is None:
            return ops.dequantize_per_tensor(self.ints, self.scales, self.zero_points, *bounds)
        return ops.dequantize_per_channel(self.ints, self.scales, self.zero_points, self.axis,
                                          *bounds)


class _Convolution(nn.Module):
    """An int8 convolution (or linear layer, ``conv`` None) computed in float from its int8
    weights, with the ReLU PyTorch fused into it."""

    def __init__(self, layer: nn.Module, relu: bool):
        super().__init__()
        weight, bias = layer._weight_bias()
        self.weight, self.relu = _Int8Weight(weight), relu
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.conv = ({name: getattr(layer, name) for name in ("stride", "padding", "dilation",
                                                                "groups")}
                     if hasattr(layer, "groups") else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (F.linear(x, self.weight(), self.bias) if self.conv is None
             else F.conv2d(x, self.weight(), self.bias, **self.conv))
        return F.relu(y) if self.relu else y


class _BatchNorm(nn.Module):
    """An int8 batch norm (its statistics and affine parameters are float), fused ReLU too."""

    def __init__(self, layer: nn.Module, relu: bool):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(layer, name).detach().clone())
        self.eps, self.relu = layer.eps, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         False, 0.0, self.eps)
        return F.relu(y) if self.relu else y


def _float_layers():
    """Quantized module type -> its float stand-in (output quantization is added after it)."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    return {
        nnq.Conv2d: lambda m: _Convolution(m, relu=False),
        nniq.ConvReLU2d: lambda m: _Convolution(m, relu=True),
        nnq.Linear: lambda m: _Convolution(m, relu=False),
        nniq.LinearReLU: lambda m: _Convolution(m, relu=True),
        nnq.BatchNorm2d: lambda m: _BatchNorm(m, relu=False),
        nniq.BNReLU2d: lambda m: _BatchNorm(m, relu=True),
        nnq.Dropout: lambda m: nn.Identity(),
        nnq.ReLU6: lambda m: nn.ReLU6(),
        nnq.Hardswish: lambda m: nn.Hardswish(),
        nnq.LeakyReLU: lambda m: nn.LeakyReLU(m.negative_slope),
        nnq.Sigmoid: lambda m: nn.Sigmoid(),
        nnq.ELU: lambda m: nn.ELU(m.alpha),
    }


def _float_functions():
    """PyTorch's int8 functions (output scale and zero point as arguments) -> float ones."""
    quantized = torch.ops.quantized
    return {quantized.add: (torch.add, False), quantized.add_relu: (torch.add, True),
            quantized.mul: (torch.mul, False), quantized.mul_relu: (torch.mul, True)}


def _refuse(what: str) -> UsageError:
    return UsageError(f"this int8 model uses {what}, which autoshrink cannot export to ONNX;"
                      " use --format pt or torchscript")


def _int8_outputs(model: fx.GraphModule, example: torch.Tensor) -> dict[str, tuple]:
    """Scale, zero point and dtype of every int8 tensor the graph computes, by node name.
    They are constants of the converted model; a run reads them for every kind of node alike."""
    found = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor) and result.is_quantized:
                if result.qscheme() in PER_CHANNEL:
                    raise _refuse(f"per-channel int8 activations ({node.name})")
                found[node.name] = (result.q_scale(), result.q_zero_point(), result.dtype)
            return result

    with torch.no_grad():
        Recorder(model).run(example)
    return found


def quantize_dequantize_graph(model: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """The float graph with quantize / dequantize pairs that computes what the int8 ``model``
    (from ``torch.ao`` FX ``convert_fx``) computes; ``example`` is one input batch."""
    int8 = _int8_outputs(model, example)
    layers, functions, ops = _float_layers(), _float_functions(), _decomposed_ops()
    modules = dict(model.named_modules())
    graph, root, env = fx.Graph(), nn.Module(), {}

    def mapped(args):
        return fx.node.map_arg(args, lambda node: env[node])

    for node in model.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if type(module).__module__.startswith("torch.ao.nn"):
                if type(module) not in layers:
                    raise _refuse(f"the int8 layer {type(module).__name__} ({node.target})")
                module = layers[type(module)](module)
                if isinstance(module, _Convolution) and node.args[0].name in int8:
                    module.weight.hold_bias(module.bias, int8[node.args[0].name][0])
            name = node.target.replace(".", "_")
            root.add_module(name, module)
            new = graph.call_module(name, mapped(node.args), mapped(node.kwargs))
        elif node.op == "get_attr":
            name = node.target.replace(".", "_")
            value = functools.reduce(getattr, node.target.split("."), model)
            if isinstance(value, torch.Tensor):
                root.register_buffer(name, value)
            else:
                setattr(root, name, value)
            new = graph.get_attr(name)
        elif node.op == "call_function" and node.target is torch.quantize_per_tensor:
            new = env[node.args[0]]  # quantized below, by the recorded scale and zero point
        elif node.op == "call_method" and node.target == "dequantize":
            env[node] = env[node.args[0]]  # the value is already the dequantized one
            continue
        elif node.op == "call_function" and node.target in functions:
            function, relu = functions[node.target]
            new = graph.call_function(function, mapped(node.args[:2]))
            if relu:
                new = graph.call_function(F.relu, (new,))
        elif node.op == "call_function" and str(node.target).startswith("quantized."):
            raise _refuse(f"PyTorch's int8 function {node.target}")
        else:
            new = graph.node_copy(node, lambda arg: env[arg])
        if node.name in int8:
            scale, zero_point, dtype = int8[node.name]
            bounds = (0, 255, torch.uint8) if dtype == torch.quint8 else (-128, 127, torch.int8)
            new = graph.call_function(ops.quantize_per_tensor, (new, scale, zero_point, *bounds))
            new = graph.call_function(ops.dequantize_per_tensor,
                                      (new, scale, zero_point, *bounds))
        env[node] = new
    pruned = fx.GraphModule(root, graph)
    pruned.graph.eliminate_dead_code()  # the scales quantize_per_tensor read from attributes
    return fx.GraphModule(root, pruned.graph).eval()  # holds only what the graph still reads
