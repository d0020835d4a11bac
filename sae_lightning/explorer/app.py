"""The SAE Explorer (Streamlit). Launch with `python -m sae_lightning.explorer run=<run>`.

Reads `<run>/eval/` (features.*, metrics.json, plots/, explorer/) from $SAE_EXPLORER_EVAL_DIR; the
"Inspect an image" page also loads the run's backbone and SAE from $SAE_EXPLORER_RUN_DIR. Pages can be
opened by URL: `?page=feature&feature=12`, `?page=overview|navigator|game|inspect`.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import streamlit as st

from sae_lightning.explorer import heatmap
from sae_lightning.explorer.game import N_CANDIDATES, N_TOP
from sae_lightning.explorer.store import GRID_SIZE, Bundle, open_bundle

PAGES = {"overview": "Overview", "navigator": "Feature navigator", "feature": "Feature page",
         "game": "Guess the image", "inspect": "Inspect an image"}
SLUG = {v: k for k, v in PAGES.items()}
SCATTER_MAX_POINTS = 10_000  # features drawn in the interactive scatter (a seeded sample beyond that; the browser
# draws 10,000 in about a second, 20,000 in two on a 2-core machine)
TABLE_MAX_ROWS = 2_000
# the seed post's numbers (ViT-L/14, layer 22, cls, expansion 64, ImageNet-1k)
SEED_NUMBERS = {"explained_variance_uncentred": ("explained variance (uncentred)", 0.86),
                "dead_features": ("dead features", 0),
                "alignment_threshold": ("alignment threshold (random max cosine)", 0.14),
                "alignment_fraction_aligned": ("features aligned to a neuron", 0.5),
                "l0": ("L0", None), "contrastive_loss_score": ("contrastive loss score", None),
                "cluster_fraction": ("ultra-low-density cluster fraction", None)}


@st.cache_resource(show_spinner="Loading the evaluation bundle")
def load_bundle(eval_dir: str) -> Bundle:
    return open_bundle(eval_dir)


def feature_table(eval_dir: str) -> pd.DataFrame:
    """One row per feature: the columns the navigator filters and sorts on (built once per bundle, shared:
    read-only; st.cache_data would copy 65,536 rows on every rerun)."""
    return load_bundle(eval_dir).table()


@st.cache_resource(show_spinner=False)
def scatter_points(eval_dir: str, n: int) -> pd.DataFrame:
    """The Overview scatter's points: live features (a seeded random n of them beyond n), only the columns the
    chart uses (Streamlit sends the whole frame to the browser) and one tooltip string each."""
    df = feature_table(eval_dir)
    live = df.loc[df["density"] > 0, ["feature", "log10_density", "mean_top_activation", "label_entropy",
                                      "top_label"]]
    if len(live) > n:
        live = live.sample(n, random_state=0)
    tooltip = ("feature " + live["feature"].astype(str) + ": " + live["top_label"] + ", mean top activation "
               + live["mean_top_activation"].map("{:.3g}".format) + ", label entropy "
               + live["label_entropy"].map("{:.2f}".format))
    return pd.DataFrame({"feature": live["feature"], "log10_density": live["log10_density"],
                         "log10_mean_top_activation": np.log10(live["mean_top_activation"].clip(lower=1e-30)),
                         "label_entropy": live["label_entropy"], "tooltip": tooltip}).reset_index(drop=True)


def eval_dir() -> str:
    path = os.environ.get("SAE_EXPLORER_EVAL_DIR")
    if not path:
        st.error("No evaluation to show: launch with `python -m sae_lightning.explorer run=<run>`.")
        st.stop()
    return path


def open_feature(f: int) -> None:
    st.session_state.feature = int(f)
    st.session_state.page = PAGES["feature"]


def thumbs(b: Bundle, keys: list[str]) -> dict[str, bytes]:
    return b.thumbs.get_many(list(keys))


def image_grid(b: Bundle, items: list[tuple[str, float, int]], columns: int = 8, width: int = 88,
               heat: np.ndarray | None = None) -> None:
    """Thumbnails with captions "<class>\n<activation>", `columns` per row; heat [len(items), grid_h, grid_w]:
    per-patch activations drawn over them (one scale for all: the largest value among them)."""
    images = thumbs(b, [k for k, _, _ in items])
    if heat is not None:
        vmax = heatmap.scale(heat[: len(items)])
        images = {key: heatmap.overlay(images[key], heat[i], vmax) for i, (key, _, _) in enumerate(items)
                  if key in images}
    for start in range(0, len(items), columns):
        cols = st.columns(columns)
        for col, (key, value, label) in zip(cols, items[start : start + columns]):
            if key in images:
                col.image(images[key], caption=f"{b.label_name(label)} · {value:.3g}", width=width)
            else:
                col.caption(f"{key}: no thumbnail")


def bars(x: str, y: str, title: str | None = None) -> dict:
    """Vega-Lite spec of a histogram from pre-binned rows (bin start `x`, bin end "end", count `y`). The charts
    are Vega-Lite specs given to Streamlit directly: Altair would add half a second of import to the start."""
    return {"mark": "bar", "encoding": {
        "x": {"field": x, "type": "quantitative", "bin": "binned", "title": title or x},
        "x2": {"field": "end"}, "y": {"field": y, "type": "quantitative"}}}


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "undefined"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------- pages


def scatter_clicked() -> None:
    """A click on a point of the Overview's scatter opens that feature's page."""
    points = st.session_state.scatter.selection.get("pick") or []
    if points and "feature" in points[0]:
        open_feature(int(points[0]["feature"]))


def page_overview(b: Bundle, ed: str) -> None:
    st.title("SAE Explorer: overview")
    m = b.metrics
    st.caption(f"{m.get('backbone', '?')} layer {m.get('layer', '?')} ({m.get('tokens', '?')} tokens), "
               f"{b.n_features:,} features, {m.get('n_images', '?'):,} held-out images")
    rows = [{"metric": name, "this run": fmt(m.get(key)), "seed (ViT-L/14)": "not reported" if seed is None
             else fmt(seed)}
            for key, (name, seed) in SEED_NUMBERS.items()]
    rows.append({"metric": "machine player, guess the image (chance 0.125)",
                 "this run": fmt(b.info.get("game_accuracy")), "seed (ViT-L/14)": "none"})
    st.table(pd.DataFrame(rows))
    df = feature_table(ed)
    st.subheader("Feature density")
    counts, edges = np.histogram(df["log10_density"], bins=60)
    hist = pd.DataFrame({"log10 density": edges[:-1], "end": edges[1:], "features": counts})
    st.vega_lite_chart(hist, bars("log10 density", "features", "log10(density + 1e-10)"), width="stretch")
    st.subheader("Density vs mean top activation (click a point to open the feature)")
    live = scatter_points(ed, SCATTER_MAX_POINTS)
    if len(live) < int((df["density"] > 0).sum()):
        st.caption(f"a random {len(live):,} of the live features")
    # one precomputed tooltip string per point: Streamlit's Vega runs every encoding expression through an
    # interpreter, once per point, so a multi-field formatted tooltip costs seconds at 20,000 points
    scatter = {
        "mark": {"type": "circle", "size": 18},
        "params": [{"name": "pick", "select": {"type": "point", "fields": ["feature"]}}],
        "encoding": {
            "x": {"field": "log10_density", "type": "quantitative", "title": "log10 density"},
            "y": {"field": "log10_mean_top_activation", "type": "quantitative",
                  "title": "log10 mean top activation"},
            "color": {"field": "label_entropy", "type": "quantitative", "scale": {"scheme": "viridis"},
                      "title": "label entropy"},
            "tooltip": {"field": "tooltip", "type": "nominal"}}}
    st.vega_lite_chart(live, scatter, on_select=scatter_clicked, key="scatter", width="stretch")
    st.subheader("Neuron alignment")
    cols = st.columns(2)
    for col, name in zip(cols, ("alignment_max_cosine", "alignment_counts")):
        png = Path(ed) / "plots" / f"{name}.png"
        if png.is_file():
            col.image(str(png))


def page_navigator(b: Bundle, ed: str) -> None:
    st.title("Feature navigator")
    df = feature_table(ed)
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("Go to feature", 0, b.n_features - 1, key="goto")
    c1.button("Open", on_click=lambda: open_feature(st.session_state.goto), key="goto_open")
    c2.button("Random feature", key="random",
              on_click=lambda: open_feature(int(np.random.default_rng().integers(b.n_features))))
    cur = st.session_state.get("feature", 0)
    c3.button("Previous", key="nav_prev", on_click=open_feature, args=(max(cur - 1, 0),))
    c4.button("Next", key="nav_next", on_click=open_feature, args=(min(cur + 1, b.n_features - 1),))

    st.subheader("Filter")
    f1, f2 = st.columns(2)
    lo, hi = float(df["log10_density"].min()), float(df["log10_density"].max())
    dens = f1.slider("log10 density", math.floor(lo), math.ceil(hi) if hi > lo else math.floor(lo) + 1,
                     (math.floor(lo), math.ceil(hi) if hi > lo else math.floor(lo) + 1), key="f_density")
    ent_max = float(np.nanmax(df["label_entropy"])) if df["label_entropy"].notna().any() else 1.0
    ent = f2.slider("label entropy (nats)", 0.0, max(ent_max, 0.01), (0.0, max(ent_max, 0.01)), key="f_entropy")
    undefined_ok = f2.checkbox("include undefined entropy", True, key="f_entropy_undef")
    cluster = f1.selectbox("cluster membership", ["any", "in the cluster", "outside"], key="f_cluster")
    aligned = f1.selectbox("neuron alignment", ["any", "aligned", "not aligned"], key="f_aligned")
    search = f2.text_input("search labels (auto label or top class)", key="f_search")
    mask = df["log10_density"].between(*dens)
    ent_ok = df["label_entropy"].between(*ent)
    mask &= ent_ok | (df["label_entropy"].isna() & undefined_ok)
    if cluster != "any":
        mask &= df["in_cluster"] == (cluster == "in the cluster")
    if aligned == "aligned":
        mask &= df["aligned_neurons"] > 0
    elif aligned == "not aligned":
        mask &= df["aligned_neurons"] == 0
    if search:
        text = df["auto_label"] + " " + df["top_label"]
        mask &= text.str.contains(search, case=False, regex=False)
    found = df[mask]
    s1, s2 = st.columns(2)
    sort = s1.selectbox("sort by", ["feature", "density", "mean_top_activation", "label_entropy",
                                    "max_mlp_cosine", "aligned_neurons"], key="f_sort")
    descending = s2.checkbox("descending", False, key="f_desc")
    found = found.sort_values(sort, ascending=not descending, na_position="last")
    st.markdown(f"**{len(found):,} features match** (showing the first {min(len(found), TABLE_MAX_ROWS):,}; "
                f"select a row to open it)")
    shown = found.head(TABLE_MAX_ROWS).drop(columns=["log10_density"]).reset_index(drop=True)
    event = st.dataframe(shown, on_select="rerun", selection_mode="single-row", key="table", hide_index=True)
    rows = event.selection.rows if event is not None else []
    if rows:
        f = int(shown["feature"].iloc[rows[0]])
        st.button(f"Open feature {f}", on_click=open_feature, args=(f,), key="open_from_table")


def page_feature(b: Bundle, ed: str) -> None:
    f = int(st.session_state.get("feature", 0))
    t = b.features
    c1, c2, c3 = st.columns([1, 1, 6])
    c1.button("◀ previous", on_click=open_feature, args=(max(f - 1, 0),), key="feat_prev")
    c2.button("next ▶", on_click=open_feature, args=(min(f + 1, b.n_features - 1),), key="feat_next")
    st.title(f"Feature {f}")
    label = b.auto_label(f)
    if label:
        st.markdown(f"**auto label:** {label}")
    k = t["top_values"].shape[1]
    m = st.columns(5)
    m[0].metric("density", fmt(float(t["density"][f])))
    m[1].metric(f"mean top-{k} activation", fmt(float(t["mean_top_activation"][f])))
    m[2].metric("label entropy (nats)", fmt(float(t["label_entropy"][f])))
    m[3].metric("max MLP cosine", fmt(float(t["max_mlp_cosine"][f])) if "max_mlp_cosine" in t else "n/a")
    m[4].metric("in the low-density cluster", "yes" if "in_cluster" in t and bool(t["in_cluster"][f]) else "no")
    top = b.top_images(f, GRID_SIZE)
    st.subheader(f"Top {len(top)} images")
    heat = b.heatmaps(f) if top and b.has_heatmaps else None
    if heat is not None:
        show = st.toggle("Heatmaps: the feature's activation on each patch", value=True, key="heatmaps")
        if show:
            gh, gw = heat.shape[1:]
            st.caption(f"Each image's {gh}x{gw} patches tinted by the feature's activation on them, from none "
                       f"(clear) to {heatmap.scale(heat[: len(top)]):.3g}, the largest over these images (yellow).")
        else:
            heat = None
    if top:
        image_grid(b, top, columns=4, width=120, heat=heat)
    else:
        st.info("This feature never fired on the held-out images.")
    feature_visualisation(ed, f)
    left, right = st.columns(2)
    edges = np.asarray(b.info["hist_bins_log10"])
    counts = b.arrays["hist_counts"][f]
    hist = pd.DataFrame({"log10 activation": edges[:-1], "end": edges[1:], "tokens": counts})
    left.markdown("**Activation histogram** (f > 0)")
    left.vega_lite_chart(hist, bars("log10 activation", "tokens"), width="stretch")
    cos = b.mlp_cosine(f)
    right.markdown(f"**Cosine with each of the {len(cos):,} MLP neurons** (encoder vector)")
    right.vega_lite_chart(pd.DataFrame({"neuron": np.arange(len(cos)), "cosine": cos}), {
        "mark": {"type": "line", "strokeWidth": 1}, "encoding": {
            "x": {"field": "neuron", "type": "quantitative", "title": "MLP neuron"},
            "y": {"field": "cosine", "type": "quantitative"}}}, width="stretch", height=250)
    st.subheader("Nearest features (decoder cosine)")
    idx = b.arrays["neighbour_indices"][f].tolist()
    cosines = b.arrays["neighbour_cosines"][f].tolist()
    first = {j: b.top_images(j, 1) for j in idx}
    images = thumbs(b, [g[0][0] for g in first.values() if g])
    cols = st.columns(min(len(idx), 10) or 1)
    for col, j, c in zip(cols, idx, cosines):
        if first[j] and first[j][0][0] in images:
            col.image(images[first[j][0][0]], width=64)
        col.button(f"{j} ({c:.2f})", key=f"nn_{j}", on_click=open_feature, args=(j,))
    if b.info.get("tokens") not in (None, "cls") and not b.has_heatmaps:
        st.caption("This bundle has no per-patch heatmaps (bundle format 1): re-run evaluate.py to add them.")


@st.cache_data(show_spinner=False)
def visualisation_summary(path: str, mtime: float) -> dict:
    """visualise.py's summary.json (docs/visualisation.md), re-read when the file changes."""
    return json.loads(Path(path).read_text())


