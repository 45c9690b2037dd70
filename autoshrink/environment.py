"""The software and hardware a study ran on, so a reader can judge its times and numbers.

Each machine that runs trials of a study records itself once (a study can be shared by
several machines through an RDB storage); reports and model cards show what was recorded.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket

import optuna
import torch

from autoshrink import __version__
from autoshrink.cpu_features import instruction_sets

PACKAGES = ("torch", "torchvision", "optuna", "torch-pruning", "ptflops", "numpy", "pandas",
            "scikit-learn", "matplotlib")
PREFIX = "environment:"  # study user attribute per machine: environment:<hostname>


def physical_memory() -> int | None:
    """Bytes of memory this machine has, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def describe() -> dict:
    """This process's library versions and machine."""
    versions = {"autoshrink": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    memory = physical_memory()
    memory_gib = None if memory is None else round(memory / 2**30, 1)
    hardware = {"host": socket.gethostname(), "system": platform.platform(terse=True),
                "cpu": _cpu_name(), "cpu_instructions": instruction_sets(),
                "logical_cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "memory_gib": memory_gib,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}
    return {"versions": versions, "hardware": hardware}


def record(study: optuna.Study) -> None:
    """Store this machine's description on the study, once per host."""
    key = PREFIX + socket.gethostname()
    if key not in study.user_attrs:
        study.set_user_attr(key, describe())


def recorded(study: optuna.Study) -> dict[str, dict]:
    """Host name -> description, for every machine that ran the study."""
    return {key[len(PREFIX):]: value for key, value in study.user_attrs.items()
            if key.startswith(PREFIX)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
