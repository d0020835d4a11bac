"""The read side of the explorer bundle (docs/explorer.md), numpy only: the app starts without torch.

`Bundle(eval_dir)` opens `<eval_dir>/features.*`, `metrics.json` and `<eval_dir>/explorer/`;
`ThumbnailStore` is the SQLite file of JPEG thumbnails. sae_lightning.explorer.bundle writes both.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

BUNDLE_VERSION = 2  # 2: heatmaps.safetensors and bundle.json heatmap_grid / heatmap_slots (patch-token runs)
READABLE_VERSIONS = (1, 2)  # a version-1 bundle reads as one without heatmaps
BUNDLE_DIR = "explorer"
HEATMAPS_FILE = "heatmaps.safetensors"
GRID_SIZE = 16
# fixed histogram bins for every feature: log10(activation) in [HIST_LOW, HIST_HIGH], values outside clamp
# into the end bins; only f > 0 is counted (the zeros are (1 - density) * n_tokens)
HIST_LOW, HIST_HIGH, HIST_BINS = -4.0, 3.0, 56
MLP_COSINE_SCALE = 127.0  # int8 storage: cosine ~= q / 127
EMBEDDINGS = ("game_embeddings", "top_embeddings")


def hist_edges() -> np.ndarray:
    """The HIST_BINS + 1 bin edges in log10(activation)."""
    return np.linspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1)



class ThumbnailStore:
    """One SQLite file, table `thumbnails(key TEXT PRIMARY KEY, jpeg BLOB) WITHOUT ROWID` and (format 2)
    `image_index(idx INTEGER PRIMARY KEY, key TEXT NOT NULL)`, features.json's `image_keys` as a table: the app
    looks up the 16 keys of a grid instead of parsing 200,000 of them from JSON at start."""

    def __init__(self, path: str | Path, write: bool = False) -> None:
        self.path = Path(path)
        if write:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=OFF")
            self.db.execute("CREATE TABLE IF NOT EXISTS thumbnails (key TEXT PRIMARY KEY, jpeg BLOB NOT NULL) "
                            "WITHOUT ROWID")
        else:
            if not self.path.is_file():
                raise FileNotFoundError(f"no thumbnail store at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def put_index(self, image_keys: dict[str, str]) -> None:
        """features.json's image_keys (stream index as a string -> key) into `image_index`."""
        self.db.execute("CREATE TABLE IF NOT EXISTS image_index (idx INTEGER PRIMARY KEY, key TEXT NOT NULL)")
        self.db.executemany("INSERT OR REPLACE INTO image_index VALUES (?, ?)",
                            ((int(i), key) for i, key in image_keys.items()))
        self.db.commit()

    def has_index(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='image_index'").fetchone() \
            is not None

    def keys_of(self, indices: list[int]) -> dict[int, str]:
        """Stream index -> image key, from `image_index`."""
        marks = ",".join("?" * len(indices))
        return dict(self.db.execute(f"SELECT idx, key FROM image_index WHERE idx IN ({marks})", indices))

    def put_many(self, rows: Iterable[tuple[str, bytes]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO thumbnails VALUES (?, ?)", rows)
        self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ",".join("?" * len(part))
            found.update(self.db.execute(f"SELECT key, jpeg FROM thumbnails WHERE key IN ({marks})", part))
        return found

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM thumbnails").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class Bundle:
    """Read side for the app: the per-feature table, the bundle arrays and lazy MLP-cosine rows."""

    def __init__(self, eval_dir: str | Path) -> None:
        self.eval_dir = Path(eval_dir)
        self.dir = self.eval_dir / BUNDLE_DIR
        if not (self.dir / "bundle.json").is_file():
            raise FileNotFoundError(f"{self.dir}/bundle.json not found: evaluate the run with the explorer "
                                    f"bundle (python evaluate.py run=<run>) first")
        self.info = json.loads((self.dir / "bundle.json").read_text())
        if self.info.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{self.dir}: bundle format {self.info.get('format_version')}, this app reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}: re-run evaluate.py")
        self.features: dict[str, np.ndarray] = load_file(str(self.eval_dir / "features.safetensors"))
        self._meta: dict | None = None
        self._meta_lock = threading.Lock()
        metrics = self.eval_dir / "metrics.json"
        self.metrics = json.loads(metrics.read_text()) if metrics.is_file() else {}
        with safe_open(str(self.dir / "explorer.safetensors"), "np") as fh:  # embeddings: game_metric only
            self.arrays = {k: fh.get_tensor(k) for k in fh.keys() if k not in EMBEDDINGS}
        self._cosines = safe_open(str(self.dir / "mlp_cosines.safetensors"), "np")
        heat = self.dir / HEATMAPS_FILE
        self._heatmaps = safe_open(str(heat), "np") if self.info.get("heatmap_grid") and heat.is_file() else None
        self.thumbs = ThumbnailStore(self.dir / "thumbnails.sqlite")
        self._indexed = self.thumbs.has_index()
        # format 2 copies the class names into bundle.json, so features.json (7 MB of image keys at the seed's
        # size) is parsed only if something asks for `meta`
        self.classnames: list[str] | None = (self.info["classnames"] if "classnames" in self.info
                                             else self.meta.get("classnames"))
        self.n_features = int(self.info["n_features"])
        self.game_keys: list[str] = self.info["game_keys"]
        self._table = None
        self._table_lock = threading.Lock()

    def table(self):
        """The navigator's per-feature table (a pandas DataFrame, one row per feature; built once, then shared:
        treat it as read-only). Columns: feature, density, log10_density, mean_top_activation, label_entropy,
        in_cluster, max_mlp_cosine, aligned_neurons, top_label (the most common class among the top images),
        auto_label."""
        with self._table_lock:
            if self._table is None:
                self._table = _feature_table(self)
            return self._table

    @property
    def meta(self) -> dict:
        """features.json (docs/format-eval.md), parsed on first use."""
        with self._meta_lock:
            if self._meta is None:
                self._meta = json.loads((self.eval_dir / "features.json").read_text())
            return self._meta

    def label_name(self, label: int) -> str:
        if self.classnames and 0 <= label < len(self.classnames):
            return self.classnames[label]
        return "unlabelled" if label < 0 else f"label {label}"

    def auto_label(self, f: int) -> str | None:
        labels = self.info.get("auto_labels") or {}
        return labels.get(str(f))

    def mlp_cosine(self, f: int) -> np.ndarray:
        """[H] cosines of feature f's encoder vector with every MLP neuron (read lazily, one row)."""
        row = self._cosines.get_slice("mlp_cosine_q")[f : f + 1]
        return row[0].astype(np.float32) / self.info["mlp_cosine_scale"]

    @property
    def has_heatmaps(self) -> bool:
        return self._heatmaps is not None

    def heatmaps(self, f: int) -> np.ndarray | None:
        """[heatmap_slots, grid_h, grid_w] float32: feature f's activation on every patch of its top images, in
        the order of `top_images(f)` (NaN: empty slot); None when the bundle has none (class-token runs)."""
        if self._heatmaps is None:
            return None
        return self._heatmaps.get_slice("heatmaps")[f : f + 1][0].astype(np.float32)

    def top_images(self, f: int, n: int = GRID_SIZE) -> list[tuple[str, float, int]]:
        """(key, activation, label) of feature f's filled top slots, descending."""
        rows = []
        for i, v, lab in zip(self.features["top_indices"][f, :n].tolist(), self.features["top_values"][f, :n].tolist(),
                             self.features["top_labels"][f, :n].tolist()):
            if i < 0:
                break
            rows.append((i, v, lab))
        if self._indexed:
            keys = self.thumbs.keys_of([i for i, _, _ in rows])
        else:
            keys = {i: self.meta["image_keys"][str(i)] for i, _, _ in rows}
        return [(keys[i], v, lab) for i, v, lab in rows]

    def game_activations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Game image i's firing features and their activations (sparse row), by descending activation."""
        lo, hi = int(self.arrays["game_indptr"][i]), int(self.arrays["game_indptr"][i + 1])
        feats = self.arrays["game_features"][lo:hi]
        vals = self.arrays["game_values"][lo:hi]
        order = np.argsort(-vals, kind="stable")
        return feats[order], vals[order]

    def embeddings(self) -> dict[str, np.ndarray]:
        """game_embeddings [n_game, D] and top_embeddings [M, D] (float16, normalised)."""
        with safe_open(str(self.dir / "explorer.safetensors"), "np") as fh:
            return {k: fh.get_tensor(k) for k in EMBEDDINGS}


def most_common(labels: np.ndarray) -> np.ndarray:
    """[F, k] -> [F]: each row's most common value (ties: the smallest), from the runs of the sorted row."""
    if labels.shape[1] == 0:
        return np.full(labels.shape[0], -1, dtype=labels.dtype)
    s = np.sort(labels, axis=1)
    k = s.shape[1]
    starts = np.ones_like(s, dtype=bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    # position of the run start each entry belongs to, then the run length at each run's last entry
    pos = np.where(starts, np.arange(k), 0)
    np.maximum.accumulate(pos, axis=1, out=pos)
    length = np.arange(k) - pos + 1
    ends = np.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    length = np.where(ends, length, 0)
    return s[np.arange(len(s)), length.argmax(1)]  # argmax takes the first (smallest) of equal runs


def _feature_table(b: Bundle):
    import pandas as pd

    t = b.features
    mode = most_common(t["top_labels"]).tolist()
    fired = t["top_indices"][:, 0] >= 0
    names = [b.label_name(m) if ok else "" for m, ok in zip(mode, fired.tolist())]
    auto = b.info.get("auto_labels") or {}
    return pd.DataFrame({
        "feature": np.arange(b.n_features),
        "density": t["density"],
        "log10_density": np.log10(t["density"].astype(np.float64) + 1e-10),
        "mean_top_activation": t["mean_top_activation"],
        "label_entropy": t["label_entropy"],
        "in_cluster": t["in_cluster"] if "in_cluster" in t else np.zeros(b.n_features, bool),
        "max_mlp_cosine": t["max_mlp_cosine"] if "max_mlp_cosine" in t else np.nan,
        "aligned_neurons": t["aligned_neurons"] if "aligned_neurons" in t else -1,
        "top_label": names,
        "auto_label": [auto.get(str(f), "") for f in range(b.n_features)] if auto else [""] * b.n_features,
    })


_preloaded: dict[str, threading.Thread | Bundle | BaseException] = {}


def preload(eval_dir: str | Path, after: str | None = None) -> None:
    """Open the bundle and build its feature table in a background thread, so the app's first page finds them
    ready; `open_bundle` picks the result up. `after`: a URL to wait for first (the launcher passes the
    server's health check: loading then overlaps the browser loading the page, not the server starting,
    which it would slow down, the two sharing one interpreter lock)."""
    key = str(Path(eval_dir))

    def work() -> None:
        try:
            if after is not None:
                _wait_for(after, timeout=60.0)
            import pandas  # noqa: F401 - the app's own import, done while the browser loads the page

            bundle = Bundle(key)
            bundle.table()
            _preloaded[key] = bundle
        except BaseException as exn:  # noqa: BLE001 - re-raised by open_bundle in the app's thread
            _preloaded[key] = exn

    thread = threading.Thread(target=work, name="explorer-preload", daemon=True)
    _preloaded[key] = thread
    thread.start()


def _wait_for(url: str, timeout: float) -> None:
    import time
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)


def open_bundle(eval_dir: str | Path) -> Bundle:
    """The preloaded bundle of `eval_dir` when `preload` was called for it (waiting for it), else a new one."""
    key = str(Path(eval_dir))
    found = _preloaded.pop(key, None)
    if isinstance(found, threading.Thread):
        found.join()
        found = _preloaded.pop(key, None)
    if isinstance(found, BaseException):
        raise found
    return found if isinstance(found, Bundle) else Bundle(key)
