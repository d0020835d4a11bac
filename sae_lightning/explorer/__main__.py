"""`python -m sae_lightning.explorer run=<run> [eval_dir=<run>/eval] [port=8501] [host=localhost]`.

Checks the run's explorer bundle, then serves the Streamlit app (sae_lightning/explorer/app.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

USAGE = "usage: python -m sae_lightning.explorer run=<run dir> [eval_dir=<dir>] [port=8501] [host=localhost]"
KEYS = ("run", "eval_dir", "port", "host")


def parse(argv: list[str]) -> dict[str, str]:
    """key=value arguments (Hydra style); unknown keys and a missing run are errors before anything starts."""
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"unknown argument {item!r}\n{USAGE}")
        args[key] = value
    if not args.get("run") and not args.get("eval_dir"):
        raise SystemExit(f"which run? {USAGE}")
    if "port" in args and not args["port"].isdigit():
        raise SystemExit(f"port={args['port']!r} is not a port number")
    return args


def resolve(args: dict[str, str]) -> tuple[Path, Path]:
    """(eval dir, run dir), with a clear error when the bundle is missing."""
    run = Path(args.get("run") or Path(args["eval_dir"]).parent).expanduser().resolve()
    eval_dir = Path(args.get("eval_dir") or run / "eval").expanduser().resolve()
    if not (eval_dir / "explorer" / "bundle.json").is_file():
        raise SystemExit(f"{eval_dir}/explorer/bundle.json not found: evaluate the run first "
                         f"(python evaluate.py run={args.get('run') or run})")
    return eval_dir, run


def command(args: dict[str, str]) -> list[str]:
    app = Path(__file__).with_name("app.py")
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
            "--server.port", args.get("port", "8501"), "--server.address", args.get("host", "localhost"),
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    eval_dir, run = resolve(args)
    env = dict(os.environ, SAE_EXPLORER_EVAL_DIR=str(eval_dir), SAE_EXPLORER_RUN_DIR=str(run))
    print(f"SAE Explorer for {eval_dir}: http://{args.get('host', 'localhost')}:{args.get('port', '8501')}",
          flush=True)
    return subprocess.call(command(args), env=env)


if __name__ == "__main__":
    raise SystemExit(main())
