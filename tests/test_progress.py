"""What a search tells the person waiting: --quiet, the default, --verbose, and the progress bar
for baseline training."""

from __future__ import annotations

import io
import itertools
import logging
import re

import pytest

from autoshrink import progress

SEARCH = ("search", "--n-trials", "1", "--epochs", "12", "--finetune-epochs", "2",
          "--techniques", "prune-l1")


@pytest.fixture
def search_output(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path / "cache"))  # trains the baseline

    def run(*flags: str):
        code, out, err = run_cli(*SEARCH, "--out", str(tmp_path / "-".join(flags or ["plain"])),
                                 *flags)
        assert code == 0, err
        return out, err
    yield run
    progress.configure(0)


def test_default_output_has_the_task_baseline_and_one_line_per_trial(search_output):
    out, err = search_output()
    assert "task: smallcnn on digits" in err and "baseline: val acc" in err
    trial_lines = [line for line in err.splitlines() if line.startswith("trial   0  acc")]
    assert len(trial_lines) == 1
    line = trial_lines[0]  # plan, accuracy, drop, budget verdict, reductions, time
    for part in ("% (drop", "params", "MACs", "size", "s  ", "prune-l1"):
        assert part in line
    assert "started:" not in err and "Pareto front: accuracy vs params" in out


def test_quiet_prints_results_only(search_output):
    out, err = search_output("--quiet")
    assert err == "" and "Pareto front: accuracy vs params" in out


def test_verbose_adds_epochs_and_per_trial_detail(search_output):
    _, err = search_output("--verbose")
    assert "baseline epoch 2/12" in err  # every epoch, not only the first and last
    assert "trial   0  started: prune-l1" in err and "trial   0  seconds: total" in err


def test_quiet_and_verbose_together_are_refused(run_cli):
    with pytest.raises(SystemExit) as stopped:
        run_cli("search", "--quiet", "--verbose")
    assert stopped.value.code == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_baseline_shows_a_progress_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    progress.configure(0)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = progress.EpochProgress("baseline")
    for epoch in range(1, 4):
        bar(epoch, 3, 0.5 / epoch)
    assert "baseline" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert "\r" in terminal.getvalue() and "baseline epoch" not in terminal.getvalue()

    log_file = io.StringIO()  # not a terminal: plain lines, first and last epoch, with times
    monkeypatch.setattr("sys.stderr", log_file)
    clock = iter([1000.0, 1090.0, 1180.0, 1270.0])  # made, then each epoch 90 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines = progress.EpochProgress("baseline")
    for epoch in range(1, 4):
        lines(epoch, 3, 0.5)
    assert log_file.getvalue().splitlines() == [
        "  baseline epoch 1/3: loss 0.5000 (1.5 min an epoch, about 3.0 min to go)",
        "  baseline epoch 3/3: loss 0.5000 (4.5 min in all)"]

    log_file.truncate(0), log_file.seek(0)  # a training of seconds gets no forecast
    clock = iter([0.0, 1.5, 3.0, 4.5])
    lines = progress.EpochProgress("baseline")
    for epoch in range(1, 4):
        lines(epoch, 3, 0.5)
    assert log_file.getvalue().splitlines() == ["  baseline epoch 1/3: loss 0.5000",
                                                "  baseline epoch 3/3: loss 0.5000 (4.5 s in all)"]


def test_a_training_that_went_on_from_a_checkpoint_paces_by_the_epochs_it_trained(
        monkeypatch):
    progress.configure(0)
    log_file = io.StringIO()
    monkeypatch.setattr("sys.stderr", log_file)
    clock = iter([0.0, 90.0, 180.0, 270.0, 360.0])  # made; epochs 49-52 each 90 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines = progress.EpochProgress("baseline")
    for epoch in range(49, 53):  # 48 of 52 were done when it went on
        lines(epoch, 52, 0.5)
    assert log_file.getvalue().splitlines() == [
        "  baseline epoch 49/52: loss 0.5000 (1.5 min an epoch, about 4.5 min to go)",
        "  baseline epoch 50/52: loss 0.5000 (1.5 min an epoch, about 3.0 min to go)",
        "  baseline epoch 52/52: loss 0.5000 (6.0 min for the last 4 epochs)"]


