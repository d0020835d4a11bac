"""The frozen open_clip backbone against open_clip's own forward, on the tiny local checkpoint (no network)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from sae_lightning.backbone import (
    TINY_MODEL_NAME,
    load_backbone,
    load_tiny_backbone,
    replace_tokens,
    resolve_model_args,
    select_tokens,
    write_tiny_checkpoint,
)

TOKENS = ("cls", "patches", "all")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt")


@pytest.fixture(scope="module")
def backbone(tiny_path):
    return load_backbone(TINY_MODEL_NAME, pretrained=str(tiny_path))


@pytest.fixture(scope="module")
def images(backbone):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=gen)


def layers_to_check(n_layers):
    return [0, n_layers // 2, n_layers - 1, -2]


def positive(layer, n_layers):
    return layer + n_layers if layer < 0 else layer


def pick(residual, tokens):
    """The token selection written out by hand (independent of select_tokens)."""
    return {"cls": residual[:, 0, :], "patches": residual[:, 1:, :], "all": residual}[tokens]


def block_output_via_hook(model, layer, images, replace=None):
    """Output of block `layer` during open_clip's own encode_image, as [B, T, d]; optionally edit it in flight."""
    transformer = model.visual.transformer
    store = {}

    def hook(module, inputs, output):
        out = output if transformer.batch_first else output.transpose(0, 1)
        store["out"] = out.detach().clone()
        if replace is not None:
            new = replace(out.clone())
            return new if transformer.batch_first else new.transpose(0, 1)
        return None

    handle = transformer.resblocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            features = model.encode_image(images)
    finally:
        handle.remove()
    return store["out"], features


