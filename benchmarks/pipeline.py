"""Pipeline throughput: image shards through ImageActivationDataModule against the bare backbone forward.

For each model, in one process and on the same batches: the bare forward to `layer` on already-decoded
tensors, a full forward (`encode_image`, what a naive hook on the whole model costs), decode + preprocess
alone per DataLoader worker count, and the whole DataModule path (decode, preprocess, backbone to `layer`,
token selection, shuffle buffer) per worker count. Then what the DataLoader ships per batch: fp32 images
normalised in the workers (`preprocess`, the pipeline before issue 7 item 10) against uint8 images normalised
on the device (`pixel_transform` + `Backbone.prepare_images`, what the DataModule does now): bytes per batch
and images/s including the normalisation.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import Section, table
from benchmarks.timing import Mark
from sae_lightning.backbone import Backbone, load_backbone, load_tiny_backbone
from sae_lightning.data.datamodule import ImageActivationDataModule
from sae_lightning.data.shards import image_loader
from sae_lightning.data.synthetic import write_demo_shards

WORKERS = (0, 1, 2)


@dataclass
class PipelineCase:
    """A model, the shards it reads and the batch it is timed at."""

    label: str
    image_size: int  # of the generated JPEGs; the model's preprocess resizes them
    n_images: int
    batch: int
    forward_batches: int
    pipeline_passes: int  # over the shard list, so the pipeline is timed for long enough
    layer: int = -2

    def backbone(self, work: Path) -> Backbone:
        if self.label == "tiny":
            return load_tiny_backbone(work / "sae-tiny-vit.pt")
        return load_backbone(self.label, pretrained=None)  # random init: no download


FULL = [PipelineCase("tiny", 64, 512, 64, 8, 4), PipelineCase("ViT-B-32", 224, 96, 16, 3, 1)]
QUICK = [PipelineCase("tiny", 64, 128, 32, 2, 2), PipelineCase("ViT-B-32", 224, 16, 4, 1, 1)]
DECODE_PASSES = 4


def rate_after_first(image_counts: Iterable[int]) -> tuple[float, int]:
    """(images per second, images timed) over an iterator of per-batch image counts, after its first batch."""
    iterator = iter(image_counts)
    next(iterator)
    start = Mark.now()
    count = sum(iterator)
    return start.rates(count)[0], count


def forward_rate(fn, images: torch.Tensor, repeats: int, rounds: int = 2) -> float:
    """Images per second of `fn(images)`: the best of `rounds` rounds of `repeats` calls, after a warm-up call."""
    fn(images)
    best = 0.0
    for _ in range(rounds):
        start = Mark.now()
        for _ in range(repeats):
            fn(images)
        best = max(best, start.rates(repeats * len(images))[0])
    return best


def datamodule_batches(backbone: Backbone, shards: list[str], case: PipelineCase, workers: int) -> Iterator[int]:
    """Yield the number of images behind each SAE batch the DataModule serves, running its hooks as Lightning does."""
    dm = ImageActivationDataModule(backbone, shards, classnames=None, layer=case.layer, tokens="cls",
                                   sae_batch_size=case.batch, buffer_size=case.batch, num_workers=workers,
                                   shuffle=0, shardshuffle=False, pin_memory=False)
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        n_images = len(batch["images"])
        dm.on_after_batch_transfer(batch, 0)
        yield n_images


TRANSFER_WORKERS = (0, 2)
SEED_BATCH = 1024  # the seed's images per backbone batch at 224 px


def transfer_rows(case: PipelineCase, backbone: Backbone, shards: list[str]) -> list[list]:
    """fp32-in-workers vs uint8-in-workers (+ normalisation in the main process): bytes per batch, images/s."""
    rows = []
    for label, transform, bytes_per_value in (("fp32, normalised in workers", backbone.preprocess, 4),
                                             ("uint8, normalised on device", backbone.pixel_transform, 1)):
        for workers in TRANSFER_WORKERS:
            loader = image_loader(shards * DECODE_PASSES, transform, case.batch, num_workers=workers, shuffle=0,
                                  shardshuffle=False)
            sizes: list[int] = []

            def counts(loader=loader, sizes=sizes) -> Iterator[int]:
                for batch in loader:
                    images = backbone.prepare_images(batch["images"])  # identity for fp32, the /255 + norm for uint8
                    sizes.append(batch["images"].element_size() * batch["images"].nelement())
                    yield len(images)

            rate, count = rate_after_first(counts())
            seed_mb = SEED_BATCH * 3 * 224 * 224 * bytes_per_value / 1e6
            rows.append([case.label, label, workers, case.batch, f"{sizes[0] / 1e6:.3f}", f"{seed_mb:,.0f}", count,
                         f"{rate:,.0f}"])
    return rows


def measure(case: PipelineCase, work: Path) -> tuple[list, list, list, str, list]:
    """(forward row, decode rows, pipeline rows, summary line, transfer rows) for one model."""
    backbone = case.backbone(work)
    shards = write_demo_shards(work / case.label, case.n_images, image_size=case.image_size,
                               shard_size=case.n_images // 4)
    decode_rows = []
    decode_per_worker = 0.0
    for workers in WORKERS:  # the shard list several times over, so decoding is timed for long enough
        loader = image_loader(shards * DECODE_PASSES, backbone.preprocess, case.batch, num_workers=workers, shuffle=0,
                              shardshuffle=False)
        rate, count = rate_after_first(len(batch["images"]) for batch in loader)
        decode_rows.append([case.label, f"{case.image_size} px JPEG -> {backbone.image_size} px", workers,
                            count, f"{rate:,.0f}", f"{rate / max(workers, 1):,.0f}"])
        decode_per_worker = max(decode_per_worker, rate / max(workers, 1))
    images = next(iter(image_loader(shards, backbone.preprocess, case.batch, num_workers=0)))["images"]
    layer = backbone.resolve_layer(case.layer)
    truncated = forward_rate(lambda x: backbone.activations(x, layer, "cls"), images, case.forward_batches)
    full = forward_rate(backbone.encode_image, images, case.forward_batches)
    forward_row = [case.label, backbone.n_layers, layer, case.batch, f"{truncated:,.1f}", f"{full:,.1f}",
                   f"{truncated / full:.2f}x", f"{backbone.n_layers / (layer + 1):.2f}x"]
    pipeline_rows, best = [], (0.0, 0)
    for workers in WORKERS:
        rate, count = rate_after_first(datamodule_batches(backbone, shards * case.pipeline_passes, case, workers))
        pipeline_rows.append([case.label, workers, case.batch, count, f"{rate:,.1f}", f"{truncated:,.1f}",
                              f"{100 * rate / truncated:.0f}%"])
        best = max(best, (rate, workers))
    summary = (f"- `{case.label}`: the pipeline reaches {100 * best[0] / truncated:.0f}% of the bare forward at best "
               f"(workers={best[1]}); decoding alone runs at up to {decode_per_worker:,.0f} images/s per worker, so "
               f"keeping up with this forward takes about {max(1, math.ceil(truncated / decode_per_worker))} "
               f"decoding core(s) beside the ones running the model.")
    return forward_row, decode_rows, pipeline_rows, summary, transfer_rows(case, backbone, shards)


def run(quick: bool = False) -> Section:
    forward_rows, decode_rows, pipeline_rows, summaries, transfer = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in QUICK if quick else FULL:
            forward_row, decode, pipeline, summary, transfer_part = measure(case, Path(tmp))
            forward_rows.append(forward_row)
            decode_rows += decode
            pipeline_rows += pipeline
            summaries.append(summary)
            transfer += transfer_part
    body = f"""
