"""Files are data: tampered model files are refused unexecuted; plugins load only when named."""

from __future__ import annotations

import pathlib
import pickle

import optuna
import pytest
import torch

from autoshrink import artifact
from autoshrink.config import build_config
from autoshrink.plugins import PluginHost
from autoshrink.task import baseline_folder, load_or_train_baseline, load_task
from tests.conftest import FAST


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def tamper(path: pathlib.Path, marker: pathlib.Path) -> None:
    torch.save({"format": artifact.FORMAT, "state": {"weight": Payload(marker)}}, path)


def test_a_tampered_artifact_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    tamper(tmp_path / "model.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        artifact.load_state_dict(tmp_path / "model.pt")
    assert not marker.exists()


def test_report_skips_a_tampered_trial_file(tmp_path, run_cli):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    code, _, err = run_cli("search", "--n-trials", "1", "--out", str(out), "--quiet",
                           "--techniques", "prune-l1", "--max-drop", "100", *FAST)
    assert code == 0, err
    tamper(out / "models" / "trial-0.pt", marker)
    study = optuna.load_study(study_name="digits-smallcnn", storage=f"sqlite:///{out}/study.db")
    study.set_user_attr("test_accuracy", {})  # make report measure the member again
    code, _, err = run_cli("report", "--out", str(out), "--max-drop", "100")
    assert code == 0, err
    assert "no test accuracy for trial 0: its model file could not be loaded" in err
    assert not marker.exists()


@pytest.mark.usefixtures("untrained_baselines")
def test_a_tampered_baseline_cache_is_retrained_not_run(tmp_path, host, monkeypatch):
    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(tmp_path / "cache"))
    task = load_task(build_config(None, {"epochs": 2}), host)
    load_or_train_baseline(task)
    marker = tmp_path / "code-ran"
    tamper(baseline_folder(task) / "weights.pt", marker)
    epochs = []
    load_or_train_baseline(task, progress=lambda epoch, total, loss: epochs.append(epoch))
    assert epochs == [1, 2] and not marker.exists()


def test_plugins_outside_entry_points_load_only_when_named(run_cli):
    assert "fault-raises" not in PluginHost.discover().techniques
    code, out, _ = run_cli("plugins")
    assert code == 0 and "fault-raises" not in out
    code, out, _ = run_cli("plugins", "--plugin", "tests/faulty_plugin.py")
    assert code == 0 and "fault-raises" in out