def fail_on_download(monkeypatch):
    """Any attempt to build or fetch a model fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError(f"a model was built or downloaded: args={args} kwargs={kwargs}")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    monkeypatch.setattr(open_clip, "create_model", boom)
    for module in (open_clip.pretrained, open_clip.factory):
        for name in ("download_pretrained", "download_pretrained_from_url", "download_pretrained_from_hf"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)


# --------------------------------------------------------------------------------------------------------------
# Loading the local checkpoint
# --------------------------------------------------------------------------------------------------------------


def test_local_checkpoint_weights_are_loaded(backbone, tiny_path):
    saved = torch.load(tiny_path, map_location="cpu", weights_only=True)
    state = backbone.model.state_dict()
    assert set(saved) <= set(state)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    other = load_tiny_backbone(tiny_path)  # the demo's path reads the same file
    assert torch.equal(other.visual.conv1.weight, backbone.visual.conv1.weight)
    assert backbone.n_layers == len(backbone.visual.transformer.resblocks) == 4
    assert backbone.n_tokens == 1 + (backbone.image_size // backbone.visual.patch_size[0]) ** 2
    assert backbone.n_tokens_for("cls") == 1
    assert backbone.n_tokens_for("patches") == backbone.n_tokens - 1
    assert backbone.n_tokens_for("all") == backbone.n_tokens


def test_different_seed_gives_different_weights(tmp_path, backbone):
    other = load_backbone(TINY_MODEL_NAME, pretrained=str(write_tiny_checkpoint(tmp_path / "b.pt", seed=1)))
    assert not torch.equal(other.visual.conv1.weight, backbone.visual.conv1.weight)


# --------------------------------------------------------------------------------------------------------------
# 1. Activations equal open_clip's own forward at that block
# --------------------------------------------------------------------------------------------------------------


def test_activations_match_forward_hook_on_encode_image(backbone, images):
    n = backbone.n_layers
    for layer in layers_to_check(n):
        hooked, _ = block_output_via_hook(backbone.model, positive(layer, n), images)
        assert hooked.shape == (images.shape[0], backbone.n_tokens, backbone.width)
        torch.testing.assert_close(backbone.residual(images, layer), hooked, rtol=1e-5, atol=1e-6)
        for tokens in TOKENS:
            got = backbone.activations(images, layer, tokens)
            want = pick(hooked, tokens)
            assert got.shape == want.shape, (layer, tokens)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, a=(layer, tokens): f"{a}: {m}")


def test_activations_match_forward_intermediates(backbone, images):
    n = backbone.n_layers
    for layer in layers_to_check(n):
        with torch.no_grad():
            res = backbone.visual.forward_intermediates(images, indices=[positive(layer, n)], output_fmt="NLC",
                                                        output_extra_tokens=True, intermediates_only=True)
        prefix, patches = res["image_intermediates_prefix"][0], res["image_intermediates"][0]
        assert prefix.shape[1] == 1 and patches.shape[1] == backbone.n_tokens - 1
        want = {"cls": prefix[:, 0], "patches": patches, "all": torch.cat([prefix, patches], dim=1)}
        for tokens in TOKENS:
            torch.testing.assert_close(backbone.activations(images, layer, tokens), want[tokens], rtol=1e-5,
                                       atol=1e-6, msg=lambda m, a=(layer, tokens): f"{a}: {m}")


def test_negative_layer_counts_from_the_end(backbone, images):
    n = backbone.n_layers
    assert backbone.resolve_layer(-2) == n - 2
    assert backbone.resolve_layer(-n) == 0
    assert torch.equal(backbone.residual(images, -2), backbone.residual(images, n - 2))
    assert not torch.allclose(backbone.residual(images, -2), backbone.residual(images, n - 1))


# --------------------------------------------------------------------------------------------------------------
# 2. forward_from and token splicing
# --------------------------------------------------------------------------------------------------------------


def test_forward_from_residual_equals_encode_image_for_every_layer(backbone, images):
    with torch.no_grad():
        want = backbone.model.encode_image(images)
    torch.testing.assert_close(backbone.encode_image(images), want, rtol=1e-5, atol=1e-6)
    for layer in list(range(backbone.n_layers)) + [-1, -2]:
        got = backbone.forward_from(backbone.residual(images, layer), layer)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, a=layer: f"layer {a}: {m}")


def test_select_replace_round_trip_and_semantics(backbone, images):
    residual = backbone.residual(images, 1)
    before = residual.clone()
    for tokens in TOKENS:
        assert torch.equal(replace_tokens(residual, tokens, select_tokens(residual, tokens)), residual), tokens
        new = torch.randn_like(pick(residual, tokens))
        out = replace_tokens(residual, tokens, new)
        assert torch.equal(pick(out, tokens), new)
        if tokens == "cls":
            assert torch.equal(out[:, 1:], residual[:, 1:])
        if tokens == "patches":
            assert torch.equal(out[:, 0], residual[:, 0])
    assert torch.equal(residual, before), "replace_tokens must not edit its input"
    with pytest.raises(ValueError):
        select_tokens(residual, "mean")
    with pytest.raises(ValueError):
        replace_tokens(residual, "mean", residual)


@pytest.mark.parametrize("tokens", TOKENS)
def test_spliced_forward_matches_open_clip_with_edited_block_output(backbone, images, tokens):
    n = backbone.n_layers
    layer = n // 2
    residual = backbone.residual(images, layer)
    gen = torch.Generator().manual_seed(1)
    new = torch.randn(pick(residual, tokens).shape, generator=gen) * 3

    def edit(out):
        if tokens == "cls":
            out[:, 0] = new
        elif tokens == "patches":
            out[:, 1:] = new
        else:
            out[:] = new
        return out

    _, want = block_output_via_hook(backbone.model, layer, images, replace=edit)
    got = backbone.forward_from(replace_tokens(residual, tokens, new), layer)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, backbone.encode_image(images), atol=1e-3), "the edit must reach the output"


# --------------------------------------------------------------------------------------------------------------
# 3. Truncation
# --------------------------------------------------------------------------------------------------------------


def test_blocks_after_layer_never_run(backbone, images):
    blocks = backbone.visual.transformer.resblocks
    n = backbone.n_layers
    calls = [0] * n
    handles = [blk.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, blk in enumerate(blocks)]
    try:
        for layer in layers_to_check(n):
            p = positive(layer, n)
            for fn in (lambda layer=layer: backbone.residual(images, layer),
                       lambda layer=layer: backbone.activations(images, layer, "cls")):
                calls[:] = [0] * n
                fn()
                assert calls == [1] * (p + 1) + [0] * (n - p - 1), (layer, calls)
            residual = backbone.residual(images, layer)
            calls[:] = [0] * n
            backbone.forward_from(residual, layer)
            assert calls == [0] * (p + 1) + [1] * (n - p - 1), ("forward_from", layer, calls)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------
# 4. QuickGELU for OpenAI weights
# --------------------------------------------------------------------------------------------------------------


def _non_quickgelu_tag(name):
    for tag in open_clip.list_pretrained_tags_by_model(name):
        if not open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False):
            return tag
    raise AssertionError(f"no non-QuickGELU tag for {name}")


def test_resolve_model_args_picks_quick_gelu_from_the_tag():
    assert open_clip.get_pretrained_cfg("ViT-B-32", "openai").get("quick_gelu") is True
    assert resolve_model_args("ViT-B-32", "openai")["force_quick_gelu"] is True
    assert resolve_model_args("ViT-L-14", "openai")["force_quick_gelu"] is True  # the seed's backbone
    tag = _non_quickgelu_tag("ViT-B-32")
    assert resolve_model_args("ViT-B-32", tag)["force_quick_gelu"] is False
    # the -quickgelu config already has it, so nothing is forced
    assert open_clip.get_model_config("ViT-B-32-quickgelu").get("quick_gelu") is True
    assert resolve_model_args("ViT-B-32-quickgelu", "openai")["force_quick_gelu"] is False
    assert resolve_model_args("ViT-B-32", None)["force_quick_gelu"] is False
    args = resolve_model_args("ViT-B-32", "openai")
    assert args["model_name"] == "ViT-B-32" and args["pretrained"] == "openai"


def test_quick_gelu_flag_reaches_create_model(monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def capture(name, pretrained=None, **kwargs):
        seen.append((name, pretrained, kwargs.get("force_quick_gelu")))
        raise Stop

    monkeypatch.setattr(open_clip, "create_model_and_transforms", capture)
    tag = _non_quickgelu_tag("ViT-B-32")
    for name, pretrained in (("ViT-B-32", "openai"), ("ViT-B-32", tag), ("ViT-B-32-quickgelu", "openai")):
        with pytest.raises(Stop):
            load_backbone(name, pretrained=pretrained)
    assert seen == [("ViT-B-32", "openai", True), ("ViT-B-32", tag, False), ("ViT-B-32-quickgelu", "openai", False)]


def test_force_quick_gelu_builds_quick_gelu_mlp(tiny_path):
    # ViT-B-32's own config has plain GELU; build it on the meta device (no weights allocated, no download)
    for force, expected in ((True, QuickGELU), (False, nn.GELU)):
        with torch.device("meta"):
            model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=force, device="meta")
        assert all(type(blk.mlp.gelu) is expected for blk in model.visual.transformer.resblocks), force
    quick = load_backbone(TINY_MODEL_NAME, pretrained=str(tiny_path), quick_gelu=True)
    assert all(isinstance(blk.mlp.gelu, QuickGELU) for blk in quick.visual.transformer.resblocks)
    plain = load_backbone(TINY_MODEL_NAME, pretrained=str(tiny_path))
    assert all(type(blk.mlp.gelu) is nn.GELU for blk in plain.visual.transformer.resblocks)


# --------------------------------------------------------------------------------------------------------------
# 5. Bad inputs fail early and clearly
# --------------------------------------------------------------------------------------------------------------


def test_resolve_layer_out_of_range_names_valid_range(backbone, images):
    n = backbone.n_layers
    for bad in (n, n + 3, -n - 1):
        with pytest.raises(ValueError) as info:
            backbone.resolve_layer(bad)
        assert f"0..{n - 1}" in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(ValueError, match=f"0..{n - 1}"):
        backbone.residual(images, n)
    with pytest.raises(ValueError):
        backbone.mlp_out_vectors(n)


def test_unknown_model_name_suggests_close_matches_before_download(monkeypatch):
    fail_on_download(monkeypatch)
    with pytest.raises(ValueError) as info:
        load_backbone("ViT-L-41", "openai")
    assert "ViT-L-41" in str(info.value) and "ViT-L-14" in str(info.value)


def test_unknown_tag_lists_tags_before_download(monkeypatch):
    fail_on_download(monkeypatch)
    with pytest.raises(ValueError) as info:
        load_backbone("ViT-B-32", "not_a_real_tag")
    message = str(info.value)
    assert "not_a_real_tag" in message
    for tag in ("openai", _non_quickgelu_tag("ViT-B-32")):
        assert tag in message


@pytest.mark.parametrize("name", [TINY_MODEL_NAME, "ViT-B-32"])
def test_missing_local_checkpoint_is_file_not_found(monkeypatch, name):
    fail_on_download(monkeypatch)
    with pytest.raises(FileNotFoundError, match="/nonexistent/w.pt"):
        load_backbone(name, "/nonexistent/w.pt")


# --------------------------------------------------------------------------------------------------------------
# 6. MLP out-projection vectors
# --------------------------------------------------------------------------------------------------------------


def test_mlp_out_vectors_are_each_neurons_residual_write(backbone):
    n = backbone.n_layers
    for layer in (0, n // 2, -1):
        block = backbone.visual.transformer.resblocks[positive(layer, n)]
        hidden = block.mlp.c_fc.out_features
        vectors = backbone.mlp_out_vectors(layer)
        assert vectors.shape == (hidden, backbone.width)
        with torch.no_grad():  # what a unit activation of neuron j adds to the residual stream
            effect = block.mlp.c_proj(torch.eye(hidden)) - block.mlp.c_proj(torch.zeros(1, hidden))
        torch.testing.assert_close(vectors, effect, rtol=1e-5, atol=1e-6)
        assert not vectors.requires_grad


# --------------------------------------------------------------------------------------------------------------
# 7. Frozen, eval mode
# --------------------------------------------------------------------------------------------------------------


def test_backbone_stays_frozen_and_in_eval(backbone, images):
    parent = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(2, 2)})
    parent.train()  # what Lightning does to a LightningModule holding the backbone
    assert parent["head"].training
    assert backbone.train() is backbone
    backbone.train(True)
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    acts = backbone.activations(images.clone().requires_grad_(True), 1, "cls")
    assert acts.grad_fn is None and not acts.requires_grad
    parent.eval()


# --------------------------------------------------------------------------------------------------------------
# 8. uint8 images: the normalisation moves from the DataLoader workers to the device
# --------------------------------------------------------------------------------------------------------------


def pil_images(n: int = 3, size: int = 45):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


def test_uint8_images_give_the_same_activations_as_preprocess(backbone):
    pil = pil_images()
    floats = torch.stack([backbone.preprocess(im) for im in pil])
    pixels = torch.stack([backbone.pixel_transform(im) for im in pil])
    assert pixels.dtype == torch.uint8 and pixels.shape == floats.shape == (3, 3, 32, 32)
    assert pixels.element_size() * pixels.nelement() * 4 == floats.element_size() * floats.nelement()
    torch.testing.assert_close(backbone.prepare_images(pixels), floats, rtol=0, atol=1e-6)
    torch.testing.assert_close(backbone.normalise_pixels(pixels.float() / 255), floats, rtol=0, atol=1e-6)
    # by hand: (x / 255 - mean) / std with OpenAI's CLIP mean and std
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    torch.testing.assert_close(backbone.normalise_pixels(pixels[:1].float() / 255)[0],
                               (pixels[0].float() / 255 - mean) / std)
    for tokens in TOKENS:  # both kinds of input through every image entry point
        torch.testing.assert_close(backbone.activations(pixels, 2, tokens), backbone.activations(floats, 2, tokens),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone.residual(pixels, 1), backbone.residual(floats, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backbone.encode_image(pixels), backbone.encode_image(floats), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float images"):
        backbone.normalise_pixels(pixels)
    with pytest.raises(TypeError, match="uint8"):
        backbone.residual(pixels.long(), 1)


def test_activations_check_tokens(backbone, images):
    with pytest.raises(ValueError, match=r"'foo'.*cls"):
        backbone.activations(images, 1, "foo")


# --------------------------------------------------------------------------------------------------------------
# 9. QuickGELU for local files holding OpenAI's weights
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_style(tmp_path_factory):
    """A tiny CLIP built the OpenAI way (QuickGELU), saved as OpenAI lays its checkpoints out."""
    root = tmp_path_factory.mktemp("openai")
    torch.manual_seed(3)
    model = open_clip.create_model(TINY_MODEL_NAME, pretrained=None, force_quick_gelu=True).eval()
    state = dict(model.state_dict())
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, root / "clip_state_dict.pt")  # OpenAI's `clip` package state dict
    torch.jit.save(torch.jit.script(model), root / "clip_jit.pt")  # OpenAI's released files are TorchScript
    torch.save(model.state_dict(), root / "plain.pt")  # open_clip's layout: nothing says where it came from
    return root, model


@pytest.mark.parametrize("filename", ["clip_state_dict.pt", "clip_jit.pt"])
def test_openai_layout_local_file_gets_quick_gelu(openai_style, filename, images):
    root, model = openai_style
    loaded = load_backbone(TINY_MODEL_NAME, pretrained=str(root / filename))
    assert all(isinstance(blk.mlp.gelu, QuickGELU) for blk in loaded.visual.transformer.resblocks)
    hooked, features = block_output_via_hook(model, 2, images)  # the model as it was trained
    torch.testing.assert_close(loaded.residual(images, 2), hooked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.encode_image(images), features, rtol=1e-5, atol=1e-6)
    explicit = load_backbone(TINY_MODEL_NAME, pretrained=str(root / filename), quick_gelu=False)  # honoured, warned
    assert all(type(blk.mlp.gelu) is nn.GELU for blk in explicit.visual.transformer.resblocks)


def test_ambiguous_local_file_for_an_openai_architecture_refuses(openai_style, monkeypatch):
    root, _ = openai_style
    fail_on_download(monkeypatch)
    with pytest.raises(ValueError, match=r"plain\.pt.*backbone\.quick_gelu=true.*backbone\.quick_gelu=false"):
        load_backbone("ViT-B-32", pretrained=str(root / "plain.pt"))  # ViT-B-32 has OpenAI and LAION weights
    for choice in (True, False):
        assert resolve_model_args("ViT-B-32", str(root / "plain.pt"), choice)["force_quick_gelu"] is choice
    assert resolve_model_args("ViT-B-32", str(root / "clip_jit.pt"))["force_quick_gelu"] is True
