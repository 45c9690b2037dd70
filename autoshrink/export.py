"""Deployable models from a study's trials, and the model card that says what they are.

Three formats: ``pt`` is the trial's packed artifact (the smallest file, as measured) with the
description :func:`load_model` needs to rebuild the architecture, so loading is one line with
autoshrink installed; ``torchscript`` and ``onnx`` load without autoshrink (``torch.jit.load``,
any ONNX runtime; an int8 model's ONNX file keeps int8 weights and runs on ONNX Runtime's int8
kernels). Every export is checked by loading it back and comparing its outputs with the rebuilt
model's on validation images (an int8 ONNX file's accuracy, as its kernels round
differently); the model card says how it was checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from autoshrink import __version__, artifact
from autoshrink.data import Split
from autoshrink.errors import UsageError
from autoshrink.int8_onnx import is_int8, quantize_dequantize_graph
from autoshrink.metrics import median_call_ms
from autoshrink.pareto import TrialRecord
from autoshrink.plan import Plan, apply_stage
from autoshrink.plugins import PluginHost
from autoshrink.task import Baseline, Task
from autoshrink.technique import Stage, TrialContext

TOLERANCE = 1e-3  # largest output difference accepted between the export and the model
CHECK_IMAGES = 8  # validation images the outputs are compared on
INT8_CHECK_IMAGES = 1024  # validation images an int8 ONNX export's accuracy is measured on
MAX_INT8_LOSS_PP = 1.0  # accuracy it may lose there against the model, in percentage points


def rebuild(model: nn.Module, plan: Plan, input_shape: tuple[int, int, int], num_classes: int,
            state: dict) -> nn.Module:
    """``model`` (the untrained task model) re-shaped by ``plan`` without training, with the
    weights of an artifact's ``state`` (:func:`autoshrink.artifact.load`)."""
    ctx = TrialContext(input_shape, num_classes, saved_state=state)
    for stage in Stage:
        if stage is Stage.QUANTIZATION:
            model.eval()
        model = apply_stage(plan, stage, model, ctx, rebuild=True)
    artifact.load_state_into(model, state)
    return model.eval()


def load_model(path: str | Path, host: PluginHost | None = None) -> nn.Module:
    """Load a model written by ``autoshrink export --format pt``: ``autoshrink.load_model(p)``."""
    state, about = artifact.load(path)
    if about is None:
        raise ValueError(f"{path} holds weights only; load it with autoshrink.artifact.load_into"
                         " or export the trial with 'autoshrink export'")
    host = host or PluginHost.discover()
    channels, size, _ = about["input_shape"]
    model = host.model(about["model"]).build(about["num_classes"], channels, size)
    plan = Plan.from_json(about["plan"], host.techniques)
    return rebuild(model, plan, tuple(about["input_shape"]), about["num_classes"], state)


@dataclasses.dataclass(frozen=True)
class Written:
    """How :func:`write` checked the file, in words, and its batch-1 latency in its runtime
    beside the uncompressed architecture's in the same format and runtime."""

    check: str
    runtime: str
    latency_ms: float
    baseline_latency_ms: float


RUNTIMES = {"pt": "PyTorch", "torchscript": "TorchScript", "onnx": "ONNX Runtime"}


