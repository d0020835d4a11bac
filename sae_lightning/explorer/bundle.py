"""The explorer's data bundle, `<eval>/explorer/` (docs/explorer.md): written once at the end of evaluation.

`write_explorer_bundle` reads what evaluation already wrote (features.safetensors/json) and adds what the app
needs: JPEG thumbnails of every top image and of a held-out game set in one SQLite file, per-feature
activation histograms on fixed bins, cosines with the hooked block's MLP neurons, nearest features by decoder
cosine, auto labels (optional), the game set's sparse SAE activations and image embeddings for the game's
machine player (sae_lightning.explorer.game). Everything over F x F or F x H is computed in chunks.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import webdataset as wds
from safetensors.torch import load_file, save_file
from torch.nn.functional import normalize

from sae_lightning.backbone import select_tokens
from sae_lightning.data.shards import decode_samples
from sae_lightning.evaluation.fetch import sample_key, thumbnail
from sae_lightning.explorer.store import (
    BUNDLE_DIR,
    BUNDLE_VERSION,
    GRID_SIZE,
    HEATMAPS_FILE,
    HIST_BINS,
    HIST_HIGH,
    HIST_LOW,
    MLP_COSINE_SCALE,
    ThumbnailStore,
    hist_edges,
)

log = logging.getLogger(__name__)

class ActivationHistogram:
    """Per-feature counts of f > 0 on fixed log10 bins, accumulated batch by batch: counts [F, HIST_BINS]."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu") -> None:
        self.n_features = n_features
        self.counts = torch.zeros(n_features * HIST_BINS, dtype=torch.long, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, acts: torch.Tensor) -> None:
        """acts: [..., F] activations of any number of tokens."""
        acts = acts.reshape(-1, self.n_features).to(self.counts.device)
        self.n_tokens += acts.shape[0]
        rows, cols = torch.nonzero(acts > 0, as_tuple=True)
        if rows.numel() == 0:
            return
        width = (HIST_HIGH - HIST_LOW) / HIST_BINS
        b = ((torch.log10(acts[rows, cols].double()) - HIST_LOW) / width).floor().long().clamp_(0, HIST_BINS - 1)
        self.counts += torch.bincount(cols * HIST_BINS + b, minlength=self.counts.numel())

    def compute(self) -> torch.Tensor:
        """[F, HIST_BINS] int32."""
        return self.counts.view(self.n_features, HIST_BINS).to(torch.int32).cpu()


