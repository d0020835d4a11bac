"""Automatic feature labels: each feature gets the vocabulary words whose CLIP text embedding
("A photo of a {label}.") is closest (cosine) to a vector in CLIP's joint space that stands for the feature.

The vector, by method:

- `encoder_lens` / `decoder_lens` (the seed's "logit lens"): the feature's encoder column W_enc[:, f] or
  decoder row W_dec[f] mapped straight through the vision tower's `ln_post` and projection. `ln_post`'s bias
  is left out: it is the same vector for every feature and would only pull every feature towards one label.
- `intervention`: the decoder row, scaled by the feature's mean top activation, is added to the hooked tokens
  of `label_images` real held-out images; the remaining blocks run (`backbone.forward_from`); the vector is the
  mean change of the unit image embedding.
- `top_images`: the mean unit image embedding of the feature's top-k images (among the images the ground-truth
  consumer kept) minus the mean over all of them.

Vocabulary: in the scene world one word per attribute value (`SCENE_WORDS`, e.g. "red", "star", "two objects",
"striped background", "red star"), so a label is scored against ground_truth.py's best value of each
monosemantic feature (top-1 / top-5 accuracy). Elsewhere: the evaluation's class names (ImageNet's for
real CLIP) plus the shipped general concept list `concepts.txt`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.functional import layer_norm, normalize

from sae_lightning.world.scenes import COUNT_WORDS

PROMPT = "A photo of a {label}."
METHODS = ("encoder_lens", "decoder_lens", "intervention", "top_images")
# the best top-1 on the demo scene world (BENCHMARKS.md); without ground truth the only one computed
DEFAULT_METHOD = "decoder_lens"
TOP_LABELS = 5
CONCEPTS_FILE = Path(__file__).with_name("concepts.txt")

EFFECT_WORDS = {"none": "clean sharp photo", "pixelated": "pixelated image", "blurred": "blurry image",
                "old_photo": "old sepia photo", "chromatic_aberration": "chromatic aberration"}
BACKGROUND_WORDS = {"plain": "plain background", "gradient": "gradient background", "noise": "noisy background",
                    "stripes": "striped background"}


def scene_word(value: str) -> str:
    """The vocabulary word of a scene attribute value ("colour=red" -> "red", "count=2" -> "two objects")."""
    group, _, v = value.partition("=")
    if group == "count":
        return f"{COUNT_WORDS[int(v)]} objects" if int(v) > 1 else "single object"
    if group == "size":
        return f"{v} object"
    if group == "background":
        return BACKGROUND_WORDS[v]
    if group == "effect":
        return EFFECT_WORDS[v]
    return v  # colour, shape, object ("red star")


def concept_vocabulary(classnames: list[str] | None) -> list[str]:
    """The class names (if any) then the shipped concept list, duplicates dropped, order kept."""
    concepts = [w.strip() for w in CONCEPTS_FILE.read_text(encoding="utf-8").splitlines()]
    words = [*(classnames or []), *(w for w in concepts if w and not w.startswith("#"))]
    return list(dict.fromkeys(words))


@torch.no_grad()
def text_embeddings(backbone, labels: list[str], batch_size: int = 256) -> Tensor:
    """[L, E] unit text embeddings of "A photo of a {label}."."""
    prompts = [PROMPT.format(label=label) for label in labels]
    parts = [backbone.encode_text(prompts[i : i + batch_size]).float() for i in range(0, len(prompts), batch_size)]
    return normalize(torch.cat(parts), dim=-1)


@torch.no_grad()
def lens_vectors(backbone, directions: Tensor) -> Tensor:
    """[C, d] residual directions -> [C, E]: layer_norm with ln_post's weight (no bias), then the projection."""
    visual = backbone.visual
    ln = visual.ln_post
    weight = ln.weight.float() if getattr(ln, "weight", None) is not None else None
    out = layer_norm(directions.float().to(backbone.device), (directions.shape[1],), weight=weight, eps=ln.eps)
    return out @ visual.proj.float() if visual.proj is not None else out


def _token_mask(tokens: str, n_tokens: int, device) -> Tensor:
    mask = torch.zeros(n_tokens, device=device)
    if tokens == "cls":
        mask[0] = 1
    elif tokens == "patches":
        mask[1:] = 1
    else:
        mask[:] = 1
    return mask