def write(model: nn.Module, fmt: str, target: Path, validation: Split, about: dict,
          host: PluginHost, baseline: nn.Module) -> Written:
    """Write ``model`` in ``fmt`` (pt, torchscript or onnx) to ``target``, check that the file
    reproduces it on ``validation`` images and time it against ``baseline`` (the task's model,
    untrained: latency depends on the architecture) written and run the same way, as the
    search's latencies are PyTorch's and say little about another runtime. The file is
    written aside and takes ``target``'s name only once checked, so a failed export leaves an
    earlier one alone."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.touch()
    except OSError as error:
        raise UsageError(f"cannot write {target} ({error.strerror}); pass --to a file or"
                         " folder you can write to") from None
    try:
        loaded = _write_and_load(model, fmt, partial, validation.x[:CHECK_IMAGES], about, host)
        with torch.no_grad():
            if fmt == "onnx" and is_int8(model):
                check = _check_accuracy(model, loaded, validation.x[:INT8_CHECK_IMAGES],
                                        validation.y[:INT8_CHECK_IMAGES])
            else:
                check = _check_outputs(model, loaded, validation.x[:CHECK_IMAGES], fmt)
            latency = median_call_ms(loaded, validation.x[:1])
        baseline_latency = _latency_as(baseline, fmt, validation.x[:CHECK_IMAGES],
                                       {**about, "plan": Plan(()).to_json()}, host)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return Written(check, RUNTIMES[fmt], latency, baseline_latency)


def _latency_as(model: nn.Module, fmt: str, images: torch.Tensor, about: dict,
                host: PluginHost) -> float:
    """Batch-1 latency of ``model`` written in ``fmt`` and loaded back, in a scratch folder."""
    with tempfile.TemporaryDirectory(prefix="autoshrink-export-") as folder:
        loaded = _write_and_load(model.eval(), fmt, Path(folder) / f"model.{fmt}",
                                 images, about, host)
        with torch.no_grad():
            return median_call_ms(loaded, images[:1])


def _write_and_load(model: nn.Module, fmt: str, target: Path, example: torch.Tensor,
                    about: dict, host: PluginHost) -> Callable[[torch.Tensor], torch.Tensor]:
    """Write the file and load it back as a function of an input batch."""
    if fmt == "pt":
        artifact.save(model, target, about=about)
        return load_model(target, host)
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracing's notes, and the deprecation of both calls
            torch.jit.trace(model, example).save(str(target))
            return torch.jit.load(str(target))
    if is_int8(model):  # PyTorch exports no int8 layer: the float graph it stands for
        model = quantize_dequantize_graph(model, example)
    session = _write_onnx(model, target, example)
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def _check_outputs(model: nn.Module, loaded, images: torch.Tensor, fmt: str) -> str:
    difference = float((loaded(images).float() - model(images).float()).abs().max())
    if difference > TOLERANCE:
        raise UsageError(f"the {fmt} export of this model differs from it by {difference:.3g}"
                         f" on validation images; use another --format (pt is exact)")
    return (f"outputs within {TOLERANCE:g} of the model's on {len(images)} validation images"
            f" (largest difference {difference:.2g})")


def _check_accuracy(model: nn.Module, loaded, images: torch.Tensor,
                    labels: torch.Tensor) -> str:
    """An int8 ONNX file is checked by its accuracy: ONNX Runtime's int8 kernels round
    differently from PyTorch's, which changes the class of images whose two best logits are
    a quantization step apart."""
    expected, actual = (run(images).argmax(1) == labels for run in (model, loaded))
    accuracy, exported = (float(right.float().mean()) * 100 for right in (expected, actual))
    lost, gained = int((expected & ~actual).sum()), int((actual & ~expected).sum())
    images_lost = "1 image it gets right is" if lost == 1 else f"{lost} images it gets right are"
    check = (f"ONNX Runtime's int8 kernels score {exported:.2f} % on {len(images)} validation"
             f" images where the model scores {accuracy:.2f} % ({images_lost} now wrong,"
             f" {gained} the other way)")
    # rounding flips near-ties both ways; a loss is refused when it is large and one-sided
    # (two standard errors of McNemar's paired test), as a faulty export's is
    if accuracy - exported > MAX_INT8_LOSS_PP and lost - gained > 2 * math.sqrt(lost + gained):
        raise UsageError(f"{check}; it loses more than {MAX_INT8_LOSS_PP:g} pp, so the file"
                         " was not kept: use --format pt or torchscript")
    return check


def _write_onnx(model: nn.Module, target: Path, example: torch.Tensor):
    """Export to ONNX with a dynamic batch; returns an ONNX Runtime session on the file."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UsageError("--format onnx needs the onnx packages; install them with"
                         " pip install 'autoshrink[onnx]'") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(target), input_names=["images"],
                              output_names=["logits"], verbose=False, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as error:
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", (str(error).splitlines() or [""])[0])
        raise UsageError(f"this model cannot be exported to ONNX ({type(error).__name__}:"
                         f" {first_line}); use --format pt or torchscript") from None
    exported = onnx.load(str(target))
    for node in exported.graph.node:
        # the exporter notes each node's PyTorch origin: most of a small model's file
        del node.metadata_props[:]
    del exported.graph.value_info[:]  # intermediate shapes, which runtimes infer anyway
    onnx.checker.check_model(exported)
    onnx.save(exported, str(target))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # timed like the PyTorch model
    return onnxruntime.InferenceSession(str(target), options,
                                        providers=["CPUExecutionProvider"])


