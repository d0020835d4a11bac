"""Backbone precision: how far TF32 matmuls and bf16 / fp16 autocast move the activations from fp32.

For the tiny demo ViT and a randomly initialised open_clip ViT-B-32 (no download), the residual stream at a
middle block (what the SAE reads) is computed in fp32 with the highest matmul precision (the reference),
then with each reduced precision on the same images. Reported per token of the residual [B, T, d]: the
relative error ||a - a_ref|| / ||a_ref|| (mean and worst token), the cosine similarity (mean and worst
token), and the same relative error for the class token alone. TF32 is measured only on a CUDA device
(CPUs have no TF32); on a CPU the row says so. `python -m benchmarks.precision [--quick]` prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.report import Section, table
from sae_lightning.backbone import Backbone, load_backbone, load_tiny_backbone

MODELS = {"tiny": 8, "ViT-B-32": 8}  # images per model
QUICK_MODELS = {"tiny": 4, "ViT-B-32": 2}


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """fp32 matmuls and convolutions in full precision, or TF32 (CUDA only)."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def modes(device: torch.device) -> dict[str, Callable[[], contextlib.AbstractContextManager] | None]:
    """Name -> context manager factory (None: not available on this device)."""
    cuda = device.type == "cuda"
    return {
        "TF32 matmuls (data.autocast=32, matmul_precision=high)": (lambda: matmul_precision(True)) if cuda else None,
        "bf16 autocast (data.autocast=bf16)": lambda: torch.autocast(device.type, dtype=torch.bfloat16),
        "fp16 autocast (data.autocast=16)": lambda: torch.autocast(device.type, dtype=torch.float16),
    }


def compare(ref: torch.Tensor, got: torch.Tensor) -> list[str]:
    """Relative error and cosine per token of [B, T, d] residuals (mean, worst), and the class token's error."""
    ref, got = ref.double(), got.double()
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    cls_rel = (got[:, 0] - ref[:, 0]).norm() / ref[:, 0].norm()
    return [f"{rel.mean():.2e}", f"{rel.max():.2e}", f"{cos.mean():.7f}", f"{cos.min():.7f}", f"{cls_rel:.2e}"]


def measure(name: str, backbone: Backbone, n_images: int, device: torch.device) -> list[list[str]]:
    backbone = backbone.to(device)
    layer = backbone.n_layers // 2 - 1  # a middle block (ViT-B-32: block 5 of 0..11)
    gen = torch.Generator().manual_seed(0)
    size = backbone.image_size
    images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    with matmul_precision(False):
        ref = backbone.residual(images, layer).float()
    rows = []
    for mode, factory in modes(device).items():
        if factory is None:
            rows.append([name, layer, mode, "n/a on this device (no TF32 on CPUs)", "", "", "", ""])
            continue
        try:
            with matmul_precision(False), factory():
                got = backbone.residual(images, layer).float()
        except RuntimeError as exn:  # e.g. an op without a kernel for this dtype on this device
            rows.append([name, layer, mode, f"not supported: {str(exn)[:60]}", "", "", "", ""])
            continue
        rows.append([name, layer, mode, *compare(ref, got)])
    return rows


def run(quick: bool = False) -> Section:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, n_images in (QUICK_MODELS if quick else MODELS).items():
            backbone = (load_tiny_backbone(Path(tmp) / "tiny.pt") if name == "tiny"
                        else load_backbone(name, pretrained=None, quick_gelu=True))  # random init, OpenAI-style
            rows += measure(name, backbone, n_images, device)
    body = f"""
Residual stream at a middle block against fp32 with full-precision matmuls, on {device.type.upper()}, random
uint8 images (normalised on the device). Per token: relative error ||a - a_fp32|| / ||a_fp32|| and cosine
similarity (mean over tokens, and the worst token); last column: relative error of the class tokens. A
randomly initialised ViT-B-32 is a stand-in for trained weights; re-run on real weights to confirm. Where TF32
cannot be measured: TF32 rounds matmul inputs to the same 10-bit mantissa as fp16 but accumulates and
stores in fp32, so the fp16 row is a rough upper bound for it.

{table(["model", "layer", "precision", "rel. error mean", "rel. error max", "cosine mean", "cosine min",
        "cls rel. error"], rows)}
"""
    return Section("Backbone precision: TF32 and autocast vs fp32", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args().quick).body)


if __name__ == "__main__":
    main()
