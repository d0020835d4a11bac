"""`python -m sae_lightning.explorer run=<run> [eval_dir=<run>/eval] [port=8501] [host=localhost]`.

Checks the run's explorer bundle, then serves the Streamlit app (sae_lightning/explorer/app.py).
"""

from __future__ import annotations

import os
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


def flags(args: dict[str, str]) -> dict[str, object]:
    """Streamlit's config options (`streamlit run --server.port ...` as flag_options)."""
    return {"server_port": int(args.get("port", 8501)), "server_address": args.get("host", "localhost"),
            "server_headless": True, "browser_gatherUsageStats": False, "client_toolbarMode": "minimal"}


def main(argv: list[str] | None = None) -> int:
    """Serve the app in this process: the modules imported here (torch, the bundle reader) are the app's, so
    its first page does not import them again."""
    args = parse(sys.argv[1:] if argv is None else argv)
    eval_dir, run = resolve(args)
    os.environ["SAE_EXPLORER_EVAL_DIR"], os.environ["SAE_EXPLORER_RUN_DIR"] = str(eval_dir), str(run)
    import altair  # noqa: F401 - the app's imports, done before the server starts
    import pandas  # noqa: F401
    from streamlit.web import bootstrap

    import sae_lightning.explorer.store  # noqa: F401

    options = flags(args)
    bootstrap.load_config_options(flag_options=options)
    print(f"SAE Explorer for {eval_dir}: http://{options['server_address']}:{options['server_port']}", flush=True)
    bootstrap.run(str(Path(__file__).with_name("app.py")), False, [], options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