def feature_visualisation(ed: str, f: int) -> None:
    """The images visualise.py optimised for feature f (<eval>/visualisations/), when there are any."""
    folder = Path(ed) / "visualisations"
    png = folder / f"feature_{f}_images.png"
    if not png.is_file():
        return
    st.subheader("Feature visualisation (images optimised to drive this feature)")
    summary, entry = folder / "summary.json", None
    if summary.is_file():
        try:
            entry = visualisation_summary(str(summary), summary.stat().st_mtime)["features"].get(str(f))
        except (ValueError, KeyError, TypeError):
            entry = None
    st.image(str(png), width="content")
    if entry:
        acts = ", ".join(f"{a:.3g}" for a in entry.get("activations") or [])
        natural, ratio = entry.get("top_natural_activation"), entry.get("ratio")
        st.caption(f"activation on each start: {acts}; best {fmt(entry.get('best_activation'))} against the top "
                   f"natural image's {fmt(natural)} (ratio {fmt(ratio)}). Details: docs/visualisation.md.")
    else:
        st.caption(f"{png.name} (no entry for this feature in summary.json: an earlier visualise.py call).")


def new_round() -> None:
    b = load_bundle(eval_dir())
    rng = np.random.default_rng()
    n = len(b.game_keys)
    target = int(rng.integers(n))
    others = rng.choice(np.delete(np.arange(n), target), N_CANDIDATES - 1, replace=False)
    cand = np.append(others, target)
    rng.shuffle(cand)
    st.session_state.round = {"target": target, "candidates": cand.tolist(), "picked": None}


