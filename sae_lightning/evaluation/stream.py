"""The single streaming pass over the held-out shards.

Per batch the backbone runs up to `layer` once; the SAE encodes the hooked tokens (in chunks of at most
`max_tokens` rows, so patch runs with 65,536 features fit), feeding the feature statistics, the
reconstruction metrics and any extra per-chunk consumer; the remaining blocks run three times for the
contrastive loss / zero-shot / KL.

A streaming analysis (e.g. ground-truth AUROC over image attributes) is one more `ChunkConsumer` handed to
`stream_pass(consumers={name: consumer})`; its `compute()` lands in `StreamResult.extra[name]`.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lightning.backbone import replace_tokens, select_tokens
from sae_lightning.data.shards import IMAGE_KEYS
from sae_lightning.evaluation.contrastive import ContrastiveAccumulator, class_text_features
from sae_lightning.evaluation.feature_stats import FeatureStats, FeatureStatsAccumulator, KeyTable
from sae_lightning.evaluation.reconstruction import ReconstructionAccumulator
from sae_lightning.sae import SparseAutoencoder

log = logging.getLogger(__name__)


@dataclass
class TokenChunk:
    """What the SAE saw for a few images of a batch."""

    x: Tensor  # [n, d] (cls) or [n, T, d]: the hooked activations
    x_hat: Tensor  # same shape: the SAE reconstruction
    acts: Tensor  # [n, F] or [n, T, F]: feature activations
    labels: Tensor  # [n] (-1 = unlabelled)
    index: Tensor  # [n] stream index of each image
    keys: list[str]  # [n] "<shard name>/<__key__>"


class ChunkConsumer(Protocol):
    """A streaming analysis: sees every chunk once, then computes its result."""

    def update(self, chunk: TokenChunk) -> None: ...

    def compute(self) -> Any: ...


@dataclass
class StreamResult:
    stats: FeatureStats
    keys: dict[int, str]
    reconstruction: dict[str, float]
    contrastive: dict[str, float]
    contrastive_undefined_reason: str | None
    n_skipped: int
    extra: dict[str, Any] = field(default_factory=dict)


def count_shard_images(urls: list[str], limit: int) -> int | None:
    """Images in the shards (samples with an image member), counted from tar headers without decoding.

    Counting stops once `limit` is reached (the pass reads no more). None when unknowable: a remote shard
    (http, pipe:, ...). An unreadable shard counts what could be read before the error, as the stream does.
    """
    total = 0
    for url in urls:
        if "://" in url or url.startswith("pipe:") or not Path(url).is_file():
            return None
        keys = set()
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    stem, _, ext = member.name.rpartition("/")[2].partition(".")
                    if member.isfile() and ext.lower() in IMAGE_KEYS:
                        keys.add(member.name.rpartition("/")[0] + "/" + stem)
        except (tarfile.TarError, OSError, EOFError):
            pass
        total += len(keys)
        if total >= limit:
            return limit
    return total


@torch.no_grad()
def stream_pass_many(backbone, saes: dict[str, SparseAutoencoder], loader, *, layer: int, tokens: str,
                     n_images: int, k: int, classnames: list[str] | None, contrastive_batch_size: int,
                     max_tokens: int, device: torch.device, total: int | None = None,
                     consumers: dict[str, dict[str, ChunkConsumer]] | None = None) -> dict[str, StreamResult]:
    """The single pass over the held-out images for one or several SAEs on the same hooked activations: per
    batch the backbone runs up to `layer` once and the original and zero-ablated CLIP features are computed
    once; each SAE encodes the same tokens [n, d] or [n, T, d] (chunks of `max_tokens` rows), feeds its
    feature statistics, reconstruction metrics and `consumers[name]`, and runs its own spliced branch for
    the contrastive loss, zero-shot accuracy and KL. Each SAE's result is what a pass with it alone gives.

    `total` is what the progress bar counts to (the images that will really be read; n_images if None).
    """
    consumers = {name: dict((consumers or {}).get(name) or {}) for name in saes}
    state = {name: {"stats": FeatureStatsAccumulator(sae.d_sae, k, device), "keys": KeyTable(),
                    "recon": ReconstructionAccumulator(sae.d_in, device)} for name, sae in saes.items()}
    text = class_text_features(backbone, classnames) if classnames else None
    for name in saes:
        state[name]["contrastive"] = (ContrastiveAccumulator(text, backbone.logit_scale(), contrastive_batch_size)
                                      if classnames else None)
    per_chunk = max(1, max_tokens // backbone.n_tokens_for(tokens))
    seen, skipped = 0, 0
    bar = tqdm(total=min(n_images, total) if total is not None else n_images, desc="evaluating", unit="img",
               dynamic_ncols=True)
    for batch in loader:
        skipped += int(batch["n_skipped"])
        take = min(len(batch["labels"]), n_images - seen)
        images = batch["images"][:take].to(device, non_blocking=True)
        labels = batch["labels"][:take].to(device)
        batch_keys = list(batch["keys"][:take])
        if classnames and take and int(labels.max()) >= len(classnames):
            raise ValueError(f"label {int(labels.max())} but only {len(classnames)} class names: wrong "
                             f"classnames for these shards?")
        residual = backbone.residual(images, layer)
        x_all = select_tokens(residual, tokens)
        fixed = None
        if classnames:
            zero = torch.zeros_like(x_all)
            fixed = {"original": backbone.forward_from(residual, layer),
                     "ablated": backbone.forward_from(replace_tokens(residual, tokens, zero), layer)}
        for name, sae in saes.items():
            st, recons = state[name], []
            for start in range(0, take, per_chunk):
                x = x_all[start : start + per_chunk].float()
                acts = sae.encode(x)
                x_hat = sae.decode(acts)
                index = torch.arange(seen + start, seen + start + x.shape[0], device=device)
                chunk_labels = labels[start : start + per_chunk]
                st["stats"].update(acts, chunk_labels, index)
                st["recon"].update(x, x_hat, acts)
                if consumers[name]:
                    chunk = TokenChunk(x, x_hat, acts, chunk_labels, index, batch_keys[start : start + per_chunk])
                    for consumer in consumers[name].values():
                        consumer.update(chunk)
                recons.append(x_hat)
            st["keys"].add(seen, batch_keys, st["stats"])
            if st["contrastive"] is not None:
                spliced = replace_tokens(residual, tokens, torch.cat(recons).to(residual.dtype))
                st["contrastive"].update(dict(fixed, sae=backbone.forward_from(spliced, layer)), labels)
        seen += take
        bar.update(take)
        if seen >= n_images:
            break
    bar.total = seen
    bar.refresh()
    bar.close()
    if seen == 0:
        raise RuntimeError("the evaluation shards yielded no image (every sample unreadable, or empty shards)")
    results = {}
    for name, st in state.items():
        st["keys"].prune(st["stats"])
        if st["contrastive"] is not None:
            values, reason = st["contrastive"].compute_all(), st["contrastive"].undefined_reason()
        else:
            values, reason = ContrastiveAccumulator.undefined(), "no class names, so no prompts"
        results[name] = StreamResult(stats=st["stats"].compute(), keys=st["keys"].keys,
                                     reconstruction=st["recon"].compute(), contrastive=values,
                                     contrastive_undefined_reason=reason, n_skipped=skipped,
                                     extra={n: c.compute() for n, c in consumers[name].items()})
    return results


@torch.no_grad()
def stream_pass(backbone, sae: SparseAutoencoder, loader, *, layer: int, tokens: str, n_images: int, k: int,
                classnames: list[str] | None, contrastive_batch_size: int, max_tokens: int,
                device: torch.device, total: int | None = None,
                consumers: dict[str, ChunkConsumer] | None = None) -> StreamResult:
    """The single pass for one SAE: feature statistics, reconstruction metrics, contrastive loss, zero-shot
    and KL (`stream_pass_many` with one SAE).

    `total` is what the progress bar counts to (the images that will really be read; n_images if None).
    """
    return stream_pass_many(backbone, {"sae": sae}, loader, layer=layer, tokens=tokens, n_images=n_images, k=k,
                            classnames=classnames, contrastive_batch_size=contrastive_batch_size,
                            max_tokens=max_tokens, device=device, total=total,
                            consumers={"sae": consumers or {}})["sae"]
