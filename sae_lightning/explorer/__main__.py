"""`python -m sae_lightning.explorer run=<run> [sae_name=<name>] [eval_dir=<run>/eval] [port=8501] [host=localhost]`.

Checks the run's explorer bundle, then serves the Streamlit app (sae_lightning/explorer/app.py). A run that
trained several SAEs (`saes:`) has one evaluation per SAE, `<run>/eval/<name>/`: `sae_name` picks one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = ("usage: python -m sae_lightning.explorer run=<run dir> [sae_name=<name>] [eval_dir=<dir>] [port=8501] "
         "[host=localhost]")
KEYS = ("run", "sae_name", "eval_dir", "port", "host")
BUNDLE = Path("explorer") / "bundle.json"


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


def resolve(args: dict[str, str]) -> tuple[Path, Path, str | None]:
    """(eval dir, run dir, SAE name or None), with a clear error when the bundle is missing.

    The evaluation is `eval_dir` (default `<run>/eval`) itself, or, for a run with several SAEs, its
    sub-directory `<sae_name>`; without `sae_name` the only evaluated SAE is taken, and several are an error
    that names them. Without `run`, the run is the parent of `eval_dir`, or for `eval_dir=<run>/eval/<name>`
    of a run with several SAEs, `<run>` (its SAE `<name>`, for the Inspect page)."""
    if not args.get("run") and not args.get("sae_name"):
        given = Path(args["eval_dir"]).expanduser().resolve()
        run = given.parent.parent  # eval_dir=<run>/eval/<name> of a run with several SAEs: that SAE of <run>
        if (given / BUNDLE).is_file() and (run / "sae" / given.name / "cfg.json").is_file():
            return given, run, given.name
    run = Path(args.get("run") or Path(args["eval_dir"]).parent).expanduser().resolve()
    base = Path(args.get("eval_dir") or run / "eval").expanduser().resolve()
    name = args.get("sae_name")
    named = sorted(p.parent.parent.name for p in base.glob(f"*/{BUNDLE}")) if base.is_dir() else []
    if name:
        if not (base / name / BUNDLE).is_file():
            found = f"evaluated SAEs: {', '.join(named)}" if named else "no evaluated SAE by name"
            raise SystemExit(f"{base / name / BUNDLE} not found ({found}): evaluate that SAE first")
        return base / name, run, name
    if (base / BUNDLE).is_file():
        return base, run, None
    if len(named) == 1:
        return base / named[0], run, named[0]
    if len(named) > 1:
        raise SystemExit(f"{base} holds the evaluations of {len(named)} SAEs ({', '.join(named)}): pick one with "
                         f"sae_name=<name>")
    raise SystemExit(f"{base / BUNDLE} not found: evaluate the run first "
                     f"(python evaluate.py run={args.get('run') or run})")


def flags(args: dict[str, str]) -> dict[str, object]:
    """Streamlit's config options (`streamlit run --server.port ...` as flag_options)."""
    return {"server_port": int(args.get("port", 8501)), "server_address": args.get("host", "localhost"),
            "server_headless": True, "browser_gatherUsageStats": False, "client_toolbarMode": "minimal"}


def skip_component_discovery() -> None:
    """Streamlit scans the metadata of every installed distribution for third-party (v2) components when its
    runtime starts (about 0.7 s with this project's environment); the app uses none, so the scan is skipped.
    A Streamlit without that scanner is left as it is."""
    try:
        from streamlit.components.v2 import manifest_scanner
    except ImportError:
        return
    if hasattr(manifest_scanner, "scan_component_manifests"):
        manifest_scanner.scan_component_manifests = lambda *args, **kwargs: []


def main(argv: list[str] | None = None) -> int:
    """Serve the app in this process. The bundle is opened (and the app's pandas/Altair imported) in a
    background thread while the server starts and the browser loads the page, so the first page finds it
    ready; torch and open_clip are imported only by the "Inspect an image" page."""
    args = parse(sys.argv[1:] if argv is None else argv)
    eval_dir, run, sae_name = resolve(args)
    os.environ["SAE_EXPLORER_EVAL_DIR"], os.environ["SAE_EXPLORER_RUN_DIR"] = str(eval_dir), str(run)
    os.environ["SAE_EXPLORER_SAE_NAME"] = sae_name or ""
    options = flags(args)
    from sae_lightning.explorer import store

    host = options["server_address"]
    local = host if host not in ("", "0.0.0.0", "::") else "localhost"
    store.preload(eval_dir, after=f"http://{local}:{options['server_port']}/_stcore/health")
    from streamlit.web import bootstrap

    skip_component_discovery()
    bootstrap.load_config_options(flag_options=options)
    print(f"SAE Explorer for {eval_dir}: http://{options['server_address']}:{options['server_port']}", flush=True)
    bootstrap.run(str(Path(__file__).with_name("app.py")), False, [], options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
