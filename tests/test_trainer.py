"""The trainer: its pool-before-ReLU reorder (same values and gradients, undone afterwards),
what it tells callbacks about each batch, early stopping, training precision, and the memory
setting of the processes it trains in."""

from __future__ import annotations

import copy
import itertools
import json
import platform
import subprocess
import sys

import pytest
import torch
from torch import fx, nn

from autoshrink.reorder import pool_before_relu
from autoshrink.technique import TrainerCallback


def layer_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


def first_relu_then_pool(model: nn.Module) -> bool:
    """Whether the first ReLU of ``model`` comes before its first max-pool."""
    names = layer_types(model)
    return names.index("ReLU") < names.index("MaxPool2d")


@pytest.mark.parametrize("name,size", [("smallcnn", 16), ("vgg11", 32)])
def test_reorder_keeps_outputs_and_gradients(host, name, size):
    torch.manual_seed(0)
    original = host.model(name).build(10, 1, size)
    reordered = copy.deepcopy(original)
    x = torch.randn(8, 1, size, size)
    y = torch.randint(0, 10, (8,))
    with pool_before_relu(reordered):
        assert not first_relu_then_pool(reordered)
        torch.manual_seed(1)  # the same dropout masks in both passes
        out = reordered(x)
        nn.functional.cross_entropy(out, y).backward()
    torch.manual_seed(1)
    expected = original(x)
    nn.functional.cross_entropy(expected, y).backward()
    assert torch.equal(out, expected)
    for (key, a), b in zip(original.named_parameters(), reordered.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), key
    assert layer_types(reordered) == layer_types(original)


def test_reorder_is_undone_when_the_block_raises():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(),
                          nn.MaxPool2d(2))
    before = layer_types(model)
    with pytest.raises(RuntimeError), pool_before_relu(model):
        assert layer_types(model)[1:] == ["Conv2d", "MaxPool2d", "ReLU", "MaxPool2d", "ReLU"]
        raise RuntimeError("trial failed")
    assert layer_types(model) == before


def test_hooked_modules_and_traced_models_keep_their_order():
    hooked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    seen = []
    hooked[1].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    traced = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2)))
    for model in (hooked, traced):
        with pool_before_relu(model):
            assert first_relu_then_pool(model)
            model(torch.randn(1, 1, 8, 8))
    assert seen == [torch.Size([1, 4, 6, 6])]  # the hook saw the ReLU's full-size output


def test_trainer_trains_reordered_and_returns_the_users_order(host):
    from autoshrink.config import build_config
    from autoshrink.task import load_task
    from autoshrink.train import Trainer

    class Watch(TrainerCallback):
        def __init__(self):
            self.orders: list[bool] = []

        def on_epoch_end(self, model, epoch):
            self.orders.append(first_relu_then_pool(model))

    task = load_task(build_config(None, {}), host)
    model = task.build_model()
    before = layer_types(model)
    watch = Watch()
    Trainer(task.splits, task.recipe).fit(model, epochs=2, lr=0.05, callbacks=[watch])
    assert watch.orders == [False, False]
    assert layer_types(model) == before


def test_callbacks_learn_which_training_samples_each_batch_holds(host):
    """``on_batch`` names the rows of the split (and of ``training_outputs``) the step trains on."""
    from autoshrink.config import build_config
    from autoshrink.task import load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {}), host)
    train = task.splits.train

    class Check(TrainerCallback):
        def __init__(self):
            self.seen, self.indices = [], None

        def on_batch(self, indices):
            self.indices = indices

        def loss(self, loss, logits, inputs, targets):
            assert torch.equal(inputs, train.x[self.indices])
            assert torch.equal(targets, train.y[self.indices])
            self.seen.append(self.indices)
            return loss

    check = Check()
    trainer = Trainer(task.splits, task.recipe)
    trainer.fit(task.build_model(), epochs=1, lr=0.05, callbacks=[check])
    assert torch.equal(torch.cat(check.seen).sort().values, torch.arange(len(train)))


