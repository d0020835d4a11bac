"""The frozen open_clip vision transformer: loading, the truncated forward to `layer`, and splicing.

`layer` is the 0-based index of the residual block whose *output* is read (negative counts from the
end), so ViT-L/14's seed hook point is `layer=22` (== -2). Only blocks 0..layer run when activations are
requested; `forward_from` runs the remaining blocks and the head, which is what the contrastive-loss
evaluation splices into.
"""

from __future__ import annotations

import difflib
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import open_clip
import torch
from torch import nn
from torchvision import transforms as T

log = logging.getLogger(__name__)

Tokens = Literal["cls", "patches", "all"]
TOKEN_CHOICES = ("cls", "patches", "all")
HF_HUB_PREFIX = "hf-hub:"
CHECKPOINT_SUFFIXES = (".pt", ".bin", ".pth", ".safetensors", ".ckpt")
TINY_MODEL_NAME = "sae-tiny-vit"
_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_MODEL_CONFIG_DIR)


OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def check_tokens(tokens: str) -> str:
    """`tokens` itself, or a ValueError listing the choices (call before any model is built or loaded)."""
    if tokens not in TOKEN_CHOICES:
        raise ValueError(
            f"tokens={tokens!r} is not a token selection: use one of {list(TOKEN_CHOICES)} (cls = the class token, "
            f"patches = every patch token, all = class + patches)."
        )
    return tokens


def select_tokens(residual: torch.Tensor, tokens: str) -> torch.Tensor:
    """[B, T, d] residual stream -> cls [B, d], patches [B, T-1, d] or all [B, T, d]."""
    if tokens == "cls":
        return residual[:, 0]
    if tokens == "patches":
        return residual[:, 1:]
    if tokens == "all":
        return residual
    raise ValueError(f"tokens must be one of {TOKEN_CHOICES}, got {tokens!r}")


def replace_tokens(residual: torch.Tensor, tokens: str, values: torch.Tensor) -> torch.Tensor:
    """A copy of `residual` with the `tokens` positions replaced by `values` (shape of `select_tokens`)."""
    out = residual.clone()
    if tokens == "cls":
        out[:, 0] = values
    elif tokens == "patches":
        out[:, 1:] = values
    elif tokens == "all":
        out = values.to(residual.dtype).clone()
    else:
        raise ValueError(f"tokens must be one of {TOKEN_CHOICES}, got {tokens!r}")
    return out


def _is_local_file(pretrained: str | None) -> bool:
    return pretrained is not None and Path(pretrained).expanduser().is_file()


def openai_checkpoint_kind(path: str | Path) -> str | None:
    """"jit" or "state_dict" when a local file holds weights laid out as OpenAI distributes CLIP, else None.

    OpenAI's checkpoints (e.g. ViT-L-14.pt) are TorchScript archives; a state dict taken from OpenAI's own
    `clip` package keeps the three non-parameter entries `input_resolution`, `context_length` and `vocab_size`.
    Either layout means the weights were trained with QuickGELU. Only the archive's member names or the
    state dict's keys are read (tensors are memory-mapped, not loaded).
    """
    path = Path(path).expanduser()
    if path.suffix in (".safetensors", ".npz", ".npy"):
        return None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "jit"
        try:
            keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not a state dict torch can read: open_clip reports it when loading
            return None
    else:
        return None
    if isinstance(keys, dict) and "state_dict" in keys and isinstance(keys["state_dict"], dict):
        keys = keys["state_dict"]
    if isinstance(keys, dict) and all(k in keys for k in OPENAI_EXTRA_KEYS):
        return "state_dict"
    return None


def _has_openai_tag(name: str) -> bool:
    return "openai" in open_clip.list_pretrained_tags_by_model(name)


