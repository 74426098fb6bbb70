"""The GPUs lcc lowers for, from the vendors' datasheets and the CUDA programming guide.

Shared memory per block is the opt-in maximum of the compute capability (CUDA C++ Programming
Guide, "Technical Specifications per Compute Capability"): 163 KB on sm_80, 99 KB on sm_86/sm_89,
227 KB on sm_90/sm_100. Tensor rates are dense (no 2:4 sparsity) with fp32 accumulation.
"""

from __future__ import annotations

from . import Target

KB = 1024

_SM80 = dict(capability=(8, 0), smem_per_block=163 * KB, smem_per_sm=164 * KB)
_SM89 = dict(capability=(8, 9), smem_per_block=99 * KB, smem_per_sm=100 * KB)
_SM90 = dict(capability=(9, 0), smem_per_block=227 * KB, smem_per_sm=228 * KB)
_SM100 = dict(capability=(10, 0), smem_per_block=227 * KB, smem_per_sm=228 * KB)

_AMPERE = ("cp.async", "bf16", "tf32")
_ADA = ("cp.async", "bf16", "tf32", "fp8")
_HOPPER = ("cp.async", "bf16", "tf32", "fp8", "wgmma", "tma")
_BLACKWELL = ("cp.async", "bf16", "tf32", "fp8", "fp4", "tcgen05", "tma")

_A100_SOURCE = "NVIDIA A100 Tensor Core GPU datasheet; NVIDIA A100 architecture whitepaper"
# what the parts of one die share; each entry adds its memory, bandwidth and source
_GA100 = dict(**_SM80, sms=108, l2_mb=40, tflops={"bf16": 312, "fp16": 312}, features=_AMPERE)
_GH100 = dict(**_SM90, sms=132, l2_mb=50, tflops={"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}, features=_HOPPER)
_AD102 = dict(**_SM89, features=_ADA)

GPUS = [
    Target("a100-40gb", "NVIDIA A100 SXM4 40 GB", "triton", **_GA100, memory_gb=40, bandwidth_gbs=1555, source=_A100_SOURCE),
    Target("a100-80gb", "NVIDIA A100 SXM4 80 GB", "triton", **_GA100, memory_gb=80, bandwidth_gbs=2039, source=_A100_SOURCE),
    Target(
        "a800",
        "NVIDIA A800 SXM4 80 GB (A100 silicon, NVLink limited to 400 GB/s)",
        "triton",
        **_GA100,
        memory_gb=80,
        bandwidth_gbs=2039,
        source="NVIDIA A800 40GB/80GB datasheet",
    ),
    Target(
        "h100",
        "NVIDIA H100 SXM5 80 GB",
        "triton",
        **_GH100,
        memory_gb=80,
        bandwidth_gbs=3350,
        source="NVIDIA H100 Tensor Core GPU datasheet; NVIDIA H100 architecture whitepaper",
    ),
    Target("h200", "NVIDIA H200 SXM 141 GB", "triton", **_GH100, memory_gb=141, bandwidth_gbs=4800, source="NVIDIA H200 Tensor Core GPU datasheet"),
    Target(
        "l40s",
        "NVIDIA L40S 48 GB",
        "triton",
        **_AD102,
        sms=142,
        l2_mb=96,
        memory_gb=48,
        bandwidth_gbs=864,
        tflops={"bf16": 362.05, "fp16": 362.05, "fp8": 733},
        source="NVIDIA L40S datasheet; NVIDIA Ada Lovelace architecture whitepaper",
    ),
    Target(
        "rtx4090",
        "NVIDIA GeForce RTX 4090 24 GB",
        "triton",
        **_AD102,
        sms=128,
        l2_mb=72,
        memory_gb=24,
        bandwidth_gbs=1008,
        tflops={"bf16": 165.2, "fp16": 165.2, "fp8": 330.3},
        source="NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090, fp32 accumulate)",
    ),
    Target(
        "b200",
        "NVIDIA B200 (HGX, 180 GB)",
        "triton",
        **_SM100,
        sms=148,
        l2_mb=126,
        memory_gb=180,
        bandwidth_gbs=8000,
        tflops={"bf16": 2250, "fp16": 2250, "fp8": 4500},
        features=_BLACKWELL,
        source="NVIDIA HGX B200 / DGX B200 datasheets (per GPU); L2 as measured by Chips and Cheese",
    ),
]
