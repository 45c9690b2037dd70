"""Bad input: one line naming the bad value and the fix, exit code 2, an existing study untouched.

Every case runs against a copy of a real finished study, so "untouched" is checked byte for byte.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAST


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def idx_folder(folder: Path, *, train_labels: int = 60, corrupt: bool = False) -> Path:
    """A small, well-formed Fashion-MNIST-shaped folder (or one with garbage files)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 255, (60, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, train_labels),
              "t10k-images-idx3-ubyte": rng.integers(0, 255, (20, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 20)}
    for name, array in arrays.items():
        if corrupt:
            (folder / f"{name}.gz").write_bytes(rng.bytes(300))
        else:
            write_idx(folder / f"{name}.gz", array)
    return folder


def preset(folder: Path, text: str) -> str:
    path = folder / "bad.toml"
    path.write_text(text)
    return str(path)


def corrupt_image_folder(folder: Path) -> str:
    for label in ("cat", "dog"):
        (folder / "images" / label).mkdir(parents=True)
        (folder / "images" / label / "broken.png").write_bytes(b"\x89PNG not really")
    return f"imagefolder:{folder / 'images'}"


def folder_with_an_empty_class(folder: Path) -> str:
    (folder / "images" / "cat").mkdir(parents=True)
    (folder / "images" / "dog").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
            folder / "images" / "cat" / f"{i}.png")
    return f"imagefolder:{folder / 'images'}"