def _decide_local_quick_gelu(name: str, path: str, quick_gelu: bool | None) -> tuple[bool, str | None]:
    """(force QuickGELU?, OpenAI layout of the file or None) for a local weights file.

    OpenAI's layout decides QuickGELU unless `quick_gelu` is given (then a contradiction is logged loudly).
    A plain state dict for an architecture OpenAI also released (ViT-B-32, ViT-L-14, ...) may hold OpenAI's
    weights (QuickGELU) or LAION's (GELU); that cannot be told from the file, so it needs `quick_gelu`.
    """
    kind = openai_checkpoint_kind(path)
    if kind is not None:
        if quick_gelu is None:
            log.info("%s holds OpenAI CLIP weights (%s layout): building %s with QuickGELU.", path, kind, name)
            return True, kind
        if not quick_gelu and not name.endswith("-quickgelu"):
            log.warning("%s holds OpenAI CLIP weights, trained with QuickGELU, but backbone.quick_gelu=false: "
                        "the activations will differ from the model OpenAI trained.", path)
        return bool(quick_gelu), kind
    if quick_gelu is None and not name.endswith("-quickgelu") and _has_openai_tag(name):
        raise ValueError(
            f"Cannot tell whether the local weights {path} for {name!r} were trained with QuickGELU (OpenAI's CLIP) "
            f"or GELU (e.g. LAION, DataComp): the wrong one silently changes every activation. Set "
            f"backbone.quick_gelu=true for OpenAI weights, backbone.quick_gelu=false otherwise."
        )
    return bool(quick_gelu), None


def resolve_model_args(name: str, pretrained: str | None, quick_gelu: bool | None = None) -> dict:
    """Check `name`/`pretrained` before anything is downloaded or read, and decide QuickGELU.

    OpenAI's CLIP weights were trained with QuickGELU; open_clip only warns when the config disagrees,
    and the activations are then silently wrong. For a pretrained *tag* the tag's own metadata decides;
    for a local file or hf-hub the caller may force it with `quick_gelu`.
    """
    if name.startswith(HF_HUB_PREFIX):
        return {"model_name": name, "pretrained": None, "force_quick_gelu": bool(quick_gelu)}
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"Unknown open_clip model {name!r}.{hint} See open_clip.list_models() for all names, "
            f"or use 'hf-hub:<org>/<repo>'."
        )
    force = bool(quick_gelu)
    if _is_local_file(pretrained):
        force, kind = _decide_local_quick_gelu(name, str(Path(pretrained).expanduser()), quick_gelu)
        return {"model_name": name, "pretrained": pretrained, "force_quick_gelu": force, "openai_layout": kind}
    if pretrained is not None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            looks_like_path = any(sep in pretrained for sep in ("/", "\\"))
            if looks_like_path or pretrained.endswith(CHECKPOINT_SUFFIXES):
                raise FileNotFoundError(f"Pretrained checkpoint file {pretrained!r} does not exist.")
            raise ValueError(
                f"Unknown pretrained tag {pretrained!r} for {name!r}. Available tags: {tags or 'none'}; "
                f"or pass a local checkpoint path."
            )
        if quick_gelu is None and cfg.get("quick_gelu", False) and not name.endswith("-quickgelu"):
            log.info("%s:%s was trained with QuickGELU; building the model with QuickGELU.", name, pretrained)
            force = True
    return {"model_name": name, "pretrained": pretrained, "force_quick_gelu": force}


def resolve_layer_index(name: str, layer: int, n_layers: int) -> int:
    """Map a (possibly negative) block index to 0..n_layers-1, or fail with the valid range."""
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer={layer} is outside {name!r}, which has {n_layers} residual blocks: use 0..{n_layers - 1} "
            f"(or -{n_layers}..-1 from the end)."
        )
    return layer % n_layers


def check_layer(name: str, layer: int) -> None:
    """Fail on an impossible `layer` from the model's config alone, before any weights are downloaded."""
    if name.startswith(HF_HUB_PREFIX):
        return
    config = open_clip.get_model_config(name) or {}
    n_layers = (config.get("vision_cfg") or {}).get("layers")
    if isinstance(n_layers, int):
        resolve_layer_index(name, layer, n_layers)


