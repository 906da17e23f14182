"""SAE training through SAELens (dictionary recovery), checkpoint interop both ways, and errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from saev_core.sae.feed import batch_provider
from saev_core.sae.training import SAECheckpointError, SAETrainConfig, encode, load_sae, save_sae, train_sae

D_IN, N_ATOMS = 32, 64


def _dictionary(seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, D_IN, generator=g)
    return atoms / atoms.norm(dim=1, keepdim=True)


def _source(atoms, seed=1, chunks=20, n=4096):
    """Activations that are sparse non-negative combinations (~3 atoms each) of a known dictionary."""
    def source():
        g = torch.Generator().manual_seed(seed)
        for _ in range(chunks):
            active = torch.rand(n, N_ATOMS, generator=g) < 3 / N_ATOMS
            yield (active * (torch.rand(n, N_ATOMS, generator=g) * 2 + 0.5)) @ atoms
    return source


def _recovered(sae, atoms) -> float:
    dec = sae.W_dec.detach()
    dec = dec / dec.norm(dim=1, keepdim=True)
    return float(((atoms @ dec.T).max(1).values > 0.9).float().mean())


@pytest.mark.parametrize("arch,steps", [("standard", 1200), ("topk", 800)])
def test_training_recovers_known_dictionary(arch, steps):
    atoms = _dictionary()
    cfg = SAETrainConfig(architecture=arch, d_sae=128, steps=steps, batch_size=512, lr=1e-3, l1_coefficient=1.0,
                         k=4, n_batches_for_norm_estimate=10)
    sae = train_sae(_source(atoms), D_IN, cfg)
    frac = _recovered(sae, atoms)
    print(f"{arch}: {frac:.3f} of true atoms matched by a decoder row with cos > 0.9")
    assert frac >= 0.9
    # the folded SAE reconstructs raw (unscaled) activations
    x = next(iter(_source(atoms, seed=5)()))
    x_hat = sae.decode(encode(sae, x))
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert ev > 0.8


def test_batchtopk_trains_and_exports():
    atoms = _dictionary()
    cfg = SAETrainConfig(architecture="batchtopk", d_sae=128, steps=200, batch_size=512, lr=1e-3, k=4,
                         n_batches_for_norm_estimate=5)
    sae = train_sae(_source(atoms, chunks=5), D_IN, cfg)
    assert sae.cfg.architecture() == "jumprelu"  # SAELens exports BatchTopK as JumpReLU
    z = encode(sae, next(iter(_source(atoms)()))[:256])
    assert 0 < float((z > 0).sum(1).float().mean()) < 32


def test_batch_provider_rebatches_and_cycles():
    chunks = [torch.arange(i * 10, i * 10 + 10, dtype=torch.float32)[:, None] for i in range(5)]
    it = batch_provider(lambda: iter(chunks), batch_size=8, buffer_tokens=16, seed=0)
    first_epoch = torch.cat([next(it) for _ in range(6)]).flatten()
    assert all(b.shape == (8, 1) for b in [next(it)])
    assert len(set(first_epoch.tolist())) == 48  # 50 tokens -> 6 full batches, no repeats within the epoch
    with pytest.raises(ValueError, match="activation source is empty"):
        next(batch_provider(lambda: iter([]), batch_size=4))


@pytest.fixture(scope="module")
def small_sae():
    cfg = SAETrainConfig(d_sae=64, steps=50, batch_size=256, lr=1e-3, n_batches_for_norm_estimate=2)
    return train_sae(_source(_dictionary(), chunks=2, n=1024), D_IN, cfg)


def test_our_checkpoint_loads_in_saelens(small_sae, tmp_path):
    from sae_lens import SAE

    save_sae(small_sae, tmp_path / "ours")
    theirs = SAE.load_from_disk(str(tmp_path / "ours"))
    x = torch.randn(50, D_IN)
    torch.testing.assert_close(theirs.encode(x), small_sae.encode(x))


def test_saelens_checkpoint_loads_in_ours(tmp_path):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(3)
    training = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=48))
    with torch.no_grad():
        training.b_enc.normal_()
        training.b_dec.normal_()
    training.save_inference_model(tmp_path / "sl")
    ours = load_sae(tmp_path / "sl", expected_d_in=D_IN)
    x = torch.randn(50, D_IN)
    torch.testing.assert_close(ours.encode(x), training.encode(x))


def test_saelens_3x_era_checkpoint(tmp_path):
    """The published SAE-V checkpoints: SAELens 3.20 cfg.json, scale already folded in."""
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(D_IN, 40, generator=g), "b_enc": torch.randn(40, generator=g),
         "W_dec": torch.randn(40, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    folder = tmp_path / "saev"
    folder.mkdir()
    save_file(w, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "model_name": "llava-hf/llava-v1.6-mistral-7b-hf", "hook_point": "blocks.16.hook_resid_post",
        "hook_point_layer": 16, "hook_point_head_index": None, "d_in": D_IN, "d_sae": 40, "dtype": "float32",
        "device": "cuda", "activation_fn_str": "relu", "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "context_size": 4096, "dataset_path": "OBELICS",
        "normalize_activations": "expected_average_only_in", "sae_lens_training_version": "3.20.0",
        "prepend_bos": True,
    }))
    sae = load_sae(folder, expected_d_in=D_IN)
    x = torch.randn(20, D_IN)
    want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), want, atol=1e-5, rtol=1e-5)
    assert sae.cfg.normalize_activations == "none"


def _good_checkpoint(small_sae, folder):
    save_sae(small_sae, folder)
    return folder


def test_d_in_mismatch_names_field(small_sae, tmp_path):
    folder = _good_checkpoint(small_sae, tmp_path / "c")
    with pytest.raises(SAECheckpointError, match=r"cfg.json: field 'd_in' is 32 but the model's hidden size .* 64"):
        load_sae(folder, expected_d_in=64)


def test_missing_and_malformed_files_are_named(small_sae, tmp_path):
    folder = _good_checkpoint(small_sae, tmp_path / "c")
    (folder / "sae_weights.safetensors").rename(tmp_path / "w.bak")
    with pytest.raises(SAECheckpointError, match="missing file sae_weights.safetensors"):
        load_sae(folder)
    (tmp_path / "w.bak").rename(folder / "sae_weights.safetensors")

    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAECheckpointError, match="cfg.json: not valid JSON"):
        load_sae(folder)

    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 65}))
    with pytest.raises(SAECheckpointError, match=r"tensor 'W_enc' has shape \(32, 64\)"):
        load_sae(folder)

    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_in"}))
    with pytest.raises(SAECheckpointError, match="field 'd_in' missing"):
        load_sae(folder)

    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAECheckpointError, match="unreadable safetensors"):
        load_sae(folder)
