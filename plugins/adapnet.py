"""AdapNet: pruning while training, seed 002 (Ahmadluei, Faez & Masoumi, JADM 2022).

Training runs in the paper's three phases: a startup phase (``startup_epochs``; 0 by default,
because a trial starts from the trained baseline, which is further along than a startup), the
structure evaluation and change phase, and fine-tuning (the trial's own fine-tune). In the
second phase every ``lsep`` batches (one LSEP, Layer Structure Evaluation and change Period)
each convolution of the plain stack except the last (the paper leaves the last layer alone) is
evaluated from the activations it produced during the period:

- Intermediate concepts. Every feature map seen (one per filter and image) is described by its
  4x4 average-pooled pattern, L2-normalised, and assigned to one of ``concepts`` clusters by
  incremental (mini-batch) k-means, whose centres carry over from period to period. RFMDist[i, j]
  adds up filter i's mean activation on the maps that fall in cluster j; FMDist normalises each
  column over the filters (equation 1). REPLACED: the paper clusters the maps by the affinity of
  a DSC-Net subspace-clustering autoencoder trained for two epochs every period, spectral
  clustering with an eigengap-chosen cluster count and BORDER boundary points to accept new
  concepts; training an autoencoder per layer and period would cost more than the trial, so we
  cluster pooled map statistics with a fixed number of concepts, every cluster being a concept.
- Pruning (Algorithm 2): a filter whose activity over the concepts is not significantly
  non-uniform (chi-square test p-value above beta; beta starts at 0.9 and falls by 0.06 every
  ``beta_every`` epochs to 0.18; the paper uses 5 epochs in runs of 50) and whose KSE indicator
  in the next layer's kernels (equation 4, s_c = 1, k-nearest-neighbour kernel density, scaled by
  the layer's largest) is below ``kse_threshold`` is soft-pruned: frozen (its weights restored
  after every optimizer step) for the next period, then removed physically.
- Merging (Algorithm 3): two filters whose maps' mean cosine similarity over the period exceeds
  twice the layer's mean and whose FMDist rows are closer than ``chebyshev_threshold``
  (Chebyshev distance) become one filter with their mean weights; the next layer reads it
  through the sum of both input weights. ADDED: at most ``merge_limit`` of a layer's filters
  are merged per period, most similar first; on post-activation maps twice the mean cosine
  otherwise merges most of a small layer at once (the paper's own reason for soft pruning,
  avoiding sudden capacity loss, applies to merging as much).
- Insertion (Algorithm 4): each filter's normalised activity is split at its largest gap into
  active and inactive concepts; P1 = |active| / n - 0.3 and P2 = 0.7 - active mass, scaled to
  [-1, 1] and summed over the filters; if either sum is positive one filter is added, derived
  from a randomly chosen filter with a positive score by the correlation of the layer's quarter
  of the network (inverse, rotated, scaled, shifted), read by the next layer with zero weights
  (the network's output is unchanged at insertion) and exempt from pruning for two periods.

The phase ends when fewer than ``stop_pruned`` filters were pruned or merged in
``stop_periods`` consecutive periods (the paper's k = 3, n = 2), or after ``max_periods``.
Plain stacks only (VGG, the small CNN); the paper's SGD settings are replaced by the task's.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from autoshrink import Stage, Technique, hookimpl
from autoshrink.errors import TrialFailed
from autoshrink.technique import check_range
from autoshrink_plugins.feature_merge import merge
from autoshrink_plugins.rewrite import plain_units

POOLED = 4  # side of the pooled pattern that describes a feature map
BETA = (0.9, 0.06, 0.18)  # start, step, minimum (Table 2)
PROTECTED_PERIODS = 2  # a new filter is not pruned or merged for this many periods
SAMPLES_PER_BATCH = 16  # images per batch whose maps are clustered
MIN_FILTERS = 2  # a layer never shrinks below this


@dataclasses.dataclass(frozen=True)
class AdapNetOptions:
    startup_epochs: int = 0
    lsep: int = 20
    max_periods: int = 15
    concepts: int = 8
    kse_threshold: float = 0.6
    chebyshev_threshold: float = 0.8
    merge_limit: float = 0.1
    beta_every: float = 1.0
    stop_pruned: int = 3
    stop_periods: int = 2
    merging: bool = True
    insertion: bool = True
    lr: float = 0.02

    def __post_init__(self):
        check_range("adapnet", "startup_epochs", self.startup_epochs, 0, 500)
        check_range("adapnet", "lsep", self.lsep, 2, 10_000)
        check_range("adapnet", "max_periods", self.max_periods, 1, 10_000)
        check_range("adapnet", "concepts", self.concepts, 2, 64)
        check_range("adapnet", "kse_threshold", self.kse_threshold, 0.0, 1.0)
        check_range("adapnet", "chebyshev_threshold", self.chebyshev_threshold, 0.0, 1.0)
        check_range("adapnet", "merge_limit", self.merge_limit, 0.0, 0.5)
        check_range("adapnet", "beta_every", self.beta_every, 0.01, 100.0)
        check_range("adapnet", "stop_pruned", self.stop_pruned, 0, 1000)
        check_range("adapnet", "stop_periods", self.stop_periods, 1, 100)
        check_range("adapnet", "lr", self.lr, 1e-5, 1.0)


# --- measures -----------------------------------------------------------------------------


def beta_at(epochs_done: float, every: float) -> float:
    start, step, low = BETA
    return max(low, start - step * math.floor(epochs_done / every))


def reader_kernels(model: nn.Module, at: int) -> torch.Tensor:
    """The next layer's weights grouped by the input channel they read: (readers, C, k)."""
    convs = plain_units(model)
    following = [i for i in convs if i > at]
    channels = model.features[at].out_channels
    if following:
        weight = model.features[following[0]].weight
        return weight.detach().flatten(2)
    linear = next(m for m in model.classifier if isinstance(m, nn.Linear))
    return linear.weight.detach().view(linear.out_features, channels, -1)