@pytest.mark.parametrize("samples", [65, 66, 129])
def test_a_lone_last_sample_joins_the_batch_before_it(samples):
    """With 65 training samples a batch of one was left each epoch, and a batch norm that sees
    one value per channel (torchvision's ResNet at 32x32 ends at 1x1) failed the training.
    Every sample still trains once an epoch."""
    from autoshrink.data import RawData, make_splits
    from autoshrink.recipe import Recipe
    from autoshrink.train import Trainer

    def split(total):  # validation and test splits are held out of ``total`` images
        raw = RawData(torch.rand(total, 1, 8, 8).numpy(), torch.arange(total).numpy() % 2,
                      None, None, num_classes=2, scale=1.0)
        return make_splits(raw, seed=0, val_fraction=0.2, input_size=8)

    splits = next(s for s in map(split, range(samples, 3 * samples)) if len(s.train) == samples)
    trainer = Trainer(splits, Recipe(epochs=1))
    batches = [index for index, _, _ in itertools.islice(trainer._indexed_batches(0),
                                                         trainer.steps_per_epoch)]
    assert min(len(b) for b in batches) > 1
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(samples))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.Linear(4, 2))
    trainer.fit(model, epochs=1, lr=0.05)


def test_training_outputs_are_the_models_outputs_computed_once(host):
    from autoshrink.config import build_config
    from autoshrink.task import load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {}), host)
    trainer = Trainer(task.splits, task.recipe)
    model = task.build_model().eval()
    runs = []
    model.register_forward_pre_hook(lambda module, args: runs.append(len(args[0])))
    outputs = trainer.training_outputs(model)
    assert trainer.training_outputs(model) is outputs
    assert sum(runs) == len(task.splits.train)
    with torch.no_grad():
        direct = model(task.splits.train.x[:37])
    assert torch.allclose(outputs[:37], direct, atol=1e-5)
    assert trainer.training_outputs(task.build_model()) is not outputs  # another model


def test_a_float_model_handed_over_in_nchw_is_evaluated_in_channels_last(host):
    """Models rebuilt from their files (test-split accuracy, reports) and the cached baseline
    come in NCHW; each convolution then reads a channels_last input with NCHW weights."""
    from autoshrink.config import build_config
    from autoshrink.task import load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {}), host)
    model = task.build_model()
    # (a weight of one input channel is contiguous in both layouts)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert convs and not any(c.weight.is_contiguous(memory_format=torch.channels_last)
                             for c in convs)
    with torch.no_grad():
        expected = model.eval()(task.splits.test.x[:64]).argmax(1)
    accuracy = Trainer(task.splits, task.recipe).accuracy(model, task.splits.test)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    with torch.no_grad():  # the same model, the same answers
        assert torch.equal(model(task.splits.test.x[:64]).argmax(1), expected)
    assert 0.0 <= accuracy <= 1.0


def test_early_stopping_and_the_monitor_share_one_validation_per_epoch(host):
    from autoshrink.config import build_config
    from autoshrink.task import load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {}), host)
    trainer = Trainer(task.splits, task.recipe)
    measured, seen = [], []
    accuracy = trainer.accuracy
    trainer.accuracy = lambda model, split: measured.append(accuracy(model, split)) or measured[-1]
    trainer.fit(task.build_model(), epochs=3, lr=0.05, patience=5, constant_lr=True,
                monitor=lambda model, epoch, epochs, acc: seen.append(acc))
    assert len(measured) == 3 and seen == measured


@pytest.mark.parametrize("part", [100, 2048])
def test_epochs_are_compared_on_the_validation_splits_head(host, monkeypatch, part):
    """A split larger than ``VALIDATION_PART`` is measured on its first samples only while a
    fit compares epochs, and the fit leaves the kept epoch's figure to whoever needs the whole
    split's (digits holds out 288 validation images)."""
    from autoshrink import train
    from autoshrink.config import build_config
    from autoshrink.task import load_task

    monkeypatch.setattr(train, "VALIDATION_PART", part)
    task = load_task(build_config(None, {}), host)
    val = task.splits.val
    trainer = train.Trainer(task.splits, task.recipe)
    asked, seen = [], []
    accuracy = trainer.accuracy
    trainer.accuracy = lambda model, split: asked.append(split) or accuracy(model, split)
    trainer.fit(task.build_model(), epochs=3, lr=0.05, patience=5, constant_lr=True,
                monitor=lambda model, epoch, epochs, acc: seen.append(acc))
    assert len(asked) == 3 and len(seen) == 3
    if part < len(val):
        assert all(len(split) == part and torch.equal(split.y, val.y[:part]) for split in asked)
        assert trainer.kept_accuracy is None
    else:
        assert all(split is val for split in asked)
        assert trainer.kept_accuracy == max(seen)


@pytest.mark.parametrize("constant_lr, epochs_measured", [(False, [6, 7, 8, 9, 10]),
                                                         (True, [1, 2, 3])])
