"""The SAE Explorer at the seed's scale: a generated bundle of 65,536 features and 200,000 thumbnails.

    python -m benchmarks.explorer                       # the seed's size
    python -m benchmarks.explorer --features 16384 --thumbnails 50000 --keep /tmp/bundle
    python -m benchmarks.explorer --heatmap-grid 16     # a patch-token run's bundle: heatmaps on the feature page

Generates `<dir>/eval/` in the documented formats (docs/format-eval.md, docs/explorer.md) with random
values of realistic sizes: ViT-L/14's 4,096 MLP neurons and 768-d embeddings, top-20 lists over the
thumbnails, 128 px JPEG thumbnails (a pool of distinct synthetic images, reused), a 1,000-image game set.
Then it measures, each in a fresh process: the server's start (launch to /_stcore/health answering), the
app's first run (AppTest: imports, bundle load, the Overview page), and the Feature page's script run for
random features once warm (AppTest, median and max). AppTest times the Python side of a page; the browser's
own drawing comes on top.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from safetensors.torch import save_file

from benchmarks.report import ROOT, Section, table
from sae_lightning.explorer.browser import LOADED_IMAGES, SETTLED, Chromium, find_chromium
from sae_lightning.explorer.bundle import BUNDLE_VERSION, HIST_BINS, MLP_COSINE_SCALE, hist_edges

SEED_FEATURES, SEED_THUMBNAILS = 65_536, 200_000
GRID = 16  # every generated feature has 20 top images, the page shows 16
K, N_NEURONS, EMBED_DIM, N_GAME, N_CLASSES = 20, 4096, 768, 1000, 1000


def synthetic_thumbnail(rng: np.random.Generator, size: int = 128) -> PIL.Image.Image:
    """A smooth image with a shape on it: JPEG sizes like a photo thumbnail's, not like noise."""
    ramp = np.linspace(0, 1, size)[:, None, None]
    base = rng.uniform(0, 255, 3) * (1 - ramp) + rng.uniform(0, 255, 3) * ramp
    image = PIL.Image.fromarray(np.broadcast_to(base, (size, size, 3)).astype(np.uint8))
    (x, y), r = rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.1, 0.3) * size
    PIL.ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3).tolist()))
    return image


