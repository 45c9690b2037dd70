"""Training checkpoints: a training stopped part-way goes on from its file as if never stopped,
one that ended is taken from its file instead of trained again, a file that does not fit the
training is set aside, and a search resumes an interrupted trial's trainings instead of starting
them over."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

from autoshrink.checkpoint import SAVE_EVERY_S, Checkpoints, TrainingCheckpoint, checkpoint_stem
from autoshrink.config import build_config
from autoshrink.sampler import trial_seed
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


def one_training(stem, every_s: float = 0, **hooks) -> TrainingCheckpoint:
    """The checkpoint of a job's first training, saved after every epoch by default."""
    return Checkpoints("test", stem=stem, every_s=every_s, **hooks).next_training("training")


def saved_after_two_epochs(host, trainer: Trainer, stem) -> TrainingCheckpoint:
    """The checkpoint of a training of EPOCHS epochs interrupted in its third (a checkpoint
    is written after the progress report, so epoch 3's never was)."""
    checkpoint = one_training(stem)
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
    checkpoint = one_training(tmp_path / "c", keep=lambda: {"curve": [1, 2]},
                              restore=kept.append)
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
    assert kept == [{"curve": [1, 2]}] and checkpoint.owner.resumed_epochs == 2
    assert checkpoint.owner.earlier_s == saved["seconds"]  # what the interrupted run had spent
    ended = torch.load(checkpoint.path, weights_only=True)  # its end, saved for what follows
    assert ended["finished"] and ended["epoch"] == EPOCHS and ended["seconds"] > saved["seconds"]
    for (name, expected), actual in zip(whole.state_dict().items(),
                                        resumed.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name


def test_a_checkpoint_of_another_model_is_set_aside(host, task, tmp_path, caplog):
    trainer = Trainer(task.splits, task.recipe)
    checkpoint = saved_after_two_epochs(host, trainer, tmp_path / "c")
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
    checkpoint = saved_after_two_epochs(host, trainer, tmp_path / "c")
    caplog.set_level(logging.WARNING, logger="autoshrink")
    epochs_run = []
    trainer.fit(fresh_model(host, 0), epochs=2, lr=0.05, checkpoint=checkpoint,
                progress=noting(epochs_run))
    assert "it was saved by a training of 4 epochs, this one has 2" in caplog.text
    assert epochs_run == [1, 2]


def test_an_unreadable_checkpoint_is_deleted_and_training_starts_over(host, task, tmp_path,
                                                                       caplog):
    checkpoint = one_training(tmp_path / "c", every_s=3600)
    checkpoint.path.write_bytes(b"cut short")
    epochs_run = []
    caplog.set_level(logging.WARNING, logger="autoshrink")
    Trainer(task.splits, task.recipe).fit(fresh_model(host, 0), epochs=2, lr=0.05,
                                          checkpoint=checkpoint, progress=noting(epochs_run))
    assert epochs_run == [1, 2] and "could not read the training checkpoint" in caplog.text
    assert not checkpoint.path.exists()


def test_a_short_training_writes_no_checkpoint(host, task, tmp_path):
    checkpoint = one_training(tmp_path / "c", every_s=SAVE_EVERY_S)
    Trainer(task.splits, task.recipe).fit(fresh_model(host, 0), epochs=2, lr=0.05,
                                          checkpoint=checkpoint)
    assert not checkpoint.path.exists()


def test_a_training_that_ended_is_taken_from_its_file_instead_of_trained_again(host, task,
                                                                                tmp_path):
    """A fit that keeps its best epoch saves nothing part-way, only its end; the same fit
    on a model of other weights then ends at once with those weights, generator state and
    the kept epoch's accuracy."""
    trainer = Trainer(task.splits, task.recipe)
    first = one_training(tmp_path / "c")
    epochs_run = []
    torch.manual_seed(5)
    trained = trainer.fit(fresh_model(host, 0), epochs=EPOCHS, lr=0.01, constant_lr=True,
                          patience=0, checkpoint=first, progress=noting(epochs_run))
    after, kept = torch.get_rng_state(), trainer.kept_accuracy
    saved = torch.load(first.path, weights_only=True)
    assert saved["finished"] and "optimizer" not in saved  # its end only
    assert saved["epoch"] == epochs_run[-1]

    again = one_training(tmp_path / "c")
    torch.manual_seed(99)
    epochs_again = []
    taken = trainer.fit(fresh_model(host, 1), epochs=EPOCHS, lr=0.01, constant_lr=True,
                        patience=0, checkpoint=again, progress=noting(epochs_again))
    assert epochs_again == [] and again.owner.resumed_epochs == epochs_run[-1]
    assert torch.equal(torch.get_rng_state(), after)  # what follows draws as it would have
    assert kept is not None and trainer.kept_accuracy == kept  # and reads what it measured
    for (name, expected), actual in zip(trained.state_dict().items(),
                                        taken.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name


def test_a_trial_and_the_one_queued_in_its_place_share_a_checkpoint(tmp_path):
    params = {"use.ghost": True, "ghost.ratio": 2, "training.length": 0.5}
    same = checkpoint_stem(tmp_path, "digits-smallcnn", dict(reversed(params.items())))
    assert checkpoint_stem(tmp_path, "digits-smallcnn", params) == same
    assert checkpoint_stem(tmp_path, "digits-smallcnn", {**params, "ghost.ratio": 3}) != same
    assert checkpoint_stem(tmp_path, "digits-vgg11", params) != same
    assert same.parent == tmp_path / "checkpoints" / "digits-smallcnn"


def stop_after_its_second_epoch(config, host, monkeypatch) -> None:
    """Run a search of ``config`` until a trial's training saves after epoch 2 (saves are due
    after every epoch from now on), then stop it as Ctrl-C does."""
    from autoshrink.search import Search

    monkeypatch.setattr(TrainingCheckpoint, "due", lambda self: True)
    save = TrainingCheckpoint.save

    def save_then_stop(self, state):
        save(self, state)
        if state["epoch"] == 2 and self.path.is_relative_to(config.run_dir):  # a trial's
            raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(TrainingCheckpoint, "save", save_then_stop)
        Search(config, host).run()


def test_a_search_goes_on_with_an_interrupted_trials_training(tmp_path, host, monkeypatch,
                                                              caplog):
    """Ctrl-C after epoch 2 of 4: the trial queued again on resume trains epochs 3 and 4 only,
    keeps the early abort's reading of epoch 2, and the run leaves no checkpoint behind."""
    from autoshrink.search import Search

    config = build_config(None, {"n_trials": 1, "out": str(tmp_path), "epochs": 8,
                                 "finetune_epochs": 4,
                                 "start_plans": ("gap-classifier",), "training_lengths": (1.0,)})
    caplog.set_level(logging.INFO, logger="autoshrink")
    stop_after_its_second_epoch(config, host, monkeypatch)
    assert ("trial   0  interrupted; its work is saved after epoch 2 of its fine-tuning, and"
            " the same command goes on from there") in caplog.text
    [saved] = (tmp_path / "checkpoints" / "digits-smallcnn").iterdir()
    state = torch.load(saved, weights_only=True)
    assert state["epoch"] == 2
    torch.save({**state, "seconds": 1000.0}, saved)  # as if the interrupted run had been long

    epochs_run = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, model, **kw: fit(
        self, model, **{**kw, "progress": noting(epochs_run)}))
    study = Search(config, host).run()
    assert ("trial   1  goes on after epoch 2 of 4 of its fine-tuning, where an interrupted run"
            " stopped") in caplog.text
    assert epochs_run == [3, 4]
    finished = study.trials[1]
    assert finished.state.name == "COMPLETE"
    assert finished.user_attrs["plan_text"] == "gap-classifier"
    assert [epoch for epoch, _, _ in finished.user_attrs["val_curve"]] == [2, 3]
    assert finished.user_attrs["resumed_epochs"] == 2
    assert 1000 < finished.user_attrs["metrics"]["seconds"] < 1100  # the trial's time, all runs
    assert not (tmp_path / "checkpoints").exists()


def test_a_trial_interrupted_between_its_pruning_steps_ends_as_if_never_stopped(
        tmp_path, host, monkeypatch, caplog):
    """A pruning trial trains four times: its fine-tuning, then after each of three pruning
    steps. Stopped as its second step's fine-tune ends, the trial queued again takes the first
    three trainings from their files, trains only the last, with the random numbers of the
    run it replaces, and measures what an uninterrupted run of the plan measures."""
    from autoshrink import artifact
    from autoshrink import search as search_module
    from autoshrink.pareto import records_from_study
    from autoshrink.report import write_files
    from autoshrink.search import Search

    def config(out):
        return build_config(None, {
            "n_trials": 1, "out": str(out), "epochs": 8, "finetune_epochs": 2,
            "start_plans": ("gap-classifier + prune-l1(amount=0.2, steps=3)",),
            "training_lengths": (1.0,)})

    monkeypatch.setattr(TrainingCheckpoint, "due", lambda self: True)
    uninterrupted = Search(config(tmp_path / "whole"), host).run().trials[0]
    assert not (tmp_path / "whole" / "checkpoints").exists()

    save = TrainingCheckpoint.save

    def save_then_stop(self, state):
        save(self, state)
        if self.path.name.endswith("-2.pt") and state["finished"]:
            raise KeyboardInterrupt

    seeds = []  # of each trial's random numbers: the rerun draws the first run's
    context = search_module.trial_context
    monkeypatch.setattr(search_module, "trial_context", lambda task, trainer, seed, *args, **kw:
                        seeds.append(seed) or context(task, trainer, seed, *args, **kw))
    caplog.set_level(logging.INFO, logger="autoshrink")
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(TrainingCheckpoint, "save", save_then_stop)
        Search(config(out), host).run()
    assert ("trial   0  interrupted; its work is saved up to the end of its training 3"
            " (prune-l1's fine-tuning after step 2 of 3), and the same command goes on from"
            " there") in caplog.text

    trained = []  # the name of each training an epoch was trained of

    def noting_fit(self, model, *, checkpoint, **kw):
        return fit(self, model, checkpoint=checkpoint, **{
            **kw, "progress": lambda done, epochs, loss: trained.append(checkpoint.name)})

    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", noting_fit)
    search = Search(config(out), host)
    study = search.run()
    for name in ("fine-tuning (2 epochs)",
                 "training 2 (prune-l1's fine-tuning after step 1 of 3, ",
                 "training 3 (prune-l1's fine-tuning after step 2 of 3, "):
        assert f"trial   1  takes its {name}" in caplog.text
    assert set(trained) == {"training 4 (prune-l1's fine-tuning after step 3 of 3)"}
    resumed = study.trials[1]
    assert resumed.state.name == "COMPLETE" and seeds == [trial_seed(0, 0)] * 2
    assert resumed.user_attrs["plan_text"] == uninterrupted.user_attrs["plan_text"]
    assert resumed.user_attrs["resumed_epochs"] >= 4  # 2 + at least 1 per pruning step
    tables = write_files(tmp_path / "tables", records_from_study(study), [], search.baseline, 5.0)
    rows = list(csv.DictReader(tables[0].open()))  # trials.csv
    assert [(row["trial"], row["resumed_epochs"]) for row in rows] == [
        ("1", str(resumed.user_attrs["resumed_epochs"]))]
    assert resumed.values == uninterrupted.values
    assert (resumed.user_attrs["metrics"]["val_accuracy"]
            == uninterrupted.user_attrs["metrics"]["val_accuracy"])
    weights = artifact.load_state_dict(out / "models" / "trial-1.pt")
    expected = artifact.load_state_dict(tmp_path / "whole" / "models" / "trial-0.pt")
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    assert not (out / "checkpoints").exists()


def test_a_rerun_makes_the_model_a_techniques_own_loop_made_and_goes_on_from_its_file(
        tmp_path, host, monkeypatch, caplog):
    """AdapNet changes the model's structure in a training loop of its own, which is not
    checkpointed and runs again on resume (its result depends on the trial's seed). Seeded as
    the run it replaces, the rerun makes the same model, so the fine-tuning after the loop goes
    on from its file instead of being set aside."""
    from autoshrink.search import Search

    config = build_config(None, {"n_trials": 1, "out": str(tmp_path), "epochs": 8,
                                 "finetune_epochs": 4, "start_plans": ("adapnet",),
                                 "training_lengths": (1.0,),
                                 "fixed_options": {"adapnet": {"lsep": 10, "max_periods": 6}}})
    caplog.set_level(logging.INFO, logger="autoshrink")
    stop_after_its_second_epoch(config, host, monkeypatch)
    study = Search(config, host).run()
    assert "does not fit this training" not in caplog.text
    assert "trial   1  goes on after epoch 2 of 4 of its fine-tuning" in caplog.text
    assert study.trials[1].state.name == "COMPLETE"
    assert study.trials[1].user_attrs["plan_text"].startswith("adapnet")


def test_a_baseline_stopped_part_way_goes_on_in_the_next_run(host, monkeypatch, caplog):
    from autoshrink.task import baseline_folder, load_or_train_baseline

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
    assert "baseline  interrupted; its work is saved after epoch 2 of its training" in caplog.text
    folder = baseline_folder(task)
    state = torch.load(folder / "training-0.pt", weights_only=True)
    torch.save({**state, "seconds": 1000.0}, folder / "training-0.pt")  # a long first run
    epochs_run = []
    _, baseline = load_or_train_baseline(task, progress=noting(epochs_run))
    assert "baseline  goes on after epoch 2 of 4 of its training" in caplog.text
    assert epochs_run == [3, 4] and baseline.val_accuracy > 0.2  # and it learned (10 classes)
    assert 1000 < baseline.train_seconds < 1100  # both runs' training
    # no checkpoint left beside the weights
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "metrics.json", "weights.pt"]