def test_only_a_constant_rate_stops_early_and_the_best_epoch_is_kept(host, constant_lr,
                                                                     epochs_measured):
    """Validation falling from the first epoch measured stops a constant-rate fit after
    ``patience`` more; a one-cycle fit, whose rate first rises, runs to its end and is
    measured only in its second half, as the rate anneals. Both keep the best epoch measured."""
    from autoshrink.config import build_config
    from autoshrink.task import load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {}), host)
    trainer = Trainer(task.splits, task.recipe)
    scripted = iter([0.9, 0.8, 0.7, 0.6, 0.65, 0.7, 0.72, 0.71, 0.73, 0.74])
    states, trained, measured = [], [], []

    def accuracy(model, split):
        states.append(copy.deepcopy(model.state_dict()))
        measured.append(trained[-1])
        return next(scripted)

    trainer.accuracy = accuracy
    model = trainer.fit(task.build_model(), epochs=10, lr=0.05, patience=1,
                        constant_lr=constant_lr,
                        progress=lambda epoch, epochs, loss: trained.append(epoch))
    assert measured == epochs_measured and len(trained) == epochs_measured[-1]
    for name, value in model.state_dict().items():  # the first measured epoch's, the best
        assert torch.equal(value.cpu(), states[0][name].cpu()), name


@pytest.mark.parametrize("technique", ["prune-filters", "feature-merge"])
@pytest.mark.parametrize("option, epochs", [({}, 4), ({"finetune_epochs": 2}, 2)])
def test_pruning_and_merging_fine_tune_for_the_recipes_length_unless_told(host, technique,
                                                                          option, epochs):
    from autoshrink.config import build_config
    from autoshrink.search import trial_context
    from autoshrink.task import load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {"epochs": 12, "finetune_epochs": 4}), host)
    trainer = Trainer(task.splits, task.recipe)
    fits = []
    fit = trainer.fit
    trainer.fit = lambda model, **kwargs: fits.append(kwargs["epochs"]) or fit(model, **kwargs)
    shrink = host.technique(technique)
    shrink.apply(task.build_model(), shrink.Options(**option), trial_context(task, trainer, seed=0))
    assert fits == [epochs]


@pytest.mark.parametrize("precision, speedup, input_size, trained_in", [
    ("float32", 2.0, 32, torch.float32),
    ("bfloat16", 0.0, 16, torch.bfloat16),
    ("auto", 2.0, 32, torch.bfloat16),  # 2.6M MACs on a CPU where bf16 measured faster
    ("auto", 2.0, 16, torch.float32),  # 0.65M MACs: under BFLOAT16_MIN_MACS
    ("auto", 0.7, 32, torch.float32),  # a CPU where bf16 measured slower
])
def test_precision_decides_what_training_runs_in_and_evaluation_stays_float32(
        host, monkeypatch, precision, speedup, input_size, trained_in):
    from autoshrink import train
    from autoshrink.config import build_config
    from autoshrink.metrics import count_macs
    from autoshrink.task import load_task

    monkeypatch.setattr(train, "cpu_bfloat16_speedup", lambda: speedup)
    task = load_task(build_config(None, {"input_size": input_size, "precision": precision}),
                     host)
    model = task.build_model()
    initial = copy.deepcopy(model.state_dict())
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(
        (module.training, output.dtype)))
    trainer = train.Trainer(task.splits, task.recipe,
                            task_macs=count_macs(model, task.input_shape))
    trainer.fit(model, epochs=1, lr=0.05, patience=1)
    assert {dtype for training, dtype in seen if training} == {trained_in}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}
    assert all(weight.dtype == torch.float32 and not torch.equal(weight, initial[name])
               for name, weight in model.state_dict().items())  # float32 weights, trained


def test_the_bf16_speed_check_needs_the_instructions_and_keeps_the_random_stream(monkeypatch):
    """It also leaves the thread count as it was: it measures on one thread."""
    from autoshrink.train import cpu_bfloat16_speedup

    check = cpu_bfloat16_speedup.__wrapped__  # uncached
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert check() == 0.0
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert check() > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.rand(3), expected)


def test_the_default_precision_keeps_the_task_key_of_studies_made_before_it(host):
    """Studies and cached baselines made before --precision existed resume under the default;
    a precision asked for by name is another task."""
    from autoshrink.config import build_config
    from autoshrink.task import load_task

    def key(**settings):
        return load_task(build_config(None, settings), host).key()

    assert key() == "c10c96445bebfd56"  # the default task's key before the setting
    assert len({key(), key(precision="float32"), key(precision="bfloat16")}) == 3


