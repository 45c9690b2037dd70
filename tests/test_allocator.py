"""Commands that train restart themselves once under tcmalloc (autoshrink.allocator)."""

import logging
import os
import platform
import subprocess
import sys

import pytest

from autoshrink import allocator
from autoshrink.allocator import (
    ALLOCATOR_CHOICE,
    LARGE_ALLOC_REPORT,
    RESTARTED,
    environment_under_tcmalloc,
    missing_tcmalloc_note,
    tcmalloc_library,
)
from autoshrink.errors import UsageError

LIBRARY = "libtcmalloc_minimal.so.4"


@pytest.mark.parametrize("chosen", [{}, {ALLOCATOR_CHOICE: "tcmalloc"},
                                    {ALLOCATOR_CHOICE: "TCMalloc"}])
def test_the_restart_preloads_tcmalloc_once_and_quiets_its_large_allocation_reports(chosen):
    environ = environment_under_tcmalloc({"PATH": "/bin", **chosen}, LIBRARY)
    assert environ == {"PATH": "/bin", **chosen, "LD_PRELOAD": LIBRARY, RESTARTED: "1",
                       LARGE_ALLOC_REPORT: str(1 << 40)}


def test_the_restart_keeps_what_the_user_preloads_and_their_report_threshold():
    environ = environment_under_tcmalloc({"LD_PRELOAD": "libfaketime.so.1",
                                          LARGE_ALLOC_REPORT: "1000"}, LIBRARY)
    assert environ["LD_PRELOAD"] == f"{LIBRARY} libfaketime.so.1"
    assert environ[LARGE_ALLOC_REPORT] == "1000"


@pytest.mark.parametrize("environ, library", [
    ({}, None),  # not installed
    ({ALLOCATOR_CHOICE: "system"}, LIBRARY),  # the user's choice
    ({ALLOCATOR_CHOICE: "System"}, LIBRARY),
    ({RESTARTED: "1"}, LIBRARY),  # restarted already: the loader may have refused the library
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, LIBRARY),  # an allocator of the user's own
])
def test_no_restart(environ, library):
    assert environment_under_tcmalloc(environ, library) is None


MISSING_NOTE = ("note: tcmalloc is not installed, so training runs on the C library's allocator,"
                " about 1.2x slower (Debian and Ubuntu: apt-get install libtcmalloc-minimal4;"
                " AUTOSHRINK_MALLOC=system keeps that allocator without this note)")


@pytest.mark.parametrize("environ, library, note", [
    ({}, None, MISSING_NOTE),
    ({"LD_PRELOAD": "libfaketime.so.1"}, None, MISSING_NOTE),  # preloads no allocator
    ({}, LIBRARY, None),  # installed: the restart takes it
    ({ALLOCATOR_CHOICE: "system"}, None, None),  # the user's choice
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, None, None),  # an allocator of their own
])
def test_a_missing_tcmalloc_is_noted_unless_the_user_chose_an_allocator(environ, library, note):
    assert missing_tcmalloc_note(environ, library) == note


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the restart is Linux's")
def test_a_command_that_trains_notes_once_that_tcmalloc_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    monkeypatch.setattr(allocator, "allocator_in_use", lambda: "system")
    for name in (ALLOCATOR_CHOICE, RESTARTED, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.INFO, logger="autoshrink"):
        allocator.restart_under_tcmalloc()  # no restart: it returns
    assert [r.getMessage() for r in caplog.records] == [MISSING_NOTE]


@pytest.mark.parametrize("choice, library, message", [
    ("jemalloc", LIBRARY, "AUTOSHRINK_MALLOC=jemalloc: not an allocator autoshrink can use; set"
                          " it to tcmalloc (the default where installed) or system"),
    ("tcmalloc", None, "AUTOSHRINK_MALLOC=tcmalloc: tcmalloc is not installed; install it"
                       " (Debian and Ubuntu: apt-get install libtcmalloc-minimal4) or unset"
                       " AUTOSHRINK_MALLOC"),
])
def test_a_choice_that_cannot_be_honoured_is_an_error(choice, library, message):
    with pytest.raises(UsageError) as error:
        environment_under_tcmalloc({ALLOCATOR_CHOICE: choice}, library)
    assert str(error.value) == message


def test_the_search_command_says_so_in_one_line_before_it_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "autoshrink.cli", "search", "--out", str(tmp_path / "run")],
        env={**os.environ, ALLOCATOR_CHOICE: "jemalloc"}, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "autoshrink: error: AUTOSHRINK_MALLOC=jemalloc: not an allocator autoshrink can use;"
        " set it to tcmalloc (the default where installed) or system"]
    assert not (tmp_path / "run").exists()


PROGRAM = """
import os
from autoshrink.allocator import allocator_in_use, restart_under_tcmalloc, retain_freed_memory
print(os.getpid(), allocator_in_use())
restart_under_tcmalloc()
print(os.getpid(), allocator_in_use(), retain_freed_memory())
"""


def run_program(**environ: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in (ALLOCATOR_CHOICE, RESTARTED, "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-c", PROGRAM], env={**clean, **environ},
                          capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.skipif(tcmalloc_library() is None, reason="tcmalloc is not installed"
                    " (Debian: apt-get install libtcmalloc-minimal4; .ci/run installs it)")
def test_a_process_restarts_itself_under_tcmalloc_with_its_arguments_and_pid():
    before, *after = run_program()
    pid = before.split()[0]
    # the program ran again from the start, in the same process, now under tcmalloc, where
    # glibc's settings for freed memory do not apply
    assert before == f"{pid} system"
    assert after == [f"{pid} tcmalloc", f"{pid} tcmalloc False"]


def test_a_process_keeps_the_system_allocator_when_told():
    before, *after = run_program(**{ALLOCATOR_CHOICE: "system"})
    pid = before.split()[0]
    assert after == [f"{pid} system {platform.libc_ver()[0] == 'glibc'}"]
