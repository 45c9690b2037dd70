"""A throwaway PostgreSQL server on 127.0.0.1 for the tests that share a study between workers.

Debian's ``postgresql`` package provides the binaries (``.ci/run`` installs it when missing).
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server():
    """Yield the SQLAlchemy URL of a fresh database; the server is stopped and removed after."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL binaries not found: apt-get install -y postgresql")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="autoshrink-pg-"))
    data, port = root / "data", _free_port()
    if as_postgres:
        shutil.chown(root, "postgres")
    run = lambda *argv: subprocess.run([*as_postgres, *argv], check=True,  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
            "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
