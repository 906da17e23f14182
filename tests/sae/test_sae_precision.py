"""SAE training precision (issue 20): bf16 autocast through SAELens's switch, TF32 matmuls, or
float32; `auto` is bf16 on a GPU and float32 elsewhere; the weights stay float32."""

import pytest
import torch

from saev_core.sae.training import SAETrainConfig, matmul_precision, train_sae


def test_auto_precision_is_bf16_on_a_gpu_only():
    assert SAETrainConfig(device="cpu").resolved_precision() == "float32"
    assert SAETrainConfig(device="cuda:1").resolved_precision() == "bf16"
    assert SAETrainConfig(device="cuda", precision="tf32").resolved_precision() == "tf32"
    with pytest.raises(ValueError, match="precision 'fp8'"):
        SAETrainConfig(precision="fp8").resolved_precision()


def test_tf32_is_set_for_the_block_and_restored():
    before = torch.get_float32_matmul_precision()
    with matmul_precision("tf32"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_training_in_each_precision_learns(precision):
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(16, 32, generator=g)
    data = (torch.rand(4096, 16, generator=g) * (torch.rand(4096, 16, generator=g) < 0.2)) @ basis

    def source():
        yield from data.split(512)

    cfg = SAETrainConfig(d_sae=64, steps=150, batch_size=256, lr=3e-3, l1_coefficient=0.1,
                         n_batches_for_norm_estimate=2, shuffle_buffer_tokens=1024, precision=precision)
    sae = train_sae(source, 32, cfg)
    assert sae.W_enc.dtype == torch.float32
    with torch.no_grad():
        x = data[:512]
        err = ((sae.decode(sae.encode(x)) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(err) < 0.5, float(err)  # explains most of the variance in either precision