def test_configure_twice_keeps_one_handler():
    progress.configure(1)
    progress.configure(-1)
    ours = [h for h in logging.getLogger("autoshrink").handlers
            if type(h).__name__ == "_StderrHandler"]
    assert len(ours) == 1 and logging.getLogger("autoshrink").level == logging.WARNING
    progress.configure(0)


def test_a_long_search_says_how_far_it_is_how_long_the_rest_takes_and_its_best(
        search_output, monkeypatch):
    monkeypatch.setattr("autoshrink.search.PROGRESS_EVERY_S", 0.0)  # a line after every trial
    _, err = search_output("--n-trials", "3", "--n-jobs", "1")
    # a plan sampled again is not trained nor counted: its line repeats the count before it
    lines = list({line.split(" trials")[0]: line for line in err.splitlines()
                  if line.startswith("progress: ")}.values())
    assert [line.split(" trials")[0] for line in lines] == [
        "progress: 1 of 3", "progress: 2 of 3", "progress: 3 of 3"]
    assert all(", about " in line and " to go; " in line for line in lines[:2])
    assert " to go" not in lines[2]
    assert all("best within 5 pp so far: " in line or "none within 5 pp yet" in line
               for line in lines)


def test_the_pace_counts_only_this_run_s_trials():
    # a resumed study: 30 of 40 done, 5 of them in this run's 10 minutes -> 2 min a trial
    assert progress.search_progress(30, 40, 600.0, 5, "none within 5 pp yet") == (
        "progress: 30 of 40 trials done after 10.0 min, about 20.0 min to go;"
        " none within 5 pp yet")
    assert progress.search_progress(2, 40, 30.0, 0, "best") == (
        "progress: 2 of 40 trials done after 30 s; best")  # no pace before a trial ends here
    assert progress.search_progress(10, 40, 300.0, 10, "best", timeout_s=600.0) == (
        "progress: 10 of 40 trials done after 5.0 min, about 15.0 min to go at this pace, but"
        " --timeout stops it in 5.0 min; best")
    assert [progress.duration(s) for s in (0.42, 59, 90, 5400)] == [
        "0.4 s", "59 s", "1.5 min", "1.5 h"]


def test_a_long_trial_says_now_and_then_what_it_trains(monkeypatch, caplog):
    seconds = iter([0.0, 0.0, 50.0, 70.0, 100.0, 150.0, 200.0, 400.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(seconds))
    heartbeat = progress.TrialHeartbeat(7)  # started at 0 s
    caplog.set_level(logging.INFO, logger="autoshrink")
    training = heartbeat.fit("training")  # its training starts at 0 s
    for epoch, loss in zip(range(1, 5), (0.9, 0.7, 0.5, 0.4)):  # epochs end at 50 ... 150 s
        training(epoch, 4, loss)
    with progress.running_step("prune-l1"):  # a technique's own fine-tune, started at 200 s
        pruning = heartbeat.fit("fine-tuning after step 2 of 5")
    pruning(1, 2, 0.3)  # 400 s
    assert [record.getMessage() for record in caplog.records] == [
        # first after a minute, then each time the running time has doubled (140 s, 400 s)
        "trial   7  running for 1.2 min: training, epoch 2/4, loss 0.7000, about 1.2 min to the"
        " end of this training",
        "trial   7  running for 2.5 min: training, epoch 4/4, loss 0.4000",
        "trial   7  running for 6.7 min: prune-l1's fine-tuning after step 2 of 5, epoch 1/2,"
        " loss 0.3000, about 3.3 min to the end of this training"]
    assert {record.levelno for record in caplog.records} == {logging.INFO}  # none under --quiet


def test_a_trial_s_heartbeat_paces_a_resumed_training_by_the_epochs_it_trained(monkeypatch,
                                                                               caplog):
    seconds = iter([0.0, 0.0, 35.0, 70.0])  # heartbeat, fit; epochs 29 and 30 end 35 s apart
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(seconds))
    caplog.set_level(logging.INFO, logger="autoshrink")
    training = progress.TrialHeartbeat(3).fit("training")
    training(29, 60, 0.5), training(30, 60, 0.4)  # 28 of 60 were done when it went on
    assert [record.getMessage() for record in caplog.records] == [
        "trial   3  running for 1.2 min: training, epoch 30/60, loss 0.4000, about 17.5 min to"
        " the end of this training"]


