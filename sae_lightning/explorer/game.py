"""'Guess the image' as a metric: a machine player that sees only an image's top features.

Each round hides one game image among `n_candidates` (8) thumbnails: itself and 7 other game images drawn
at random. The player sees the image's top-5 features (their activations a_f and their top-16 images, never
the image). It forms the query q = sum_f a_f e_f / sum_f a_f, where e_f is the activation-weighted mean of
the normalised image embeddings of feature f's top images, and picks the candidate whose normalised
embedding has the largest dot product with q. The baseline does the same with 5 random live features in
place of the image's own (same weights), so it is near chance (1/8) unless the candidates themselves are
unbalanced. Rounds whose image fired no feature with top images are not played (n_rounds counts the rest).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

N_CANDIDATES = 8
N_TOP = 5


def candidate_sets(n_images: int, seed: int = 0, n_candidates: int = N_CANDIDATES) -> np.ndarray:
    """[n_images, n_candidates] game indices: row t holds t and n_candidates - 1 distinct others, shuffled."""
    if n_images < n_candidates:
        raise ValueError(f"{n_images} game images: need at least {n_candidates} for one round")
    rng = np.random.default_rng(seed)
    rows = np.empty((n_images, n_candidates), dtype=np.int64)
    for t in range(n_images):
        others = rng.choice(n_images - 1, n_candidates - 1, replace=False)
        others = others + (others >= t)  # skip t itself
        row = np.append(others, t)
        rng.shuffle(row)
        rows[t] = row
    return rows


def feature_embeddings(features: list[int], top_keys: list[list[str]], top_values: list[list[float]],
                       embedding_of: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """e_f = activation-weighted mean of the embeddings of feature f's top images (those with an embedding)."""
    out = {}
    for f, keys, values in zip(features, top_keys, top_values):
        pairs = [(embedding_of[k], v) for k, v in zip(keys, values) if k in embedding_of and v > 0]
        if pairs:
            weights = np.array([v for _, v in pairs])
            out[f] = (np.stack([e for e, _ in pairs]) * weights[:, None]).sum(0) / weights.sum()
    return out


def machine_pick(feature_ids: list[int], weights: list[float], feature_emb: dict[int, np.ndarray],
                 candidate_emb: np.ndarray) -> int | None:
    """Index (into the candidates [C, D]) of the player's pick, or None when no feature has an embedding."""
    pairs = [(feature_emb[f], w) for f, w in zip(feature_ids, weights) if f in feature_emb]
    if not pairs:
        return None
    w = np.array([w for _, w in pairs])
    query = (np.stack([e for e, _ in pairs]) * w[:, None]).sum(0) / w.sum()
    return int(np.argmax(candidate_emb @ query))


def play(top_features: list[tuple[list[int], list[float]]], feature_emb: dict[int, np.ndarray],
         game_emb: np.ndarray, candidates: np.ndarray, baseline_pool: list[int], seed: int = 0) -> dict:
    """Play one round per game image; returns {accuracy, baseline_accuracy, n_rounds}.

    top_features[t]: (feature ids, activations) of game image t's top features; game_emb [N, D] normalised;
    candidates [N, C] from candidate_sets; baseline_pool: live features with embeddings to draw from.
    """
    rng = np.random.default_rng(seed + 1)
    hits, base_hits, rounds = 0, 0, 0
    for t, (feats, acts) in enumerate(top_features):
        cand = candidates[t]
        pick = machine_pick(feats, acts, feature_emb, game_emb[cand])
        if pick is None:
            continue
        rounds += 1
        hits += int(cand[pick] == t)
        random_feats = rng.choice(baseline_pool, size=len(feats), replace=False).tolist()
        base_pick = machine_pick(random_feats, acts, feature_emb, game_emb[cand])
        base_hits += int(base_pick is not None and cand[base_pick] == t)
    return {"accuracy": hits / rounds if rounds else None,
            "baseline_accuracy": base_hits / rounds if rounds else None,
            "n_rounds": rounds}


def game_metric(eval_dir: str | Path, seed: int = 0, n_top: int = N_TOP,
                n_candidates: int = N_CANDIDATES) -> dict:
    """The machine player on a written bundle (<eval_dir>/explorer/): {accuracy, baseline_accuracy, n_rounds}.

    Chance is 1 / n_candidates. Keys for metrics.json: game_machine_accuracy, game_baseline_accuracy, ...
    """
    from sae_lightning.explorer.store import Bundle

    bundle = Bundle(eval_dir)
    n = len(bundle.game_keys)
    emb = bundle.embeddings()
    embedding_of = dict(zip(bundle.info["top_embedding_keys"], emb["top_embeddings"].astype(np.float32)))
    top_features = []
    for i in range(n):
        feats, vals = bundle.game_activations(i)
        top_features.append((feats[:n_top].tolist(), vals[:n_top].tolist()))
    wanted = sorted({f for feats, _ in top_features for f in feats} | set(bundle.info["baseline_features"]))
    grids = [bundle.top_images(f) for f in wanted]
    feature_emb = feature_embeddings(wanted, [[k for k, _, _ in g] for g in grids],
                                     [[v for _, v, _ in g] for g in grids], embedding_of)
    pool = [f for f in bundle.info["baseline_features"] if f in feature_emb]
    if n < n_candidates or len(pool) < n_top:
        log.warning("the guessing game is undefined: %d game images (need %d) and %d baseline features with "
                    "top images (need %d)", n, n_candidates, len(pool), n_top)
        return {"accuracy": None, "baseline_accuracy": None, "n_rounds": 0, "chance": 1 / n_candidates}
    game_emb = emb["game_embeddings"].astype(np.float32)
    game_emb = game_emb / np.linalg.norm(game_emb, axis=1, keepdims=True).clip(1e-12)
    result = play(top_features, feature_emb, game_emb, candidate_sets(n, seed, n_candidates), pool, seed)
    return {**result, "chance": 1 / n_candidates}


def metrics_entries(result: dict) -> dict:
    """The keys the lead adds to metrics.json / report.md."""
    return {"game_machine_accuracy": result["accuracy"], "game_baseline_accuracy": result["baseline_accuracy"],
            "game_rounds": result["n_rounds"]}

