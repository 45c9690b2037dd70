"""The trainer: in-memory tensors, channels_last, one-cycle SGD, early stopping.

Made for small image datasets on a few CPU cores: batches are slices of tensors already in
memory (no DataLoader, no per-sample Python), convolutions run in channels_last, and a ReLU
before a max-pool runs after it (``autoshrink.reorder``: same values, the ReLU on a quarter of
the elements). A model that no longer changes, such as a distillation teacher, runs once over
the training split rather than at every step of every trial (``training_outputs``). Batch norm
statistics that lag the weights are measured again before evaluation (``autoshrink.batch_norm``),
strided convolutions avoid two faults of oneDNN (``autoshrink.strided_conv``), wide
convolutions on maps of 4x4 pixels or less, where oneDNN's kernels are slow, run as matrix
products (``autoshrink.matmul_conv``), and depthwise ones on maps shorter than their kernel pad
their input ahead to reach oneDNN's fast kernel (``autoshrink.depthwise_padding``). The same
code runs on CUDA when one is present.

Precision (``Recipe.precision``): training runs under bf16 autocast on CUDA, and on a CPU whose
bf16 instructions measured faster than float32 (``cpu_bfloat16_speedup``) for tasks whose model
is large enough to gain from it, except grouped convolutions, which oneDNN runs slower in bf16
(``autoshrink.grouped_conv``); evaluation always runs in float32, the exported model's
precision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.allocator import retain_freed_memory
from autoshrink.batch_norm import has_stale_statistics, reestimate_statistics
from autoshrink.checkpoint import TrainingCheckpoint
from autoshrink.cpu_features import has_amx, has_avx512_bf16
from autoshrink.data import Split, Splits
from autoshrink.depthwise_padding import depthwise_layers_padded_ahead
from autoshrink.errors import TrialFailed
from autoshrink.grouped_conv import grouped_convolutions_in_float32
from autoshrink.int8_onnx import is_int8
from autoshrink.matmul_conv import small_map_convolutions_as_matmul
from autoshrink.recipe import Recipe, available_cores
from autoshrink.reorder import pool_before_relu
from autoshrink.strided_conv import around_strided_conv_faults
from autoshrink.technique import TrainerCallback

log = logging.getLogger(__name__)

# "auto" trains in bf16 on the CPU only when the task's model has this many MACs per sample:
# below it a step is bound by per-operator overhead, and autocast's casts cost about what bf16
# saves (AMD EPYC with AVX-512 BF16, one thread: 0.88x-1.13x at 39k-650k MACs, 1.54x at 1.9M,
# 1.77x at 7.3M)
BFLOAT16_MIN_MACS = 1_000_000
BFLOAT16_MIN_SPEEDUP = 1.25  # what the probe must measure for "auto" to train in bf16
# validation samples, the split's first, on which a fit with patience compares its epochs and
# an early-abort check (autoshrink.abort) first measures: a whole large split after every epoch
# cost more than the epoch's training in a Fashion-MNIST proxy search (see Trainer.fit)
VALIDATION_PART = 2048


def configure_threads(threads: int | None = None) -> None:
    """Use ``threads`` (default: every core) for intra-op work; inter-op parallelism only adds
    overhead here."""
    torch.set_num_threads(threads or available_cores())


def configure_process(threads: int | None = None) -> None:
    """Set up a process that trains: its thread count (``configure_threads``) and an
    allocator that keeps freed memory for the next step (``autoshrink.allocator``)."""
    configure_threads(threads)
    retain_freed_memory()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_bfloat16_speedup() -> float:
    """How many times faster a convolution network trains under bf16 autocast than in float32
    on this CPU, measured once per process (about a second); 0 without bf16 instructions.

    Measured, not read off the CPU's flags: on Intel Xeon cores with AVX-512 BF16 but no AMX,
    bf16 trained 0.7x as fast as float32, on AMD EPYC cores with it 1.5x-1.9x. Measured on one
    thread, the best of seven: while other processes ran, the best of three on two threads
    read 0.9x-2.6x in six measurements (the choice needs 1.25x), on one thread 1.1x-1.9x in
    fifteen, and the best of seven on one thread 1.5x-1.6x in eight.
    """
    if not (has_avx512_bf16() or has_amx()):
        return 0.0
    with torch.random.fork_rng(devices=[]):  # leave the seeded random stream as it was
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        x = torch.randn(32, 16, 16, 16).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (32,))
    net = net.to(memory_format=torch.channels_last)

    def seconds(bfloat16: bool) -> float:
        start = time.perf_counter()
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                loss = F.cross_entropy(net(x), y)
            net.zero_grad(set_to_none=True)
            loss.backward()
        return time.perf_counter() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seconds(False), seconds(True)  # warm-up: oneDNN builds its kernels on first use
        best = {False: math.inf, True: math.inf}
        for _ in range(7):
            for bfloat16 in (False, True):
                best[bfloat16] = min(best[bfloat16], seconds(bfloat16))
    finally:
        torch.set_num_threads(threads)
    speedup = best[False] / best[True]
    chosen = "bfloat16" if speedup >= BFLOAT16_MIN_SPEEDUP else "float32"
    log.info(f"bf16 autocast trains {speedup:.2f}x as fast as float32 on this CPU: tasks whose"
             f" model has {BFLOAT16_MIN_MACS:,} MACs or more train in {chosen} (see --precision)")
    return speedup


def trains_in_bfloat16(precision: str, device: torch.device, task_macs: int | None) -> bool:
    """Whether a task trains under bf16 autocast (see the module): per task, not per model,
    so every trial of a search trains in one precision."""
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return True
    # the size first: the speed check takes about a second
    return ((task_macs or 0) >= BFLOAT16_MIN_MACS
            and cpu_bfloat16_speedup() >= BFLOAT16_MIN_SPEEDUP)


def evaluation_device(model: nn.Module, device: torch.device) -> torch.device:
    """Where the trainer runs ``model`` outside training: an int8 model on the CPU, which alone
    has kernels for it (such a model may keep float layers too: an int8 VGG-19 with a float
    one was sent to an H200 and failed its trial), any other on the trainer's ``device``."""
    return torch.device("cpu") if is_int8(model) else device


