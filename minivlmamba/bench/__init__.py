"""Benchmarks on CUDA GPUs.

    python -m minivlmamba.bench scan            # fused Triton scan vs the reference, with floors
    python -m minivlmamba.bench scan --sweep    # also try kernel configurations on the LM shape
    python -m minivlmamba.bench generate        # VL-Mamba-2.8B decode: whole request, batch, context, roofline
    python -m minivlmamba.bench train           # VL-Mamba-2.8B stage-2 training steps: tokens/s, MFU, memory
    torchrun --nproc_per_node=2 -m minivlmamba.bench train --fsdp --micro-batch 8   # the same on 2 GPUs

One module per command (scan.py, generate.py, train.py), common.py for what they share. Every table
starts with the device and the measured copy bandwidth: timings are comparable only on the same
card. Times are medians of `triton.testing.do_bench` or of CUDA events.
"""
