"""The training fast paths == their readable twins, values and gradients: the channels-first Mamba
mixer (with the reference scan and with the Triton scan) against the readable mixer, the fused
causal convolution + SiLU against torch's, and the fused RMSNorm against its formula. On a machine
without CUDA the Triton kernels run in Triton's interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

import torch.nn.functional as F

from minivlmamba.mamba import MambaConfig, MambaLM, MambaMixer, RMSNorm
from minivlmamba.triton_conv import causal_conv1d_silu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def values_and_grads(module, fn, x):
    """fn(x) and the gradients of a random projection of it w.r.t. x and every parameter."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * weights).sum().backward()
    return [t.detach().clone() for t in [out, x.grad] + [p.grad for p in module.parameters()]]


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_channels_first_mixer_equals_readable_mixer(backend):
    torch.manual_seed(0)
    readable = MambaMixer(MambaConfig(d_model=8, n_layer=1, d_state=4, scan_backend="ref"), 0)  # di 16, r 1
    with torch.no_grad():
        readable.dt_proj.bias.uniform_(-4, -2)  # small steps, as after upstream's init
    fast = MambaMixer(MambaConfig(d_model=8, n_layer=1, d_state=4, scan_backend=backend), 0)
    fast.load_state_dict(readable.state_dict())
    fast.to(DEVICE)
    hidden = torch.randn(3, 13, 8)  # (b, l, d): several sequences of odd length, so layouts matter
    want = values_and_grads(readable, readable.forward, hidden)  # CPU, readable: no channels-first path
    got = values_and_grads(fast, fast.forward_channels_first, hidden.to(DEVICE))
    tol = dict(rtol=1e-3, atol=2e-3) if DEVICE == "cuda" or backend == "triton" else dict(rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["out", "hidden"] + [n for n, _ in fast.named_parameters()], got, want):
        torch.testing.assert_close(a.cpu(), b, **tol, msg=name)


@pytest.mark.skipif(DEVICE != "cuda", reason="the LM pads its sequences for the channels-first mixers on CUDA only")
def test_lm_on_the_gpu_equals_the_readable_lm():
    torch.manual_seed(0)
    readable = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, d_state=4))
    fast = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, d_state=4)).to(DEVICE)
    fast.load_state_dict(readable.state_dict())
    embeds = torch.randn(3, 13, 16)  # b * l = 39: padded to 3 x 16 steps on the GPU
    want = values_and_grads(readable, lambda e: readable(inputs_embeds=e), embeds)
    got = values_and_grads(fast, lambda e: fast(inputs_embeds=e), embeds.to(DEVICE))
    for name, a, b in zip(["logits", "embeds"] + [n for n, _ in fast.named_parameters()], got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=2e-3, msg=name)


@pytest.mark.parametrize("b, l", [(3, 13), (2, 2), (1, 300)])  # odd l, l shorter than the kernel, several tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_causal_conv_silu_equals_torch(b, l, dtype):
    torch.manual_seed(0)
    di, k = 6, 4
    conv = torch.nn.Conv1d(di, di, k, groups=di, padding=k - 1)
    x = torch.randn(2 * di, b * l)[:di].view(di, b, l).to(dtype)  # (di, b, l) with strided channels
    readable = lambda x: F.silu(conv(x.float().transpose(0, 1))[..., :l]).transpose(0, 1)  # noqa: E731
    fused = lambda x: causal_conv1d_silu(x, conv.weight[:, 0], conv.bias, block_c=4, block_t=128)  # noqa: E731
    want = values_and_grads(conv, readable, x)
    got = values_and_grads(conv.to(DEVICE), fused, x.to(DEVICE))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(["out", "x", "weight", "bias"], got, want):
        torch.testing.assert_close(a.cpu().float(), b.float(), **tol, msg=name)


def test_rms_norm_equals_its_formula():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.normal_()
    formula = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight  # noqa: E731
    x = 3 * torch.randn(4, 7, 32)
    for a, b in zip(values_and_grads(norm, norm, x), values_and_grads(norm, formula, x)):
        torch.testing.assert_close(a, b)