# (arguments, a text the single error line must contain); ``d`` is a scratch folder
SEARCH = [
    (lambda d: ["--model", "alexnet"], "alexnet"),
    (lambda d: ["--model", "no_such_module:build"], "no_such_module"),
    (lambda d: ["--model", "tests.user_models:returns_weights"], "returns_weights"),
    (lambda d: ["--model", "tests.user_models:built_for_28x28"], "cannot take 3x8x8 inputs"),
    (lambda d: ["--model", "tests.user_models:ignores_num_classes"], "returns (2, 1000)"),
    (lambda d: ["--model", "tests.user_models:with_auxiliary_classifier"],
     "returns tuple in training"),
    (lambda d: ["--model", "tests.user_models:needs_a_width"],  # these were tracebacks
     "missing 1 required positional argument: 'width', called as needs_a_width(num_classes=10)"),
    (lambda d: ["--model", "tests.user_models:fails_to_build"],
     "raised ValueError: Invalid padding string 'sideways'"),
    (lambda d: ["--dataset", "imagenet"], "imagenet"),
    (lambda d: ["--start-plan", "prune-l1(amount=0.9)"], "prune-l1.amount=0.9 is outside"),
    (lambda d: ["--start-plan", "ghots + prune-l1"], "unknown technique 'ghots'"),
    (lambda d: ["--techniques", "magic-prune"], "magic-prune"),
    (lambda d: ["--exclude", "magic-prune"], "magic-prune"),
    (lambda d: ["--techniques", ","], "--techniques ',' names nothing"),  # read as every one
    (lambda d: ["--techniques", "ghost,se", "--exclude", "se,ghost"],  # searched the baseline
     "--techniques ghost,se with --exclude se,ghost leaves no technique to search"),
    (lambda d: ["--objectives", "latency"], "latency"),
    (lambda d: ["--max-drop", "-1"], "-1"),
    (lambda d: ["--max-drop", "101"], "101"),
    (lambda d: ["--seed", "-1"], "--seed -1 is outside 0..2,147,483,647"),  # blamed the test split
    (lambda d: ["--n-trials", "0"], "--n-trials 0"),
    (lambda d: ["--proxy-max-drop", "1"], "--proxy-data SHARE"),
    (lambda d: ["--proxy-data", "1"],  # searched, then trained every candidate again
     "--proxy-data 1 makes the proxy the full task"),
    (lambda d: ["--proxy-data", "0.5", "--proxy-max-drop", "-2"], "--proxy-max-drop -2"),
    (lambda d: ["--n-jobs", "0"], "--n-jobs 0"),
    (lambda d: ["--input-size", "20000"], "--input-size 20000: the 1,797 images would take"),
    (lambda d: ["--input-size", "8"], "--input-size 8 is too small for model 'smallcnn'; use at"
                                      " least 16x16"),
    (lambda d: ["--input-size", "0"], "--input-size 0 must be a positive number of pixels"),
    (lambda d: ["--training-lengths", "0.5,half"], "'half'"),
    (lambda d: ["--training-lengths", "0.5,1.5"], "value 1.5"),
    (lambda d: ["--study", preset(d, "[search]\ntraining_lengths = [0.5, 0.5]\n")],
     "0.5,0.5 names one twice"),
    (lambda d: ["--study", "no-such-preset"], "no-such-preset"),
    (lambda d: ["--study", preset(d, "[search\nmodel = ")], "not valid TOML"),
    (lambda d: ["--study", preset(d, '[search]\nmodle = "vgg11"\n')], "modle"),
    (lambda d: ["--study", preset(d, '[serach]\nmodel = "vgg11"\n')], "serach"),
    (lambda d: ["--study", preset(d, '[search]\nmax_drop = "five"\n')], "max_drop = 'five'"),
    (lambda d: ["--study", preset(d, "[recipe]\nepochs = 2.5\n")], "epochs = 2.5"),
    (lambda d: ["--finetune-epochs", "0"],
     "finetune_epochs 0 (--finetune-epochs or [recipe] finetune_epochs) must be at least 1"),
    (lambda d: ["--study", preset(d, "[recipe]\nbatch_size = 0\n")],
     "batch_size 0 ([recipe] batch_size) must be at least 1"),
    (lambda d: ["--study", preset(d, '[recipe]\nprecision = "fp16"\n')], "precision 'fp16'"),
    (lambda d: ["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent"),
    (lambda d: ["--dataset", "fashion-mnist", "--data-dir",
                str(idx_folder(d / "garbage", corrupt=True))], "not a readable IDX file"),
    (lambda d: ["--dataset", "fashion-mnist", "--data-dir",
                str(idx_folder(d / "short", train_labels=50))], "60 train images but 50 labels"),
    (lambda d: ["--dataset", corrupt_image_folder(d)],
     "could be decoded; check that they are images in a format PIL reads"),
    (lambda d: ["--dataset", f"imagefolder:{d / 'photoz'}"],
     "photoz' does not exist; give an existing folder after 'imagefolder:'"),
    (lambda d: ["--dataset", "fashion-mnist", "--data-dir", preset(d, "[search]\n")],
     "bad.toml' is a file, not a folder; pass an existing folder with --data-dir"),
    (lambda d: ["--dataset", folder_with_an_empty_class(d)],
     "classes dog; remove the folders without images or add some"),
    (lambda d: ["--storage", "nonsense://somewhere"], "nonsense://somewhere"),
    (lambda d: ["--storage", "sqlite:////nonexistent/dir/study.db"], "/nonexistent/dir"),
    (lambda d: ["--storage", "postgresql+psycopg2://nobody@127.0.0.1:9/study"], "127.0.0.1:9"),
    (lambda d: ["--storage", "mysql://nobody@127.0.0.1:9/study"], "MySQLdb"),
    (lambda d: ["--plugin", "no_such_plugin_module"], "no_such_plugin_module"),
    (lambda d: ["--plugin", str(d / "missing.py")], "missing.py"),
    # the existing study in the run folder is digits-smallcnn: smallcnn on digits, FAST recipe
    (lambda d: ["--model", "tests.user_models:tiny_rgb_net"], "already holds study"),
    (lambda d: ["--study-name", "digits-smallcnn", "--model", "tests.user_models:tiny_rgb_net"],
     "model 'tests.user_models:tiny_rgb_net' instead of 'smallcnn'"),
    (lambda d: ["--study-name", "digits-smallcnn", "--dataset", "fashion-mnist", "--data-dir",
                str(idx_folder(d / "fmnist"))], "dataset 'fashion-mnist' instead of 'digits'"),
    (lambda d: ["--epochs", "3"], "this search has --epochs 3 instead of 12"),  # it read
    (lambda d: ["--precision", "float32"],  # "other data, recipe or seed"
     "this search has --precision 'float32' instead of 'auto'"),
    (lambda d: ["--seed", "4", "--input-size", "20"],
     "--seed 4 instead of 0, --input-size 20 instead of the default"),
    (lambda d: ["--training-lengths", "0.5,1"], "created with --training-lengths 0.25,0.5;"),
    (lambda d: ["--max-drop", "2"], "created with --max-drop 5; search it at that budget, see"
                                    " its trials at 2 pp with `autoshrink report --max-drop 2`"),
]
OTHER = [
    (["inspect", "--apply", "prune-l1:amount=2"], "amount=2"),
    (["inspect", "--apply", "prune-l1:speed=3"], "speed"),
    (["inspect", "--input-shape", "32x32"], "32x32"),
    (["inspect", "--input-shape", "1x20x36"], "use e.g. 1x36x36"),
    (["inspect", "--input-shape", "1x8x8"], "too small for model 'smallcnn'; use at least 16x16"),
    (["inspect", "--model", "tests.user_models:built_for_28x28", "--input-shape", "3x32x32"],
     "with --input-shape"),
    (["inspect", "--model", "resnet18", "--input-shape", "3x32x32", "--apply",
      "gap-classifier"], "gap-classifier"),
    (["inspect", "--input-shape", "1x16x16", "--apply", "ghost:ratio=3", "--apply",
      "prune-filters"], "prune-filters does not apply after earlier steps"),
    (["inspect", "--model", "tests.user_models:tiny_rgb_net", "--input-shape", "3x8x8",
      "--apply", "dwconv"],  # it said "after earlier steps" of a plan with no earlier step
     "tiny_rgb_net: dwconv does not apply: has no ordinary k x k convolution"),
    (["inspect", "--model", "tests.user_models:tiny_rgb_net", "--input-shape", "3x8x8",
      "--apply", "prune-filters"], "prune-filters does not apply: has fewer than two"),
    (["inspect", "--apply", "ghost:ratio=3,se"], "give each technique with options its own"),
    (["inspect", "--apply", "ghost", "--apply", "ghost:ratio=3"], "'ghost' is given twice"),
    (["inspect", "--apply", "ghost(ratio=3) + se"],
     "--apply 'ghost(ratio=3) + se' is written as reports print plans; pass it as --plan"),
    (["inspect", "--plan", "ghost(ratio=3) + nonsense"],
     "--plan 'ghost(ratio=3) + nonsense': unknown technique 'nonsense'"),
    (["inspect", "--plan", "ghost", "--apply", "ghost:ratio=3"], "'ghost' is given twice"),
    (["plugins", "--plugin", "no_such_plugin_module"], "no_such_plugin_module"),
]


@pytest.fixture(scope="module")
def existing_study(tmp_path_factory) -> Path:
    from autoshrink.cli import main

    out = tmp_path_factory.mktemp("existing") / "run"
    assert main(["search", "--n-trials", "1", "--out", str(out), "--quiet", *FAST,
                 "--techniques", "prune-l1"]) == 0
    return out


def assert_one_clear_line(code: int, err: str, quoted: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autoshrink: error:") and quoted in lines[0], lines[0]


@pytest.mark.parametrize("make_args, quoted", SEARCH,
                         ids=[q for _, q in SEARCH])
def test_bad_search_input_leaves_the_study_untouched(run_cli, tmp_path, existing_study,
                                                     make_args, quoted):
    run = tmp_path / "run"
    shutil.copytree(existing_study, run)
    before = (run / "study.db").read_bytes()
    code, _, err = run_cli("search", "--out", str(run), "--n-trials", "2", *FAST,
                           *make_args(tmp_path))
    assert_one_clear_line(code, err, quoted)
    assert "baseline epoch" not in err  # refused before training anything
    assert (run / "study.db").read_bytes() == before


def test_unwritable_output_folder(run_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli("search", "--out", str(blocker / "run"), *FAST)
    assert_one_clear_line(code, err, str(blocker / "run"))


def test_a_cache_folder_that_cannot_be_written(run_cli, tmp_path, existing_study,
                                              monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AUTOSHRINK_CACHE_DIR", str(blocker))
    run = tmp_path / "run"
    shutil.copytree(existing_study, run)
    before = (run / "study.db").read_bytes()
    code, _, err = run_cli("search", "--out", str(run), "--n-trials", "2", *FAST)
    assert_one_clear_line(code, err, f"cache folder {str(blocker)!r} cannot be written (File"
                                     " exists); set AUTOSHRINK_CACHE_DIR to a folder you can"
                                     " write to")
    assert (run / "study.db").read_bytes() == before


def test_an_output_folder_that_is_a_file(run_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli("search", "--out", str(blocker), *FAST)
    assert_one_clear_line(code, err, f"--out {str(blocker)!r} is a file, not a folder")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("argv, quoted", OTHER, ids=[" ".join(a) for a, _ in OTHER])
def test_bad_input_to_other_verbs(run_cli, argv, quoted):
    code, _, err = run_cli(*argv)
    assert_one_clear_line(code, err, quoted)


def test_report_without_a_study(run_cli, tmp_path):
    code, _, err = run_cli("report", "--out", str(tmp_path / "nothing"))
    assert_one_clear_line(code, err, "autoshrink search")


def test_report_with_an_unknown_study_name(run_cli, tmp_path, existing_study):
    code, _, err = run_cli("report", "--out", str(existing_study), "--study-name", "nope")
    assert_one_clear_line(code, err, "nope")


def test_a_run_folder_with_one_study_needs_no_task_flags(run_cli, tmp_path):
    """After ``search --model X --out F``, ``export --out F`` finds the study without
    repeating ``--model``; a task flag that names another study is refused, naming the one
    the folder holds."""
    out = str(tmp_path / "run")
    assert run_cli("search", "--n-trials", "1", "--out", out, "--study-name", "mine",
                   "--quiet", *FAST, "--techniques", "prune-l1")[0] == 0
    code, _, err = run_cli("export", "--out", out, "--trial", "0", "--quiet")
    assert code == 0 and (tmp_path / "run" / "export" / "trial-0.pt").exists(), err
    code, _, err = run_cli("report", "--out", out, "--model", "vgg11")
    assert_one_clear_line(code, err, "'digits-vgg11' is not in")
    assert "which holds 'mine'" in err


def test_help_and_refused_settings_answer_without_loading_torch():
    """The parser and the settings' checks load none of the libraries that train (seconds of
    start-up, see autoshrink.cli); run in a fresh interpreter, as the command runs."""
    script = """
import contextlib, io, sys
from autoshrink.cli import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    main(["search", "--help"])
code = main(["search", "--max-drop", "500"])
heavy = {"torch", "torchvision", "sklearn", "optuna", "pandas"} & set(sys.modules)
print(code, *sorted(heavy))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["2"], result.stdout
    assert_one_clear_line(2, result.stderr, "--max-drop 500")


def test_a_name_typed_wrong_is_refused_without_the_data_and_report_libraries():
    """Checking a model's name needs the plugins (torch, torchvision), not scikit-learn, SciPy,
    pandas or matplotlib: those add about 1.5 s of imports before the error line."""
    script = """
import sys
from autoshrink.cli import main
code = main(["search", "--model", "nope"])
heavy = {"sklearn", "scipy", "pandas", "matplotlib"} & set(sys.modules)
print(code, *sorted(heavy))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["2"], result.stdout
    assert_one_clear_line(2, result.stderr, "unknown model 'nope'")


def test_output_piped_to_a_reader_that_stops_ends_quietly():
    """``autoshrink plugins | head -1``: the reader closes the pipe before the listing is
    written; the command ends with the shell's code for that and no traceback."""
    command = subprocess.Popen([sys.executable, "-m", "autoshrink.cli", "plugins"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()
    err = command.stderr.read().decode()
    assert command.wait() == 141 and err == "", err
