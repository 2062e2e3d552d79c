"""The training fast paths == their readable twins, values and gradients: the channels-first Mamba
mixer (with the reference scan and with the Triton kernels, interpreted on a CPU) against the
readable mixer, and the fused RMSNorm against its formula."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

from minivlmamba.mamba import MambaConfig, MambaMixer, RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def values_and_grads(module, fn, x):
    """fn(x) and the gradients of a random projection of it w.r.t. x and every parameter."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = fn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * weights).sum().backward()
    return [out, x.grad] + [p.grad for p in module.parameters()]


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


def test_rms_norm_equals_its_formula():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.normal_()
    formula = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight  # noqa: E731
    x = 3 * torch.randn(4, 7, 32)
    for a, b in zip(values_and_grads(norm, norm, x), values_and_grads(norm, formula, x)):
        torch.testing.assert_close(a, b)
