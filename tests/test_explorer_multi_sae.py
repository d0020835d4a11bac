"""The explorer on a run that trained several SAEs (`saes:`): evaluate.py writes <run>/eval/<name>/ per SAE
(explorer bundle included), the launcher's sae_name picks one, and the Inspect page runs that SAE."""

from __future__ import annotations

import io
from pathlib import Path

import hydra
import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae_lightning.backbone import select_tokens
from sae_lightning.explorer import __main__ as launcher
from sae_lightning.explorer.store import Bundle
from sae_lightning.sae import SparseAutoencoder
from tests.conftest import compose_config, demo_overrides

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "sae_lightning" / "explorer" / "app.py"


@pytest.mark.slow
def test_explorer_on_a_run_with_two_saes(tmp_path, data_dir, tiny_shards, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from sae_lightning.evaluation.run import evaluate_run
    from sae_lightning.training import train

    run = train(compose_config(demo_overrides(tmp_path / "run", data_dir, tiny_shards, [
        "saes={relu:{}}", "+saes.topk.sae={_target_:sae_lightning.sae.TopKSAE,k:4,mse:plain}", "max_steps=10"])))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"run={run}", "n_images=48", "top_k=5", "batch_size=16", "contrastive_batch_size=16", "num_workers=0",
            "device=cpu", "n_grid_features=0", "n_game=8", "tensorboard=false", "ground_truth=false"])
    evaluate_run(cfg)
    for name in ("relu", "topk"):
        assert Bundle(run / "eval" / name).n_features == SparseAutoencoder.load(run / "sae" / name).d_sae

    with pytest.raises(SystemExit, match=r"2 SAEs \(relu, topk\): pick one with sae_name"):
        launcher.resolve({"run": str(run)})
    eval_dir, run_dir, name = launcher.resolve({"run": str(run), "sae_name": "topk"})
    assert (eval_dir, run_dir, name) == (run.resolve() / "eval" / "topk", run.resolve(), "topk")

    monkeypatch.setenv("SAE_EXPLORER_EVAL_DIR", str(eval_dir))
    monkeypatch.setenv("SAE_EXPLORER_RUN_DIR", str(run_dir))
    monkeypatch.setenv("SAE_EXPLORER_SAE_NAME", name)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception and at.title[0].value == "SAE Explorer: overview"
    at.sidebar.radio(key="page").set_value("Inspect an image").run()
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), (30, 30, 200)).save(buffer, format="PNG")
    at.file_uploader(key="upload").upload("blue.png", buffer.getvalue(), "image/png").run()
    assert not at.exception and not at.error
    # the TopK SAE's own count on that image (k=4 per token: at most 4 features fire on a class-token run)
    resolved = OmegaConf.load(run / ".hydra" / "resolved.yaml")
    backbone = hydra.utils.instantiate(resolved.backbone, device="cpu")
    sae = SparseAutoencoder.load(run / "sae" / "topk").eval()
    image = PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    with torch.no_grad():
        x = select_tokens(backbone.residual(backbone.preprocess(image)[None], backbone.resolve_layer(resolved.layer)),
                          str(resolved.tokens))
        acts = sae.encode(x.float())
    firing = int(((acts.amax(1) if acts.dim() == 3 else acts) > 0).sum())
    assert 0 < firing <= 4
    assert any(f"**{firing} features fire** on blue.png" == m.value for m in at.markdown)
