"""The SAE is loaded once per process (device, dtype) and reused across tasks (issue 20): at 65k
features it is 2 GB, and loading it per record shard read 1.4 TB over an 83k-sample run."""

import torch

from saev_core.pipeline import loaded_models as models
from saev_core.pipeline.specs import ModelSpec
from saev_core.sae.training import SAETrainConfig, _training_sae, save_sae


def _checkpoint(folder, seed: int):
    torch.manual_seed(seed)
    return save_sae(_training_sae(SAETrainConfig(d_sae=32, normalize_activations=False), 8), folder)


def test_sae_for_loads_once_per_checkpoint_and_dtype(tmp_path, monkeypatch):
    from saev_core.sae import training

    loads = []
    real = training.load_sae

    def counting(*a, **k):
        loads.append(k.get("dtype"))
        return real(*a, **k)

    monkeypatch.setattr(training, "load_sae", counting)
    monkeypatch.setattr(models, "_saes", type(models._saes)())
    a, b = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)
    cpu = ModelSpec(device="cpu")
    first = models.sae_for(a, "sha-a", cpu)
    assert models.sae_for(a, "sha-a", cpu) is first and loads == ["float32"]
    low = models.sae_for(a, "sha-a", ModelSpec(device="cpu", dtype="bfloat16", sae_dtype="model"))
    assert low is not first and low.W_enc.dtype == torch.bfloat16 and loads == ["float32", "bfloat16"]
    models.sae_for(b, "sha-b", cpu)  # a third SAE evicts the least recently used one
    assert len(models._saes) == 2
    models.sae_for(a, "sha-a", cpu)
    assert loads[-1] == "float32" and len(loads) == 4


def test_encode_dtype_follows_the_model_spec():
    assert models.encode_dtype(ModelSpec(device="cpu")) == "float32"
    assert models.encode_dtype(ModelSpec(device="cpu", sae_dtype="model")) == "float32"  # fp32 forward on CPU
    assert models.encode_dtype(ModelSpec(device="cpu", dtype="bf16", sae_dtype="model")) == "bfloat16"
    assert ModelSpec(sae_dtype="float32").encode_key() == "float32"
    assert ModelSpec(sae_dtype="model", device="cuda").encode_key() != ModelSpec(sae_dtype="model").encode_key()