Models: `tiny` is the demo's random 4-block, width-64 open_clip ViT at 32 px; `ViT-B-32` is open_clip's
ViT-B-32 built without pretrained weights (12 blocks, width 768, 224 px). Shards are generated demo images
(`write_demo_shards`, JPEG). Hook point `layer=-2`, class token. CPU, fp32, torch threads as listed above;
DataLoader workers are extra processes on the same cores. Rates skip the first batch (worker start-up);
bare forwards are the best of 2 rounds.

**Pipeline vs bare forward.** Images/s out of `ImageActivationDataModule` (DataLoader workers decode and
preprocess, then `on_before_batch_transfer` / `on_after_batch_transfer` run the backbone to `layer`, select
the token and push through the shuffle buffer), against the bare truncated forward on an already-decoded
batch of the same size, same model, same run.

{table(["model", "workers", "batch", "images timed", "pipeline images/s", "bare forward images/s",
        "pipeline / bare"], pipeline_rows)}

{chr(10).join(summaries)}

With 0 workers the main process decodes between forwards; with workers, they share this machine's
cores with the main process's torch threads, so on a small machine more workers can be slower.

**What the workers ship: fp32 vs uint8.** The same loader with the model's full `preprocess` in the workers
(fp32, the pipeline before) or with `pixel_transform` (resize + crop, uint8) and the normalisation
(`Backbone.prepare_images`: /255, mean, std) in the main process, as the DataModule now does on the device.
Bytes per batch as the workers send it (through shared memory, then to the GPU), and at the seed's batch of
1,024 images at 224 px; images/s include the normalisation.

{table(["model", "images", "workers", "batch", "MB per batch", "MB per 1,024 x 224 px", "images timed",
        "images/s"], transfer)}

**Decode + preprocess alone** (`image_loader`, the DataModule's loader, no backbone).

{table(["model", "images", "workers", "images timed", "images/s", "images/s per worker"], decode_rows)}

**Truncation at `layer` vs a full forward** (`Backbone.activations` runs blocks 0..layer; `encode_image`
runs every block, the pooling and the projection), same decoded batch.

{table(["model", "blocks", "layer", "batch", "to layer images/s", "full forward images/s", "speed-up",
        "blocks ratio"], forward_rows)}
"""
    return Section("Pipeline throughput: shards -> activations", body)
