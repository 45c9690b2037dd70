"""Every registered technique, driven from the live registry (new ones are tested automatically).

Each technique is tried on the first of a few small models it applies to (a rewrite may need
another one first: grouped-pointwise needs the 1x1 convolutions that fire creates).
"""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import torch

from autoshrink.config import build_config
from autoshrink.metrics import count_params
from autoshrink.plan import Plan, apply_stage
from autoshrink.plugins import PluginHost
from autoshrink.search import Search, open_study
from autoshrink.task import load_task
from autoshrink.technique import Stage, TrialContext
from autoshrink.testing import check_apply, check_plan_rebuild, check_rebuild, check_search_space
from autoshrink.train import Trainer

PARAMS_GROW = {"se"}  # attention adds parameters by design
CANDIDATES = [  # (model, input shape, rewrites applied first)
    ("smallcnn", (1, 16, 16), []),
    ("smallcnn", (1, 16, 16), ["fire"]),
    ("resnet50", (3, 8, 8), []),
]


def _techniques():
    return sorted(PluginHost.discover().techniques.items())


def model_for(host, technique):
    """A small model the technique applies to, with the rewrites it needs already made."""
    for name, shape, before in CANDIDATES:
        torch.manual_seed(0)
        model = host.model(name).build(10, shape[0], shape[1])
        ctx = TrialContext(shape, 10)
        for other in before:
            model = host.technique(other).apply(model, host.technique(other).Options(), ctx)
        if technique.applies_to(model)[0]:
            return model.eval(), shape, name, before
    pytest.fail(f"{technique.name} applies to none of {CANDIDATES}")


@pytest.mark.parametrize("name, technique", _techniques(), ids=lambda v: getattr(v, "name", v))
def test_technique_changes_the_model_as_claimed(host, name, technique):
    model, shape, _, _ = model_for(host, technique)
    before_params, before_nonzero = count_params(model)
    changed = check_apply(technique, model, shape)
    if technique.stage is Stage.ARCHITECTURE:
        after_params, _ = count_params(changed)
        if name in PARAMS_GROW:
            assert after_params > before_params
        else:
            assert after_params < before_params, f"{name} did not reduce parameters"
    if technique.stage is Stage.POST_TRAINING:
        assert count_params(changed)[1] < before_nonzero, f"{name} left every weight non-zero"


@pytest.mark.parametrize("name, technique", _techniques(), ids=lambda v: getattr(v, "name", v))
def test_rebuild_gives_a_model_that_loads_the_artifact(host, tmp_path, name, technique):
    model, shape, _, _ = model_for(host, technique)
    check_rebuild(technique, model, shape, tmp_path)


@pytest.mark.parametrize("name, technique", _techniques(), ids=lambda v: getattr(v, "name", v))
def test_search_space_options_are_valid_and_round_trip(name, technique):
    check_search_space(technique)


def _search_cases():
    """Every technique in float32, and under bf16 autocast (what CUDA and CPUs with fast bf16
    train in) those that apply to the small CNN: a ResNet-50 baseline in bf16 costs minutes."""
    host = PluginHost.discover()
    for name, technique in _techniques():
        yield pytest.param(name, technique, "float32", id=f"{name}-float32")
        if model_for(host, technique)[2] == "smallcnn":
            yield pytest.param(name, technique, "bfloat16", id=f"{name}-bfloat16")


@pytest.mark.parametrize("name, technique, precision", _search_cases())
@pytest.mark.usefixtures("untrained_baselines")
def test_technique_works_inside_a_search(host, tmp_path, name, technique, precision):
    """One enqueued trial that uses the technique runs through the real engine."""
    _, shape, model_name, before = model_for(host, technique)
    config = build_config(None, {"model": model_name, "n_trials": 1, "out": str(tmp_path),
                                 "epochs": 1, "finetune_epochs": 1, "precision": precision,
                                 "input_size": shape[1], "early_abort": False})
    study, _ = open_study(config, load_task(config, host))
    study.enqueue_trial({f"use.{n}": n in (name, *before) for n in host.techniques},
                        skip_if_exists=False)
    trial = Search(config, host).run().trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("error")
    assert name in trial.user_attrs["plan_text"]


def test_dwconv_inherits_a_rank_one_approximation():
    """The depthwise-separable pair reproduces a kernel that is exactly rank one per channel."""
    from autoshrink_plugins.convolution import separable_from

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        depth = torch.randn(8, 1, 3, 3)
        point = torch.randn(16, 8)
        conv.weight.copy_(point[:, :, None, None] * depth[:, 0][None])
    pair = separable_from(conv)
    x = torch.randn(2, 8, 10, 10)
    assert torch.allclose(pair(x), conv(x), atol=1e-4)


def test_factorisation_inherits_an_exact_low_rank_kernel():
    from autoshrink_plugins.factorize import factorized

    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():  # rank <= in_channels over (out, w) x (in, h): exactly representable
        a, b = torch.randn(6, 3, 4), torch.randn(4, 4, 3)
        conv.weight.copy_(torch.einsum("owm,mih->oihw", a, b))
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(factorized(conv)(x), conv(x), atol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_channel_shuffle_moves_channels_by_its_permutation_and_keeps_the_layout(memory_format):
    """A channels_last input stays channels_last: a max-pool after an NCHW shuffle ran 16x
    slower, and the next convolution converted it back."""
    from autoshrink_plugins.blocks import ChannelShuffle

    shuffle = ChannelShuffle(4)
    x = torch.randn(2, 12, 5, 5).contiguous(memory_format=memory_format)
    out = shuffle(x)
    assert torch.equal(out, x[:, shuffle.permutation(12)])
    assert out.is_contiguous(memory_format=memory_format)


def test_grouped_pointwise_keeps_block_diagonal_weights_in_place():
    """When each output only reads its future group, grouping plus shuffle changes nothing."""
    from autoshrink_plugins.blocks import ChannelShuffle
    from autoshrink_plugins.grouping import grouped_from

    groups, channels = 4, 8
    conv = torch.nn.Conv2d(channels, channels, 1)
    order = ChannelShuffle(groups).permutation(channels)
    per_group = channels // groups
    mask = torch.zeros(channels, channels)
    for position in range(channels):
        group = int(order[position]) // per_group
        mask[position, group * per_group:(group + 1) * per_group] = 1
    with torch.no_grad():
        conv.weight.mul_(mask[:, :, None, None])
    x = torch.randn(2, channels, 5, 5)
    assert torch.allclose(grouped_from(conv, groups, shuffle=True)(x), conv(x), atol=1e-5)
    assert not torch.allclose(mask, torch.ones_like(mask))  # the test is not trivial


def _plan(host, *steps):
    """A plan from technique names or [name, options] pairs, given in run order."""
    return Plan.from_json(json.dumps([[s, {}] if isinstance(s, str) else s for s in steps]),
                          host.techniques)


def _model_with(host, name, shape, *steps):
    torch.manual_seed(0)
    model = host.model(name).build(10, shape[0], shape[1])
    return apply_stage(_plan(host, *steps), Stage.ARCHITECTURE, model, TrialContext(shape, 10),
                       rebuild=True).eval()


def _smallcnn_with(host, *steps):
    return _model_with(host, "smallcnn", (1, 16, 16), *steps)


def test_ghost_cheap_maps_are_the_channel_multiplier_convolution(host):
    """Separate depthwise convolutions give exactly GhostNet's multiplier convolution."""
    from autoshrink_plugins.blocks import GhostModule

    ghost = GhostModule(6, 16, kernel_size=3, ratio=3, cheap_kernel=3).eval()
    intrinsic = ghost.primary[0].out_channels
    multiplier = torch.nn.Conv2d(intrinsic, 2 * intrinsic, 3, padding=1, groups=intrinsic,
                                 bias=False)
    with torch.no_grad():  # output j*intrinsic + c of ours is output c*2 + j of the multiplier
        weight = torch.stack([branch[0].weight for branch in ghost.cheap], 1)
        multiplier.weight.copy_(weight.reshape_as(multiplier.weight))
    x = torch.randn(2, 6, 8, 8)
    primary = ghost.primary(x)
    reference = torch.relu(multiplier(primary)).view(2, intrinsic, 2, 8, 8).transpose(1, 2)
    expected = torch.cat([primary, reference.reshape(2, 2 * intrinsic, 8, 8)], 1)[:, :16]
    assert torch.allclose(ghost(x), expected, atol=1e-5)
    assert all(b[0].groups == b[0].in_channels == b[0].out_channels for b in ghost.cheap)


def test_ghost_cuts_a_cheap_kernel_wider_than_its_map_without_changing_its_function(host):
    """On a 2x2 map a 5x5 depthwise kernel meets the map with its middle 3x3 only."""
    from autoshrink_plugins.blocks import GhostModule
    from autoshrink_plugins.rewrite import input_shapes

    model = _smallcnn_with(host, "slim-before-gap", "fire",
                           ["ghost", {"ratio": 2, "cheap_kernel": 5}])
    shapes = input_shapes(model, (1, 16, 16))
    kernels = {}  # map side -> cheap kernel sizes there
    for ghost in (m for m in model.modules() if isinstance(m, GhostModule)):
        for cheap in ghost.cheap:
            kernels.setdefault(shapes[id(cheap[0])][1], set()).add(cheap[0].kernel_size)
    assert kernels[2] == {(3, 3)}  # cut on 2x2 maps, kept where the map is wider
    assert all(sizes == {(5, 5)} for side, sizes in kernels.items() if side >= 3)
    assert len(kernels) > 1

    wide = GhostModule(4, 8, cheap_kernel=5).eval()
    cut = GhostModule(4, 8, cheap_kernel=3).eval()
    with torch.no_grad():
        cut.primary[0].weight.copy_(wide.primary[0].weight)
        cut.cheap[0][0].weight.copy_(wide.cheap[0][0].weight[:, :, 1:4, 1:4])
    x = torch.randn(3, 4, 2, 2)
    assert torch.allclose(cut(x), wide(x), atol=1e-6)
    assert wide.cheap[0][0].weight[:, :, 0].abs().sum() > 0  # the cut taps were not zeros


def test_ghost_replaces_only_the_relu_its_module_repeats(host):
    from autoshrink_plugins.blocks import GhostModule

    model = _smallcnn_with(host, "ghost")
    stack = list(model.features)
    ghosts = [i for i, layer in enumerate(stack) if isinstance(layer, GhostModule)]
    assert ghosts and all(isinstance(stack[i + 1], torch.nn.Identity) for i in ghosts)
    x = torch.randn(3, 1, 16, 16)
    out = model(x)
    for i in ghosts:
        model.features[i + 1] = torch.nn.ReLU()
    assert torch.equal(model(x), out)


def test_se_attaches_after_every_ghost_module_of_a_stack(host):
    from autoshrink_plugins.blocks import GhostModule, SqueezeExcite

    stack = list(_smallcnn_with(host, "ghost", "se").features)
    ghosts = [i for i, layer in enumerate(stack) if isinstance(layer, GhostModule)]
    assert len(ghosts) == 3
    for i in ghosts:
        assert isinstance(stack[i + 1], SqueezeExcite)
        assert stack[i + 1].fc1.in_features == stack[i].out_channels


def test_fire_normalises_its_squeeze_only_in_a_network_without_batch_norm(host):
    from autoshrink_plugins.blocks import Fire

    def squeeze_norms(model):
        return {type(m.squeeze_norm) for m in model.modules() if isinstance(m, Fire)}

    assert squeeze_norms(_smallcnn_with(host, "fire")) == {torch.nn.BatchNorm2d}
    # VGG normalises after every convolution already: the paper's counts stay
    assert squeeze_norms(_model_with(host, "vgg11", (3, 32, 32), "fire")) == {torch.nn.Identity}
    # a ghost module that becomes the squeeze brings its own batch norm
    assert squeeze_norms(_smallcnn_with(host, "fire", "ghost")) == {torch.nn.Identity}


def test_a_deep_fire_rewrite_of_the_small_cnn_learns_digits(host):
    """Without the squeeze's batch norm this plan stayed at chance in 8 of 8 trainings."""
    task = load_task(build_config(None, {}), host)
    model = _smallcnn_with(host, "slim-before-gap", ["fire", {"squeeze_ratio": 4}], "dwconv",
                           "gap-classifier")
    trainer = Trainer(task.splits, task.recipe)
    trainer.fit(model, epochs=12, lr=task.recipe.lr)
    assert trainer.accuracy(model, task.splits.val) > 0.5


def test_bn_scale_ranks_by_batch_norm_and_by_l1_where_there_is_none(host):
    prune = host.technique("prune-filters")
    options = prune.Options(ratio=0.5, criterion="bn-scale", finetune_epochs=0)
    plain = host.model("smallcnn").build(10, 1, 16)  # no batch norm at all
    pruned = prune.apply(plain, options, TrialContext((1, 16, 16), 10))
    assert [m.out_channels for m in pruned.features if isinstance(m, torch.nn.Conv2d)] == \
        [8, 16, 16, 64]
    vgg = host.model("vgg11").build(10, 1, 32)
    with torch.no_grad():  # the first batch norm's scales say channels 32-63 matter
        vgg.features[1].weight.copy_(torch.linspace(0.01, 1.0, 64))
    pruned = prune.apply(vgg, options, TrialContext((1, 32, 32), 10))
    assert torch.equal(pruned.features[1].weight, torch.linspace(0.01, 1.0, 64)[32:])
    assert pruned.classifier[0].out_features == 2048  # the hidden layers, without a norm: L1


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_l1_masks_the_same_weights_as_torch_l1_pruning(host, scope):
    """Its one-threshold masks are torch's L1Unstructured masks, also after a first step has
    left zeros (ties at a non-zero magnitude have probability zero with random weights)."""
    from torch.nn.utils import prune as torch_prune

    from autoshrink_plugins.pruning import mask_smallest, prunable

    torch.manual_seed(0)
    ours, theirs = (host.model("smallcnn").build(10, 1, 16) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    for share in (0.3, 0.6):
        targets, expected = prunable(ours), prunable(theirs)
        for group in ([targets] if scope == "global" else [[t] for t in targets]):
            mask_smallest(group, share)
        if scope == "global":
            torch_prune.global_unstructured(expected, pruning_method=torch_prune.L1Unstructured,
                                            amount=share)
        else:
            for module, name in expected:
                torch_prune.l1_unstructured(module, name, amount=share)
        for (mine, _), (reference, _) in zip(targets, expected):
            assert torch.equal(mine.weight_mask, reference.weight_mask)
            torch_prune.remove(mine, "weight")
            torch_prune.remove(reference, "weight")
    zeros = sum(int((m.weight == 0).sum()) for m, _ in prunable(ours))
    assert zeros / sum(m.weight.numel() for m, _ in prunable(ours)) == pytest.approx(0.6, abs=1e-4)


@pytest.mark.parametrize("rewrites", [["ghost"], [["ghost", {"ratio": 4}], "factorize-nx1"]])
def test_prune_filters_removes_channels_inside_ghost_modules(host, tmp_path, rewrites):
    """Ghost modules whose maps need no cut are ordinary convolutions and a concatenation to
    Torch-Pruning: prune-filters halves their intrinsic maps and every cheap copy with them."""
    from autoshrink_plugins.blocks import GhostModule

    plan = _plan(host, *rewrites, ["prune-filters", {"ratio": 0.5}])
    torch.manual_seed(0)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    pruned = check_plan_rebuild(plan, model, (1, 16, 16), tmp_path)
    widths = [(m.out_channels, m.primary[1].num_features, len(m.cheap) + 1)
              for m in pruned.modules() if isinstance(m, GhostModule)]
    assert [out for out, _, _ in widths] == [16, 16, 64]  # 32, 32, 128 before
    assert all(out == intrinsic * copies for out, intrinsic, copies in widths)
    assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)


GHOST_NEIGHBOURS = [["ghost", "dwconv"], [["ghost", {"ratio": 4}], "dwconv"], ["ghost", "se"],
                    ["fire", "ghost"], ["fire", "ghost", "dwconv", "gap-classifier"]]
GHOST_NEIGHBOUR_IDS = ["+".join(map(str, rewrites)) for rewrites in GHOST_NEIGHBOURS]


@pytest.mark.parametrize("rewrites", GHOST_NEIGHBOURS, ids=GHOST_NEIGHBOUR_IDS)
def test_prune_filters_removes_exactly_the_silent_ghost_maps(host, rewrites, monkeypatch):
    """Every other intrinsic map of every ghost module (and its cheap copies) made silent and
    ranked last by batch-norm scale: pruning half the channels removes exactly those, so the
    pruned model computes what the full one did. Traced layer by layer, these neighbours of a
    ghost module made Torch-Pruning remove the wrong channels or none."""
    import torch_pruning as tp

    import autoshrink_plugins.structured
    from autoshrink_plugins.blocks import GhostModule

    # batch-norm scale alone: layers without a batch norm (the first convolution, se's linear
    # layers) are left as they are instead of ranked by L1
    monkeypatch.setattr(autoshrink_plugins.structured, "_bn_scale_or_l1",
                        tp.importance.BNScaleImportance)

    torch.manual_seed(0)
    model = _smallcnn_with(host, *rewrites)
    ghosts = [m for m in model.modules() if isinstance(m, GhostModule)]
    before = [g.out_channels for g in ghosts]
    with torch.no_grad():
        for ghost in ghosts:
            silent = torch.arange(0, ghost.primary[1].num_features, 2)
            for norm in (ghost.primary[1], *(cheap[1] for cheap in ghost.cheap)):
                for values in (norm.weight, norm.bias, norm.running_mean):
                    values[silent] = 0
    x = torch.randn(4, 1, 16, 16)
    expected = model(x)
    plan = _plan(host, ["prune-filters", {"ratio": 0.5, "criterion": "bn-scale",
                                          "finetune_epochs": 0}])
    pruned = apply_stage(plan, Stage.POST_TRAINING, model, TrialContext((1, 16, 16), 10)).eval()
    assert [g.out_channels for g in ghosts] == [width // 2 for width in before]
    assert torch.allclose(pruned(x), expected, atol=1e-5)


@pytest.mark.parametrize("rewrites", GHOST_NEIGHBOURS, ids=GHOST_NEIGHBOUR_IDS)
def test_ghost_models_pruned_by_filters_rebuild_from_their_artifact(host, tmp_path, rewrites):
    torch.manual_seed(0)
    model = host.model("smallcnn").build(10, 1, 16).eval()
    check_plan_rebuild(_plan(host, *rewrites, ["prune-filters", {"ratio": 0.5}]), model,
                       (1, 16, 16), tmp_path)


SHUFFLED = [["dwconv", ["grouped-pointwise", {"groups": 2}]],
            ["dwconv", ["grouped-pointwise", {"groups": 4}]], ["fire", "grouped-pointwise"],
            ["fire", "grouped-pointwise", "se"], ["dwconv", "grouped-pointwise", "gap-classifier"]]
SHUFFLED_IDS = ["+".join(map(str, rewrites)) for rewrites in SHUFFLED]


def _producers(group):
    """The group's items whose layer makes the channels (not those that read them)."""
    return [item for item in group.items
            if isinstance(item.dep.target.module, torch.nn.Conv2d | torch.nn.Linear)
            and item.dep.handler.__name__.endswith("out_channels")]


def _producer_l1(group):
    """L1 norm of the filters that make each channel."""
    scores = torch.zeros(len(group[0].idxs))
    for item in _producers(group):
        weight = item.dep.target.module.weight.detach()
        scores[item.root_idxs] += weight.flatten(1).abs().sum(1)[item.idxs]
    return scores


def _graph_across_shuffles(model, x):
    """Torch-Pruning's dependency graph of ``model`` with its shuffles and concatenations
    followed, as prune-filters builds it."""
    import torch_pruning as tp

    from autoshrink_plugins.blocks import ChannelShuffle
    from autoshrink_plugins.channel_atoms import (
        ShufflePruner,
        follow_concatenations,
        follow_shuffles,
        shuffle_channels,
    )

    channels = shuffle_channels(model, x)
    graph = tp.DependencyGraph().build_dependency(
        model, x, customized_pruners={ChannelShuffle: ShufflePruner(channels)})
    follow_shuffles(graph, channels)
    follow_concatenations(graph)
    return graph


# at 32x32 seed 000's classifier reads a 2x2 map: Fire's concatenation through a flatten; a
# DenseNet concatenates a shuffle's output (grouped-pointwise after dwconv) to its input
# (the DenseNet keeps more: its grouped 1x1 layers read concatenations, whose channels stay)
SILENT_CASES = [*(("smallcnn", rewrites, (1, 16, 16), 0.6) for rewrites in SHUFFLED),
                ("smallcnn", ["fire"], (1, 32, 32), 0.6),
                ("smallcnn", ["fire", "grouped-pointwise"], (1, 32, 32), 0.6),
                ("tests.user_models:tiny_densenet",
                 [["dwconv", {"min_channels": 8}], ["grouped-pointwise", {"groups": 2}]],
                 (3, 16, 16), 0.85)]


@pytest.mark.parametrize(("name", "rewrites", "shape", "kept"), SILENT_CASES,
                         ids=[*SHUFFLED_IDS, "fire-32x32", "fire+grouped-pointwise-32x32",
                              "densenet-dwconv+grouped-pointwise"])
def test_prune_filters_removes_exactly_the_silent_channels_across_shuffles(host, name, rewrites,
                                                                          shape, kept,
                                                                          monkeypatch):
    """In every channel group, every other atom made silent (its filters and batch-norm
    scales zero) and ranked last: pruning half the channels removes exactly those, so the
    outputs stay the same, the grouped 1x1 convolutions keep their groups and the model keeps
    at most ``kept`` of its parameters. Followed without the shuffle's permutation, the readers lose
    the wrong channels and the outputs change; without the concatenation's offsets (which
    Torch-Pruning drops where a flatten of a 2x2 map reads it), both Fire expands and the
    classifier lost the wrong ones and the classifier's weight no longer matched its input;
    with the permutation applied before the offsets of a concatenation that reads the shuffle,
    the DenseNet failed with an index out of range."""
    import autoshrink_plugins.structured
    from autoshrink_plugins.channel_atoms import atoms

    monkeypatch.setattr(autoshrink_plugins.structured, "_importance", lambda _: _producer_l1)
    model = _model_with(host, name, shape, *rewrites)
    x = torch.randn(4, *shape)
    graph = _graph_across_shuffles(model, x)
    ignored = autoshrink_plugins.structured.output_layers(model, x)
    for group in graph.get_all_groups(ignored_layers=ignored):
        silent = {i for part in atoms(graph, group)[::2] for i in part}
        norms = [item for item in group.items
                 if isinstance(item.dep.target.module, torch.nn.BatchNorm2d)]
        for item in [*_producers(group), *norms]:
            layer = item.dep.target.module
            with torch.no_grad():
                for index, root in zip(item.idxs, item.root_idxs):
                    if root in silent:
                        layer.weight[index] = 0
                        if layer.bias is not None:
                            layer.bias[index] = 0
    grouped = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
               and m.kernel_size == (1, 1)]
    groups, params, expected = [m.groups for m in grouped], count_params(model)[0], model(x)
    plan = _plan(host, ["prune-filters", {"ratio": 0.5, "finetune_epochs": 0}])
    pruned = apply_stage(plan, Stage.POST_TRAINING, model, TrialContext(shape, 10)).eval()
    assert torch.allclose(pruned(x), expected, atol=1e-5)
    assert [m.groups for m in grouped] == groups
    assert count_params(pruned)[0] < kept * params


@pytest.mark.parametrize(("name", "rewrites"), [*(("smallcnn", r) for r in SHUFFLED),
                                                ("smallcnn", ["dwconv"]), ("resnet18", ["fire"])],
                         ids=[*SHUFFLED_IDS, "dwconv", "resnet18-fire"])
def test_models_pruned_by_filters_rebuild_from_their_int8_artifact(host, tmp_path, name,
                                                                   rewrites):
    """Int8 layers keep the widths they were built with, so the loader gives a depthwise
    convolution its pruned groups and a batch norm that int8 conversion did not fold into a
    convolution (after a Fire block's concatenation) its pruned width; both failed to load."""
    shape = (1, 16, 16) if name == "smallcnn" else (3, 16, 16)
    model = host.model(name).build(10, shape[0], shape[1]).eval()
    check_plan_rebuild(_plan(host, *rewrites, ["prune-filters", {"ratio": 0.5}],
                             ["quantize-int8", {"calibration_batches": 1}]),
                       model, shape, tmp_path)


def test_channel_atoms_between_two_shuffled_grouped_convolutions(host):
    """Grouped 1x1 (4 groups of 8), shuffle, depthwise, grouped 1x1 (4 groups of 8): the first
    layer must lose the same positions in each group, which the shuffle turns into runs of 4
    channels, and the second layer the same positions in each group of 8; so channels go in
    two atoms of 16: the first or the second half of every group of 8 (after the shuffle)."""
    import torch_pruning as tp

    from autoshrink_plugins.channel_atoms import atoms

    model = _smallcnn_with(host, "dwconv", ["grouped-pointwise", {"groups": 4}])
    middle = model.features[6][0]  # the depthwise convolution between two shuffled layers
    assert middle.groups == middle.out_channels == 32
    graph = _graph_across_shuffles(model, torch.randn(2, 1, 16, 16))
    group = graph.get_pruning_group(middle, tp.prune_depthwise_conv_out_channels,
                                    list(range(32)))
    assert sorted(map(sorted, atoms(graph, group))) == [
        [k for k in range(32) if k % 8 < 4], [k for k in range(32) if k % 8 >= 4]]


@pytest.mark.parametrize(("name", "rewrites", "why"), [
    ("smallcnn", [["ghost", {"ratio": 3}]], "cuts maps off"),  # 11 intrinsic maps, cut from 33
    ("smallcnn", ["fire", "ghost", "se"], "squeeze-excitation"),  # the gate mis-sized
    ("resnet18", ["fire", "ghost"], "residual"),  # a batch norm mis-sized
    ("smallcnn", ["ghost", "dwconv", "grouped-pointwise"], "grouped"),  # outputs changed
    ("smallcnn", ["dice"], "DiCE"),
])
def test_prune_filters_refuses_models_torch_pruning_gets_wrong(host, name, rewrites, why):
    model = _model_with(host, name, (1, 16, 16) if name == "smallcnn" else (3, 16, 16),
                        *rewrites)
    ok, reason = host.technique("prune-filters").applies_to(model)
    assert not ok and why in reason


NESTED_INT8 = """
import tempfile
import torch
from autoshrink.plan import fixed_plan
from autoshrink.plugins import PluginHost
from autoshrink.testing import check_plan_rebuild

host = PluginHost.discover()
techniques = [host.technique(name) for name in ("fire", "ghost", "quantize-int8")]
plan = fixed_plan(techniques, [t.parse_options({}) for t in techniques])
with tempfile.TemporaryDirectory() as folder:
    model = check_plan_rebuild(plan, host.model("smallcnn").build(10, 1, 16), (1, 16, 16), folder)
print(model.code.count("torch.cat("), tuple(model(torch.randn(4, 1, 16, 16)).shape))
"""


def test_int8_models_with_nested_concatenations_run_without_pytorch_warnings():
    """Fire blocks of ghost modules concatenate inside a concatenation; the int8 model's runs
    (every evaluation of a trial) print nothing (see plugins/quantization.py). A fresh
    interpreter, as a search runs it: pytest resets warning filters around each test."""
    result = subprocess.run([sys.executable, "-c", NESTED_INT8], capture_output=True,
                            text=True, check=True)
    cats, shape = result.stdout.split(" ", 1)
    assert int(cats) >= 2 and shape.strip() == "(4, 10)", result.stdout
    assert result.stderr == "", result.stderr