def pick(i: int) -> None:
    r = st.session_state.round
    if r["picked"] is not None:
        return
    r["picked"] = i  # -1: revealed without a pick, a miss
    st.session_state.played = st.session_state.get("played", 0) + 1
    if i >= 0 and r["candidates"][i] == r["target"]:
        st.session_state.score = st.session_state.get("score", 0) + 1
        st.session_state.streak = st.session_state.get("streak", 0) + 1
    else:
        st.session_state.streak = 0


def page_game(b: Bundle, ed: str) -> None:
    st.title("Guess the image")
    st.caption(f"One held-out image is hidden. You see its SAE activations and its top-{N_TOP} features; "
               f"pick it among {N_CANDIDATES} candidates (chance {1 / N_CANDIDATES:.1%}).")
    if len(b.game_keys) < N_CANDIDATES:
        st.warning(f"The bundle holds {len(b.game_keys)} game images; a round needs {N_CANDIDATES}. Evaluate on "
                   f"held-out shards with more images than top images.")
        return
    if "round" not in st.session_state:
        new_round()
    r = st.session_state.round
    s = st.columns(3)
    s[0].metric("score", f"{st.session_state.get('score', 0)} / {st.session_state.get('played', 0)}")
    s[1].metric("streak", st.session_state.get("streak", 0))
    acc = b.info.get("game_accuracy")
    s[2].metric("machine player", fmt(acc) if acc is not None else "n/a")
    feats, vals = b.game_activations(r["target"])
    st.markdown(f"**Its SAE activations** ({len(feats)} features fire)")
    acts = pd.DataFrame({"feature": feats, "activation": vals})
    st.vega_lite_chart(acts, {"mark": {"type": "bar", "width": 2}, "encoding": {
        "x": {"field": "feature", "type": "quantitative", "scale": {"domain": [0, b.n_features]}},
        "y": {"field": "activation", "type": "quantitative"},
        "tooltip": [{"field": "feature", "type": "quantitative"}, {"field": "activation", "type": "quantitative"}]}},
        width="stretch")
    for f, v in zip(feats[:N_TOP].tolist(), vals[:N_TOP].tolist()):
        st.markdown(f"**Feature {f}** (activation {v:.3g})")
        image_grid(b, b.top_images(f, 8), columns=8, width=72)
    st.subheader("Which image is it?")
    cand_keys = [b.game_keys[c] for c in r["candidates"]]
    images = thumbs(b, cand_keys)
    cols = st.columns(N_CANDIDATES // 2)
    for i, key in enumerate(cand_keys):
        col = cols[i % len(cols)]
        col.image(images[key], width=110)
        col.button(f"Pick {i + 1}", key=f"pick_{i}", on_click=pick, args=(i,), disabled=r["picked"] is not None)
    if r["picked"] is not None:
        right = r["candidates"].index(r["target"])
        if r["picked"] == right:
            st.success(f"Correct: it was candidate {right + 1}.")
        else:
            picked = f"you picked {r['picked'] + 1}" if r["picked"] >= 0 else "revealed"
            st.error(f"Wrong: it was candidate {right + 1} ({picked}).")
        label = int(b.arrays["game_labels"][r["target"]])
        st.image(images[cand_keys[right]], caption=f"the image: {b.label_name(label)}", width=160)
        st.button("Next round", on_click=new_round, key="next_round")
    else:
        st.button("Reveal (counts as a miss)", on_click=pick, args=(-1,), key="reveal")


@st.cache_resource(show_spinner="Loading the backbone and the SAE")
def load_models(run_dir: str, sae_name: str = ""):
    import hydra
    from omegaconf import OmegaConf

    from sae_lightning.evaluation.inputs import run_backbone
    from sae_lightning.sae import SparseAutoencoder

    run = Path(run_dir)
    cfg_path = run / ".hydra" / "resolved.yaml"
    sae_dir = run / "sae" / sae_name if sae_name else run / "sae"  # a run with several SAEs: sae/<name>/
    if not cfg_path.is_file() or not (sae_dir / "cfg.json").is_file():
        raise FileNotFoundError(f"{run} is not a training run directory (no .hydra/resolved.yaml or "
                                f"{sae_dir.relative_to(run)}/cfg.json)")
    # a run trained from an activation cache has no backbone of its own: the cache's manifest names it
    backbone_cfg, layer, tokens = run_backbone(OmegaConf.load(cfg_path))
    backbone = hydra.utils.instantiate(backbone_cfg, device="cpu")
    sae = SparseAutoencoder.load(sae_dir, device="cpu").eval()
    return backbone, sae, backbone.resolve_layer(layer), tokens


def image_activations(run_dir: str, image: PIL.Image.Image) -> np.ndarray:
    """[F] per-image activations (max over the hooked tokens) of one image."""
    import torch

    from sae_lightning.backbone import select_tokens

    backbone, sae, layer, tokens = load_models(run_dir, os.environ.get("SAE_EXPLORER_SAE_NAME", ""))
    x = backbone.preprocess(image.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        acts = sae.encode(select_tokens(backbone.residual(x, layer), tokens).float())
    return (acts.amax(1) if acts.dim() == 3 else acts)[0].numpy()


def page_inspect(b: Bundle, ed: str) -> None:
    st.title("Inspect an image")
    run_dir = os.environ.get("SAE_EXPLORER_RUN_DIR") or str(Path(ed).parent)
    upload = st.file_uploader("Upload an image", type=["png", "jpg", "jpeg", "webp"], key="upload")
    choice = st.selectbox("... or pick one of the game set", ["(none)"] + b.game_keys, key="inspect_pick")
    image, name = None, None
    if upload is not None:
        try:
            image = PIL.Image.open(io.BytesIO(upload.getvalue()))
            image.load()
            name = upload.name
        except Exception as exn:  # noqa: BLE001 - any undecodable upload is the user's input error
            st.error(f"{upload.name} is not a readable image: {exn}")
            return
    elif choice != "(none)":
        image = PIL.Image.open(io.BytesIO(thumbs(b, [choice])[choice]))
        name = choice
    if image is None:
        st.info("Upload an image or pick one to see which features fire on it.")
        return
    try:
        acts = image_activations(run_dir, image)
    except (FileNotFoundError, ValueError) as exn:  # no run there; a run with no backbone (planted)
        st.error(str(exn))
        return
    st.image(image, caption=name, width=160)
    order = np.argsort(-acts)
    firing = int((acts > 0).sum())
    st.markdown(f"**{firing} features fire** on {name}")
    for f in order[: min(10, firing)].tolist():
        c1, c2 = st.columns([3, 1])
        c1.markdown(f"**Feature {f}** (activation {acts[f]:.3g})")
        c2.button(f"Open feature {f}", key=f"inspect_open_{f}", on_click=open_feature, args=(f,))
        image_grid(b, b.top_images(f, 8), columns=8, width=72)


def main() -> None:
    st.set_page_config(page_title="SAE Explorer", layout="wide")
    ed = eval_dir()
    try:
        b = load_bundle(ed)
    except (FileNotFoundError, ValueError) as exn:
        st.error(str(exn))
        st.stop()
    if "page" not in st.session_state:  # first run of this session: the URL decides
        st.session_state.page = PAGES.get(st.query_params.get("page", "overview"), PAGES["overview"])
        if "feature" in st.query_params:
            try:
                st.session_state.feature = min(max(int(st.query_params["feature"]), 0), b.n_features - 1)
            except ValueError:
                st.session_state.feature = 0
    st.session_state.setdefault("feature", 0)
    page = st.sidebar.radio("Page", list(PAGES.values()), key="page")
    st.sidebar.caption(f"{ed}")
    st.query_params["page"] = SLUG[page]
    if page == PAGES["feature"]:
        st.query_params["feature"] = str(st.session_state.feature)
    {"overview": page_overview, "navigator": page_navigator, "feature": page_feature, "game": page_game,
     "inspect": page_inspect}[SLUG[page]](b, ed)


main()