def generate(root: Path, n_features: int, n_thumbnails: int, seed: int = 0, heatmap_grid: int = 0) -> Path:
    """Write a bundle of the given size under root/eval; returns the eval directory. heatmap_grid > 0: a
    patch-token run's bundle, with [F, 16, g, g] heatmaps (ViT-L/14 at 224 px: g = 16, 512 MiB)."""
    rng = np.random.default_rng(seed)
    ev = root / "eval"
    (ev / "explorer").mkdir(parents=True, exist_ok=True)
    density = 10 ** rng.uniform(-6, -0.5, n_features)
    top_indices = np.sort(rng.integers(0, n_thumbnails, (n_features, K)), axis=1)
    top_indices[:, 0] = np.arange(n_features) % n_thumbnails  # every thumbnail is someone's top image
    top_values = -np.sort(-rng.gamma(2.0, 1.0, (n_features, K)), axis=1)
    labels = rng.integers(0, N_CLASSES, (n_features, K))
    entropy = rng.uniform(0, 3, n_features)
    save_file({
        "density": torch.tensor(density, dtype=torch.float32),
        "image_density": torch.tensor(density, dtype=torch.float32),
        "mean_activation": torch.tensor(top_values.mean(1) / 2, dtype=torch.float32),
        "mean_top_activation": torch.tensor(top_values.mean(1), dtype=torch.float32),
        "label_entropy": torch.tensor(entropy, dtype=torch.float32),
        "entropy_defined": torch.ones(n_features, dtype=torch.bool),
        "top_values": torch.tensor(top_values, dtype=torch.float32),
        "top_indices": torch.tensor(top_indices),
        "top_labels": torch.tensor(labels),
        "in_cluster": torch.tensor(rng.random(n_features) < 0.6),
        "max_mlp_cosine": torch.tensor(rng.uniform(0.05, 0.4, n_features), dtype=torch.float32),
        "aligned_neurons": torch.tensor(rng.integers(0, 5, n_features)),
    }, str(ev / "features.safetensors"))
    keys = {str(i): f"gen-{i // 10_000:06d}.tar/{i:08d}" for i in range(n_thumbnails)}
    (ev / "features.json").write_text(json.dumps({
        "format_version": 1, "n_features": n_features, "k": K, "n_images": 524_288, "tokens": "cls", "layer": 22,
        "backbone": "ViT-L-14 (generated)", "classnames": [f"class {i}" for i in range(N_CLASSES)],
        "image_keys": keys}))
    (ev / "metrics.json").write_text(json.dumps({"n_images": 524_288, "backbone": "ViT-L-14 (generated)",
                                                 "layer": 22, "tokens": "cls", "n_features": n_features}))
    pool = []
    for _ in range(512):
        buffer = io.BytesIO()
        synthetic_thumbnail(rng).save(buffer, format="JPEG", quality=85)
        pool.append(buffer.getvalue())
    game_keys = [f"game.tar/{i:06d}" for i in range(N_GAME)]
    (ev / "explorer" / "thumbnails.sqlite").unlink(missing_ok=True)
    db = sqlite3.connect(ev / "explorer" / "thumbnails.sqlite")
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("CREATE TABLE thumbnails (key TEXT PRIMARY KEY, jpeg BLOB NOT NULL) WITHOUT ROWID")
    db.execute("CREATE TABLE image_index (idx INTEGER PRIMARY KEY, key TEXT NOT NULL)")
    db.executemany("INSERT INTO image_index VALUES (?, ?)", ((int(i), key) for i, key in keys.items()))
    all_keys = list(keys.values()) + game_keys
    for start in range(0, len(all_keys), 20_000):
        db.executemany("INSERT INTO thumbnails VALUES (?, ?)",
                       ((k, pool[(start + j) % len(pool)]) for j, k in enumerate(all_keys[start : start + 20_000])))
        db.commit()
    db.close()
    cos = torch.randint(-20, 40, (n_features, N_NEURONS), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    save_file({"mlp_cosine_q": cos}, str(ev / "explorer" / "mlp_cosines.safetensors"))
    del cos
    nnz = rng.integers(20, 200, N_GAME)
    indptr = np.concatenate([[0], np.cumsum(nnz)])
    n_embedded = min(n_thumbnails, 80_000)
    save_file({
        "hist_counts": torch.tensor(rng.integers(0, 1000, (n_features, HIST_BINS)), dtype=torch.int32),
        "neighbour_indices": torch.tensor(rng.integers(0, n_features, (n_features, 10)), dtype=torch.int32),
        "neighbour_cosines": torch.tensor(-np.sort(-rng.random((n_features, 10))), dtype=torch.float32),
        "game_indptr": torch.tensor(indptr),
        "game_features": torch.tensor(rng.integers(0, n_features, indptr[-1]), dtype=torch.int32),
        "game_values": torch.tensor(rng.gamma(2.0, 1.0, indptr[-1]), dtype=torch.float32),
        "game_labels": torch.tensor(rng.integers(0, N_CLASSES, N_GAME)),
        "game_embeddings": torch.randn(N_GAME, EMBED_DIM).half(),
        "top_embeddings": torch.randn(n_embedded, EMBED_DIM).half(),
    }, str(ev / "explorer" / "explorer.safetensors"))
    if heatmap_grid:
        gen = torch.Generator().manual_seed(seed)
        maps = torch.empty(n_features, GRID, heatmap_grid, heatmap_grid, dtype=torch.float16)
        for start in range(0, n_features, 4096):  # sparse blobs: a few patches fire per image
            part = torch.rand(min(4096, n_features - start), GRID, heatmap_grid, heatmap_grid, generator=gen)
            maps[start : start + 4096] = torch.where(part > 0.9, part * 5, 0.0).half()
        save_file({"heatmaps": maps}, str(ev / "explorer" / "heatmaps.safetensors"))
        del maps
    else:
        (ev / "explorer" / "heatmaps.safetensors").unlink(missing_ok=True)
    (ev / "explorer" / "bundle.json").write_text(json.dumps({
        "format_version": BUNDLE_VERSION, "n_features": n_features, "n_neurons": N_NEURONS, "n_game": N_GAME,
        "n_thumbnails": n_thumbnails + N_GAME, "thumb_size": 128, "layer": 22,
        "tokens": "patches" if heatmap_grid else "cls",
        "hist_bins_log10": hist_edges().tolist(), "hist_n_tokens": None, "mlp_cosine_scale": MLP_COSINE_SCALE,
        "n_neighbours": 10, "game_keys": game_keys, "top_embedding_keys": list(keys.values())[:n_embedded],
        "baseline_features": list(range(512)), "auto_labels": None,
        "heatmap_grid": [heatmap_grid] * 2 if heatmap_grid else None, "heatmap_slots": GRID if heatmap_grid else 0,
        "classnames": [f"class {i}" for i in range(N_CLASSES)],
        "seed": seed}))
    return ev


APPTEST = """
import json, os, sys, time
t0 = time.perf_counter()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=600).run()
assert not at.exception, at.exception
first = time.perf_counter() - t0
n_features = int(sys.argv[2])
times = []
at.sidebar.radio(key="page").set_value("Feature page").run()
for f in [int(x) for x in sys.argv[3].split(",")]:
    at.session_state["feature"] = f
    t = time.perf_counter()
    at.run()
    times.append(time.perf_counter() - t)
    assert at.title[0].value == f"Feature {f}", at.title[0].value
print(json.dumps({"first_run_s": first, "feature_s": times}))
"""


def browser_times(ev: Path, n_pages: int) -> dict:
    """Launch the explorer and time, in headless Chromium: launch -> health, launch -> the Overview drawn,
    and "next" on the Feature page -> the next feature's title and all its images drawn."""
    binary = find_chromium()
    if binary is None:
        return {}
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    browser = Chromium(binary)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sae_lightning.explorer", f"eval_dir={ev}", f"port={port}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - start > 300:
                    raise RuntimeError("the explorer did not start") from None
                time.sleep(0.05)
        health = time.perf_counter() - start
        browser.goto(f"http://localhost:{port}/?page=overview")
        browser.wait_for("document.body.innerText.includes('SAE Explorer: overview')", timeout=300)
        browser.wait_for("document.querySelectorAll('canvas, svg.marks').length >= 2", timeout=300)
        browser.wait_for(SETTLED, timeout=300)
        first_page = time.perf_counter() - start
        first = int(np.random.default_rng(2).integers(0, 1000))
        browser.goto(f"http://localhost:{port}/?page=feature&feature={first}")
        browser.wait_for(f"document.querySelector('h1') && document.querySelector('h1').innerText === "
                         f"'Feature {first}'")
        pages = []
        for f in range(first + 1, first + 1 + n_pages):
            t = time.perf_counter()
            browser.click("next ▶")
            browser.wait_for(f"document.querySelector('h1') && document.querySelector('h1').innerText === "
                             f"'Feature {f}' && {LOADED_IMAGES} >= {GRID} && "
                             f"[...document.images].every(i => i.complete) && ({SETTLED})")
            pages.append(time.perf_counter() - t)
        return {"health_s": health, "first_page_s": first_page, "browser_feature_s": pages}
    finally:
        browser.close()
        os.killpg(proc.pid, 9)
        proc.wait(10)


def measure(ev: Path, n_features: int, n_pages: int = 20) -> dict:
    features = np.random.default_rng(1).integers(0, n_features, n_pages).tolist()
    env = dict(os.environ, SAE_EXPLORER_EVAL_DIR=str(ev), SAE_EXPLORER_RUN_DIR=str(ev.parent))
    app = ROOT / "sae_lightning" / "explorer" / "app.py"
    done = subprocess.run([sys.executable, "-c", APPTEST, str(app), str(n_features), ",".join(map(str, features))],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | browser_times(ev, n_pages)


def directory_mib(path: Path) -> dict[str, float]:
    return {p.relative_to(path).as_posix(): p.stat().st_size / 2**20 for p in sorted(path.rglob("*")) if p.is_file()}


def run(quick: bool = False, n_features: int | None = None, n_thumbnails: int | None = None,
        keep: str | None = None, heatmap_grid: int = 0) -> Section:
    n_features = n_features or (4096 if quick else SEED_FEATURES)
    n_thumbnails = n_thumbnails or (12_000 if quick else SEED_THUMBNAILS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep) if keep else Path(tmp)
        start = time.perf_counter()
        ev = generate(root, n_features, n_thumbnails, heatmap_grid=heatmap_grid)
        generated = time.perf_counter() - start
        sizes = directory_mib(ev)
        result = measure(ev, n_features)
        load = os.getloadavg()[0]
    pages = np.array(result["feature_s"])
    rows = [["first AppTest run (imports, bundle load, Overview)", result["first_run_s"]],
            ["Feature page script run, median (AppTest, warm)", float(np.median(pages))],
            ["Feature page script run, max", float(pages.max())]]
    if "health_s" in result:
        drawn = np.array(result["browser_feature_s"])
        rows = [["launch -> server answers", result["health_s"]],
                ["launch -> Overview drawn in Chromium", result["first_page_s"]],
                ["Feature page, 'next' -> drawn with its images, median", float(np.median(drawn))],
                ["Feature page, 'next' -> drawn, max", float(drawn.max())], *rows]
    heat = f", {heatmap_grid}x{heatmap_grid} patch heatmaps over every top-16 grid" if heatmap_grid else ""
    files = [[name, f"{mib:,.1f}"] for name, mib in sizes.items()] + [["total", f"{sum(sizes.values()):,.1f}"]]
    body = f"""
A generated bundle of {n_features:,} features and {n_thumbnails:,} top-image thumbnails (+ {N_GAME:,} game
images), {N_NEURONS:,} MLP neurons, {EMBED_DIM}-d embeddings{heat} (written in {generated:.0f} s). "launch" is
`python -m sae_lightning.explorer eval_dir=...` starting; "drawn" means headless Chromium shows the page's
title, charts/images loaded and no placeholder left; "next" is a click on the Feature page's next button,
{len(pages)} times. The AppTest rows time only the Python side of a page, in a fresh process. 1-minute load
average during the measurement: {load:.1f} on {os.cpu_count()} CPUs (a busy machine stretches every time).

{table(["measure", "seconds"], rows)}

{table(["file", "MiB"], files)}
"""
    return Section("Explorer: app start and feature page at the seed's size", body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=SEED_FEATURES)
    parser.add_argument("--thumbnails", type=int, default=SEED_THUMBNAILS)
    parser.add_argument("--keep", default=None, help="write the bundle here and keep it")
    parser.add_argument("--heatmap-grid", type=int, default=0,
                        help="patch grid side of a patch-token run's heatmaps (16: ViT-L/14); 0: a class-token run")
    args = parser.parse_args(argv)
    print(run(n_features=args.features, n_thumbnails=args.thumbnails, keep=args.keep,
              heatmap_grid=args.heatmap_grid).body)


if __name__ == "__main__":
    main()
