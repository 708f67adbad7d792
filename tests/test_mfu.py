"""MFU against the device's own peak: train.py's GPU table and its lookup, and estimate_mfu
against the peak it is given."""
import pytest
import torch

import train
from model import Prism, PrismConfig
from train import gpu_peak_flops


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),   # H100 SXM5
    ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA H100 NVL", "float16", 835.5),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA H200", "float32", 494.7),               # TF32
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("NVIDIA A100-PCIE-40GB", "float32", 156.0),
    ("NVIDIA A10", "bfloat16", 125.0),
    ("NVIDIA L4", "bfloat16", 121.0),
    ("NVIDIA L40S", "float16", 362.05),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2),
    ("Tesla V100-SXM2-16GB", "float16", 125.0),
    ("Tesla V100-SXM2-16GB", "float32", 15.7),       # no TF32: the CUDA cores
    ("Tesla T4", "float16", 65.0),
])
def test_known_gpus(name, dtype, tflops):
    assert gpu_peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name, dtype", [
    ("NVIDIA A10G", "bfloat16"),                  # not an A10, not an A100
    ("NVIDIA L40", "bfloat16"),                   # not an L4, not an L40S
    ("NVIDIA GeForce RTX 4090 D", "bfloat16"),    # fewer SMs than the 4090
    ("NVIDIA GH200 480GB", "bfloat16"),
    ("AMD Instinct MI300X", "bfloat16"),
    ("", "bfloat16"),
    ("Tesla V100-SXM2-16GB", "bfloat16"),         # no bfloat16 tensor cores
])
def test_unknown_gpus_and_missing_units_have_no_peak(name, dtype):
    assert gpu_peak_flops(name, dtype) is None


def test_every_table_row_is_well_formed():
    for pattern, bf16, fp16, fp32 in train.GPU_PEAK_TFLOPS:
        assert fp16 is not None and fp32 is not None, pattern
        # tensor cores are never slower than the float32 matmuls of the same GPU
        assert all(p is None or p >= fp32 for p in (bf16, fp16)), pattern


def test_estimate_mfu_is_the_model_flops_over_the_given_peak():
    torch.manual_seed(0)
    m = Prism(PrismConfig(vocab_size=64, block_size=16, n_layer=1, n_embd=16, n_head=2))
    flops = m.flops_per_token() * 16 * 4  # 4 sequences of block_size
    assert m.estimate_mfu(4, 0.5, 1e12) == pytest.approx(flops / 0.5 / 1e12)
    assert m.estimate_mfu(8, 0.5, 1e12) == pytest.approx(2 * m.estimate_mfu(4, 0.5, 1e12))