def config_tokens_per_image(name: str, tokens: str) -> int | None:
    """Activations per image for a token selection from the model's config alone (no weights, as
    `Backbone.n_tokens_for` counts them once built); None where the config cannot tell (an hf-hub model)."""
    if check_tokens(tokens) == "cls":
        return 1
    if name.startswith(HF_HUB_PREFIX):
        return None
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg") or {}
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if not (isinstance(size, int) and isinstance(patch, int)):
        return None
    return (size // patch) ** 2 + (tokens == "all")


def split_preprocess(preprocess: Callable) -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """open_clip's eval preprocess -> (PIL -> uint8 [3, H, W] transform, mean [3], std [3]).

    The geometric steps (resize, crop, RGB) stay on the host; ToTensor's /255 and Normalize move to the device
    (`Backbone.normalise_pixels`), so DataLoader workers ship uint8 images, a quarter of fp32's bytes.
    """
    steps = list(getattr(preprocess, "transforms", []))
    norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
    if norm is None:
        raise ValueError(f"the model's preprocess {preprocess} has no Normalize step: cannot move it to the device.")
    host = [t for t in steps if not isinstance(t, (T.ToTensor, T.Normalize))]
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).reshape(3)
    std = torch.as_tensor(norm.std, dtype=torch.float32).reshape(3)
    return T.Compose([*host, T.PILToTensor()]), mean, std


