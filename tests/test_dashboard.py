"""``autoshrink dashboard`` against a real optuna-dashboard server on localhost."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_dashboard_serves_the_study_with_feasibility_metric_names_and_models(small_study):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "autoshrink.cli", "dashboard", "--out",
                               str(small_study), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                studies = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                time.sleep(0.5)
        else:
            pytest.fail("the dashboard did not answer")
        assert [s["study_name"] for s in studies] == ["digits-smallcnn"]
        detail = json.loads(_get(f"{base}/api/studies/{studies[0]['study_id']}"))
        assert detail["objective_names"] == ["accuracy", "params"]
        trials = [t for t in detail["trials"] if t["state"] == "Complete"]
        assert trials and all(len(t["constraints"]) == 1 for t in trials)
        for trial in trials:  # the dashboard's feasibility agrees with the budget
            feasible = {a["key"]: a["value"] for a in trial["user_attrs"]}["feasible"]
            assert (trial["constraints"][0] <= 0) == (feasible == "True")
        artifacts = detail["artifacts"]
        assert artifacts and all(a["filename"].startswith("trial-") for a in artifacts)
        first = artifacts[0]
        served = _get(f"{base}/artifacts/{studies[0]['study_id']}/{first['artifact_id']}")
        assert served == (small_study / "models" / first["filename"]).read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=30)
    # a second start attaches nothing twice
    from autoshrink.cli import build_parser
    from autoshrink.cli.common import open_existing_study
    from autoshrink.dashboard import attach_pareto_models

    args = build_parser().parse_args(["dashboard", "--out", str(small_study)])
    study, config = open_existing_study(args)
    before = len(list((small_study / "artifacts").iterdir()))
    attach_pareto_models(study, config)
    assert len(list((small_study / "artifacts").iterdir())) == before


def test_dashboard_refuses_a_bad_port_in_one_line(run_cli, small_study):
    code, _, err = run_cli("dashboard", "--out", str(small_study), "--port", "70000")
    assert code == 2 and "--port 70000" in err and len(err.strip().splitlines()) == 1
