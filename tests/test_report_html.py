"""Pareto plots, the text fronts and the self-contained report.html: what they show, and that
Chromium renders the page with every image decoded."""

from __future__ import annotations

import csv
import html
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib import image

from autoshrink.pareto import TrialRecord, front_area, late_area_share, pareto_front
from autoshrink.plots import pareto_png
from autoshrink.report import format_front
from autoshrink.task import Baseline

BASELINE = Baseline(val_accuracy=0.95, test_accuracy=0.94, params=100_000,
                    nonzero_params=100_000, macs=1_000_000, size_bytes=400_000, latency_ms=1.0,
                    train_seconds=10.0)
COLOURS = {"baseline": "#c44e52", "front": "#dd8452", "feasible": "#4c72b0",
           "over budget": "#b8b8b8"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _record(number: int, accuracy: float, params: int) -> TrialRecord:
    return TrialRecord(number=number, plan=f"plan {number}", plan_json="[]",
                       val_accuracy=accuracy, params=params, nonzero_params=params,
                       macs=params * 10, size_bytes=params * 4, latency_ms=0.5, seconds=1.0)


def _pixels_of(png: bytes, hex_colour: str, tolerance: float = 0.005) -> int:
    """How many pixels have this colour (text anti-aliasing makes a few of any grey)."""
    pixels = image.imread(io.BytesIO(png), format="png")[..., :3]
    wanted = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(pixels - wanted).max(axis=-1) < tolerance).sum())


def test_plot_marks_baseline_front_feasible_and_greys_trials_over_budget():
    records = [_record(0, 0.94, 20_000), _record(1, 0.92, 5_000), _record(2, 0.93, 30_000),
               _record(3, 0.60, 1_000), _record(4, 0.10, 2_000)]  # 3, 4: over the 5 pp budget
    front = pareto_front(records, "params", BASELINE, 5.0)
    assert [r.number for r in front.members] == [1, 0]
    png = pareto_png(front, records, BASELINE)
    assert png.startswith(b"\x89PNG")
    for what, colour in COLOURS.items():
        assert _pixels_of(png, colour) > 100, f"no {what} marks ({colour}) in the plot"
    all_feasible = pareto_png(front, records[:3], BASELINE)
    grey = COLOURS["over budget"]
    assert _pixels_of(png, grey) - _pixels_of(all_feasible, grey) > 100  # the two grey marks


def test_front_area_is_the_staircase_above_the_floor_in_decades_of_reduction():
    # baseline 95 % and 100,000 parameters, budget 5 pp: the floor is 90 %
    records = [_record(0, 0.94, 10_000), _record(1, 0.92, 1_000), _record(2, 0.91, 20_000),
               _record(3, 0.80, 100), _record(4, 0.97, 200_000)]
    front = pareto_front(records, "params", BASELINE, 5.0)
    assert [r.number for r in front.members] == [1, 0, 4]  # 2 dominated, 3 over budget
    # 94 % down to 92 % at one decade, 92 % down to the floor at two; trial 4, larger than
    # the baseline, reduces nothing and adds no area
    assert front_area(front, BASELINE) == pytest.approx(2 * 1 + 2 * 2)
    assert front_area(pareto_front([], "params", BASELINE, 5.0), BASELINE) == 0.0
    assert late_area_share(records, "params", BASELINE, 5.0) == (2, 0.0)  # 3 and 4 added none
    # a last trial at 95 % with two decades dominates trials 0 and 1: 10 instead of 6
    grown = late_area_share([*records, _record(5, 0.95, 1_000)], "params", BASELINE, 5.0)
    assert grown == (2, pytest.approx(0.4))
    assert late_area_share(records[:3], "params", BASELINE, 5.0) is None  # too few to say