def kse_indicator(kernels: torch.Tensor) -> torch.Tensor:
    """KSE (Li et al. 2019) with s_c = 1 per input channel, scaled to the layer's largest.

    For channel c, each reader's kernel gets a density: the summed distance to its k nearest
    fellow kernels; e_c is the entropy of those densities and v_c = sqrt(1 / (1 + e_c)).
    """
    readers = kernels.shape[0]
    if readers < 2:
        return torch.ones(kernels.shape[1])
    k = min(5, readers - 1)
    per_channel = kernels.permute(1, 0, 2).float()  # (C, readers, k)
    distances = torch.cdist(per_channel, per_channel)
    density = distances.topk(k + 1, dim=2, largest=False).values[:, :, 1:].sum(2)
    share = density / density.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(share * torch.log2(share.clamp_min(1e-12))).sum(1)
    indicator = torch.sqrt(1.0 / (1.0 + entropy))
    return indicator / indicator.max().clamp_min(1e-12)


def uniformity_p_values(raw: torch.Tensor, observed: int) -> np.ndarray:
    """Chi-square p-value per filter that its activity over the concepts is uniform; a filter
    that never fired counts as uniform (p = 1)."""
    from scipy.stats import chisquare  # slow to import: see LayerRecord

    p_values = np.ones(raw.shape[0])
    for i, row in enumerate(raw.numpy()):
        total = row.sum()
        if total > 1e-12 and observed > 0:
            counts = row / total * observed
            p_values[i] = chisquare(counts).pvalue
    return np.nan_to_num(p_values, nan=1.0)


def insertion_scores(distribution: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 4's P1 and P2 per filter from rows normalised to sum 1."""
    n = distribution.shape[1]
    p1, p2 = np.zeros(distribution.shape[0]), np.zeros(distribution.shape[0])
    for i, row in enumerate(distribution.numpy()):
        ordered = np.sort(row)[::-1]
        gap = int(np.argmax(ordered[:-1] - ordered[1:])) + 1 if n > 1 else 1
        active = ordered[:gap]
        a, b = len(active) / n - 0.3, 0.7 - active.sum()
        p1[i] = a / (0.7 if a > 0 else 0.3)
        p2[i] = b / (0.7 if b > 0 else 0.3)
    return p1, p2


def chebyshev(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --- one layer's record -------------------------------------------------------------------


class LayerRecord:
    """What AdapNet knows about one convolution: concepts, RFMDist, map similarity."""

    def __init__(self, at: int, channels: int, concepts: int, seed: int):
        # imported when AdapNet runs, not when plugins are discovered: with scipy.stats they
        # take over a second, which every command that lists or checks plugin names would pay
        from sklearn.cluster import MiniBatchKMeans

        self.at = at
        self.kmeans = MiniBatchKMeans(n_clusters=concepts, random_state=seed, n_init=3,
                                      batch_size=256)
        self.raw = torch.zeros(channels, concepts)  # RFMDist
        self.frozen: list[int] = []
        self.protected: dict[int, int] = {}  # new filter -> periods left
        self.reset_period()

    def reset_period(self) -> None:
        self.cosine_sum, self.cosine_count, self.observed = None, 0, 0

    @torch.no_grad()
    def observe(self, maps: torch.Tensor) -> None:
        maps = maps[:SAMPLES_PER_BATCH].detach().float().cpu()
        batch, channels = maps.shape[:2]
        pattern = F.adaptive_avg_pool2d(maps, POOLED).flatten(2)
        pattern = pattern / pattern.norm(dim=2, keepdim=True).clamp_min(1e-12)
        points = pattern.reshape(batch * channels, -1).numpy()
        with threadpool_limits(1):  # OpenMP threads of k-means would fight torch's
            if len(points) >= self.kmeans.n_clusters:
                self.kmeans.partial_fit(points)
            fitted = hasattr(self.kmeans, "cluster_centers_")
            labels = self.kmeans.predict(points) if fitted else None
        if labels is not None:
            labels = torch.as_tensor(labels).view(batch, channels)
            mass = maps.mean((2, 3))
            self.raw.index_put_((torch.arange(channels).expand(batch, -1), labels), mass,
                                accumulate=True)
            self.observed += batch
        flat = maps.transpose(0, 1).flatten(1)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosine = unit @ unit.t()
        self.cosine_sum = cosine if self.cosine_sum is None else self.cosine_sum + cosine
        self.cosine_count += 1

    def fmdist(self) -> torch.Tensor:
        """Equation 1: each concept's column of RFMDist normalised over the filters."""
        return self.raw / self.raw.sum(0, keepdim=True).clamp_min(1e-12)

    def distribution(self) -> torch.Tensor:
        """Each filter's FMDist row normalised to sum 1: its activity over the concepts."""
        rows = self.fmdist()
        return rows / rows.sum(1, keepdim=True).clamp_min(1e-12)

    def regroup(self, groups: list[list[int]]) -> None:
        """Follow a change of the layer's channels (removal: singletons; merge: pairs)."""
        average = torch.zeros(len(groups), self.raw.shape[0])
        for new, group in enumerate(groups):
            average[new, group] = 1.0 / len(group)
        self.raw = average @ self.raw
        if self.cosine_sum is not None:
            self.cosine_sum = average @ self.cosine_sum @ average.t()
        position = {old: new for new, g in enumerate(groups) for old in g}
        self.frozen = [position[c] for c in self.frozen if c in position]
        self.protected = {position[c]: n for c, n in self.protected.items() if c in position}

    def add_row(self) -> None:
        self.raw = torch.cat([self.raw, torch.zeros(1, self.raw.shape[1])])
        if self.cosine_sum is not None:
            self.cosine_sum = F.pad(self.cosine_sum, (0, 1, 0, 1))


# --- channel surgery on plain stacks ------------------------------------------------------


def _unit_layers(model: nn.Module, at: int) -> tuple[nn.Module | None, int]:
    """The batch norm after convolution ``at`` (if any) and the index whose output the next
    layer reads (after the activation)."""
    features = model.features
    bn = features[at + 1] if at + 1 < len(features) and isinstance(
        features[at + 1], nn.BatchNorm2d) else None
    last = at + (2 if bn is not None else 1)
    if last < len(features) and isinstance(features[last], nn.ReLU):
        return bn, last
    return bn, last - 1


@torch.no_grad()
def insert_filter(model: nn.Module, at: int, weight: torch.Tensor, bias: float,
                  master: int) -> None:
    """Add one output channel to convolution ``at``; the next layer reads it with zeros."""
    features = model.features
    conv = features[at]
    device = conv.weight.device
    new = nn.Conv2d(conv.in_channels, conv.out_channels + 1, conv.kernel_size, conv.stride,
                    conv.padding, bias=conv.bias is not None).to(device)
    new.weight.copy_(torch.cat([conv.weight, weight[None].to(device)]))
    if conv.bias is not None:
        new.bias.copy_(torch.cat([conv.bias, torch.tensor([bias], device=device)]))
    features[at] = new
    bn, _ = _unit_layers(model, at)
    if bn is not None:
        grown = nn.BatchNorm2d(bn.num_features + 1, bn.eps, bn.momentum).to(device)
        for name in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(bn, name)
            getattr(grown, name).copy_(torch.cat([old, old[master:master + 1]]))
        features[at + 1] = grown
    following = [i for i in plain_units(model) if i > at]
    if following:
        reader = features[following[0]]
        wider = nn.Conv2d(reader.in_channels + 1, reader.out_channels, reader.kernel_size,
                          reader.stride, reader.padding,
                          bias=reader.bias is not None).to(device)
        wider.weight.zero_()
        wider.weight[:, :reader.in_channels] = reader.weight
        if reader.bias is not None:
            wider.bias.copy_(reader.bias)
        features[following[0]] = wider
        return
    position = next(i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear))
    linear = model.classifier[position]
    spatial = linear.in_features // conv.out_channels
    wider = nn.Linear(linear.in_features + spatial, linear.out_features,
                      bias=linear.bias is not None).to(device)
    wider.weight.zero_()
    blocks = linear.weight.view(linear.out_features, conv.out_channels, spatial)
    wider.weight.view(linear.out_features, conv.out_channels + 1, spatial)[:, :-1] = blocks
    if linear.bias is not None:
        wider.bias.copy_(linear.bias)
    model.classifier[position] = wider


def correlated_filter(weight: torch.Tensor, quarter: int) -> torch.Tensor:
    """A new filter correlated with ``weight`` as the paper's source prescribes per quarter of
    the network: inverse, rotary, scaling, translational."""
    if quarter == 0:
        return -weight
    if quarter == 1:
        return torch.rot90(weight, 1, dims=(1, 2))
    if quarter == 2:
        return 0.5 * weight
    return torch.roll(weight, 1, dims=2)


# --- the technique --------------------------------------------------------------------------


@dataclasses.dataclass
class PeriodLog:
    """One LSEP's changes, kept for reports and tests."""

    period: int
    removed: int
    frozen: int
    merged: int
    inserted: int


class AdapNetRun:
    """The structure evaluation and change phase on one model."""

    def __init__(self, model: nn.Module, options: AdapNetOptions, ctx):
        self.model, self.options, self.ctx = model, options, ctx
        self.random = random.Random(ctx.seed)
        self.layers = [LayerRecord(at, model.features[at].out_channels, options.concepts,
                                   ctx.seed) for at in plain_units(model)[:-1]]
        self.log: list[PeriodLog] = []
        self.batches_done = 0
        self._hooks: list = []

    # training -----------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.options.lr, momentum=0.9,
                               weight_decay=5e-4)

    def _watch(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for layer in self.layers:
            _, read_at = _unit_layers(self.model, layer.at)
            self._hooks.append(self.model.features[read_at].register_forward_hook(
                lambda module, inputs, output, layer=layer: layer.observe(output)))

    def _frozen_snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(parameter, rows, saved values) of every frozen filter's weights."""
        saved = []
        for layer in self.layers:
            if not layer.frozen:
                continue
            rows = torch.tensor(layer.frozen)
            bn, _ = _unit_layers(self.model, layer.at)
            conv = self.model.features[layer.at]
            for parameter in (conv.weight, conv.bias, *(() if bn is None else (bn.weight,
                                                                                bn.bias))):
                if parameter is not None:
                    saved.append((parameter, rows, parameter.detach()[rows].clone()))
        return saved

    def run(self) -> list[PeriodLog]:
        options, ctx = self.options, self.ctx
        batches = ctx.training_batches()
        quiet_periods = 0
        for period in range(options.max_periods):
            self._train_period(batches)
            if self.batches_done == 0:  # no data (``inspect``): nothing to evaluate
                break
            device = next(self.model.parameters()).device
            changes = self._evaluate_and_change(period)
            self.model.to(device)
            self.log.append(changes)
            quiet_periods = (quiet_periods + 1
                             if changes.frozen + changes.merged < options.stop_pruned else 0)
            if quiet_periods >= options.stop_periods:
                break
        for hook in self._hooks:
            hook.remove()
        return self.log

    def _train_period(self, batches) -> None:
        self.model.train()
        self._watch()
        optimizer = self._optimizer()
        frozen = self._frozen_snapshot()
        for _, (x, y) in zip(range(self.options.lsep), batches):
            if self.batches_done == 0:  # surgery builds layers on the CPU; follow the data
                self.model.to(x.device)
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            for callback in self.ctx.callbacks:
                loss = callback.loss(loss, logits, x, y)
            if not torch.isfinite(loss):
                raise TrialFailed(f"adapnet: training diverged (loss {loss.item()})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # soft pruning: frozen filters keep their values
                for parameter, rows, values in frozen:
                    parameter[rows] = values
            self.batches_done += 1

    # evaluation and change ----------------------------------------------------------------

    def _evaluate_and_change(self, period: int) -> PeriodLog:
        epochs = self.batches_done / max(1, self.ctx.batches_per_epoch)
        beta = beta_at(epochs, self.options.beta_every)
        log = PeriodLog(period, 0, 0, 0, 0)
        for index, layer in enumerate(self.layers):
            log.removed += self._remove_frozen(layer)
            log.frozen += self._choose_frozen(layer, beta)
            if self.options.merging:
                log.merged += self._merge_similar(layer)
            if self.options.insertion:
                log.inserted += self._insert_if_needed(layer, index)
            layer.protected = {c: n - 1 for c, n in layer.protected.items() if n > 1}
            layer.reset_period()
        return log

    def _remove_frozen(self, layer: LayerRecord) -> int:
        if not layer.frozen:
            return 0
        channels = self.model.features[layer.at].out_channels
        gone = set(layer.frozen)
        groups = [[c] for c in range(channels) if c not in gone]
        merge(self.model, layer.at, groups, torch.ones(channels))
        layer.frozen = []
        layer.regroup(groups)
        return len(gone)

    def _choose_frozen(self, layer: LayerRecord, beta: float) -> int:
        channels = self.model.features[layer.at].out_channels
        p_values = uniformity_p_values(layer.raw, layer.observed)
        kse = kse_indicator(reader_kernels(self.model, layer.at))
        candidates = [c for c in range(channels) if p_values[c] > beta
                      and kse[c] < self.options.kse_threshold and c not in layer.protected]
        room = channels - MIN_FILTERS
        layer.frozen = sorted(candidates, key=lambda c: kse[c])[:max(0, room)]
        return len(layer.frozen)

    def _merge_similar(self, layer: LayerRecord) -> int:
        if layer.cosine_sum is None:
            return 0
        cosine = layer.cosine_sum / layer.cosine_count
        channels = cosine.shape[0]
        off_diagonal = cosine[~torch.eye(channels, dtype=torch.bool)]
        threshold = 2.0 * float(off_diagonal.mean()) if channels > 1 else 1.0
        fmdist = layer.fmdist()
        busy = set(layer.frozen) | set(layer.protected)
        limit = round(self.options.merge_limit * channels) if self.options.merge_limit else 0
        limit = max(1, limit) if self.options.merge_limit else 0
        pairs, used = [], set()
        rows, cols = torch.triu_indices(channels, channels, 1)
        scores = cosine[rows, cols]
        for k in scores.argsort(descending=True).tolist():
            i, j = int(rows[k]), int(cols[k])
            if scores[k] <= threshold:
                break
            if {i, j} & (used | busy):
                continue
            if len(pairs) >= limit:
                break
            if chebyshev(fmdist[i], fmdist[j]) < self.options.chebyshev_threshold:
                pairs.append([i, j])
                used |= {i, j}
        pairs = pairs[:max(0, channels - len(layer.frozen) - MIN_FILTERS)]
        if not pairs:
            return 0
        groups = pairs + [[c] for c in range(channels) if c not in used]
        merge(self.model, layer.at, groups, torch.ones(channels))
        layer.regroup(groups)
        return len(pairs)

    def _insert_if_needed(self, layer: LayerRecord, index: int) -> int:
        if layer.observed == 0:
            return 0
        p1, p2 = insertion_scores(layer.distribution())
        if p1.sum() <= 0 and p2.sum() <= 0:
            return 0
        wanting = [c for c in range(len(p1)) if (p1[c] > 0 or p2[c] > 0)
                   and c not in layer.frozen]
        if not wanting:
            return 0
        master = self.random.choice(wanting)
        conv = self.model.features[layer.at]
        quarter = min(3, 4 * index // max(1, len(self.layers)))
        weight = correlated_filter(conv.weight.detach()[master], quarter)
        bias = float(conv.bias.detach()[master]) if conv.bias is not None else 0.0
        insert_filter(self.model, layer.at, weight, -bias if quarter == 0 else bias, master)
        layer.add_row()
        layer.protected[conv.out_channels] = PROTECTED_PERIODS + 1
        return 1


class AdapNet(Technique):
    name = "adapnet"
    stage = Stage.TRAINING
    claims = frozenset({"channels", "schedule"})
    Options = AdapNetOptions
    order = 20
    paper = "seed 002 (Ahmadluei et al., AdapNet): prune, merge and insert filters in training"

    def applies_to(self, model: nn.Module) -> tuple[bool, str]:
        convs = plain_units(model)
        if not convs:
            return False, ("needs a plain stack (features of conv / BN / ReLU / pooling and a"
                           " classifier)")
        if len(convs) < 2:
            return False, "has fewer than two convolutions (the last one is never evaluated)"
        return True, ""

    def search_space(self, trial) -> AdapNetOptions:
        return AdapNetOptions(
            lsep=trial.suggest_categorical("lsep", [10, 20, 40]),
            concepts=trial.suggest_categorical("concepts", [4, 8, 16]),
            kse_threshold=trial.suggest_float("kse_threshold", 0.4, 0.9, step=0.1),
            chebyshev_threshold=trial.suggest_float("chebyshev_threshold", 0.2, 1.0, step=0.2),
            beta_every=trial.suggest_categorical("beta_every", [0.5, 1.0, 2.0]))

    def apply(self, model: nn.Module, options: AdapNetOptions, ctx) -> nn.Module:
        if options.startup_epochs:
            ctx.finetune(model, max_epochs=options.startup_epochs, lr=options.lr,
                         patience=None, watched=False, label="start-up training")
        AdapNetRun(model, options, ctx).run()
        return model


@hookimpl
def register_techniques(register):
    register(AdapNet())