def test_a_technique_s_own_training_loop_keeps_the_heartbeat(monkeypatch, caplog):
    seconds = iter([0.0, 65.0, 100.0, 140.0])  # made; then as the 3rd, 6th and 9th batch is drawn
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(seconds))
    caplog.set_level(logging.INFO, logger="autoshrink")
    heartbeat = progress.TrialHeartbeat(2)
    with progress.running_step("adapnet"):
        drawn = list(heartbeat.batches(iter(range(10)), per_epoch=3))
    assert drawn == list(range(10))  # every batch, in order
    assert [record.getMessage() for record in caplog.records] == [
        "trial   2  running for 1.1 min: adapnet's own training loop, epoch 1",
        "trial   2  running for 2.3 min: adapnet's own training loop, epoch 3"]


def test_a_trial_of_seconds_prints_no_heartbeat(monkeypatch, caplog):
    seconds = iter([0.0, 0.0, 30.0, 59.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(seconds))
    caplog.set_level(logging.INFO, logger="autoshrink")
    training = progress.TrialHeartbeat(0).fit("training")
    training(1, 2, 0.5), training(2, 2, 0.4)
    assert caplog.records == []


def test_a_search_trial_reports_the_technique_it_waits_on(search_output, monkeypatch):
    monkeypatch.setattr(progress, "FIRST_HEARTBEAT_S", 0.0)  # as if every trial were long
    _, err = search_output("--techniques", "gap-classifier,prune-l1", "--training-lengths", "1",
                           "--start-plan", "gap-classifier + prune-l1")
    beats = [line.split(": ")[1] for line in err.splitlines()
             if line.startswith("trial   0  running for")]
    # the engine's fine-tune of the rewritten model, then prune-l1's own fine-tunes, one a step
    # (the lines come at doubling intervals: on a loaded machine the first fine-tune may get two)
    assert beats[0].startswith("fine-tuning, epoch 1/2"), err
    prune_l1 = list(itertools.dropwhile(lambda beat: beat.startswith("fine-tuning, epoch"),
                                        beats))
    assert prune_l1 and all(re.match(r"prune-l1's fine-tuning after step [123] of 3, epoch",
                                     beat) for beat in prune_l1), err


def test_a_search_trial_reports_a_technique_s_own_training_loop(search_output, monkeypatch):
    monkeypatch.setattr(progress, "FIRST_HEARTBEAT_S", 0.0)
    _, err = search_output("--techniques", "adapnet", "--set", "adapnet:max_periods=2",
                           "--start-plan", "adapnet")
    assert "trial   0  running for" in err and ": adapnet's own training loop, epoch 1" in err, err


@pytest.mark.parametrize("technique, options, trainings", [
    ("pyramid", "stop_at_target=false,block_epochs=1",
     ["pyramid's training of block 1 of 2", "pyramid's training of block 2 of 2"]),
    ("adapnet", "startup_epochs=1,max_periods=1", ["adapnet's start-up training"])])
def test_a_search_trial_names_each_training_a_technique_runs(search_output, monkeypatch,
                                                             technique, options, trainings):
    """Every training of the trial, in order, by the name its heartbeat lines give it (which
    lines come depends on the clock: the names are recorded where they are made instead)."""
    named, fit = [], progress.TrialHeartbeat.fit

    def recording_fit(self, label):
        named.append(progress.training_name(label, progress.current_step()))
        return fit(self, label)
    monkeypatch.setattr(progress.TrialHeartbeat, "fit", recording_fit)
    held = [flag for option in options.split(",") for flag in ("--set", f"{technique}:{option}")]
    search_output("--techniques", technique, *held, "--start-plan", technique,
                  "--no-early-abort")
    assert named == [*trainings, "fine-tuning"]  # then the engine's, of the model it made
