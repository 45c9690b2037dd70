"""Distillation's mechanism: the loss it trains on and where its gradients come from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoshrink.losses import focal_loss
from autoshrink.technique import TrialContext
from autoshrink_plugins.distillation import DistillationLoss, DistillOptions, soft_target_loss


def test_soft_term_gradient_is_the_gap_to_the_teacher_distribution():
    """d/ds of T^2 KL(p_t || p_s) is T (p_s - p_t) / batch: the teacher's logits drive it."""
    torch.manual_seed(0)
    student = torch.randn(5, 10, requires_grad=True)
    teacher = torch.randn(5, 10)
    temperature = 3.0
    soft_target_loss(student, teacher, temperature).backward()
    expected = temperature * (F.softmax(student / temperature, 1)
                              - F.softmax(teacher / temperature, 1)) / 5
    assert torch.allclose(student.grad, expected.detach(), atol=1e-6)


def test_student_matching_its_teacher_gets_no_soft_gradient():
    logits = torch.randn(4, 10, requires_grad=True)
    soft_target_loss(logits, logits.detach(), 2.0).backward()
    assert logits.grad.abs().max() < 1e-6


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_down_weights_easy_examples():
    torch.manual_seed(1)
    logits, targets = torch.randn(16, 10), torch.randint(0, 10, (16,))
    assert torch.allclose(focal_loss(logits, targets, 0.0), F.cross_entropy(logits, targets))
    assert focal_loss(logits, targets, 2.0) < F.cross_entropy(logits, targets)
    easy = torch.full((1, 10), -5.0)
    easy[0, 3] = 5.0
    assert focal_loss(easy, torch.tensor([3]), 2.0) < 1e-3 * F.cross_entropy(
        easy, torch.tensor([3]))


def test_callback_mixes_student_and_teacher_terms_by_alpha():
    torch.manual_seed(2)
    teacher = nn.Linear(6, 4).eval()
    inputs, targets = torch.randn(8, 6), torch.randint(0, 4, (8,))
    logits = torch.randn(8, 4, requires_grad=True)
    hard = F.cross_entropy(logits, targets)
    options = DistillOptions(temperature=2.0, alpha=0.25)
    mixed = DistillationLoss(teacher, options).loss(hard, logits, inputs, targets)
    soft = soft_target_loss(logits, teacher(inputs), 2.0)
    assert torch.allclose(mixed, 0.75 * hard + 0.25 * soft)
    focal = DistillationLoss(teacher, DistillOptions(alpha=0.0, student_loss="focal", gamma=1.0))
    assert torch.allclose(focal.loss(hard, logits, inputs, targets),
                          focal_loss(logits, targets, 1.0))
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never learns


def test_teacher_logits_are_looked_up_only_for_the_batch_the_trainer_announced():
    torch.manual_seed(3)
    teacher = nn.Linear(6, 4).eval()
    split_inputs = torch.randn(20, 6)
    with torch.no_grad():
        table = teacher(split_inputs)
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    callback = DistillationLoss(teacher, DistillOptions(), lambda model: table)
    rows = torch.tensor([7, 2, 19])
    student = torch.randn(3, 4, requires_grad=True)
    hard = F.cross_entropy(student, torch.zeros(3, dtype=torch.long))
    callback.on_batch(rows)
    mixed = callback.loss(hard, student, split_inputs[rows], None)
    assert torch.allclose(mixed, 0.5 * hard + 0.5 * soft_target_loss(student, table[rows], 4.0))
    assert calls == []
    # the next batch was not announced (a technique's own loop): the teacher runs on it
    with torch.no_grad():
        direct = teacher(split_inputs[:3])
    callback.loss(hard, student, split_inputs[:3], None)
    assert calls == [3, 3]
    assert torch.allclose(callback.teacher_logits(split_inputs[:3]), direct)


def test_distill_registers_its_loss_with_the_trial(host):
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    ctx = TrialContext((1, 4, 4), 10, teacher=teacher)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    assert host.technique("distill").apply(model, DistillOptions(), ctx) is model
    assert [type(c).__name__ for c in ctx.callbacks] == ["DistillationLoss"]


def test_student_learns_from_the_teacher_alone_when_labels_are_noise(host):
    """With alpha = 1 the labels are ignored: a fresh student trained on shuffled labels still
    classifies digits well, because everything it learns comes from the teacher's logits."""
    import dataclasses

    from autoshrink.config import build_config
    from autoshrink.data import Split
    from autoshrink.task import load_or_train_baseline, load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {"epochs": 12}), host)
    teacher, _ = load_or_train_baseline(task)
    train = task.splits.train
    noisy = Split(train.x, train.y[torch.randperm(len(train), generator=torch.Generator()
                                                  .manual_seed(0))])
    trainer = Trainer(dataclasses.replace(task.splits, train=noisy), task.recipe)
    torch.manual_seed(0)
    student = task.build_model()
    teacher_batches = []
    teacher.register_forward_hook(lambda module, args, out: teacher_batches.append(len(out)))
    # as in a search: the teacher's logits are looked up by the batch's sample positions, so
    # a student that learns from them also shows they belong to the right samples
    pure = DistillationLoss(teacher.eval(), DistillOptions(temperature=2.0, alpha=1.0),
                            trainer.training_outputs)
    trainer.fit(student, epochs=10, lr=0.02, callbacks=[pure])
    assert trainer.accuracy(student, task.splits.val) > 0.8
    assert sum(teacher_batches) == len(train)  # one pass over the split, not one per step
    control = task.build_model()
    trainer.fit(control, epochs=10, lr=0.02)
    assert trainer.accuracy(control, task.splits.val) < 0.4


def test_distillation_is_in_place_before_other_training_techniques_train(host):
    """pyramid and adapnet train inside their own step: distill must register first."""
    from autoshrink.plan import fixed_plan
    from autoshrink.technique import Stage

    techniques = [host.technique(name) for name in ("pyramid", "adapnet", "distill")]
    plan = fixed_plan(techniques[::2], [t.Options() for t in techniques[::2]])
    assert [step.name for step in plan.at(Stage.TRAINING)] == ["distill", "pyramid"]
    assert all(host.technique("distill").order < t.order for t in techniques[:2])


def test_focal_loss_gradient_stays_finite_for_a_certain_prediction():
    """gamma < 1 (the paper's 0.5): x^gamma has an infinite slope at 0, where p_t = 1."""
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    focal_loss(logits, torch.tensor([0, 1]), 0.5).backward()
    assert torch.isfinite(logits.grad).all()


def test_a_copy_of_the_teacher_keeps_its_accuracy_at_a_high_temperature(host):
    """T^2 KL against a confident teacher is far sharper than cross-entropy: unclipped, the
    one-cycle fine-tune of an exact copy (zero loss at the start) blew up within a few epochs."""
    import copy

    from autoshrink.config import build_config
    from autoshrink.task import load_or_train_baseline, load_task
    from autoshrink.train import Trainer

    task = load_task(build_config(None, {}), host)
    teacher, baseline = load_or_train_baseline(task)
    trainer = Trainer(task.splits, task.recipe)
    student = copy.deepcopy(teacher)
    sharp = DistillationLoss(teacher.eval(), DistillOptions(temperature=6.0, alpha=0.8))
    trainer.fit(student, epochs=6, lr=0.02, callbacks=[sharp])
    assert trainer.accuracy(student, task.splits.val) > baseline.val_accuracy - 0.02