class _Page(HTMLParser):
    """The parts of report.html the tests read."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings, self.rows, self._in = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("link", "script") or (tag == "a" and "href" in attrs):
            self.links.append(tag)
        if tag == "tr":
            self.rows.append(attrs.get("class", ""))
        self._in = tag

    def handle_data(self, data):
        if self._in == "h2":
            self.headings.append(data)


def test_text_front_lists_each_plan_left_aligned_after_the_figures():
    """Plans differ in length by hundreds of characters; right-aligned, the short ones began
    far right of their figures."""
    long_plan = " + ".join(["ghost(ratio=4)"] * 12)
    records = [TrialRecord(**{**vars(_record(0, 0.94, 20_000)), "plan": long_plan}),
               _record(1, 0.92, 5_000)]
    lines = format_front(pareto_front(records, "params", BASELINE, 5.0), BASELINE,
                         records).splitlines()
    header, rows = lines[1], lines[2:4]  # after the title, the front's two members
    assert header.endswith("size x  plan")
    assert [row[header.index("plan"):] for row in rows] == ["plan 1", long_plan]


@pytest.fixture(scope="module")
def reported(small_study, tmp_path_factory):
    """The small study's run folder after ``autoshrink report`` (a copy: other tests read the
    original)."""
    from autoshrink.cli import main

    run_dir = tmp_path_factory.mktemp("reported") / "run"
    shutil.copytree(small_study, run_dir)
    assert main(["report", "--out", str(run_dir), "--quiet"]) == 0
    return run_dir


def test_report_html_is_self_contained_and_has_every_section(reported):
    page = _Page()
    text = (reported / "report.html").read_text()
    page.feed(text)
    assert len(page.images) == 3 and all(src.startswith("data:image/png;base64,")
                                         for src in page.images)
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not page.links and "http" not in outside_images  # nothing fetched from anywhere
    assert page.headings == ["Pareto fronts", "Baseline", "Trials", "Search settings",
                             "Software and hardware"]
    trials = list(csv.DictReader(io.StringIO((reported / "trials.csv").read_text())))
    assert len(trials) == 2
    for row in trials:  # every trial with its plan (quoted in the CSV where it holds a comma)
        assert html.escape(row["plan"]) in text
    for setting in ("max_drop", "seed", "recipe.finetune_epochs", "sampler"):
        assert f">{setting}<" in text
    assert re.search(r">torch<.*?>\d+\.\d+", text) and ">logical_cores<" in text
    for metric in ("params", "flops", "size"):
        assert (reported / f"pareto-{metric}.png").read_bytes().startswith(b"\x89PNG")


def test_report_html_escapes_study_text(tmp_path):
    from autoshrink.html_report import write_report_html

    hostile = _record(0, 0.94, 20_000)
    hostile = TrialRecord(**{**vars(hostile), "plan": "<script>alert(1)</script>"})
    path = write_report_html(tmp_path / "r.html", study_name="<b>x</b>", settings={"a": "<i>"},
                             baseline=BASELINE, records=[hostile],
                             fronts=[pareto_front([hostile], "params", BASELINE, 5.0)],
                             max_drop=5.0, stopped=[], plots={}, environments={})
    text = path.read_text()
    assert "<script>" not in text and "<b>x</b>" not in text and "&lt;script&gt;" in text


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
def test_chromium_renders_report_with_every_image_decoded(reported, tmp_path):
    """A copy of the page with a probe script that writes what the browser decoded into the
    DOM, dumped by headless Chromium; and a screenshot that is not blank."""
    probe = ("<script>window.onload = () => { document.body.dataset.decoded ="
             " [...document.images].map(i => i.complete ? i.naturalWidth : -1).join(',');"
             " document.body.dataset.rows = document.querySelectorAll('tr').length; };"
             "</script>")
    copy = tmp_path / "probe.html"
    copy.write_text((reported / "report.html").read_text().replace("</body>",
                                                                   probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", copy.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    decoded = re.search(r'data-decoded="([^"]*)"', dom)
    assert decoded, "the page did not load in Chromium"
    widths = [int(w) for w in decoded.group(1).split(",")]
    assert len(widths) == 3 and min(widths) > 100, widths  # every plot decoded as an image
    assert int(re.search(r'data-rows="(\d+)"', dom).group(1)) >= 2 + 1 + 3
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}",
                    (reported / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = image.imread(shot)[..., :3]
    assert pixels.std() > 0.05  # scaled to half width: the front's colour is blended
    assert _pixels_of(shot.read_bytes(), COLOURS["front"], tolerance=0.05) > 50
