"""``autoshrink export``: deployable files that reproduce the trial's model, and model cards."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import autoshrink
from autoshrink.config import build_config
from autoshrink.task import load_task
from tests.conftest import FAST


@pytest.fixture(scope="module")
def study_dir(small_study):
    return small_study


@pytest.fixture(scope="module")
def validation_images(host):
    return load_task(build_config(None, {"epochs": 12}), host).splits.val.x[:16]


def _export(run_cli, study_dir, trial, fmt):
    code, out, err = run_cli("export", "--out", str(study_dir), "--trial", str(trial),
                             "--format", fmt, "--json")
    assert code == 0, err
    return json.loads(out)


def _trial_model(host, study_dir, trial):
    from autoshrink.pareto import records_from_study
    from autoshrink.search import rebuild_trial_model
    from autoshrink.storage import open_storage

    study = __import__("optuna").load_study(
        study_name="digits-smallcnn", storage=open_storage(f"sqlite:///{study_dir}/study.db"))
    record = next(r for r in records_from_study(study) if r.number == trial)
    config = build_config(None, {"epochs": 12, "finetune_epochs": 1})
    return rebuild_trial_model(record, load_task(config, host), host, study_dir)


@pytest.mark.parametrize("trial", [0, 1])
def test_pt_export_loads_in_one_line_and_is_the_measured_artifact(
        run_cli, host, study_dir, validation_images, trial):
    card = _export(run_cli, study_dir, trial, "pt")
    path = study_dir / "export" / card["file"]
    model = autoshrink.load_model(path)
    expected = _trial_model(host, study_dir, trial)(validation_images)
    assert torch.allclose(model(validation_images), expected, atol=1e-5)
    # the packed file is the trial's artifact plus a few hundred bytes of description
    assert card["bytes"] - card["metrics"]["artifact_bytes"] < 2048


@pytest.mark.parametrize("trial", [0, 1])
def test_torchscript_export_runs_without_autoshrink(run_cli, host, study_dir,
                                                     validation_images, trial, recwarn):
    card = _export(run_cli, study_dir, trial, "torchscript")
    assert not recwarn.list, [str(w.message) for w in recwarn]  # the command prints none
    path = study_dir / "export" / card["file"]
    torch.save(validation_images, study_dir / "images.pt")
    script = ("import sys, torch; model = torch.jit.load(sys.argv[1]);"
              " out = model(torch.load(sys.argv[2])); torch.save(out, sys.argv[3]);"
              " assert not any(m.startswith('autoshrink') for m in sys.modules)")
    subprocess.run([sys.executable, "-I", "-c", script, str(path),
                    str(study_dir / "images.pt"), str(study_dir / "out.pt")], check=True)
    expected = _trial_model(host, study_dir, trial)(validation_images)
    assert torch.allclose(torch.load(study_dir / "out.pt"), expected, atol=1e-4)


def test_onnx_export_matches_in_onnxruntime(run_cli, host, study_dir, validation_images):
    import onnxruntime

    card = _export(run_cli, study_dir, 0, "onnx")
    session = onnxruntime.InferenceSession(str(study_dir / "export" / card["file"]))
    logits = session.run(None, {"images": validation_images.numpy()})[0]  # batch of 16: dynamic
    expected = _trial_model(host, study_dir, 0)(validation_images).detach().numpy()
    assert np.abs(logits - expected).max() < 1e-3


def test_int8_model_exports_to_onnx_with_int8_weights_and_its_accuracy(
        run_cli, host, study_dir, validation_images):
    import onnx
    import onnxruntime
    import torch.ao.nn.quantized as nnq

    card = _export(run_cli, study_dir, 1, "onnx")
    path = study_dir / "export" / card["file"]
    graph = onnx.load(str(path)).graph
    initializers = {i.name: i.data_type for i in graph.initializer}
    producers = {n.output[0]: n for n in graph.node}
    model = _trial_model(host, study_dir, 1)
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    int8_layers = (nnq.Conv2d, nnq.Linear)  # with their fused-ReLU subclasses
    assert len(layers) == sum(isinstance(m, int8_layers) for m in model.modules()) == 6
    for layer in layers:  # each reads its weight from an int8 initializer
        weight = producers[layer.input[1]]
        assert weight.op_type == "DequantizeLinear"
        assert initializers[weight.input[0]] == onnx.TensorProto.INT8
    assert all(not n.metadata_props for n in graph.node)  # no PyTorch origins: a small file
    assert card["bytes"] < 2.5 * card["metrics"]["artifact_bytes"]
    # ONNX Runtime runs it on its int8 kernels and makes the model's predictions
    session = onnxruntime.InferenceSession(str(path))
    predicted = session.run(None, {"images": validation_images.numpy()})[0].argmax(1)
    expected = model(validation_images).argmax(1).numpy()
    assert (predicted == expected).mean() >= 14 / 16
    checked = card["checked"]
    assert checked.startswith("ONNX Runtime's int8 kernels score") and "validation" in checked
    metrics = card["metrics"]
    assert metrics["file_runtime"] == "ONNX Runtime" and metrics["file_latency_ms"] > 0
    # the model's own accuracy, measured again on the same images
    assert f"{card['metrics']['val_accuracy'] * 100:.2f} %" in checked


@pytest.mark.parametrize("wrong, kept", [(2, True), (40, False)])
def test_int8_onnx_file_that_loses_accuracy_one_sidedly_is_not_kept(
        run_cli, host, study_dir, monkeypatch, wrong, kept):
    """Rounding flips a few near-ties either way; a file that gets many more images wrong
    than it gets newly right (a faulty kernel) is refused, and an earlier export it would
    have replaced stays. The file itself may differ from the model on a near-tie or two, so
    the counts it reports are the images made wrong here plus those."""
    import autoshrink.export as export

    def written_with_errors(*args):
        def run(images):
            logits = loaded(images)
            labels = validation_labels[:len(images)]
            right = (logits.argmax(1) == labels).nonzero().flatten()[:wrong]
            logits[right] = torch.nn.functional.one_hot((labels[right] + 1) % 10, 10).float()
            return logits

        loaded = write_and_load(*args)
        return run

    validation_labels = load_task(build_config(None, {"epochs": 12}), host).splits.val.y
    write_and_load = export._write_and_load
    monkeypatch.setattr(export, "_write_and_load", written_with_errors)
    target = study_dir / "export" / "faulty.onnx"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"an earlier export")
    code, _, err = run_cli("export", "--out", str(study_dir), "--trial", "1", "--format",
                           "onnx", "--to", str(target))
    assert (code == 0) is kept
    assert (target.read_bytes() == b"an earlier export") is not kept  # left alone if refused
    assert [p.name for p in target.parent.iterdir() if "partial" in p.name] == []
    if not kept:
        lost, gained = map(int, re.search(r"\((\d+) images it gets right are now wrong,"
                                          r" (\d+) the other way\)", err).groups())
        assert wrong <= lost <= wrong + 3 and gained <= 3
        assert "so the file was not kept: use --format pt or torchscript" in err


def test_model_card_states_plan_metrics_data_and_baseline(run_cli, study_dir):
    card = _export(run_cli, study_dir, 0, "pt")
    assert run_cli("report", "--out", str(study_dir), "--quiet")[0] == 0  # writes trials.csv
    trials = {row.split(",")[0]: row for row in (study_dir / "trials.csv").read_text()
              .splitlines()[1:]}
    assert "prune-filters" in card["techniques"] and card["plan"][0][0] == "prune-filters"
    assert card["metrics"]["nonzero_params"] < card["baseline"]["nonzero_params"]
    assert card["baseline"]["params_x"] == pytest.approx(
        card["baseline"]["nonzero_params"] / card["metrics"]["nonzero_params"], abs=0.01)
    assert str(card["metrics"]["artifact_bytes"]) in trials["0"]
    assert card["data"]["train"] + card["data"]["validation"] + card["data"]["test"] == 1797
    markdown = (study_dir / "export" / "trial-0.pt.card.md").read_text()
    assert "autoshrink.load_model('trial-0.pt')" in markdown and "| MACs |" in markdown
    assert "checked: outputs within 0.001 of the model's on 8 validation images" in markdown
    assert card["metrics"]["file_runtime"] == "PyTorch" and card["metrics"]["file_latency_ms"] > 0
    assert re.search(r"\| CPU latency \(batch 1\), this file in PyTorch \| [\d.]+ ms \|"
                     r" [\d.]+ ms \| [\d.]+x (faster|slower) \|", markdown)
    assert card["baseline"]["file_latency_ms"] > 0  # the uncompressed architecture, same runtime
    assert card["baseline"]["file_latency_x"] == pytest.approx(
        card["baseline"]["file_latency_ms"] / card["metrics"]["file_latency_ms"],
        rel=0.01, abs=1e-3)


def test_export_to_a_folder_or_a_file_whose_ending_names_the_format(run_cli, study_dir):
    folder = study_dir / "deploy" / "phone"
    code, out, err = run_cli("export", "--out", str(study_dir), "--trial", "0", "--format",
                             "torchscript", "--to", f"{folder}/")
    assert code == 0, err
    assert (folder / "trial-0.torchscript.pt").is_file()
    assert (folder / "trial-0.torchscript.pt.card.md").is_file()
    assert f"wrote {folder}/trial-0" in out
    code, _, err = run_cli("export", "--out", str(study_dir), "--trial", "0", "--to",
                           str(folder / "model.v2.onnx"), "--json")
    assert code == 0, err
    assert json.loads((folder / "model.v2.onnx.card.json").read_text())["format"] == "onnx"
    code, _, err = run_cli("export", "--out", str(study_dir), "--trial", "0", "--to",
                           f"{folder}/")  # the same trial as pt, into the same folder
    assert code == 0, err
    assert json.loads((folder / "trial-0.pt.card.json").read_text())["format"] == "pt"
    cards = {path.name: json.loads(path.read_text())["format"]
             for path in folder.glob("*.card.json")}  # each format keeps its own card
    assert cards == {"trial-0.torchscript.pt.card.json": "torchscript",
                     "model.v2.onnx.card.json": "onnx", "trial-0.pt.card.json": "pt"}


def test_export_file_ending_that_names_another_format_is_refused(run_cli, study_dir):
    target = study_dir / "deploy" / "model.onnx"
    code, _, err = run_cli("export", "--out", str(study_dir), "--trial", "0", "--format",
                           "pt", "--to", str(target))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--to {target} ends in .onnx (format onnx) but --format is pt" in err
    assert "end the file name in .pt or leave --format out" in err
    assert not target.exists()


def test_unknown_trial_is_refused_in_one_line(run_cli, study_dir):
    code, _, err = run_cli("export", "--out", str(study_dir), "--trial", "99")
    assert code == 2
    assert "trial 99" in err and "completed trials: 0, 1" in err


def test_export_to_a_place_that_cannot_be_written_is_refused_in_one_line(run_cli, study_dir):
    blocker = study_dir / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli("export", "--out", str(study_dir), "--trial", "0", "--format", "onnx",
                           "--to", str(blocker / "model.onnx"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    # it read "this model cannot be exported to ONNX (FileNotFoundError: ...)"
    assert f"cannot write {blocker / 'model.onnx'} (" in err
    assert "pass --to a file or folder you can write to" in err


def test_a_study_kept_in_another_storage_is_reported_and_exported_from_its_run_folder(
        run_cli, tmp_path, monkeypatch):
    """A search given --storage and --out: `report` and `export` given the same --storage find
    the run folder its search wrote to (they used runs/<study name>, where no model was), and
    the run folder alone says which flag it lacks."""
    monkeypatch.chdir(tmp_path)
    storage, out = "sqlite:///studies.db", "runs/mine"
    code, _, err = run_cli("search", "--n-trials", "1", *FAST, "--techniques", "prune-l1",
                           "--storage", storage, "--out", out, "--quiet")
    assert code == 0, err
    (tmp_path / out / "trials.csv").unlink()
    assert run_cli("report", "--storage", storage, "--quiet")[0] == 0
    assert (tmp_path / out / "trials.csv").is_file()
    code, _, err = run_cli("export", "--storage", storage, "--trial", "0")
    assert code == 0, err
    assert (tmp_path / out / "export" / "trial-0.pt").is_file()
    assert not (tmp_path / "runs" / "digits-smallcnn").exists()
    code, _, err = run_cli("report", "--out", out)
    assert code == 2
    assert err.strip() == ("autoshrink: error: 'runs/mine' holds the files of study"
                           " 'digits-smallcnn', whose storage is elsewhere (its search was given"
                           " --storage); pass the same --storage")


def test_export_smallest_takes_the_most_reduced_trial_within_the_budget(run_cli, study_dir,
                                                                        tmp_path):
    from autoshrink.pareto import records_from_study
    from autoshrink.storage import open_storage

    study = __import__("optuna").load_study(
        study_name="digits-smallcnn", storage=open_storage(f"sqlite:///{study_dir}/study.db"))
    records = records_from_study(study)
    fewest = min(records, key=lambda r: (r.nonzero_params, -r.val_accuracy)).number
    code, out, err = run_cli("export", "--out", str(study_dir), "--trial", "smallest",
                             "--max-drop", "100", "--to", f"{tmp_path}/", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["trial"] == fewest and card["budget_pp"] == 100
    assert (tmp_path / f"trial-{fewest}.pt").is_file()
    assert err.startswith(f"trial {fewest}: the fewest params within 100 pp (")
    code, _, err = run_cli("export", "--out", str(study_dir), "--trial", "1", "--max-drop", "2")
    assert code == 2 and "use it with --trial smallest, not --trial 1" in err
