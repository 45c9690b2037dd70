"""Training checkpoints: a training stopped part-way goes on from its file as if never stopped,
a file that does not fit the training is set aside, and a search resumes an interrupted trial's
training instead of starting it over."""

from __future__ import annotations

import logging

import pytest
import torch

from autoshrink.checkpoint import TrainingCheckpoint, checkpoint_path
from autoshrink.config import build_config
from autoshrink.task import load_task
from autoshrink.train import Trainer

EPOCHS = 4


class Interrupted(Exception):
    """Stands in for Ctrl-C part-way through a training."""


@pytest.fixture(scope="module")
def task(host):
    return load_task(build_config(None, {}), host)


def fresh_model(host, seed: int):
    torch.manual_seed(seed)
    return host.model("smallcnn").build(10, 1, 16)


def stop_after(epoch: int):
    def progress(done, epochs, loss):
        if done == epoch:
            raise Interrupted
    return progress


def noting(epochs_run: list[int]):
    """A progress report that notes each epoch trained."""
    return lambda done, epochs, loss: epochs_run.append(done)


def saved_after_two_epochs(host, trainer: Trainer, path) -> TrainingCheckpoint:
    """The checkpoint of a training of EPOCHS epochs interrupted in its third (a checkpoint
    is written after the progress report, so epoch 3's never was)."""
    checkpoint = TrainingCheckpoint(path, every_s=0)
    with pytest.raises(Interrupted):
        trainer.fit(fresh_model(host, 0), epochs=EPOCHS, lr=0.05, checkpoint=checkpoint,
                    progress=stop_after(3))
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 2
    return checkpoint


def test_a_training_stopped_part_way_goes_on_from_its_checkpoint_as_if_never_stopped(
        host, task, tmp_path):
    trainer = Trainer(task.splits, task.recipe)
    whole = fresh_model(host, 0)
    torch.manual_seed(5)
    trainer.fit(whole, epochs=EPOCHS, lr=0.05)

    stopped = fresh_model(host, 0)
    torch.manual_seed(5)
    kept = []
    checkpoint = TrainingCheckpoint(tmp_path / "c.pt", every_s=0, keep=lambda: {"curve": [1, 2]},
                                    restore=lambda curve, done: kept.append((curve, done)))
    with pytest.raises(Interrupted):
        trainer.fit(stopped, epochs=EPOCHS, lr=0.05, checkpoint=checkpoint,
                    progress=stop_after(3))
    # the checkpoint is written after the progress report: epoch 3's state never was
    saved = torch.load(checkpoint.path, weights_only=True)
    assert saved["epoch"] == 2 and saved["seconds"] > 0

    resumed = fresh_model(host, 1)  # other weights: only the file can make it end alike
    torch.manual_seed(99)  # and another generator state, which the file replaces
    epochs_run = []
    trainer.fit(resumed, epochs=EPOCHS, lr=0.05, checkpoint=checkpoint,
                progress=noting(epochs_run))
    assert epochs_run == [3, 4]
    assert kept == [({"curve": [1, 2]}, 2)]
    assert checkpoint.earlier_s == saved["seconds"]  # what the interrupted run had spent
    assert torch.load(checkpoint.path, weights_only=True)["seconds"] > saved["seconds"]
    for (name, expected), actual in zip(whole.state_dict().items(),
                                        resumed.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name


def test_a_checkpoint_of_another_model_is_set_aside(host, task, tmp_path, caplog):
    trainer = Trainer(task.splits, task.recipe)
    checkpoint = saved_after_two_epochs(host, trainer, tmp_path / "c.pt")
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10))
    epochs_run = []
    caplog.set_level(logging.WARNING, logger="autoshrink")
    trainer.fit(other, epochs=EPOCHS, lr=0.05, checkpoint=checkpoint, progress=noting(epochs_run))
    assert "does not fit this training (its model has other layers)" in caplog.text
    assert epochs_run == [1, 2, 3, 4]  # from the start
    saved = torch.load(checkpoint.path, weights_only=True)
    assert saved["model"].keys() == other.state_dict().keys()


def test_a_checkpoint_of_a_longer_training_is_set_aside(host, task, tmp_path, caplog):
    trainer = Trainer(task.splits, task.recipe)
    checkpoint = saved_after_two_epochs(host, trainer, tmp_path / "c.pt")
    caplog.set_level(logging.WARNING, logger="autoshrink")
    epochs_run = []
    trainer.fit(fresh_model(host, 0), epochs=2, lr=0.05, checkpoint=checkpoint,
                progress=noting(epochs_run))
    assert "it was saved by a training of 4 epochs, this one has 2" in caplog.text
    assert epochs_run == [1, 2]


