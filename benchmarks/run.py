"""`python -m benchmarks.run`: run the benchmarks and write BENCHMARKS.md (what `make bench` does).

    python -m benchmarks.run                 # every CPU benchmark, a few minutes on 2 cores
    python -m benchmarks.run --quick         # smaller sizes: a smoke run
    python -m benchmarks.run --only planted,memory
    python -m benchmarks.run --gpu --only gpu --out BENCHMARKS-gpu.md   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from benchmarks.report import ROOT, Section, machine, render

# part -> "module:function"; a part's module is imported only when that part runs, so a GPU machine with the
# training dependencies alone (no Streamlit) can run `--only gpu`
CPU_PARTS = {"planted": "planted_recovery:run", "sae_step": "sae_step:run", "pipeline": "pipeline:run",
             "memory": "memory:run", "precision": "precision:run", "explorer": "explorer:run",
             "tiny_clip": "tiny_clip:run", "architectures": "planted_recovery:architecture_section",
             "cache": "cache:run", "multi_sae": "multi_sae:run"}
# Opt-in parts: too long for `make bench` on a 2-core CPU (every architecture x 3 data variants at 2,000 steps
# of 1,024); run them on a GPU machine: python -m benchmarks.run --only architectures --out BENCHMARKS-arch.md
OPT_IN = {"architectures", "multi_sae"}  # multi_sae: N SAEs x (1 + N) fits, numbers in one_off.md
PARTS = [*CPU_PARTS, "gpu"]
ONE_OFF = ROOT / "benchmarks" / "one_off.md"


def quiet() -> None:
    """Keep the console to the benchmark's own progress lines (Lightning's banners, expected warnings)."""
    logging.getLogger().setLevel(logging.ERROR)  # e.g. open_clip's "no pretrained weights" for random inits
    for name in ("lightning.pytorch", "lightning.fabric", "sae_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def run_part(name: str, quick: bool, gpu_requested: bool) -> Section:
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"[bench] {name} ...", flush=True)
    try:
        if name == "gpu":
            section = importlib.import_module("benchmarks.gpu").run(quick, measure=gpu_requested)
        else:
            module, function = CPU_PARTS[name].split(":")
            section = getattr(importlib.import_module(f"benchmarks.{module}"), function)(quick)
    except Exception as err:  # noqa: BLE001 - one broken part must not lose the others' figures
        print(f"[bench] {name} FAILED: {type(err).__name__}: {err}", flush=True)
        section = Section(f"{name} (failed)", f"This part failed: `{type(err).__name__}: {str(err)[:500]}`")
    elapsed = time.perf_counter() - start
    print(f"[bench] {name} done in {elapsed:.0f} s", flush=True)
    # Other processes' load skews timings on a shared machine: say how busy it was.
    section.body += (f"\n\n_This part took {elapsed:.0f} s; 1-minute load average {load_before:.1f} before, "
                     f"{os.getloadavg()[0]:.1f} after._")
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the sae_lightning benchmarks and write BENCHMARKS.md.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (a smoke run)")
    parser.add_argument("--gpu", action="store_true", help="measure the GPU section (needs CUDA)")
    parser.add_argument("--only", default=",".join(p for p in PARTS if p not in OPT_IN),
                        help=f"comma-separated parts of {PARTS} (default: all but {sorted(OPT_IN)})")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="where to write the report")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    quiet()
    start = time.perf_counter()
    sections = [run_part(name, args.quick, args.gpu) for name in parts]
    command = " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    text = render(sections, machine(), command, time.perf_counter() - start)
    if ONE_OFF.is_file() and Path(args.out).resolve() == (ROOT / "BENCHMARKS.md").resolve():
        text += "\n" + ONE_OFF.read_text()  # measured by hand, outside this command: kept verbatim
    Path(args.out).write_text(text)
    print(f"[bench] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
