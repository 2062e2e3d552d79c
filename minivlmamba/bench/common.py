"""What the benchmarks share: the card's measured copy bandwidth, printed beside every timing."""

import torch
from triton.testing import do_bench


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(2**28, device="cuda", dtype=torch.float32).uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)