@torch.no_grad()
def intervention_vectors(backbone, layer: int, tokens: str, residuals: Tensor, directions: Tensor, scales: Tensor,
                         chunk_images: int = 1024) -> Tensor:
    """Mean change of the unit image embedding when scale * direction is added to the hooked tokens.

    residuals: [M, T, d] at block `layer`; directions: [C, d]; scales: [C] -> [C, E]."""
    device = backbone.device
    dtype = backbone.visual.conv1.weight.dtype
    res = residuals.to(device, dtype)
    m, t, _ = res.shape
    base = normalize(backbone.forward_from(res, layer).float(), dim=-1)  # [M, E]
    mask = _token_mask(tokens, t, device)[None, :, None]  # [1, T, 1]
    per = max(1, chunk_images // m)
    out = []
    for start in range(0, directions.shape[0], per):
        d = directions[start : start + per].to(device).float() * scales[start : start + per].to(device)[:, None]
        edited = res[None] + (d[:, None, None, :] * mask).to(dtype)  # [c, M, T, d]
        emb = normalize(backbone.forward_from(edited.reshape(-1, t, res.shape[2]), layer).float(), dim=-1)
        out.append((emb.reshape(d.shape[0], m, -1) - base[None]).mean(1))
    return torch.cat(out) if out else torch.empty(0, base.shape[1], device=device)


def top_image_vectors(data, k: int) -> Tensor:
    """[F, E]: mean unit embedding of each feature's top-k images (activation > 0) among the kept images,
    minus the mean over all of them; NaN rows for features that fire on none of them."""
    emb = data.embeddings.float()
    mean_all = emb.mean(0)
    out = torch.full((data.n_features, emb.shape[1]), math.nan)
    order = torch.argsort(data.sae_cols, stable=True)
    cols, rows, vals = data.sae_cols[order], data.sae_rows[order], data.sae_values[order]
    bounds = torch.searchsorted(cols, torch.arange(data.n_features + 1))
    for f in torch.nonzero(bounds[1:] > bounds[:-1]).squeeze(1).tolist():
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        top = rows[lo:hi][torch.argsort(vals[lo:hi], descending=True, stable=True)[:k]]
        out[f] = emb[top].mean(0) - mean_all
    return out


def rank_labels(vectors: Tensor, text: Tensor, k: int = TOP_LABELS) -> tuple[Tensor, Tensor]:
    """vectors [C, E] (NaN rows: unlabelled), text [L, E] unit -> (indices [C, k] int64, cosines [C, k] float32);
    -1 / NaN for unlabelled rows (or beyond L labels)."""
    k_eff = min(k, text.shape[0])
    cos = normalize(vectors.float().to(text.device), dim=-1) @ text.T
    values, indices = cos.nan_to_num(-math.inf).topk(k_eff, dim=1)
    bad = ~torch.isfinite(vectors.float()).all(1).to(text.device)
    indices[bad], values[bad] = -1, math.nan
    idx = torch.full((vectors.shape[0], k), -1, dtype=torch.long)
    val = torch.full((vectors.shape[0], k), math.nan)
    idx[:, :k_eff], val[:, :k_eff] = indices.cpu(), values.float().cpu()
    return idx, val


def label_accuracy(top: Tensor, truth: Tensor, mask: Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of label indices `top` [C, k] against `truth` [C] over rows in `mask` [C]."""
    n = int(mask.sum())
    if n == 0:
        return math.nan, math.nan
    hits = top[mask] == truth[mask][:, None]
    return hits[:, 0].double().mean().item(), hits[:, :TOP_LABELS].any(1).double().mean().item()


def implied(value: str) -> set[str]:
    """A scene value and what it implies: "object=red star" -> itself, "colour=red", "shape=star"."""
    group, _, v = value.partition("=")
    if group == "object":
        colour, _, shape = v.partition(" ")
        return {value, f"colour={colour}", f"shape={shape}"}
    return {value}


def related_accuracy(top: Tensor, truth: Tensor, mask: Tensor, values: list[str]) -> float:
    """Top-1 accuracy counting a label as right when it names the true value, a part of it ("red" for a "red
    star" feature) or a whole it is part of ("red star" for a "red" feature)."""
    rows = torch.nonzero(mask).squeeze(1).tolist()
    if not rows:
        return math.nan
    hits = [int(top[f, 0]) >= 0 and (values[int(top[f, 0])] in implied(values[int(truth[f])])
                                     or values[int(truth[f])] in implied(values[int(top[f, 0])])) for f in rows]
    return sum(hits) / len(hits)


def method_vectors(method: str, *, backbone, sae, data, layer: int, tokens: str, scales: Tensor, live: Tensor,
                   k: int) -> Tensor:
    """[F, E] vectors of one method; NaN rows for features that are not live (never labelled)."""
    n_features = sae.d_sae
    out = torch.full((n_features, backbone.embed_dim or sae.d_in), math.nan)
    idx = torch.nonzero(live).squeeze(1)
    if method == "top_images":
        vectors = top_image_vectors(data, k)
        out[idx] = vectors[idx]
        return out
    if method in ("encoder_lens", "decoder_lens"):
        directions = sae.W_enc.detach().T if method == "encoder_lens" else sae.W_dec.detach()
        out[idx] = lens_vectors(backbone, directions[idx.to(directions.device)]).float().cpu()
        return out
    if method == "intervention":
        if data.residuals.numel() == 0:
            return out
        scale = scales[idx].nan_to_num(1.0)
        out[idx] = intervention_vectors(backbone, layer, tokens, data.residuals,
                                        sae.W_dec.detach()[idx.to(sae.W_dec.device)], scale).float().cpu()
        return out
    raise ValueError(f"label method {method!r}: use one of {METHODS}")


def feature_labels(ev) -> None:
    """Item 5: top-5 labels per live feature for each method (all four where ground truth scores them, else the
    default only, or `label_methods`), their top-1 / top-5 accuracy over the monosemantic features."""
    data = ev.stream.extra.get("ground_truth")
    if data is None or data.n_images == 0:
        return
    inputs = ev.inputs
    backbone, sae = inputs.backbone, inputs.sae
    if getattr(backbone, "embed_dim", None) is None or not hasattr(backbone.model, "encode_text"):
        return
    scenes = data.values is not None
    vocabulary = [scene_word(v) for v in data.values] if scenes else concept_vocabulary(inputs.classnames)
    methods = inputs.cfg.get("label_methods") or (METHODS if scenes else (DEFAULT_METHOD,))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"label_methods={list(methods)}: unknown {unknown}; use some of {list(METHODS)}")
    text = text_embeddings(backbone, vocabulary).cpu()
    stats = ev.stream.stats
    live = (stats.density > 0).cpu()
    scales = stats.mean_top_activation.float().cpu()
    truth = ev.features.get("gt_best_value")
    mono = ev.features.get("gt_monosemantic")
    scores = {}
    for method in methods:
        vectors = method_vectors(method, backbone=backbone, sae=sae, data=data, layer=inputs.layer,
                                 tokens=inputs.tokens, scales=scales, live=live, k=int(inputs.cfg.top_k))
        top, cos = rank_labels(vectors, text)
        ev.features |= {f"label_{method}": top, f"label_{method}_cosine": cos}
        if scenes and truth is not None:
            top1, top5 = label_accuracy(top, truth.cpu(), mono.cpu())
            scores[method] = top1
            ev.metrics |= {f"label_{method}_top1": top1, f"label_{method}_top5": top5,
                           f"label_{method}_top1_related": related_accuracy(top, truth.cpu(), mono.cpu(), data.values)}
    default = DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0]
    ev.features["label"] = ev.features[f"label_{default}"][:, 0].clone()
    if hasattr(ev, "feature_names"):
        ev.feature_names["label_vocabulary"] = vocabulary
    ev.metrics |= {"label_method": default, "label_vocabulary_size": len(vocabulary),
                   "label_monosemantic_features": int(mono.sum()) if (scenes and mono is not None) else None}
    finite = {m: s for m, s in scores.items() if math.isfinite(s)}
    if finite:
        best = max(finite, key=finite.get)
        ev.metrics["label_best_method"] = best
        shown = ", ".join(f"{m} {100 * s:.1f}%" for m, s in scores.items())
        ev.notes.append(f"Feature labels against the ground truth (top-1 over {int(mono.sum())} monosemantic "
                        f"features): {shown}; the default method is {default}.")
        examples = torch.nonzero(mono).squeeze(1)[:8].tolist()
        if examples:
            shown = "; ".join(
                f"{f}: {data.values[int(truth[f])]} -> \"{vocabulary[int(ev.features['label'][f])]}\""
                for f in examples)
            ev.notes.append(f"Example labels ({default}; feature: best attribute value -> label): {shown}.")