# Called after each epoch with (model, epochs done, epochs planned, the accuracy of the
# validation split's first VALIDATION_PART samples when the trainer measured it this epoch, else
# None); raises to stop training.
EpochMonitor = Callable[[nn.Module, int, int, float | None], None]


@dataclasses.dataclass
class TimeSpent:
    """Seconds spent training and evaluating, so the engine can tell its own overhead apart."""

    training: float = 0.0
    evaluating: float = 0.0


class Trainer:
    """Trains and evaluates models on one set of splits."""

    def __init__(self, splits: Splits, recipe: Recipe, device: torch.device | None = None,
                 seed: int = 0, task_macs: int | None = None, bfloat16: bool | None = None):
        """``task_macs``: the MACs per sample of the task's model, which decide the precision of
        its training (see the module); None (not known) counts as a small model. ``bfloat16``
        decides instead, where the precision was settled before (a study's)."""
        self.splits, self.recipe, self.seed = splits, recipe, seed
        self.device = device or default_device()
        self.bfloat16 = (trains_in_bfloat16(recipe.precision, self.device, task_macs)
                         if bfloat16 is None else bfloat16)
        self.spent = TimeSpent()
        self._training_outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # models trained since their batch norm statistics were last measured again
        self._stale_statistics: weakref.WeakSet = weakref.WeakSet()
        # the validation accuracy of the epoch the last fit kept (with patience), which the
        # model it returned has: None when that fit measured none, or only a part of the split
        self.kept_accuracy: float | None = None

    # --- evaluation ---------------------------------------------------------------------

    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: Split, batch_size: int = 512) -> float:
        """Top-1 accuracy in [0, 1]; quantized models are evaluated on the CPU."""
        start = time.perf_counter()
        try:
            self._refresh_statistics(model)
            with pool_before_relu(model):
                return self._accuracy(model, split, batch_size)
        finally:
            self.spent.evaluating += time.perf_counter() - start

    def _accuracy(self, model: nn.Module, split: Split, batch_size: int) -> float:
        correct = 0
        for start, logits in self._outputs(model, split, batch_size):
            correct += (logits.argmax(1).cpu() == split.y[start:start + batch_size]).sum().item()
        return correct / max(1, len(split))

    def _outputs(self, model: nn.Module, split: Split,
                 batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first sample, outputs) per batch of ``split``, in eval mode; a float model in
        channels_last, as it trains. A model rebuilt from its file or the cached baseline comes
        in NCHW, in which a Fashion-MNIST search's confirmed models took 1.7x as long on the
        test split (4.4 s against 2.6 s for nine)."""
        device, floating = evaluation_device(model, self.device), not is_int8(model)
        # techniques hand models over on the CPU (autoshrink.plan); one pass over the weights
        layout = torch.channels_last if floating else torch.preserve_format
        model.to(device, memory_format=layout).eval()
        for start in range(0, len(split), batch_size):
            x = split.x[start:start + batch_size].to(device)
            if floating:
                x = x.contiguous(memory_format=torch.channels_last)
            yield start, model(x)

    @torch.no_grad()
    def training_outputs(self, model: nn.Module) -> torch.Tensor:
        """``model``'s outputs on every training sample, in the split's order, on the device.

        For a model that no longer changes (a distillation teacher): computed on first use and
        kept while the model lives, so every trial of a search reads its rows instead of
        running the model on each batch. Valid because training feeds the split's samples
        unchanged.
        """
        outputs = self._training_outputs.get(model)
        if outputs is None:
            outputs = self._training_outputs[model] = self.outputs(model, self.splits.train)
        return outputs

    @torch.no_grad()
    def outputs(self, model: nn.Module, split: Split, batch_size: int = 512) -> torch.Tensor:
        """``model``'s float32 outputs on every sample of ``split``, in order, on the device it
        ran on (the trainer's, or the CPU for an int8 model)."""
        with pool_before_relu(model):
            return torch.cat([logits.float() for _, logits in
                              self._outputs(model, split, batch_size)])

    # --- training -----------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        """Batches of ``batch_size``, the last one holding the rest, except that a single
        sample left over joins the batch before it: alone, it fails every batch norm that
        sees one value per channel (a ResNet's last block at 1x1) and the whole training."""
        full, rest = divmod(len(self.splits.train), self.recipe.batch_size)
        return max(1, full + (rest > 1))

    def training_batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless (inputs, labels) batches of the training split on the device, reshuffled
        every ``steps_per_epoch`` batches; the split is moved to the device once."""
        for _, x, y in self._indexed_batches(seed):
            yield x, y

    def _indexed_batches(self, seed: int, skip_epochs: int = 0
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:meth:`training_batches` with each batch's sample positions in the split first,
        from the first batch after ``skip_epochs`` epochs' worth."""
        train, size, steps = self.splits.train, self.recipe.batch_size, self.steps_per_epoch
        x_all, y_all = train.x.to(self.device), train.y.to(self.device)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(skip_epochs):
            torch.randperm(len(train), generator=generator)
        while True:
            order = torch.randperm(len(train), generator=generator).to(self.device)
            for step in range(steps):
                index = order[step * size:len(train) if step == steps - 1 else (step + 1) * size]
                yield (index, x_all[index].contiguous(memory_format=torch.channels_last),
                       y_all[index])

    def fit(self, model: nn.Module, *, epochs: int, lr: float, constant_lr: bool = False,
            callbacks: list[TrainerCallback] = (), patience: int | None = None,
            progress=None, monitor: EpochMonitor | None = None,
            checkpoint: TrainingCheckpoint | None = None) -> nn.Module:
        """Train ``model`` in place; with ``patience``, keep the best epoch on validation.

        A constant learning rate (``constant_lr``) stops after ``patience`` epochs without a
        better one. The default one-cycle schedule runs to its end: validation falls while its
        rate rises and gains most as it anneals, so stopping on a dip returned un-annealed
        models (two pruned Fashion-MNIST models given up to 15 epochs stopped within 7 and lost
        1.2-1.6 pp more than after 5; run to the end, 0.1-0.4 pp less than after 5). For the
        same reason its best epoch is looked for in its second half only: in the 23 one-cycle
        fine-tunes of a Fashion-MNIST proxy search (8 epochs each, 12,000 validation images,
        which took longer to evaluate than an epoch of the proxy's 4,800 training images to
        train), one had its best epoch in the first half, 0.10 pp above the second half's best.

        Epochs are compared on the validation split's first ``VALIDATION_PART`` samples, and
        the monitor is handed that part's accuracy; ``kept_accuracy`` is the kept epoch's only
        where the part is the whole split, and whoever needs the whole split's figure of a
        larger one measures it once, on the model returned.

        Raises TrialFailed when the loss stops being finite; ``monitor`` may stop training by
        raising after any epoch. With a ``checkpoint`` (autoshrink.checkpoint), training goes
        on from the state it holds, or ends at once with the weights of one that ended, and
        saves its state there after an epoch when one is due (not with ``patience``: its best
        epoch is not saved) and at its end when one is due or was saved.
        """
        self.kept_accuracy = None
        if epochs <= 0:
            return model
        start, evaluating = time.perf_counter(), self.spent.evaluating
        try:
            with pool_before_relu(model), self._around_cpu_kernel_limits(model):
                return self._fit(model, epochs, lr, constant_lr, callbacks, patience, progress,
                                 monitor, checkpoint)
        finally:  # validation inside training counts as evaluation, the rest as training
            self.spent.training += (time.perf_counter() - start
                                    - (self.spent.evaluating - evaluating))

    def measure_statistics(self, model: nn.Module, images: int | None = None) -> None:
        """Measure ``model``'s batch norm statistics again on its current weights, on the
        training split's first ``images`` images (all of them by default)."""
        size = self.recipe.batch_size
        limit = None if images is None else max(1, images // size)
        device = evaluation_device(model, self.device)
        reestimate_statistics(model.to(device), self.splits.train, size, device, limit)

    def measures_statistics_before_evaluating(self, model: nn.Module) -> bool:
        """Whether, while ``model`` trains, each evaluation first measures its batch norm
        statistics again on the whole training split (see :meth:`_refresh_statistics`)."""
        return has_stale_statistics(model, self.steps_per_epoch)

    def _refresh_statistics(self, model: nn.Module) -> None:
        """Measure batch norm statistics again if ``model`` trained since they lagged
        (autoshrink.batch_norm): only before they are read, not after every epoch."""
        if model in self._stale_statistics:
            self._stale_statistics.discard(model)
            self.measure_statistics(model)

    @contextlib.contextmanager
    def _around_cpu_kernel_limits(self, model: nn.Module) -> Iterator[nn.Module]:
        """On the CPU, convolutions avoid two faults of oneDNN, the CPU's kernels
        (autoshrink.strided_conv), its slow kernels for wide and depthwise layers on small maps
        (autoshrink.matmul_conv, autoshrink.depthwise_padding) and, in bf16, for grouped layers
        (autoshrink.grouped_conv)."""
        if self.device.type != "cpu":
            yield model
            return
        grouped = (grouped_convolutions_in_float32(model) if self.bfloat16
                   else contextlib.nullcontext())
        with (around_strided_conv_faults(model), small_map_convolutions_as_matmul(model),
              depthwise_layers_padded_ahead(model), grouped):
            yield model

    def _fit(self, model, epochs, lr, constant_lr, callbacks, patience, progress,
             monitor, checkpoint) -> nn.Module:
        recipe = self.recipe
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16)
        model.to(self.device).to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:  # SGD's own words, "optimizer got an empty parameter list", name no cause
            raise TrialFailed(f"the model to train has no trainable parameters (all"
                              f" {sum(1 for _ in model.parameters())} have requires_grad=False):"
                              " a technique froze them before training")
        # fused: one kernel updates every tensor (the default loops over them in Python, which
        # costs a tenth of a step for the small compressed models of a search)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, nesterov=True,
                                    weight_decay=recipe.weight_decay, fused=True)
        steps_per_epoch = self.steps_per_epoch
        scheduler = None
        if not constant_lr:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
        clip = min((c.max_grad_norm for c in callbacks if c.max_grad_norm), default=None)
        # measured again before they are read when the running ones lag (autoshrink.batch_norm)
        stale_statistics = self.measures_statistics_before_evaluating(model)
        done = 0
        if checkpoint is not None:
            done, finished = self._resume(checkpoint, model, optimizer, scheduler, epochs)
            if finished:  # its weights, statistics and generators as the training left them
                return model.eval()
            if done and stale_statistics:
                self._stale_statistics.add(model)
        batches = self._indexed_batches(self.seed, skip_epochs=done)
        selection = self.splits.val.head(VALIDATION_PART)
        best_acc, best_state, stale = -1.0, None, 0
        for epoch in range(done, epochs):
            model.train()
            total_loss = torch.zeros((), device=self.device)
            for index, x, y in itertools.islice(batches, steps_per_epoch):
                with autocast:  # the loss and the callbacks see float32 logits
                    logits = model(x).float()
                    loss = F.cross_entropy(logits, y)
                for callback in callbacks:
                    callback.on_batch(index)
                    loss = callback.loss(loss, logits, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(params, clip, foreach=True)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total_loss += loss.detach()
            mean_loss = total_loss.item() / steps_per_epoch  # one sync per epoch
            if not math.isfinite(mean_loss):
                raise TrialFailed(f"training diverged: loss is {mean_loss} in epoch {epoch + 1}")
            for callback in callbacks:
                callback.on_epoch_end(model, epoch)
            if progress is not None:
                progress(epoch + 1, epochs, mean_loss)
            if stale_statistics:
                self._stale_statistics.add(model)
            # a one-cycle fit's best epoch is looked for as its rate anneals (see the docstring)
            measured = patience is not None and (constant_lr or epoch + 1 > epochs // 2)
            acc = self.accuracy(model, selection) if measured else None
            if monitor is not None:
                monitor(model, epoch + 1, epochs, acc)
            done = epoch + 1
            if checkpoint is not None and patience is None and checkpoint.due():
                checkpoint.save(training_state(model, optimizer, scheduler, done, epochs))
            if acc is not None:
                if acc > best_acc:
                    best_acc, best_state, stale = acc, copy.deepcopy(model.state_dict()), 0
                elif constant_lr:  # a one-cycle fit runs to its end (see the docstring)
                    stale += 1
                    if stale > patience:
                        break
        if best_state is not None:
            model.load_state_dict(best_state)  # its statistics were fresh when it was measured
            self.kept_accuracy = best_acc if selection is self.splits.val else None
        self._refresh_statistics(model)  # for what reads them next: quantizers, exports
        if checkpoint is not None and (checkpoint.in_file or checkpoint.due()):
            # what comes after it (pruning steps, quantization) may be interrupted too
            checkpoint.save(finished_state(model, done, epochs, self.kept_accuracy))
        return model.eval()

    def _resume(self, checkpoint: TrainingCheckpoint, model: nn.Module, optimizer, scheduler,
                epochs: int) -> tuple[int, bool]:
        """Take up the state ``checkpoint`` holds: the epochs it had done (0: none, or one
        that does not fit this training, which is then deleted), and whether the training had
        ended."""
        state = checkpoint.load()
        if state is None:
            return 0, False
        mismatch = training_state_mismatch(state, model, scheduler, epochs)
        if mismatch:
            log.warning(f"the training checkpoint {checkpoint.path} does not fit this"
                        f" training ({mismatch}); it trains from the start")
            checkpoint.discard()
            return 0, False
        model.load_state_dict(state["model"])
        finished = state["finished"]
        if finished:  # files of stop 67 carry no accuracy: then it is measured again
            self.kept_accuracy = state.get("kept_accuracy")
        else:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        checkpoint.resumed(state)
        return state["epoch"], finished


def training_state(model: nn.Module, optimizer, scheduler, epoch: int, epochs: int) -> dict:
    """What a training needs to go on after ``epoch`` of ``epochs`` as if never stopped."""
    return {**finished_state(model, epoch, epochs), "finished": False,
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict()}


def finished_state(model: nn.Module, epoch: int, epochs: int,
                   kept_accuracy: float | None = None) -> dict:
    """What stands for a training of at most ``epochs`` that ended after ``epoch``: its model,
    the validation accuracy of the epoch it kept (if it measured one) and where the random
    number generators were, for what the job does next."""
    state = {"model": model.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
             "epochs": epochs, "finished": True, "kept_accuracy": kept_accuracy}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def training_state_mismatch(state: dict, model: nn.Module, scheduler, epochs: int) -> str:
    """Why a saved training state cannot go on in this training ('' when it can)."""
    if state["epochs"] != epochs:
        return f"it was saved by a training of {state['epochs']} epochs, this one has {epochs}"
    if not state["finished"] and (state["scheduler"] is None) != (scheduler is None):
        return "it was saved by a training with another learning rate schedule"
    current = model.state_dict()
    if state["model"].keys() != current.keys():
        return "its model has other layers"
    for name, tensor in current.items():
        if state["model"][name].shape != tensor.shape:
            return f"its {name} is {tuple(state['model'][name].shape)}, not {tuple(tensor.shape)}"
    return ""
