"""Plugin discovery: entry points, duplicates, broken plugins, and a real out-of-tree package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from autoshrink import Stage, Technique, hookimpl
from autoshrink.errors import PluginError
from autoshrink.plugins import PluginHost

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "plugins" / "autoshrink-example"


class Clash(Technique):
    name = "gap-classifier"
    stage = Stage.ARCHITECTURE


class ClashPlugin:
    @hookimpl
    def register_techniques(self, register):
        register(Clash())


class CrashingPlugin:
    @hookimpl
    def register_techniques(self, register):
        raise RuntimeError("boom")


def test_builtins_register_through_entry_points(host):
    assert {"gap-classifier", "dwconv", "prune-l1", "quantize-int8"} <= set(host.techniques)
    registered = host.registry["technique"]["prune-l1"]
    assert registered.plugin == "pruning" and registered.distribution == "autoshrink"
    assert {"smallcnn", "vgg19", "resnet101"} <= set(host.registry["model"])
    assert {"digits", "fashion-mnist", "imagefolder"} <= set(host.registry["dataset"])


def test_plugins_listing_keeps_its_columns_for_the_longest_name(run_cli):
    """quantize-fixed-point is longer than the name column was and pushed its row askew."""
    code, out, _ = run_cli("plugins")
    rows = [line for line in out.splitlines() if line.startswith("  ") and "[" in line]
    assert code == 0 and any("quantize-fixed-point" in row for row in rows)
    assert len({row.index("[") for row in rows}) == 1
    assert len({row.index(" autoshrink ") for row in rows}) == 1


def test_duplicate_name_names_both_plugins():
    host = PluginHost.discover()
    fresh = PluginHost()
    for name, plugin in host.manager.list_name_plugin():
        fresh.add(plugin, name, "autoshrink", "0.1.0")
    fresh.add(ClashPlugin(), "clash", "autoshrink-clash", "1.0")
    with pytest.raises(PluginError) as error:
        fresh.collect()
    assert "'classifier'" in str(error.value) and "'clash'" in str(error.value)


class Declared(Technique):
    name = "declared"
    stage = Stage.POST_TRAINING


@pytest.mark.parametrize("attributes, problem", [
    ({"stage": "post-training"}, "its stage is 'post-training'; set stage to one of"
                                 " Stage.ARCHITECTURE"),  # a search ran it; plugins crashed
    ({"name": "my technique"}, "its name is 'my technique'; set name to kebab-case"),
    ({"name": None}, "its name is None"),
    ({"claims": "weights"}, "its claims are 'weights'; set claims to a frozenset of names"),
    ({"Options": dict}, "its Options is <class 'dict'>; set Options to the dataclass"),
])
def test_a_technique_declared_wrongly_is_refused_as_it_registers(attributes, problem):
    technique = type("Slip", (Declared,), attributes)()

    class SlipPlugin:
        @hookimpl
        def register_techniques(self, register):
            register(technique)

    host = PluginHost()
    host.add(SlipPlugin(), "slip", "autoshrink-slip", "1.0")
    with pytest.raises(PluginError) as error:
        host.collect()
    assert str(error.value).startswith("plugin 'slip' (autoshrink-slip) registered technique")
    assert problem in str(error.value)


def test_a_technique_declared_rightly_registers():
    host = PluginHost()
    host.add(type("Right", (), {"register_techniques": hookimpl(
        lambda self, register: register(Declared()))})(), "right")
    host.collect()
    assert list(host.techniques) == ["declared"]


def test_crashing_hook_is_reported_and_skipped():
    host = PluginHost()
    host.add(CrashingPlugin(), "crashing", "autoshrink-crash", "0.1")
    host.collect()
    assert host.broken and host.broken[0].plugin == "crashing" and "boom" in host.broken[0].error


@pytest.mark.parametrize("code, fix", [
    ("def register_techniques(register):\n    pass\n",  # the usual slip: no @hookimpl
     "mark register_techniques with @hookimpl (from autoshrink import hookimpl)"),
    ("WIDTH = 3\n", "define register_techniques, register_models or register_datasets marked"
                    " with @hookimpl"),
])
def test_a_plugin_file_with_no_hook_is_refused_instead_of_ignored(tmp_path, code, fix):
    from autoshrink.errors import UsageError

    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(code)
    with pytest.raises(UsageError) as error:
        PluginHost.discover(explicit=(str(plugin),))
    assert f"--plugin {str(plugin)!r} implements no autoshrink hook; {fix}" in str(error.value)


def _install_fake_distribution(site: Path, name: str, entry_points: str, module: str,
                               code: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[autoshrink]\n{entry_points}\n")


def _run(args: list[str], site: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), AUTOSHRINK_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "autoshrink.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_broken_entry_point_is_reported_not_fatal(tmp_path):
    _install_fake_distribution(tmp_path, "autoshrink-broken", "broken = autoshrink_broken",
                               "autoshrink_broken", "raise ImportError('missing dependency')\n")
    result = _run(["plugins", "--json"], tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["broken"][0]["plugin"] == "broken"
    assert "missing dependency" in listing["broken"][0]["error"]
    assert any(r["name"] == "prune-l1" for r in listing["registered"])


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The example plugin, installed by pip from its own folder, as a user would."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(EXAMPLE)],
                   check=True, capture_output=True, timeout=300)
    return site


def test_out_of_tree_plugin_is_listed(example_site, tmp_path):
    result = _run(["plugins", "--json"], example_site, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["registered"]}
    assert rows["half-precision"]["distribution"] == "autoshrink-example"
    assert rows["half-precision"]["version"] == "0.1.0"
    assert rows["half-precision"]["stage"] == "quantization"


def test_out_of_tree_plugin_is_sampled_by_search(example_site, tmp_path):
    result = _run(["search", "--techniques", "half-precision", "--n-trials", "2",
                   "--epochs", "12", "--out", str(tmp_path / "run"), "--json"],
                  example_site, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "half-precision" in (tmp_path / "run" / "trials.csv").read_text()
    summary = json.loads(result.stdout)
    sizes = [m["size_x"] for m in summary["fronts"]["size"]["members"]]
    assert max(sizes) > 1.8  # float16 storage halves the artifact


def test_example_plugin_passes_its_own_tests_written_with_the_kit(tmp_path):
    """autoshrink.testing.TechniqueTests works for an out-of-tree package's test suite."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(EXAMPLE / "tests"), "--rootdir", str(EXAMPLE)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(EXAMPLE)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout
