"""Sizes are the bytes of the exported artifact, and they fall when a technique says so."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from autoshrink import artifact
from autoshrink.metrics import count_params
from autoshrink.technique import TrialContext
from tests.conftest import FAST


@pytest.fixture
def wide_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def test_size_falls_with_sparsity_and_reloads_exactly(wide_model, host, tmp_path):
    prune_l1 = host.technique("prune-l1")
    ctx = TrialContext((1, 16, 16), 10)
    sizes = []
    for amount in (0.2, 0.5, 0.8):
        pruned = prune_l1.apply(copy.deepcopy(wide_model),
                                prune_l1.Options(amount=amount, steps=1), ctx)
        sizes.append(artifact.save(pruned, tmp_path / f"{amount}.pt"))
        reloaded = artifact.load_state_dict(tmp_path / f"{amount}.pt")
        for key, value in pruned.state_dict().items():
            assert torch.equal(reloaded[key], value), key
        total, nonzero = count_params(pruned)
        assert nonzero == pytest.approx(total * (1 - amount), rel=0.05)
    dense = artifact.save(wide_model, tmp_path / "dense.pt")
    assert dense > sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < dense * 0.4


def test_iterative_pruning_removes_the_share_of_surviving_weights(wide_model, host):
    prune_l1 = host.technique("prune-l1")
    pruned = prune_l1.apply(wide_model, prune_l1.Options(amount=0.2, steps=3),
                            TrialContext((1, 16, 16), 10))
    weights = sum(m.weight.numel() for m in pruned.modules() if hasattr(m, "weight"))
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if hasattr(m, "weight"))
    assert zeros / weights == pytest.approx(1 - 0.8 ** 3, abs=0.01)


def test_int8_artifact_is_about_four_times_smaller(host, tmp_path):
    torch.manual_seed(0)
    model = host.model("vgg11").build(10, 3, 32).eval()
    quantize = host.technique("quantize-int8")
    quantized = quantize.apply(copy.deepcopy(model), quantize.Options(calibration_batches=2),
                               TrialContext((3, 32, 32), 10))
    ratio = artifact.save(model, tmp_path / "f.pt") / artifact.save(quantized, tmp_path / "q.pt")
    assert 3.5 < ratio < 4.5
    x = torch.randn(2, 3, 32, 32)
    assert quantized(x).shape == (2, 10)


def _values_bytes(model: nn.Module) -> int:
    """What the state's tensors hold: int8 values count one byte each, and per-channel
    scales theirs."""
    total = 0
    for value in model.state_dict().values():
        for tensor in value if isinstance(value, tuple) else (value,):
            if not isinstance(tensor, torch.Tensor):
                continue
            total += tensor.numel() * (1 if tensor.is_quantized else tensor.element_size())
            if tensor.is_quantized and tensor.qscheme() == torch.per_channel_affine:
                total += tensor.q_per_channel_scales().numel() * 8
    return total


def test_a_small_model_file_is_mostly_its_values(host, tmp_path):
    """A file is its values plus a few kilobytes, however many layers hold them: format 1
    stored each tensor as an archive entry of its own (about 400 bytes each), which for a
    pruned int8 smallcnn was most of the file, and the size front measured that."""
    torch.manual_seed(0)
    ctx = TrialContext((1, 16, 16), 10)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    prune, quantize = host.technique("prune-filters"), host.technique("quantize-int8")
    small = prune.apply(model, prune.Options(ratio=0.8, finetune_epochs=0), ctx)
    int8 = quantize.apply(small, quantize.Options(calibration_batches=1), ctx)
    for tiny in (small, int8):
        size = artifact.save(tiny, tmp_path / "new.pt")
        legacy = artifact.save(tiny, tmp_path / "legacy.pt", legacy=True)
        assert size < _values_bytes(tiny) + 3000, (size, legacy)
        for path in (tmp_path / "new.pt", tmp_path / "legacy.pt"):  # format 1 still loads
            state = artifact.load_state_dict(path)
            for key, value in tiny.state_dict().items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(state[key], value) and state[key].dtype == value.dtype
                    if value.is_quantized and value.qscheme() == torch.per_channel_affine:
                        for qparams in ("q_per_channel_scales", "q_per_channel_zero_points"):
                            saved, held = getattr(state[key], qparams)(), getattr(value, qparams)()
                            assert torch.equal(saved, held) and saved.dtype == held.dtype, key
                else:
                    assert type(state[key]) is type(value), key


def test_values_exact_in_half_precision_are_stored_as_half(tmp_path):
    layer = nn.Linear(256, 256)
    full = artifact.save(layer, tmp_path / "full.pt")
    with torch.no_grad():
        layer.weight.copy_(layer.weight.half().float())
        layer.bias.copy_(layer.bias.half().float())
    half = artifact.save(layer, tmp_path / "half.pt")
    assert half < full * 0.55
    assert torch.equal(artifact.load_state_dict(tmp_path / "half.pt")["weight"], layer.weight)


def test_artifact_loads_weights_only(tmp_path):
    path = tmp_path / "m.pt"
    artifact.save(nn.Linear(4, 2), path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == artifact.FORMAT


def test_pruning_and_int8_compound_and_reload_exactly(wide_model, host, tmp_path):
    ctx = TrialContext((1, 16, 16), 10)
    prune_l1, quantize = host.technique("prune-l1"), host.technique("quantize-int8")
    int8 = quantize.apply(copy.deepcopy(wide_model), quantize.Options(), ctx)
    pruned = prune_l1.apply(copy.deepcopy(wide_model), prune_l1.Options(amount=0.7, steps=1), ctx)
    both = quantize.apply(pruned, quantize.Options(), ctx)
    int8_size = artifact.save(int8, tmp_path / "int8.pt")
    both_size = artifact.save(both, tmp_path / "both.pt")
    assert both_size < int8_size * 0.75
    rebuilt = quantize.rebuild(copy.deepcopy(wide_model), quantize.Options(), ctx)
    rebuilt.load_state_dict(artifact.load_state_dict(tmp_path / "both.pt"))
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(rebuilt(x), both(x))


def test_structurally_pruned_model_is_smaller_and_reloads_into_the_original(host, tmp_path):
    torch.manual_seed(0)
    model = host.model("vgg11").build(10, 3, 32).eval()
    prune = host.technique("prune-filters")
    pruned = prune.apply(copy.deepcopy(model), prune.Options(ratio=0.5, finetune_epochs=0),
                         TrialContext((3, 32, 32), 10))
    before, after = count_params(model)[0], count_params(pruned)[0]
    assert after < before * 0.4  # half the channels: about a quarter of the weights
    path = tmp_path / "pruned.pt"
    assert artifact.save(pruned, path) < artifact.save(model, tmp_path / "full.pt") * 0.4
    assert artifact.load_state_dict(path)["features.0.weight"].shape[0] == 32
    fresh = artifact.load_into(host.model("vgg11").build(10, 3, 32), path).eval()
    assert count_params(fresh)[0] == after
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fresh(x), pruned.eval()(x), atol=1e-5)


def test_a_file_with_a_wider_kernel_than_the_rebuilt_layer_loads_with_its_own(tmp_path):
    """Files saved before ghost cut cheap kernels to their maps hold 5x5 kernels where a
    rebuild now makes 3x3 ones: the layer takes the saved kernel, padded to the same size."""
    from autoshrink_plugins.blocks import GhostModule

    torch.manual_seed(0)
    saved = GhostModule(4, 8, cheap_kernel=5).eval()
    artifact.save(saved, tmp_path / "old.pt")
    loaded = artifact.load_into(GhostModule(4, 8, cheap_kernel=3), tmp_path / "old.pt").eval()
    assert loaded.cheap[0][0].kernel_size == (5, 5)
    for side in (2, 6):
        x = torch.randn(2, 4, side, side)
        assert torch.equal(loaded(x), saved(x))


@pytest.mark.parametrize("technique, option, values", [
    ("quantize-fixed-point", "bits", (8, 6, 4)),
    ("quantize-kmeans", "bits", (6, 4, 2)),
])
def test_size_falls_with_bits_and_reloads_exactly(wide_model, host, tmp_path, technique,
                                                  option, values):
    quantize = host.technique(technique)
    sizes = []
    for bits in values:
        model = quantize.apply(copy.deepcopy(wide_model), quantize.Options(**{option: bits}),
                               TrialContext((1, 16, 16), 10))
        distinct = max(len(torch.unique(m.weight)) for m in model.modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear)))
        assert distinct <= 2 ** bits
        path = tmp_path / f"{bits}.pt"
        sizes.append(artifact.save(model, path))
        fresh = artifact.load_into(copy.deepcopy(wide_model), path)
        x = torch.randn(3, 1, 16, 16)
        assert torch.equal(fresh(x), model(x))  # the packed file rebuilds the same predictions
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[-1] < artifact.save(wide_model, tmp_path / "f.pt") / 4


def test_feature_merge_merges_identical_maps_without_changing_the_function(host):
    """Two filters that produce the same map merge into one; the network computes the same."""
    torch.manual_seed(0)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    with torch.no_grad():
        conv = model.features[3]  # 16 -> 32 channels
        conv.weight[1] = conv.weight[0]
        conv.bias[1] = conv.bias[0]
    merge = host.technique("feature-merge")
    x = torch.randn(8, 1, 16, 16)
    expected = model(x)
    options = merge.Options(threshold=0.999999, finetune_epochs=0)
    merged = merge.apply(copy.deepcopy(model), options, TrialContext((1, 16, 16), 10))
    assert merged.features[3].out_channels == 31
    assert torch.allclose(merged(x), expected, atol=1e-4)


def test_feature_merge_lower_threshold_merges_more(host):
    torch.manual_seed(0)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    merge = host.technique("feature-merge")
    counts = []
    for threshold in (0.95, 0.6):
        merged = merge.apply(copy.deepcopy(model), merge.Options(threshold=threshold,
                                                                 finetune_epochs=0),
                             TrialContext((1, 16, 16), 10))
        counts.append(count_params(merged)[0])
    assert counts[0] > counts[1]


def test_pruning_an_already_sparse_model_removes_a_share_of_the_survivors(wide_model, host):
    prune_l1 = host.technique("prune-l1")
    ctx = TrialContext((1, 16, 16), 10)
    model = wide_model
    for _ in range(3):
        model = prune_l1.apply(model, prune_l1.Options(amount=0.2, steps=1), ctx)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(1 - 0.8 ** 3, abs=0.01)


def test_int8_observer_option_decides_the_activation_range(host):
    """minmax keeps the calibration extremes (scale = range / 127 with x86's reduced range);
    histogram, PyTorch's default, clips outliers for a finer scale."""
    torch.manual_seed(0)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    quantize = host.technique("quantize-int8")
    x = torch.randn(64, 1, 16, 16)
    ctx = TrialContext((1, 16, 16), 10, calibration_fn=lambda count: [x])
    scales = {}
    for observer in ("minmax", "histogram"):
        quantized = quantize.apply(copy.deepcopy(model),
                                   quantize.Options(calibration_batches=1, observer=observer), ctx)
        scales[observer] = float(quantized.features_0_input_scale_0)
        assert quantized(x).shape == (64, 10)
    assert scales["minmax"] == pytest.approx(float(x.max() - x.min()) / 127, rel=1e-3)
    assert scales["histogram"] < scales["minmax"]


def test_kmeans_centroids_are_the_means_of_their_nearest_weights():
    """The sorted-runs k-means converges to a Lloyd fixed point: every centroid is the mean of
    the weights nearest to it (checked by assigning each weight directly)."""
    from autoshrink_plugins.weight_sharing import kmeans_1d, nearest

    torch.manual_seed(0)
    values = torch.cat([torch.randn(5000) * 0.02, torch.randn(300) * 0.2 + 0.5])
    centroids = kmeans_1d(values, 8, iterations=200)
    assert torch.all(centroids[1:] > centroids[:-1])
    assignment = nearest(values, centroids)
    for cluster in range(8):
        members = values[assignment == cluster]
        assert len(members) > 0
        assert float(centroids[cluster]) == pytest.approx(float(members.double().mean()),
                                                          abs=1e-6)


def test_a_study_measures_every_size_in_the_format_it_was_created_with(tmp_path, run_cli, host,
                                                                      monkeypatch):
    """A study created before format 2 (it has no artifact_format) goes on writing format 1,
    its baseline's size too, so its size reductions compare like with like; a new one writes
    format 2."""
    import optuna

    from autoshrink.config import build_config
    from autoshrink.task import load_or_train_baseline, load_task

    def search(out, trials):
        code, _, err = run_cli("search", "--out", str(out), "--n-trials", str(trials),
                               "--n-jobs", "1", "--techniques", "prune-l1", "--quiet", *FAST)
        assert code == 0, err
        return optuna.load_study(study_name="digits-smallcnn",
                                 storage=f"sqlite:///{out}/study.db")

    remember = optuna.Study.set_user_attr
    with monkeypatch.context() as older_version:
        older_version.setattr(optuna.Study, "set_user_attr", lambda study, key, value: None
                              if key == "artifact_format" else remember(study, key, value))
        search(tmp_path / "old", 1)
    task = load_task(build_config(None, {"epochs": 12, "finetune_epochs": 2}), host)
    baseline_model, _ = load_or_train_baseline(task)  # cached by the searches
    for out, legacy in ((tmp_path / "old", True), (tmp_path / "new", False)):
        study = search(out, 2)
        for trial in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
            path = out / "models" / f"trial-{trial.number}.pt"
            stored = torch.load(path, weights_only=True)["format"]
            assert stored == (artifact.LEGACY_FORMAT if legacy else artifact.FORMAT)
            assert trial.user_attrs["metrics"]["size_bytes"] == path.stat().st_size
        assert json.loads(study.user_attrs["baseline"])["size_bytes"] == \
            artifact.size_in_bytes(baseline_model, legacy=legacy)
