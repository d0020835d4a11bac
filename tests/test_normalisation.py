"""Activation normalisation: trained on s*x, exported for raw x, with the same features and reconstructions."""

from __future__ import annotations

import lightning as L
import torch

from sae_lightning.module import SAETrainingModule
from sae_lightning.sae import SparseAutoencoder


def test_scale_from_first_buffer_is_folded_into_the_export(tmp_path):
    torch.manual_seed(0)
    d = 16
    data = torch.randn(256, d) * 50.0 + 200.0  # a large mean and norm, like a ViT residual stream
    module = SAETrainingModule(SparseAutoencoder(d, 32), lr_warmup_steps=1, b_dec_init="mean",
                               normalize_activations="expected_average_only_in")
    batches = [{"activations": data[i: i + 64]} for i in range(0, 256, 64)]
    batches[0]["init_activations"] = data
    trainer = L.Trainer(max_steps=4, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))

    scale = float(module.activation_scale)
    assert scale == torch.tensor(d**0.5 / data.norm(dim=-1).mean()).item()
    module.export_sae(tmp_path / "sae")
    exported = SparseAutoencoder.load(tmp_path / "sae")
    x = data[:10]
    with torch.no_grad():
        f_train = module.sae.encode(x * scale)
        assert torch.allclose(exported.encode(x), f_train, rtol=1e-4, atol=1e-5)
        assert torch.allclose(exported(x), module.sae(x * scale) / scale, rtol=1e-4, atol=1e-3)
    assert exported.metadata["activation_scale"] == scale
