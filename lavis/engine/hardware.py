"""Device facts used for estimates: dense bf16 tensor-core peaks (fp32 accumulate), from vendor datasheets."""

from __future__ import annotations

import torch

PEAK_TFLOPS = {
    "H100 80GB HBM3": 989.0,  # SXM
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "A100": 312.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "RTX A6000": 154.8,
    "L40S": 362.0,
}


def known_peak_tflops() -> float | None:
    """This process's GPU's peak, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
