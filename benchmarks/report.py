"""BENCHMARKS.md pieces: the machine it ran on, markdown tables, and one section per benchmark."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Section:
    """One benchmark's part of the report: a title and its markdown body (tables and notes)."""

    title: str
    body: str


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats get 3 significant digits unless already formatted."""
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, str]:
    """What the numbers depend on: CPU, cores, RAM, torch, threads, GPU, date, commit."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    one_off = ROOT / "benchmarks" / "one_off.md"
    measured = [line[4:].split(",")[0] for line in (one_off.read_text().splitlines() if one_off.is_file() else [])
                if line.startswith("### GPU: ")]
    if gpu == "none" and measured:  # GPU figures measured by hand elsewhere: say where
        gpu = "none (GPU figures: " + ", ".join(f'"{m}"' for m in measured) + ' under "Measured separately")'
    return {
        "CPU": _cpu_model(),
        "cores (usable)": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "RAM": f"{_ram_gib():.1f} GiB",
        "GPU": gpu,
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": _git_commit(),
    }


def render(sections: list[Section], info: dict[str, str], command: str, elapsed_s: float) -> str:
    """The whole BENCHMARKS.md."""
    head = [
        "# Benchmarks",
        "",
        f"Written by `{command}` in {elapsed_s / 60:.1f} min. Timings are from one run on the machine below;",
        "they are never test assertions. Rerun with `make bench` (or `python -m benchmarks.run --quick` for a",
        "smoke run); `python -m benchmarks.run --gpu --only gpu --out BENCHMARKS-gpu.md` on a CUDA machine.",
        "",
        table(["machine", ""], [[k, v] for k, v in info.items()]),
    ]
    parts = ["\n".join(head)] + [f"## {s.title}\n\n{s.body.strip()}" for s in sections]
    return "\n\n".join(parts) + "\n"
