"""Static post-training int8 quantization for CPUs, seed 003 (Sec. III-C).

Uses torch.ao FX graph mode (``prepare_fx`` / ``convert_fx``) with the x86 backend: observers are
calibrated on training batches, then weights and activations become int8. FX inserts the
quantize / dequantize stubs the paper had to add to its model code by hand. The artifact stores
int8 weights, about 4x smaller than float32.

``observer`` chooses how activation ranges are found: ``histogram`` is PyTorch's x86 default
(a search for the range that loses least, about 0.07 s per observed tensor on this CPU: a
minute for ResNet-101), ``minmax`` takes the observed extremes (instant, coarser when a few
activations are outliers). Weights are observed per channel either way.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink.technique import check_choice, check_range

OBSERVERS = ("histogram", "minmax")

# FX shares a concatenation's observer between its first input and its output, so in nested
# concatenations (a ghost module's inside a Fire block's) the inner one's inputs keep a range of
# their own, and torch.cat requantizes them into the outer one's range, which was observed over
# the whole concatenation: they lose resolution, not range. PyTorch warns of "large numerical
# inaccuracies" on every run of such a model; here they are not (untrained smallcnn on digits,
# int8 against float32 outputs: 0.6 % relative error with fire + ghost, 0.7-0.9 % with either).
warnings.filterwarnings("ignore", message="All inputs of this cat operator must share the same"
                        " quantization parameters")


@dataclasses.dataclass(frozen=True)
class QuantizeInt8Options:
    calibration_batches: int = 8
    observer: str = "histogram"

    def __post_init__(self):
        check_range("quantize-int8", "calibration_batches", self.calibration_batches, 1, 1000)
        check_choice("quantize-int8", "observer", self.observer, OBSERVERS)


def _qconfig_mapping(observer: str):
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver

    mapping = get_default_qconfig_mapping("x86")
    if observer == "minmax":
        default = mapping.global_qconfig
        mapping.set_global(QConfig(activation=MinMaxObserver.with_args(reduce_range=True),
                                   weight=default.weight))
    return mapping


def _norms_kept_whole(model: nn.Module):
    """FX traces through norm layers defined outside torch (torchvision's LayerNorm2d, in
    ConvNeXt) and writes their width into the graph as a constant, so a rebuild, which
    converts the unpruned model, could not take a pruned one's narrower weights. Such layers
    stay modules (run in float) whose width the loader can change."""
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    classes = {type(m) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
               and not type(m).__module__.startswith("torch.")}
    return PrepareCustomConfig().set_non_traceable_module_classes(sorted(classes, key=str))


def _quantize(model: nn.Module, batches, example: torch.Tensor, observer: str) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, _qconfig_mapping(observer), example_inputs=(example,),
                              prepare_custom_config=_norms_kept_whole(model))
        with torch.no_grad():
            for batch in batches:
                prepared(batch.cpu().contiguous())
        return _spatial_means_keep_dims(convert_fx(prepared))


SPATIAL_DIMS = ({2, 3}, {-2, -1})  # of an N x C x H x W tensor


def _spatial_means_keep_dims(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite ``x.mean([2, 3])`` as ``x.mean([2, 3], keepdim=True).flatten(1)``: the same values.

    PyTorch's int8 mean without ``keepdim`` fails ("required rank 4 tensor to use
    channels_last format") on the 1x1 maps of a model run on small images, whose strides
    read as channels_last: ShuffleNetV2, which ends so, could not be quantized at 32x32."""
    graph = model.graph
    for node in list(graph.nodes):
        if not (node.op == "call_method" and node.target == "mean"):
            continue
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if keepdim or not isinstance(dims, (list, tuple)) or set(dims) not in SPATIAL_DIMS:
            continue
        with graph.inserting_after(node):
            flat = graph.call_method("flatten", (node, 1))
        node.replace_all_uses_with(flat, delete_user_cb=lambda user: user is not flat)
        node.args, node.kwargs = (node.args[0], list(dims)), {"keepdim": True}
    graph.lint()
    model.recompile()
    return model


class QuantizeInt8(Technique):
    name = "quantize-int8"
    stage = Stage.QUANTIZATION
    claims = frozenset({"weight-dtype"})
    Options = QuantizeInt8Options
    paper = "seed 003, Sec. III-C (post-training static quantization)"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        try:
            torch.fx.symbolic_trace(copy.deepcopy(model).eval())
        except Exception as error:
            return False, f"torch.fx cannot trace the model ({type(error).__name__})"
        return True, ""

    def search_space(self, trial) -> QuantizeInt8Options:
        return QuantizeInt8Options(
            calibration_batches=trial.suggest_categorical("calibration_batches", [2, 8, 32]),
            observer=trial.suggest_categorical("observer", list(OBSERVERS)))

    def apply(self, model: nn.Module, options: QuantizeInt8Options, ctx) -> nn.Module:
        return _quantize(model, ctx.calibration_batches(options.calibration_batches),
                         ctx.example_input(), options.observer)

    def rebuild(self, model: nn.Module, options: QuantizeInt8Options, ctx) -> nn.Module:
        # Only the structure is needed: the artifact's state dict holds every scale and zero
        # point, so the instant min-max observer stands in for the trial's (histogram: 2-7 s
        # per model of the default search, spent on ranges the artifact then overwrites)
        return _quantize(model, [ctx.example_input()], ctx.example_input(), "minmax")


@hookimpl
def register_techniques(register):
    register(QuantizeInt8())