@torch.no_grad()
def mlp_cosines(encoder_vectors: torch.Tensor, neurons: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Cosine of every feature's encoder vector with every MLP out vector, int8-quantised (q / 127).

    encoder_vectors: [F, d] (W_enc columns); neurons: [H, d]. Returns [F, H] int8 on the CPU; the float
    matrix is only ever [chunk, H].
    """
    m = normalize(neurons.float(), dim=1)
    out = torch.empty(encoder_vectors.shape[0], m.shape[0], dtype=torch.int8)
    for start in range(0, encoder_vectors.shape[0], chunk):
        cos = normalize(encoder_vectors[start : start + chunk].float().to(m.device), dim=1) @ m.T
        out[start : start + chunk] = (cos * MLP_COSINE_SCALE).round().clamp(-127, 127).to(torch.int8).cpu()
    return out


@torch.no_grad()
def nearest_features(decoder: torch.Tensor, n: int = 10, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The n features with the largest decoder cosine to each feature (itself excluded).

    decoder: [F, d] (W_dec rows). Returns (indices [F, n] int32, cosines [F, n] float32), descending.
    The F x F cosine matrix is only ever [chunk, F].
    """
    w = normalize(decoder.float(), dim=1)
    f = w.shape[0]
    n = min(n, f - 1)
    idx_out = torch.empty(f, n, dtype=torch.int32)
    cos_out = torch.empty(f, n, dtype=torch.float32)
    for start in range(0, f, chunk):
        cos = w[start : start + chunk] @ w.T
        rows = torch.arange(cos.shape[0], device=cos.device)
        cos[rows, rows + start] = -math.inf
        values, indices = torch.topk(cos, n, dim=1)
        idx_out[start : start + chunk] = indices.int().cpu()
        cos_out[start : start + chunk] = values.cpu()
    return idx_out, cos_out


class TopImageHeatmaps:
    """Each feature's activation on every patch of its top images, filled image by image in the fetch pass.

    top_indices: [F, k] stream indices (-1: empty slot, as in features.safetensors); the first `n_slots` slots
    are kept. `maps` is [F, n_slots, P] float16, P the image's patch tokens in row-major grid order (NaN: an
    empty slot or an image that was not found).
    """

    def __init__(self, top_indices: torch.Tensor, n_slots: int, n_patches: int) -> None:
        idx = top_indices[:, :n_slots].long()
        feats, slots = torch.nonzero(idx >= 0, as_tuple=True)
        images = idx[feats, slots]
        order = torch.argsort(images, stable=True)
        self.images, self.feats, self.slots = images[order], feats[order], slots[order]
        self.maps = torch.full((idx.shape[0], n_slots, n_patches), math.nan, dtype=torch.float16)

    @torch.no_grad()
    def update(self, patch_acts: torch.Tensor, indices: list[int]) -> None:
        """patch_acts: [B, P, F] activations on the patch tokens of B images; indices: their stream indices."""
        query = torch.tensor(indices, dtype=torch.long)
        lo = torch.searchsorted(self.images, query).tolist()
        hi = torch.searchsorted(self.images, query, right=True).tolist()
        for b, (start, stop) in enumerate(zip(lo, hi)):
            if start == stop:
                continue
            feats = self.feats[start:stop]
            self.maps[feats, self.slots[start:stop]] = patch_acts[b][:, feats.to(patch_acts.device)].T.half().cpu()


@torch.no_grad()
def patch_activations(backbone, sae, images: torch.Tensor, *, layer: int, tokens: str,
                      max_tokens: int = 4096) -> torch.Tensor:
    """SAE activations on the patch tokens: images [B, 3, H, W] (preprocessed) -> [B, P, F], P = the patch grid's
    cells in row-major order (for tokens="all" the class token is dropped). Encoded max_tokens rows at a time."""
    if tokens not in ("patches", "all"):
        raise ValueError(f"tokens={tokens!r} has no per-patch activations")
    x = select_tokens(backbone.residual(images, layer), tokens)  # [B, T, d]
    if tokens == "all":
        x = x[:, 1:]
    per_chunk = max(1, max_tokens // x.shape[1])
    return torch.cat([sae.encode(x[i : i + per_chunk].float()) for i in range(0, x.shape[0], per_chunk)])


def jpeg_bytes(image: PIL.Image.Image, size: int, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(thumbnail(image, size)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _raw_samples(urls: list[str], keep=None) -> wds.DataPipeline:
    stages = [wds.SimpleShardList(list(urls)), wds.tarfile_to_samples(handler=wds.warn_and_continue)]
    if keep is not None:
        stages.append(wds.select(lambda s: sample_key(s) in keep))
    return wds.DataPipeline(*stages)


def _embed(backbone, images: list[PIL.Image.Image], device: torch.device) -> torch.Tensor:
    batch = torch.stack([backbone.preprocess(im) for im in images]).to(device)
    return normalize(backbone.encode_image(batch).float(), dim=1).cpu()


@dataclass
class GameSet:
    keys: list[str]
    labels: list[int]
    indptr: torch.Tensor  # [n + 1] int64 (CSR rows)
    features: torch.Tensor  # [nnz] int32
    values: torch.Tensor  # [nnz] float32
    embeddings: torch.Tensor  # [n, D] float32, normalised
    thumbs: dict[str, bytes]


@torch.no_grad()
def _held_out_pass(backbone, sae, urls, *, layer, tokens, exclude: set[str], n_game: int, n_hist_images: int,
                   batch_size: int, size: int, device: torch.device, hist: ActivationHistogram | None) -> GameSet:
    """Stream the shards in order: histogram over n_hist_images images, the first n_game images whose key is
    not a top image become the game set (their per-image activation: max over the hooked tokens)."""
    keys, labels, thumbs, pending, embeds = [], [], {}, [], []
    indptr, feats, vals = [0], [], []
    seen = 0

    def flush(items):
        nonlocal seen
        images = torch.stack([backbone.preprocess(it.image) for it in items]).to(device)
        acts = sae.encode(select_tokens(backbone.residual(images, layer), tokens).float())  # [B(, T), F]
        if hist is not None and seen < n_hist_images:
            hist.update(acts[: n_hist_images - seen])
        seen += len(items)
        rows = [i for i, it in enumerate(items) if it.key not in exclude][: n_game - len(keys)]
        if not rows:
            return
        per_image = acts.amax(1) if acts.dim() == 3 else acts  # [B, F]
        emb = normalize(backbone.encode_image(images[rows]).float(), dim=1).cpu()
        for row, i in enumerate(rows):
            it = items[i]
            nz = torch.nonzero(per_image[i] > 0).squeeze(1)
            feats.append(nz.int().cpu())
            vals.append(per_image[i, nz].float().cpu())
            indptr.append(indptr[-1] + nz.numel())
            keys.append(it.key)
            labels.append(it.label)
            thumbs[it.key] = jpeg_bytes(it.image, size)
            embeds.append(emb[row])

    samples = decode_samples(_raw_samples(urls), lambda im: im)
    for item in samples:
        if not hasattr(item, "image"):  # an undecodable sample (logged by decode_samples)
            continue
        pending.append(item)
        if len(pending) == batch_size:
            flush(pending)
            pending = []
        if len(keys) >= n_game and seen >= n_hist_images:
            break
    if pending and (len(keys) < n_game or seen < n_hist_images):
        flush(pending)
    if len(keys) < n_game:
        log.warning("the held-out shards gave only %d game images (not top images) of the %d asked for",
                    len(keys), n_game)
    return GameSet(keys, labels, torch.tensor(indptr, dtype=torch.long),
                   torch.cat(feats) if feats else torch.zeros(0, dtype=torch.int32),
                   torch.cat(vals) if vals else torch.zeros(0),
                   torch.stack(embeds) if embeds else torch.zeros(0, 1), thumbs)


def _fetch_top_images(urls, wanted: set[str], embed_keys: set[str], backbone, store: ThumbnailStore, size: int,
                      device: torch.device, batch_size: int,
                      heat: tuple[TopImageHeatmaps, dict[str, int], Any] | None = None) -> dict[str, torch.Tensor]:
    """Thumbnails of `wanted` into the store (a decode-only-what-is-needed pass); embeddings of `embed_keys`.

    heat: (heatmaps, key -> stream index, activations(images) -> [B, P, F]) to record every wanted image's
    per-patch activations as it passes (patch-token runs)."""
    embeddings: dict[str, torch.Tensor] = {}
    rows, to_embed, to_heat, found = [], [], [], 0

    def flush_heat() -> None:
        maps, index_of, activations = heat
        batch = torch.stack([backbone.preprocess(t.image) for t in to_heat]).to(device)
        maps.update(activations(batch), [index_of[t.key] for t in to_heat])
        to_heat.clear()

    for item in decode_samples(_raw_samples(urls, wanted), lambda im: im):
        if not hasattr(item, "image"):  # an undecodable sample (logged by decode_samples)
            continue
        rows.append((item.key, jpeg_bytes(item.image, size)))
        found += 1
        if item.key in embed_keys:
            to_embed.append(item)
        if heat is not None:
            to_heat.append(item)
            if len(to_heat) >= batch_size:
                flush_heat()
        if len(rows) >= 2048:
            store.put_many(rows)
            rows = []
        if len(to_embed) >= batch_size:
            embeddings.update(zip([t.key for t in to_embed], _embed(backbone, [t.image for t in to_embed], device)))
            to_embed = []
        if found == len(wanted):
            break
    store.put_many(rows)
    if to_embed:
        embeddings.update(zip([t.key for t in to_embed], _embed(backbone, [t.image for t in to_embed], device)))
    if to_heat:
        flush_heat()
    if found < len(wanted):
        log.warning("%d of %d top images were not found in the shards", len(wanted) - found, len(wanted))
    return embeddings


def read_features(eval_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """features.safetensors + features.json of an evaluation (docs/format-eval.md)."""
    st, meta = eval_dir / "features.safetensors", eval_dir / "features.json"
    if not st.is_file() or not meta.is_file():
        raise FileNotFoundError(f"{eval_dir} has no features.safetensors/features.json: run evaluate.py first")
    return load_file(str(st)), json.loads(meta.read_text())


@torch.no_grad()
def write_explorer_bundle(eval_dir: str | Path, sae, backbone, *, layer: int, tokens: str, shards: list[str],
                          n_game: int = 1000, n_hist_images: int = 10_000, histograms: torch.Tensor | None = None,
                          auto_labels: dict[int, str] | None = None, n_neighbours: int = 10,
                          thumb_size: int = 128, batch_size: int = 64, device: str | torch.device = "cpu",
                          seed: int = 0, chunk: int = 1024, max_tokens: int = 4096) -> dict[str, Any]:
    """Write `<eval_dir>/explorer/` and return the game metric (explorer.game.game_metric on the bundle).

    Call after evaluation wrote features.safetensors/json. `shards`: the held-out shard URLs (top images are
    fetched from them by key; the game set is their first `n_game` images, in shard order, that are not a top
    image of any feature). `histograms`: [F, HIST_BINS] counts from an ActivationHistogram fed during the
    evaluation pass; None computes them over the first `n_hist_images` images of the shards instead.
    `auto_labels`: feature id -> text, optional. Patch-token runs (`tokens` "patches" or "all") also get
    `heatmaps.safetensors`: each feature's activation on every patch of its top-16 images, computed in the
    fetch pass (`max_tokens` SAE rows at a time).
    """
    from sae_lightning.explorer.game import game_metric

    eval_dir = Path(eval_dir)
    tensors, meta = read_features(eval_dir)
    n_features = int(meta["n_features"])
    if sae.d_sae != n_features:
        raise ValueError(f"the SAE has {sae.d_sae} features but {eval_dir}/features.json has {n_features}")
    if histograms is not None and tuple(histograms.shape) != (n_features, HIST_BINS):
        raise ValueError(f"histograms must be [{n_features}, {HIST_BINS}], got {list(histograms.shape)}")
    if n_game < 8:
        raise ValueError(f"n_game={n_game}: the game needs at least 8 images (1 + 7 candidates)")
    device = torch.device(device)
    out = eval_dir / BUNDLE_DIR
    out.mkdir(parents=True, exist_ok=True)
    db_path = out / "thumbnails.sqlite"
    db_path.unlink(missing_ok=True)
    store = ThumbnailStore(db_path, write=True)
    store.put_index(meta["image_keys"])

    top_keys = set(meta["image_keys"].values())
    hist = ActivationHistogram(n_features, device) if histograms is None else None
    game = _held_out_pass(backbone, sae, shards, layer=layer, tokens=tokens, exclude=top_keys, n_game=n_game,
                          n_hist_images=n_hist_images if histograms is None else 0, batch_size=batch_size,
                          size=thumb_size, device=device, hist=hist)
    store.put_many(game.thumbs.items())
    counts = histograms.to(torch.int32).cpu() if histograms is not None else hist.compute()

    # top images the machine player needs: top-16 of every feature in some game image's top 5
    top_idx = tensors["top_indices"][:, :GRID_SIZE]
    game_feats = set()
    for i in range(len(game.keys)):
        lo, hi = int(game.indptr[i]), int(game.indptr[i + 1])
        order = torch.argsort(game.values[lo:hi], descending=True)[:5]
        game_feats.update(game.features[lo:hi][order].tolist())
    embed_keys = {meta["image_keys"][str(i)] for f in game_feats for i in top_idx[f].tolist() if i >= 0}
    # the random-feature baseline draws from every live feature: embed their grids too (cheap on small runs,
    # capped to the features in the game's top-5 plus 512 random live ones at scale)
    live = torch.nonzero(tensors["top_indices"][:, 0] >= 0).squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    extra = live[torch.randperm(live.numel(), generator=gen)[:512]].tolist()
    embed_keys |= {meta["image_keys"][str(i)] for f in extra for i in top_idx[f].tolist() if i >= 0}
    heat, grid = None, None
    if tokens != "cls":
        grid = [int(g) for g in backbone.visual.grid_size]
        maps = TopImageHeatmaps(tensors["top_indices"], GRID_SIZE, grid[0] * grid[1])
        index_of = {key: int(i) for i, key in meta["image_keys"].items()}
        heat = (maps, index_of, lambda images: patch_activations(backbone, sae, images, layer=layer, tokens=tokens,
                                                                 max_tokens=max_tokens))
    embeddings = _fetch_top_images(shards, top_keys, embed_keys, backbone, store, thumb_size, device, batch_size,
                                   heat)
    store.close()
    if heat is not None:
        save_file({"heatmaps": heat[0].maps.view(n_features, GRID_SIZE, *grid).contiguous()},
                  str(out / HEATMAPS_FILE))
    else:
        (out / HEATMAPS_FILE).unlink(missing_ok=True)

    log.info("explorer: MLP cosines and nearest features of %d features (chunked)", n_features)
    neurons = backbone.mlp_out_vectors(layer)
    cos_q = mlp_cosines(sae.W_enc.detach().T, neurons, chunk=4 * chunk)
    save_file({"mlp_cosine_q": cos_q}, str(out / "mlp_cosines.safetensors"))
    nn_idx, nn_cos = nearest_features(sae.W_dec.detach(), n_neighbours, chunk=chunk)

    embed_list = sorted(embeddings)
    arrays = {
        "hist_counts": counts,
        "neighbour_indices": nn_idx,
        "neighbour_cosines": nn_cos,
        "game_indptr": game.indptr,
        "game_features": game.features,
        "game_values": game.values,
        "game_labels": torch.tensor(game.labels, dtype=torch.long),
        "game_embeddings": game.embeddings.half(),
        "top_embeddings": (torch.stack([embeddings[k] for k in embed_list]) if embed_list
                           else torch.zeros(0, game.embeddings.shape[1])).half(),
    }
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(out / "explorer.safetensors"))
    info = {
        "format_version": BUNDLE_VERSION,
        "n_features": n_features,
        "n_neurons": int(neurons.shape[0]),
        "n_game": len(game.keys),
        "n_thumbnails": len(top_keys) + len(game.keys),
        "thumb_size": thumb_size,
        "layer": layer,
        "tokens": tokens,
        "hist_bins_log10": hist_edges().tolist(),
        "hist_n_tokens": None if hist is None else hist.n_tokens,
        "mlp_cosine_scale": MLP_COSINE_SCALE,
        "n_neighbours": int(nn_idx.shape[1]),
        "game_keys": game.keys,
        "top_embedding_keys": embed_list,
        "baseline_features": extra,
        "auto_labels": {str(k): v for k, v in auto_labels.items()} if auto_labels else None,
        "classnames": meta.get("classnames"),
        "heatmap_grid": grid,
        "heatmap_slots": GRID_SIZE if grid else 0,
        "seed": seed,
    }
    (out / "bundle.json").write_text(json.dumps(info) + "\n")
    result = game_metric(eval_dir, seed=seed)
    info |= {"game_accuracy": result["accuracy"], "game_baseline_accuracy": result["baseline_accuracy"],
             "game_rounds": result["n_rounds"]}
    (out / "bundle.json").write_text(json.dumps(info) + "\n")
    return result
