"""The reference selective scan against an independent formula, its decode step against the scan, the
fast CPU paths (PyTorch and C) against the reference, and the C causal convolution against conv1d."""

import functools

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minivlmamba import cpu_scan, scan
from minivlmamba.mamba import causal_conv1d_silu
from minivlmamba.scan import (selective_scan, selective_scan_c, selective_scan_ref, selective_scan_torch,
                              selective_state_update_ref)

FAST = pytest.mark.parametrize("fast", [selective_scan_torch, selective_scan_c], ids=["torch", "c"])


def random_inputs(b=2, di=6, l=7, n=4, g=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    BC_shape = (b, n, l) if g is None else (b, g, n, l)
    return dict(u=rand(b, di, l).to(dtype), delta=(0.5 * rand(b, di, l)).to(dtype), A=-torch.rand(di, n, generator=gen) - 0.1,
                B=rand(*BC_shape).to(dtype), C=rand(*BC_shape).to(dtype), D=rand(di), z=rand(b, di, l).to(dtype),
                delta_bias=0.5 * rand(di))


def naive(u, delta, A, B, C, D, z, delta_bias):
    """y_t = sum_{s<=t} C_t . (prod_{s<r<=t} exp(delta_r A)) delta_s B_s u_s + D u_t, gated: float64 sums."""
    u, delta, A, B, C, D, z, delta_bias = (x.double() for x in (u, delta, A, B, C, D, z, delta_bias))
    delta = F.softplus(delta + delta_bias[:, None])
    b, di, l = u.shape
    group = lambda X, c: X if X.dim() == 3 else X[:, c // (di // X.shape[1])]  # (b, n, l) read by channel c
    y = torch.zeros(b, di, l, dtype=torch.float64)
    for c in range(di):
        Bc, Cc = group(B, c), group(C, c)
        for t in range(l):
            for s in range(t + 1):
                decay = torch.exp(delta[:, c, s + 1:t + 1, None] * A[c]).prod(1)  # (b, n)
                y[:, c, t] += (Cc[:, :, t] * decay * delta[:, c, s, None] * Bc[:, :, s] * u[:, c, s, None]).sum(-1)
    return (y + D[:, None] * u) * F.silu(z)


def test_reference_matches_naive_formula():
    for g in (None, 2, 3):
        x = random_inputs(g=g)
        ours = selective_scan_ref(**x, delta_softplus=True)
        torch.testing.assert_close(ours.double(), naive(**x), rtol=1e-5, atol=1e-5)


def test_grouped_B_C_equal_separate_scans():
    x = random_inputs(di=6, g=3)
    full = selective_scan_ref(**x, delta_softplus=True)
    for i in range(3):
        part = slice(2 * i, 2 * i + 2)
        one = selective_scan_ref(x["u"][:, part], x["delta"][:, part], x["A"][part], x["B"][:, i], x["C"][:, i],
                                 x["D"][part], x["z"][:, part], x["delta_bias"][part], delta_softplus=True)
        torch.testing.assert_close(full[:, part], one)


def test_softplus_passes_large_values_through():
    x = random_inputs(l=3)
    big = dict(x, delta=torch.full_like(x["delta"], 30.0), delta_bias=torch.zeros_like(x["delta_bias"]))
    same = dict(big, delta_softplus=False)
    torch.testing.assert_close(selective_scan_ref(**big, delta_softplus=True), selective_scan_ref(**same))


def test_last_state_and_decode_step_continue_the_scan():
    x = random_inputs(l=9, g=2)
    full, _ = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    head = {k: (v[..., :8] if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    _, state = selective_scan_ref(**head, delta_softplus=True, return_last_state=True)
    y = selective_state_update_ref(state, x["u"][..., 8], x["delta"][..., 8], x["A"], x["B"][..., 8], x["C"][..., 8],
                                   x["D"], x["z"][..., 8], x["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(y, full[..., 8])
    _, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(state, last)


def test_bf16_inputs_give_bf16_output_close_to_fp32():
    x = random_inputs()
    x16 = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out = selective_scan_ref(**x16, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_ref(**{k: (v.float() if k in x16 and v.dtype == torch.bfloat16 else v) for k, v in x16.items()},
                             delta_softplus=True)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=5e-2)


def scan_both(x, fast, dtype=torch.float64, views=False, **kw):
    """Output, last state (if asked) and the gradients of every input, from the reference and from
    `fast`. dtype: of the inputs (None keeps x's). views: u, delta, z, B and C reach the scans as the
    LM passes them (mamba.py's MambaMixer.forward), transposed views of tensors with time second."""
    leaves = {k: (v if dtype is None else v.to(dtype)) for k, v in x.items() if v is not None}
    time_second = lambda v: v.movedim(-1, 1).contiguous() if views and v.dim() >= 3 else v  # (b, l, ...)
    leaves = {k: time_second(v).requires_grad_() for k, v in leaves.items()}
    args = {k: (v.movedim(1, -1) if views and v.dim() >= 3 else v) for k, v in leaves.items()}  # (b, ..., l)
    results = []
    for fn in (selective_scan_ref, fast):
        res = fn(**args, **kw)
        out, last = res if kw.get("return_last_state") else (res, None)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)  # weighs each output
        loss = (out * w).sum() + (last.pow(2).sum() if last is not None else 0)
        results.append((out, last, torch.autograd.grad(loss, list(leaves.values())), list(leaves)))
    return results


def assert_same(ref, ours, rtol=1e-5, atol=1e-5):  # default: both compute in fp32, summing in different orders
    (ref_out, ref_last, ref_grads, names), (out, last, grads, _) = ref, ours
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    if ref_last is not None:
        torch.testing.assert_close(last, ref_last, rtol=rtol, atol=atol)
    for name, g, ref_g in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, ref_g, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


@FAST
@pytest.mark.parametrize("g", [None, 1, 2, 4])
@pytest.mark.parametrize("last", [True, False])
def test_fast_path_matches_reference_values_state_and_gradients(fast, g, last):
    x = random_inputs(di=8, l=9, g=g)
    assert_same(*scan_both(x, fast, delta_softplus=True, return_last_state=last))


@FAST
@pytest.mark.parametrize("drop", [("D",), ("z",), ("delta_bias",), ("D", "z", "delta_bias")])
def test_fast_path_without_optional_inputs(fast, drop):
    x = {k: (None if k in drop else v) for k, v in random_inputs(di=8, l=9, g=2).items()}
    assert_same(*scan_both(x, fast, delta_softplus="delta_bias" not in drop, return_last_state=True))


@FAST
@pytest.mark.parametrize("l", [1, 2, 5])
def test_fast_path_short_sequences(fast, l):
    assert_same(*scan_both(random_inputs(l=l), fast, delta_softplus=True, return_last_state=True))


@FAST
@pytest.mark.parametrize("g", [None, 2])
def test_fast_path_takes_transposed_views(fast, g):
    x = random_inputs(b=3, di=8, l=9, g=g)
    assert_same(*scan_both(x, fast, views=True, delta_softplus=True, return_last_state=True))


@pytest.mark.parametrize("steps", [1, 2, 4])  # l = 9: the last chunk has 1 step
def test_torch_path_chunks_with_a_remainder(steps, monkeypatch):
    b, di, n = 3, 8, 4
    monkeypatch.setattr(scan, "_CHUNK_ELEMENTS", steps * b * di * n)
    assert scan._chunk_steps(b, di, n) == steps
    x = random_inputs(b=b, di=di, l=9, n=n, g=2)
    assert_same(*scan_both(x, selective_scan_torch, delta_softplus=True, return_last_state=True))


@pytest.mark.parametrize("di, g", [(16, None), (40, 2), (96, 3)])  # channels a group: 16, 20 (16 + 4), 32
def test_c_path_full_and_partial_blocks_of_channels(di, g):
    x = random_inputs(b=3, di=di, l=33, n=16, g=g)  # 33 steps of fp32 rounding: the PyTorch path is as far off
    assert_same(*scan_both(x, selective_scan_c, delta_softplus=True, return_last_state=True), rtol=1e-4, atol=1e-4)


def test_c_path_takes_the_mamba_layers_slices():
    """As MambaMixer passes them: u and delta (b, di, l) views of (b, l, di), z a slice of in_proj's
    output and B, C slices of x_proj's (steps 2 di and r + 2n apart), which the kernel reads in place."""
    torch.manual_seed(0)
    b, l, di, n, r = 2, 9, 16, 4, 3
    u, delta = torch.randn(b, l, di, requires_grad=True), torch.randn(b, l, di, requires_grad=True)
    xz, x_dbl = torch.randn(b, l, 2 * di, requires_grad=True), torch.randn(b, l, r + 2 * n, requires_grad=True)
    A, D, bias = -torch.rand(di, n) - 0.5, torch.randn(di), 0.1 * torch.randn(di)
    w = torch.randn(b, di, l)
    results = []
    for fn in (selective_scan_ref, selective_scan_c):
        view = lambda X: X.transpose(1, 2)
        out = fn(view(u), view(delta), A, view(x_dbl[..., r:r + n]), view(x_dbl[..., r + n:]), D, z=view(xz[..., di:]),
                 delta_bias=bias, delta_softplus=True)
        results.append((out, *torch.autograd.grad((out * w).sum(), (u, delta, xz, x_dbl))))
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_c_path_decays_that_underflow():
    x = random_inputs(di=16, l=9)  # delta around 30 and A down to -30: exp(delta A) far below fp32's smallest
    x = dict(x, delta=x["delta"].abs() + 30, A=30 * x["A"])
    assert_same(*scan_both(x, selective_scan_c, delta_softplus=True, return_last_state=True))


@pytest.mark.parametrize("b, di, l, k", [(2, 24, 7, 4), (3, 40, 2, 4), (1, 17, 1, 4), (2, 8, 5, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_c_conv_matches_conv1d_and_silu_values_and_gradients(b, di, l, k, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(di, di, k, groups=di, padding=k - 1, bias=bias)
    xz = torch.randn(b, l, 2 * di, requires_grad=True)  # x is a slice of it, as of in_proj's output
    dy = torch.randn(b, di, l)
    results = []
    for backend in ("c", "ref"):
        y = causal_conv1d_silu(rearrange(xz[..., :di], "b l di -> b di l"), conv, backend)
        results.append((y, *torch.autograd.grad(y, (xz, *conv.parameters()), dy)))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_conv_takes_the_c_kernel_on_cpu_only_for_fp32(monkeypatch):
    calls, original = [], cpu_scan.CConv1dSilu.apply
    monkeypatch.setattr(cpu_scan.CConv1dSilu, "apply", lambda *a: calls.append(a) or original(*a))
    conv, x = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3), torch.randn(2, 8, 5)
    expected = F.silu(conv(x)[..., :5])
    torch.testing.assert_close(causal_conv1d_silu(x, conv), expected)
    assert len(calls) == 1
    causal_conv1d_silu(x, conv, "torch")
    causal_conv1d_silu(x.bfloat16(), conv.bfloat16())
    assert len(calls) == 1


@FAST
def test_fast_path_bf16_inputs_match_reference(fast):
    x = random_inputs(di=8, l=9)
    x = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    ref, ours = scan_both(x, fast, dtype=None, return_last_state=True, delta_softplus=True)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.float32
    assert_same(ref, ours, rtol=2e-2, atol=2e-2)  # outputs and gradients rounded to bf16 (8 bits)


def test_dispatch_takes_the_c_kernel_on_cpu_and_rejects_unknown_backend(monkeypatch):
    assert cpu_scan.available()  # the machines the tests run on have a C compiler: the kernel must build
    x, calls = random_inputs(), []
    monkeypatch.setattr(scan, "selective_scan_c", lambda *a: calls.append(a) or selective_scan_torch(*a))
    torch.testing.assert_close(selective_scan(**x, backend="auto"), selective_scan_ref(**x))
    assert len(calls) == 1
    torch.testing.assert_close(selective_scan(**x, backend="ref"), selective_scan_ref(**x))
    with pytest.raises(ValueError, match="cuda-magic"):
        selective_scan(**x, backend="cuda-magic")


def test_without_a_compiler_the_cpu_scan_says_so_once_and_runs_the_torch_path(monkeypatch, capsys):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(cpu_scan, "_library", functools.cache(cpu_scan._library.__wrapped__))
    x = random_inputs()
    for _ in range(2):
        torch.testing.assert_close(selective_scan(**x), selective_scan_ref(**x))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/nonexistent/cc" in err and "PyTorch path" in err