def test_an_unreadable_checkpoint_is_deleted_and_training_starts_over(host, task, tmp_path,
                                                                       caplog):
    path = tmp_path / "c.pt"
    path.write_bytes(b"cut short")
    epochs_run = []
    caplog.set_level(logging.WARNING, logger="autoshrink")
    Trainer(task.splits, task.recipe).fit(
        fresh_model(host, 0), epochs=2, lr=0.05, checkpoint=TrainingCheckpoint(path),
        progress=noting(epochs_run))
    assert epochs_run == [1, 2] and "could not read the training checkpoint" in caplog.text
    assert not path.exists()


def test_a_short_training_writes_no_checkpoint(host, task, tmp_path):
    checkpoint = TrainingCheckpoint(tmp_path / "c.pt")  # the default interval
    Trainer(task.splits, task.recipe).fit(fresh_model(host, 0), epochs=2, lr=0.05,
                                          checkpoint=checkpoint)
    assert not checkpoint.path.exists()


def test_a_trial_and_the_one_queued_in_its_place_share_a_checkpoint(tmp_path):
    params = {"use.ghost": True, "ghost.ratio": 2, "training.length": 0.5}
    same = checkpoint_path(tmp_path, "digits-smallcnn", dict(reversed(params.items())))
    assert checkpoint_path(tmp_path, "digits-smallcnn", params) == same
    assert checkpoint_path(tmp_path, "digits-smallcnn", {**params, "ghost.ratio": 3}) != same
    assert checkpoint_path(tmp_path, "digits-vgg11", params) != same
    assert same.parent == tmp_path / "checkpoints" / "digits-smallcnn"


def test_a_search_goes_on_with_an_interrupted_trials_training(tmp_path, host, monkeypatch,
                                                              caplog):
    """Ctrl-C after epoch 2 of 4: the trial queued again on resume trains epochs 3 and 4 only,
    keeps the early abort's reading of epoch 2, and the run leaves no checkpoint behind."""
    from autoshrink.search import Search

    config = build_config(None, {"n_trials": 1, "out": str(tmp_path), "epochs": 8,
                                 "finetune_epochs": 4,
                                 "start_plans": ("gap-classifier",), "training_lengths": (1.0,)})
    monkeypatch.setattr(TrainingCheckpoint, "due", lambda self: True)
    save = TrainingCheckpoint.save

    def save_then_stop(self, state):
        save(self, state)
        if state["epoch"] == 2 and self.path.is_relative_to(tmp_path):  # not the baseline's
            raise KeyboardInterrupt

    caplog.set_level(logging.INFO, logger="autoshrink")
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(TrainingCheckpoint, "save", save_then_stop)
        Search(config, host).run()
    assert ("trial   0  interrupted; its training is saved after epoch 2, and the same command"
            " goes on from there") in caplog.text
    [saved] = (tmp_path / "checkpoints" / "digits-smallcnn").iterdir()
    state = torch.load(saved, weights_only=True)
    assert state["epoch"] == 2
    torch.save({**state, "seconds": 1000.0}, saved)  # as if the interrupted run had been long

    epochs_run = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, model, **kw: fit(
        self, model, **{**kw, "progress": noting(epochs_run)}))
    study = Search(config, host).run()
    assert "trial   1  goes on after epoch 2 of its training" in caplog.text
    assert epochs_run == [3, 4]
    finished = study.trials[1]
    assert finished.state.name == "COMPLETE"
    assert finished.user_attrs["plan_text"] == "gap-classifier"
    assert [epoch for epoch, _, _ in finished.user_attrs["val_curve"]] == [2, 3]
    assert finished.user_attrs["resumed_after_epoch"] == 2
    assert 1000 < finished.user_attrs["metrics"]["seconds"] < 1100  # the trial's time, all runs
    assert not (tmp_path / "checkpoints").exists()


def test_a_baseline_stopped_part_way_goes_on_in_the_next_run(host, monkeypatch, caplog):
    from autoshrink.task import cache_root, load_or_train_baseline

    # a seed of its own: no other test's cached baseline
    task = load_task(build_config(None, {"epochs": 4, "seed": 4242}), host)
    monkeypatch.setattr(TrainingCheckpoint, "due", lambda self: True)
    save = TrainingCheckpoint.save

    def save_then_stop(self, state):
        save(self, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    caplog.set_level(logging.INFO, logger="autoshrink")
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(TrainingCheckpoint, "save", save_then_stop)
        load_or_train_baseline(task)
    assert "baseline  interrupted; its training is saved after epoch 2" in caplog.text
    folder = cache_root() / "baselines" / task.key()
    state = torch.load(folder / "training.pt", weights_only=True)
    torch.save({**state, "seconds": 1000.0}, folder / "training.pt")  # a long first run
    epochs_run = []
    _, baseline = load_or_train_baseline(task, progress=noting(epochs_run))
    assert "baseline: its training goes on after epoch 2 of 4" in caplog.text
    assert epochs_run == [3, 4] and baseline.val_accuracy > 0.2  # and it learned (10 classes)
    assert 1000 < baseline.train_seconds < 1100  # both runs' training
    # no checkpoint left beside the weights
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "metrics.json", "weights.pt"]