def model_card(record: TrialRecord, baseline: Baseline, task: Task, config, fmt: str,
               target: Path, study_name: str, written: Written) -> dict:
    """What the exported model is: plan, measurements against the baseline, data, loading."""
    ratio = lambda base, value: round(base / max(value, 1), 2)  # noqa: E731
    latency_x = round(written.baseline_latency_ms / written.latency_ms, 3)
    loading = {
        "pt": f"import autoshrink; model = autoshrink.load_model({target.name!r})",
        "torchscript": f"import torch; model = torch.jit.load({target.name!r})",
        "onnx": f"import onnxruntime; session = onnxruntime.InferenceSession({target.name!r})",
    }[fmt]
    splits = task.splits
    return {
        "file": target.name, "format": fmt, "bytes": target.stat().st_size, "load": loading,
        "checked": written.check,
        "study": study_name, "trial": record.number,
        "model": task.model_spec.name, "techniques": record.plan,
        "plan": json.loads(record.plan_json),
        "metrics": {
            "val_accuracy": record.val_accuracy, "test_accuracy": record.test_accuracy,
            "accuracy_drop_pp": round(record.drop_pp(baseline), 3),
            "within_budget": record.feasible(baseline, config.budget),
            "params": record.params, "nonzero_params": record.nonzero_params,
            "macs": record.macs, "artifact_bytes": record.size_bytes,
            "cpu_latency_ms": round(record.latency_ms, 3),
            "file_runtime": written.runtime,
            "file_latency_ms": round(written.latency_ms, 3)},
        "baseline": {**dataclasses.asdict(baseline),
                     "params_x": ratio(baseline.nonzero_params, record.nonzero_params),
                     "macs_x": ratio(baseline.macs, record.macs),
                     "size_x": ratio(baseline.size_bytes, record.size_bytes),
                     "file_latency_ms": round(written.baseline_latency_ms, 3),
                     "file_latency_x": latency_x},
        "data": {"dataset": task.dataset, "input_shape": list(task.input_shape),
                 "num_classes": splits.num_classes, "train": len(splits.train),
                 "validation": len(splits.val), "test": len(splits.test),
                 "validation_fraction": config.val_fraction, "seed": config.seed,
                 "normalisation": None if splits.normalisation is None else {
                     "mean": splits.normalisation[0].flatten().tolist(),
                     "std": splits.normalisation[1].flatten().tolist()}},
        "budget_pp": config.budget,
        "versions": {"autoshrink": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }


def _speed(ratio: float) -> str:
    """A latency ratio in words: compressed models of many small layers can run slower."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def card_markdown(card: dict) -> str:
    m, b, d = card["metrics"], card["baseline"], card["data"]
    test = "not measured" if m["test_accuracy"] is None else f"{m['test_accuracy'] * 100:.2f} %"
    lines = [
        f"# {card['model']} — trial {card['trial']} of study {card['study']}", "",
        f"Techniques: {card['techniques']}", "",
        f"Load it: `{card['load']}`", "",
        "| | this model | baseline | reduction |", "|---|---|---|---|",
        f"| validation accuracy | {m['val_accuracy'] * 100:.2f} % |"
        f" {b['val_accuracy'] * 100:.2f} % | {abs(m['accuracy_drop_pp']):.2f} pp"
        f" {'drop' if m['accuracy_drop_pp'] >= 0 else 'gain'}"
        f" ({'within' if m['within_budget'] else 'outside'} the {card['budget_pp']:g} pp budget) |",
        f"| test accuracy | {test} | {b['test_accuracy'] * 100:.2f} % | |",
        f"| non-zero parameters | {m['nonzero_params']:,} | {b['nonzero_params']:,} |"
        f" {b['params_x']}x |",
        f"| MACs | {m['macs']:,} | {b['macs']:,} | {b['macs_x']}x |",
        f"| artifact bytes | {m['artifact_bytes']:,} | {b['size_bytes']:,} | {b['size_x']}x |",
        f"| CPU latency (batch 1), PyTorch, in the search | {m['cpu_latency_ms']:.3f} ms |"
        f" {b['latency_ms']:.3f} ms | |",
        f"| CPU latency (batch 1), this file in {m['file_runtime']} |"
        f" {m['file_latency_ms']:.3f} ms | {b['file_latency_ms']:.3f} ms |"
        f" {_speed(b['file_latency_x'])} |",
        "",
        f"Data: {d['dataset']}, input {'x'.join(map(str, d['input_shape']))},"
        f" {d['num_classes']} classes; {d['train']} train / {d['validation']} validation /"
        f" {d['test']} test images (seed {d['seed']}). Inputs are normalised per channel with"
        f" the training split's mean and standard deviation (in the JSON card).", "",
        f"File: {card['file']} ({card['format']}, {card['bytes']:,} bytes); exported with"
        f" autoshrink {card['versions']['autoshrink']}, torch {card['versions']['torch']};"
        f" checked: {card['checked']}.",
    ]
    return "\n".join(lines) + "\n"
