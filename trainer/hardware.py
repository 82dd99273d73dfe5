"""Accelerator facts for labrat's training core. Fixed: the agent may read this file, never change it.

MFU (model FLOPs utilisation) divides the FLOPs a run achieved by the device's peak. The peak is the
exact SKU's dense bf16 tensor-core rate from NVIDIA's data sheets (the sparse figures are twice these).
SKUs of one generation differ a lot (an H100 PCIe peaks at 756 TFLOP/s, an SXM at 989), so the name
that torch reports must match one of these exactly; any other device gets no MFU rather than a wrong one.
"""

from __future__ import annotations

TFLOPS = 1e12
# torch.cuda.get_device_name() -> dense bf16 FLOP/s.
DENSE_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989.4 * TFLOPS,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5 * TFLOPS,
    "NVIDIA H100 NVL": 835.5 * TFLOPS,
    "NVIDIA H200": 989.4 * TFLOPS,  # H200 SXM (141 GB)
    "NVIDIA H200 NVL": 835.5 * TFLOPS,
    "NVIDIA GH200 480GB": 989.4 * TFLOPS,
    "NVIDIA A100-SXM4-80GB": 312.0 * TFLOPS,
    "NVIDIA A100-SXM4-40GB": 312.0 * TFLOPS,
    "NVIDIA A100 80GB PCIe": 312.0 * TFLOPS,
    "NVIDIA A100-PCIE-40GB": 312.0 * TFLOPS,
    "NVIDIA L40S": 362.1 * TFLOPS,
    "NVIDIA L4": 121.0 * TFLOPS,
    "NVIDIA A10": 125.0 * TFLOPS,
}


def dense_bf16_peak(device_name: str) -> float | None:
    """The SKU's dense bf16 peak in FLOP/s, or None for a device this table does not name exactly."""
    return DENSE_BF16_PEAK.get(device_name.strip())


def mfu(tokens_per_s: float, flops_per_token: float, device_name: str) -> float | None:
    """Achieved FLOP/s over the SKU's peak; None when the peak is unknown (never a guess)."""
    peak = dense_bf16_peak(device_name)
    return tokens_per_s * flops_per_token / peak if peak else None