@pytest.mark.usefixtures("untrained_baselines")
def test_tasks_that_differ_only_in_how_candidates_fine_tune_share_one_baseline(
        host, tmp_path, monkeypatch):
    from autoshrink.config import build_config
    from autoshrink.task import load_or_train_baseline, load_task

    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path))

    def task(**settings):
        return load_task(build_config(None, {"epochs": 2, **settings}), host)

    epochs = []

    def noting(epoch, total, loss):
        epochs.append(epoch)

    first = task(finetune_epochs=3)
    load_or_train_baseline(first)
    other = task(finetune_epochs=5, finetune_lr=0.01)
    assert other.key() != first.key()  # a study still refuses the other task's trials
    load_or_train_baseline(other, progress=noting)
    assert epochs == []  # its baseline came from the cache
    load_or_train_baseline(task(finetune_epochs=3, lr=0.04), progress=noting)
    assert epochs == [1, 2]  # another baseline training is another baseline


@pytest.mark.usefixtures("untrained_baselines")
def test_a_baseline_cached_under_the_task_key_is_still_used(host, tmp_path, monkeypatch):
    """Before the fine-tuning settings left the baseline's key, entries were kept under the
    task's."""
    from autoshrink.config import build_config
    from autoshrink.task import cache_root, load_or_train_baseline, load_task

    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path))
    task = load_task(build_config(None, {"epochs": 2}), host)
    _, cached = load_or_train_baseline(task)
    root = cache_root() / "baselines"
    (root / task.baseline_key()).rename(root / task.key())
    epochs = []
    _, baseline = load_or_train_baseline(task, progress=lambda *report: epochs.append(report))
    assert epochs == [] and baseline == cached


# Prints how many bytes a process maps for a live 64 MiB tensor, and how many free bytes its
# heap keeps once the tensor is gone (glibc's mallinfo2), after the set-up code in argv[1].
MEMORY_PROBE = """
import ctypes, json, sys
import torch
exec(sys.argv[1])
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena ordblks smblks hblks hblkhd"
                                                     " usmblks fsmblks uordblks fordblks"
                                                     " keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
tensor = torch.ones(16 << 20)
mapped = libc.mallinfo2().hblkhd
del tensor
print(json.dumps({"mapped": mapped, "kept": libc.mallinfo2().fordblks}))
"""
SEARCH_PROCESS = """
from autoshrink.config import build_config
from autoshrink.plugins import PluginHost
from autoshrink.search import Search
Search(build_config(None, {"epochs": 1, "out": sys.argv[2]}), PluginHost.discover()).prepare()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
@pytest.mark.parametrize("setup, kept", [
    ("", False),  # the C library's default: large blocks are mapped, and unmapped on free
    ("from autoshrink.allocator import retain_freed_memory; assert retain_freed_memory()", True),
    (SEARCH_PROCESS, True),  # a search's process (and each worker's) makes the setting
])
def test_freed_tensors_stay_in_the_process_for_the_next_step(tmp_path, setup, kept):
    """Training steps allocate and free the same large tensors; kept, they are not faulted in
    page by page again (autoshrink.allocator)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, setup, str(tmp_path)],
                            capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.splitlines()[-1])
    size = 64 << 20
    if kept:
        assert measured["mapped"] < size and measured["kept"] >= size
    else:
        assert measured["mapped"] >= size


def test_int8_models_are_evaluated_on_the_cpu_even_with_float_layers():
    """Only the CPU has int8 kernels. An int8 model may keep float layers (an int8 VGG-19 kept
    one and was sent to a GPU, where its trial failed): any int8 layer keeps it on the CPU."""
    from torch.ao.nn import quantized

    from autoshrink.train import evaluation_device

    gpu = torch.device("cuda")  # named only: nothing is sent there
    int8 = nn.Sequential(quantized.Quantize(0.1, 0, torch.quint8), quantized.Conv2d(1, 2, 3),
                         quantized.DeQuantize(), nn.Flatten(), nn.Linear(8, 10))
    assert any(p.is_floating_point() for p in int8.parameters())
    assert evaluation_device(int8, gpu) == torch.device("cpu")
    assert evaluation_device(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), gpu) == gpu
    assert int8(torch.rand(2, 1, 4, 4)).shape == (2, 10)