class Backbone(nn.Module):
    """A frozen open_clip CLIP whose vision tower can be run up to a block and resumed from it.

    Every entry point that takes images accepts either uint8 pixels [B, 3, H, W] (0..255, as
    `pixel_transform` makes them; normalised here, on the images' device) or float images already normalised
    by `preprocess` (used as they are).
    """

    def __init__(self, model: nn.Module, preprocess: Callable, tokenizer: Callable, name: str,
                 pretrained: str | None):
        super().__init__()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
            raise ValueError(
                f"{name!r} has no open_clip VisionTransformer (timm or ModifiedResNet towers are not "
                f"supported): the residual stream cannot be hooked."
            )
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.pretrained = pretrained
        self.n_layers = len(visual.transformer.resblocks)
        self.width = visual.transformer.width
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        grid = visual.grid_size
        self.n_tokens = 1 + int(grid[0]) * int(grid[1])
        self.embed_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else None
        self.pixel_transform, mean, std = split_preprocess(preprocess)
        self.register_buffer("pixel_mean", mean.reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.reshape(1, 3, 1, 1), persistent=False)
        # uint8 x -> x * scale + bias == (x / 255 - mean) / std, in one multiply-add over the batch
        self.register_buffer("pixel_scale", (1.0 / (255.0 * std)).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_bias", (-mean / std).reshape(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Backbone":
        """The backbone is frozen: it stays in eval mode whatever the caller asks."""
        return super().train(False)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def resolve_layer(self, layer: int) -> int:
        """Map a (possibly negative) block index to 0..n_layers-1, or fail with the valid range."""
        return resolve_layer_index(self.name, layer, self.n_layers)

    def n_tokens_for(self, tokens: str) -> int:
        """Activations per image for a token selection."""
        return {"cls": 1, "patches": self.n_tokens - 1, "all": self.n_tokens}[check_tokens(tokens)]

    def normalise_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] [B, 3, H, W] -> the model's normalised input [B, 3, H, W] (fp32, same device)."""
        if not images.is_floating_point():
            raise TypeError(f"normalise_pixels takes float images in [0, 1], got {images.dtype}; uint8 images go "
                            f"straight to residual/activations/encode_image.")
        mean = self.pixel_mean.to(images.device, non_blocking=True)
        std = self.pixel_std.to(images.device, non_blocking=True)
        return (images.float() - mean) / std

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised (on the images' device); float images pass unchanged. Model dtype."""
        if images.dtype == torch.uint8:
            scale = self.pixel_scale.to(images.device, non_blocking=True)
            bias = self.pixel_bias.to(images.device, non_blocking=True)
            images = images.float().mul_(scale).add_(bias)
        elif not images.is_floating_point():
            raise TypeError(f"images must be uint8 pixels or normalised float images, got {images.dtype}.")
        return images.to(self.visual.conv1.weight.dtype)

    def _run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        transformer = self.visual.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            x = block(x)
        return x if transformer.batch_first else x.transpose(0, 1)

    @torch.no_grad()
    def residual(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream [B, T, d] at the output of block `layer`; later blocks are never run."""
        layer = self.resolve_layer(layer)
        images = self.prepare_images(images)
        return self._run_blocks(self.visual._embeds(images), 0, layer + 1)

    def activations(self, images: torch.Tensor, layer: int, tokens: str = "cls") -> torch.Tensor:
        """The SAE's input: cls [B, d], patches [B, T-1, d] or all [B, T, d] at `layer` (images: see the class)."""
        check_tokens(tokens)
        return select_tokens(self.residual(images, layer), tokens)

    @torch.no_grad()
    def forward_from(self, residual: torch.Tensor, layer: int) -> torch.Tensor:
        """Unnormalised image features from a (possibly edited) residual stream at `layer`."""
        layer = self.resolve_layer(layer)
        x = self._run_blocks(residual, layer + 1, self.n_layers)
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features of the untouched model (open_clip's own forward)."""
        return self.model.encode_image(self.prepare_images(images))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised text features for a list of prompts."""
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    def mlp_out_vectors(self, layer: int) -> torch.Tensor:
        """One d-vector per MLP neuron of block `layer`: what that neuron writes to the residual stream."""
        block = self.visual.transformer.resblocks[self.resolve_layer(layer)]
        return block.mlp.c_proj.weight.detach().T.contiguous()


def load_backbone(name: str = "ViT-L-14", pretrained: str | None = "openai", device: str | torch.device = "cpu",
                  cache_dir: str | None = None, quick_gelu: bool | None = None) -> Backbone:
    """Load any open_clip model by name with a pretrained tag, a local checkpoint file, or an hf-hub: id.

    The model is frozen and in eval mode. Errors about the name or tag come before any download.
    """
    args = resolve_model_args(name, None if pretrained in (None, "", "none") else str(pretrained), quick_gelu)
    if args["pretrained"] is not None and _is_local_file(args["pretrained"]):
        args["pretrained"] = str(Path(args["pretrained"]).expanduser())
    openai_layout = args.get("openai_layout")
    model, _, preprocess = open_clip.create_model_and_transforms(
        args["model_name"], pretrained=None if openai_layout else args["pretrained"],
        force_quick_gelu=args["force_quick_gelu"], device="cpu" if openai_layout else device, cache_dir=cache_dir,
    )
    if openai_layout:
        _load_openai_layout(model, args["pretrained"], openai_layout)
        model = model.to(device)
    tokenizer = open_clip.get_tokenizer(args["model_name"])
    return Backbone(model, preprocess, tokenizer, name, args["pretrained"])


def _load_openai_layout(model: nn.Module, path: str, kind: str) -> None:
    """Load OpenAI's TorchScript archive or `clip` state dict into an open_clip CLIP (same parameter names)."""
    if kind == "jit":
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("state_dict", state_dict)
    # the three metadata entries, and the causal mask a TorchScript archive keeps as a buffer: not weights
    state_dict = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS and not k.endswith("attn_mask")}
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k != "logit_bias"]
    if missing or unexpected:
        raise ValueError(f"{path} holds OpenAI-layout weights that do not fit this architecture: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}. Check backbone.name.")


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny CLIP (registered as `sae-tiny-vit`) as a local checkpoint.

    Tests and the demo load it back through `load_backbone(TINY_MODEL_NAME, pretrained=path)`, the same
    path real local weights take. Written to a temporary name and renamed, so it is never half-written.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL_NAME, pretrained=None)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return path


def load_tiny_backbone(pretrained: str | Path, device: str | torch.device = "cpu", seed: int = 0) -> Backbone:
    """The demo's backbone: writes the tiny random checkpoint on first use, then loads it like real weights."""
    path = Path(pretrained).expanduser()
    if not path.is_file():
        log.info("Writing the tiny random demo checkpoint to %s", path)
        write_tiny_checkpoint(path, seed=seed)
    return load_backbone(TINY_MODEL_NAME, pretrained=str(path), device=device, quick_gelu=False)
