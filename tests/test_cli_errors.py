"""Bad input: one line naming the bad value and the fix, exit code 2, no study damaged."""

from __future__ import annotations

import pytest

from tests.conftest import FAST

BAD = [
    (["search", "--model", "alexnet"], "alexnet"),
    (["search", "--dataset", "imagenet"], "imagenet"),
    (["search", "--techniques", "magic-prune"], "magic-prune"),
    (["search", "--objectives", "latency"], "latency"),
    (["search", "--max-drop", "-1"], "-1"),
    (["search", "--max-drop", "101"], "101"),
    (["search", "--n-trials", "0"], "--n-trials 0"),
    (["search", "--study", "no-such-preset"], "no-such-preset"),
    (["search", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent"),
    (["search", "--model", "no_such_module:build"], "no_such_module"),
    (["inspect", "--apply", "prune-l1:amount=2"], "amount=2"),
    (["inspect", "--apply", "prune-l1:speed=3"], "speed"),
    (["inspect", "--input-shape", "32x32"], "32x32"),
    (["inspect", "--model", "resnet18", "--input-shape", "3x32x32", "--apply",
      "gap-classifier"], "gap-classifier"),
]


@pytest.mark.parametrize("argv, quoted", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_gets_one_clear_line(run_cli, tmp_path, argv, quoted):
    code, out, err = run_cli(*argv, "--out", str(tmp_path)) if argv[0] == "search" \
        else run_cli(*argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("autoshrink: error:") and quoted in lines[0]
    assert not (tmp_path / "study.db").exists()


def test_report_without_a_study(run_cli, tmp_path):
    code, _, err = run_cli("report", "--out", str(tmp_path / "nothing"))
    assert code == 2 and "autoshrink search" in err


def test_study_with_another_task_is_refused(run_cli, tmp_path):
    code, _, err = run_cli("search", "--n-trials", "1", "--out", str(tmp_path),
                           "--study-name", "shared", "--quiet", *FAST)
    assert code == 0, err
    before = (tmp_path / "study.db").read_bytes()
    code, _, err = run_cli("search", "--n-trials", "1", "--out", str(tmp_path),
                           "--study-name", "shared", "--epochs", "3")
    assert code == 2 and "shared" in err and "--study-name" in err
    assert "baseline epoch" not in err  # refused before training anything
    assert (tmp_path / "study.db").read_bytes() == before
