"""Anthropic-style resampling of dead features: the math on a hand-built case, and through the real module
and Trainer (features forced dead are revived, live ones untouched, their Adam moments reset)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sae_lightning.data.activations import ActivationsDataModule
from sae_lightning.module import SAETrainingModule
from sae_lightning.planted import PlantedFeatures
from sae_lightning.sae import GatedSAE, SparseAutoencoder, TopKSAE
from sae_lightning.sae import functional as F_sae


def test_resampling_by_hand():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0], [2.0, 2.0, 1.0]])
    x_hat = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 1.0]])  # only row 1 is mis-reconstructed
    b_dec = torch.tensor([0.0, 0.0, 0.0])
    W_enc = torch.tensor([[2.0, 0.0, 9.0, 0.0], [0.0, 0.0, 9.0, 2.0], [0.0, 0.0, 9.0, 0.0]])  # live norms 2, 2
    W_dec = torch.eye(4, 3)
    dead = torch.tensor([False, True, False, False])
    dead[2] = True
    F_sae.resample_dead_features(x, x_hat, b_dec, W_enc, W_dec, dead, generator=torch.Generator().manual_seed(0))
    direction = torch.tensor([0.0, 0.6, 0.8])  # row 1, at unit norm
    assert torch.allclose(W_dec[1], direction) and torch.allclose(W_dec[2], direction)
    assert torch.equal(W_dec[[0, 3]], torch.eye(4, 3)[[0, 3]])
    assert torch.allclose(W_enc[:, 1], direction * 0.2 * 2.0) and torch.allclose(W_enc[:, 2], direction * 0.4)
    assert torch.equal(W_enc[:, 0], torch.tensor([2.0, 0.0, 0.0])) and torch.equal(W_enc[:, 3],
                                                                                  torch.tensor([0.0, 2.0, 0.0]))


@pytest.mark.parametrize("make", [lambda: SparseAutoencoder(16, 48, l1_coefficient=1e-3),
                                  lambda: TopKSAE(16, 48, k=4), lambda: GatedSAE(16, 48, l1_coefficient=1e-3)])
def test_module_resamples_features_dead_for_a_window(make):
    torch.manual_seed(0)
    planted = PlantedFeatures.create(d=16, n_features=24, active=2.0, seed=0)
    x = planted.sample(4096, torch.Generator().manual_seed(1))
    sae = make()
    forced = torch.arange(48) < 8
    with torch.no_grad():  # features 0..7 can never fire: their encoder columns point nowhere and biases are -100
        sae.W_enc[:, forced] = 0.0
        getattr(sae, "b_gate" if isinstance(sae, GatedSAE) else "b_enc")[forced] = -100.0
    module = SAETrainingModule(sae, lr=1e-3, lr_warmup_steps=1, ghost_grads=False, feature_sampling_window=10,
                               b_dec_init="mean", resample_dead=True)
    snapshot = AtStep(10)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=12, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[snapshot])
    trainer.fit(module, datamodule=ActivationsDataModule(x, sae_batch_size=64, buffer_size=256, seed=0))
    # the window closed at step 10 with 0..7 dead: resampled to unit-norm inputs, biases zeroed, Adam reset
    W_enc, W_dec, bias, exp_avg = snapshot.state
    assert torch.allclose(W_dec[forced].norm(dim=-1), torch.ones(8), atol=1e-5)
    assert (W_enc[:, forced].norm(dim=0) > 0).all()
    assert torch.equal(bias[forced], torch.zeros(8))
    assert torch.equal(exp_avg[:, forced], torch.zeros(16, 8)) and exp_avg[:, ~forced].abs().sum() > 0
    assert (sae.encode_pre(x[:512])[:, forced] > 0).any()  # they can fire again (TopK: when among the top k)
    if not isinstance(sae, TopKSAE):
        assert (sae.encode(x[:512])[:, forced] > 0).any()


class AtStep(L.Callback):
    """The SAE's W_enc, W_dec, encoder (or gate) bias and W_enc's Adam exp_avg right after step `step`."""

    def __init__(self, step: int):
        self.step, self.state = step, None

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            sae = pl_module.sae
            bias = sae.b_gate if isinstance(sae, GatedSAE) else sae.b_enc
            exp_avg = trainer.optimizers[0].state[sae.W_enc]["exp_avg"]
            self.state = tuple(t.detach().clone() for t in (sae.W_enc, sae.W_dec, bias, exp_avg))


def test_no_resampling_at_the_last_step():
    """A window closing on the final step resamples nothing: the export keeps the trained dictionary rather
    than freshly re-initialised features that never trained."""
    torch.manual_seed(0)
    planted = PlantedFeatures.create(d=16, n_features=24, active=2.0, seed=0)
    x = planted.sample(4096, torch.Generator().manual_seed(1))
    sae = SparseAutoencoder(16, 48, l1_coefficient=1e-3)
    forced = torch.arange(48) < 8
    with torch.no_grad():
        sae.W_enc[:, forced] = 0.0
        sae.b_enc[forced] = -100.0
    module = SAETrainingModule(sae, lr=1e-3, lr_warmup_steps=1, ghost_grads=False, feature_sampling_window=10,
                               b_dec_init="mean", resample_dead=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=10, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=ActivationsDataModule(x, sae_batch_size=64, buffer_size=256, seed=0))
    assert torch.equal(sae.W_enc[:, forced], torch.zeros(16, 8))  # still dead: not resampled at step 10
    assert torch.equal(sae.b_enc[forced], torch.full((8,), -100.0))


def test_resampling_generator_is_the_saes_own_and_old_checkpoints_still_load():
    """Each SAE draws from its own generator, seeded from the run seed (or `resample_seed`), never from the
    global stream; a checkpoint written before the generator was saved loads and starts it from its seed."""
    def module(**kwargs):
        return SAETrainingModule(SparseAutoencoder(4, 8), resample_dead=True, **kwargs)

    a, b = module(), module()
    a.run_config, b.run_seed = {"seed": 42}, 42  # a single run's config; a member of a multi-SAE run
    torch.manual_seed(0)
    first = torch.randint(0, 1 << 30, (4,), generator=a.resample_generator())
    torch.manual_seed(1)  # the global stream does not matter
    assert torch.equal(first, torch.randint(0, 1 << 30, (4,), generator=b.resample_generator()))
    other = module()
    other.run_config = {"seed": 43}
    assert other.resampling_seed() != a.resampling_seed() and module(resample_seed=7).resampling_seed() == 7
    saved = {}
    a.on_save_checkpoint(saved)
    after = torch.randint(0, 1 << 30, (4,), generator=a.resample_generator())
    restored = module()
    restored.on_load_checkpoint(saved)
    assert torch.equal(torch.randint(0, 1 << 30, (4,), generator=restored.resample_generator()), after)
    old = module()
    old.run_config = {"seed": 42}
    old.on_load_checkpoint({"state_dict": {}})  # no "sae_lightning_resample_rng": from the seed
    assert torch.equal(torch.randint(0, 1 << 30, (4,), generator=old.resample_generator()), first)
    with pytest.raises(ValueError, match="resampling generator version 9"):
        old.on_load_checkpoint({"sae_lightning_resample_rng": {"version": 9}})
