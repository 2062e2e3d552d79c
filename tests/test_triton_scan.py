"""The fused Triton scan == the reference scan: values, last state and the gradient of every input.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on the CPU;
with CUDA they are compiled and run on the GPU. Small chunks make short sequences span several
chunks, so the carries between chunks (forward state, backward adjoint) are exercised.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

from minivlmamba.scan import selective_scan, selective_scan_ref, selective_state_update_ref
from minivlmamba.triton_decode import selective_state_update_triton
from minivlmamba.triton_scan import selective_scan_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}  # (rtol, atol), as upstream


def make_inputs(b, di, l, n, g, dtype, has_z, has_bias, seed):
    """Leaf tensors, drawn as upstream's test does (A < 0, small positive delta)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    leaves = {
        "u": randn(b, l, di).to(dtype),  # stored (b, l, di): the kernel sees a transposed view
        "delta": (0.5 * rand(b, 2 * di, l)).to(dtype),  # every other channel block: strided rows
        "A": -0.5 * rand(di, n),
        "B": randn(b, g, l, n).to(dtype),  # transposed to (b, g, n, l)
        "C": randn(b, g, n, l).to(dtype),
        "D": randn(di),
    }
    if has_z:
        leaves["z"] = randn(b, di, l).to(dtype)
    if has_bias:
        leaves["delta_bias"] = 0.5 * rand(di)
    return {k: v.to(DEVICE).requires_grad_() for k, v in leaves.items()}


def scan_args(leaves, g):
    di = leaves["A"].shape[0]
    B = leaves["B"].transpose(-1, -2)  # (b, g, n, l), non-contiguous
    C = leaves["C"]
    return dict(u=leaves["u"].transpose(1, 2), delta=leaves["delta"][:, :di], A=leaves["A"],
                B=B[:, 0] if g == 1 else B, C=C[:, 0] if g == 1 else C, D=leaves.get("D"),
                z=leaves.get("z"), delta_bias=leaves.get("delta_bias"))


CASES = [  # (b, di, l, n, g, has_z, has_bias, chunk, segments)
    (2, 4, 1, 4, 1, True, True, 16, 1),  # a single step
    (2, 6, 37, 8, 2, False, True, 16, 1),  # odd l, groups of 3 channels
    (1, 8, 100, 16, 4, True, False, 16, 3),  # 7 chunks, 4 groups; segments of 3, 3 and 1 chunks
    (2, 8, 45, 5, 1, True, True, 8, 4),  # n not a power of two; 3 segments of 2 chunks
    (1, 16, 130, 16, 2, True, True, None, None),  # the default kernel configuration, 2 directions
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_scan_matches_reference(case, dtype):
    b, di, l, n, g, has_z, has_bias, chunk, segments = case
    rtol, atol = TOL[dtype]
    leaves = make_inputs(b, di, l, n, g, dtype, has_z, has_bias, seed=hash(case) % 1000)
    twin = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    config = dict(chunk=chunk, block_d=4, segments=segments, bwd_chunk=2 * chunk, bwd_block_d=2) if chunk else {}
    out, last = selective_scan_triton(**scan_args(leaves, g), delta_softplus=has_bias, return_last_state=True,
                                      **config)
    out_ref, last_ref = selective_scan_ref(**scan_args(twin, g), delta_softplus=has_bias, return_last_state=True)
    assert out.dtype == dtype and out.shape == (b, di, l) and last.dtype == torch.float32
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_ref, rtol=rtol, atol=atol)

    dout = torch.randn(b, di, l, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out.backward(dout)
    out_ref.backward(dout)
    scale = {"u": (2, 2), "delta": (5, 10), "A": (1, 5)}  # looser for du, ddelta, dA, as upstream
    for name, leaf in leaves.items():
        rs, as_ = scale.get(name, (1, 1))
        ref = twin[name].grad.float()
        torch.testing.assert_close(leaf.grad.float(), ref, rtol=rtol * rs, atol=atol * as_,
                                   msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_D_and_one_run_a_chunk(dtype):
    """No skip term D, and backward chunks of 8 steps: a single thread's run (bf16), so the chain of runs
    across lanes has nothing to do."""
    b, di, l, n = 2, 4, 37, 4
    rtol, atol = TOL[dtype]
    leaves = make_inputs(b, di, l, n, 1, dtype, has_z=True, has_bias=True, seed=5)
    leaves.pop("D")
    twin = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    dout = torch.randn(b, di, l, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    selective_scan_triton(**scan_args(leaves, 1), delta_softplus=True, chunk=4, bwd_chunk=8).backward(dout)
    selective_scan_ref(**scan_args(twin, 1), delta_softplus=True).backward(dout)
    scale = {"u": (2, 2), "delta": (5, 10), "A": (1, 5)}
    for name, leaf in leaves.items():
        rs, as_ = scale.get(name, (1, 1))
        torch.testing.assert_close(leaf.grad.float(), twin[name].grad.float(), rtol=rtol * rs, atol=atol * as_,
                                   msg=lambda m: f"d{name}: {m}")


def test_bf16_D_and_delta_bias_are_read_as_their_fp32_values():
    """The paper model keeps D and dt_proj's bias in bf16, and the kernels read them as they are
    (no cast kernel a layer): the same output and gradients as the same values passed in fp32."""
    leaves = make_inputs(2, 8, 45, 4, 1, torch.bfloat16, has_z=True, has_bias=True, seed=11)
    for name in ("D", "delta_bias"):
        leaves[name] = leaves[name].detach().bfloat16().requires_grad_()
    wide = {k: v.detach().float() if k in ("D", "delta_bias") else v.detach() for k, v in leaves.items()}
    wide = {k: v.requires_grad_() for k, v in wide.items()}
    dout = torch.randn(2, 8, 45, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    outs = []
    for inputs in (leaves, wide):
        out = selective_scan_triton(**scan_args(inputs, 1), delta_softplus=True, chunk=8)
        out.backward(dout)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for name, leaf in leaves.items():
        assert torch.equal(leaf.grad, wide[name].grad.to(leaf.dtype)), name


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("path", ["triton", "triton, 3 segments", "ref", "torch"])
def test_steps_leave_the_padding_inert(path, softplus):
    """steps = k: the first k outputs and the last state are those of the first k steps alone, whatever
    the padding after them holds (the prefill graph's padding)."""
    args = {k: v.detach() for k, v in scan_args(make_inputs(1, 8, 45, 5, 1, torch.float32, True, True, seed=3), 1).items()}
    k = 29
    steps = torch.tensor(k, device=DEVICE)
    if path == "triton, 3 segments":  # of 2 chunks each: the padding starts in the second, fills the third
        out, last = selective_scan_triton(**args, delta_softplus=softplus, return_last_state=True, steps=steps,
                                          chunk=8, segments=3)
    else:
        out, last = selective_scan(**args, delta_softplus=softplus, return_last_state=True, steps=steps, backend=path)
    cut = {name: t[..., :k] if name in ("u", "delta", "B", "C", "z") else t for name, t in args.items()}
    out_ref, last_ref = selective_scan_ref(**cut, delta_softplus=softplus, return_last_state=True)
    torch.testing.assert_close(out[..., :k], out_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_ref, rtol=6e-4, atol=2e-3)


def test_channels_first_views():
    """The training layout: u, delta, z, B, C are (b, c, l) views of channels-first (c, b * l) tensors,
    l a multiple of 16. The output and the gradients come back in the inputs' own layout (so no copy
    follows) and equal the reference's."""
    b, di, l, n = 2, 8, 160, 4  # two backward chunks of 128 steps
    gen = torch.Generator().manual_seed(3)
    seq = lambda c: torch.randn(c, b * l, generator=gen).to(DEVICE).requires_grad_()  # noqa: E731
    u, delta, z, B, C = seq(di), seq(di), seq(di), seq(n), seq(n)
    A, D, bias = -torch.rand(di, n, generator=gen).to(DEVICE), torch.randn(di).to(DEVICE), torch.rand(di).to(DEVICE)
    view = lambda x: x.view(-1, b, l).transpose(0, 1)  # noqa: E731
    grads = []
    for fn in (selective_scan_triton, selective_scan_ref):
        out = fn(view(u), view(0.5 * torch.sigmoid(delta)), A, view(B), view(C), D, view(z), bias, True)
        grads.append(torch.autograd.grad((out * out).sum(), (u, delta, z, B, C)))
    for name, got, ref in zip("u delta z B C".split(), *grads):
        torch.testing.assert_close(got, ref, rtol=6e-4, atol=2e-3, msg=lambda m: f"d{name}: {m}")
    seen = {}
    inputs = {name: view(x) for name, x in (("u", u), ("delta", delta), ("z", z))}
    for name, x in inputs.items():
        x.register_hook(lambda grad, name=name: seen.update({name: grad.stride()}))
    out = selective_scan_triton(inputs["u"], inputs["delta"], A, view(B), view(C), D, inputs["z"], bias, True)
    out.sum().backward()
    assert seen == {name: x.stride() for name, x in inputs.items()} and out.stride() == inputs["u"].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 2])
def test_state_update_matches_reference(g, dtype):
    b, di, n = 3, 10, 16
    rtol, atol = TOL[dtype]
    gen = torch.Generator().manual_seed(g)
    state = torch.randn(b, di, n, generator=gen).to(DEVICE)
    xz = torch.randn(b, 2 * di, generator=gen).to(DEVICE, dtype)
    x, z = xz[:, :di], xz[:, di:]  # strided views, as after in_proj
    delta = torch.randn(b, di, generator=gen).to(DEVICE, dtype)
    A = -torch.rand(di, n, generator=gen).to(DEVICE)
    B = torch.randn(b, g, n, generator=gen).to(DEVICE, dtype)
    C = torch.randn(b, g, n, generator=gen).to(DEVICE, dtype)
    D, bias = torch.randn(di, generator=gen).to(DEVICE), torch.rand(di, generator=gen).to(DEVICE)
    if g == 1:
        B, C = B[:, 0], C[:, 0]
    state_ref = state.clone()
    y = selective_state_update_triton(state, x, delta, A, B, C, D, z, bias, delta_softplus=True)
    y_ref = selective_state_update_ref(state_ref, x, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert y.dtype == dtype and y.shape == (b, di)
    torch.testing.assert_close(state, state_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)


def test_decode_continues_the_scan():
    """Prefill with the scan's last state, then one decode step == the scan over one more step."""
    b, di, l, n = 2, 8, 19, 16
    gen = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(b, di, l + 1, generator=gen).to(DEVICE) for _ in range(3))
    A = -torch.rand(di, n, generator=gen).to(DEVICE)
    B, C = (torch.randn(b, n, l + 1, generator=gen).to(DEVICE) for _ in range(2))
    D, bias = torch.randn(di, generator=gen).to(DEVICE), torch.rand(di, generator=gen).to(DEVICE)
    full = selective_scan_triton(u, delta, A, B, C, D, z, bias, True, chunk=8)
    _, state = selective_scan_triton(u[..., :l], delta[..., :l], A, B[..., :l], C[..., :l], D, z[..., :l], bias,
                                     True, return_last_state=True, chunk=8)
    y = selective_state_update_triton(state, u[..., l], delta[..., l], A, B[..., l], C[..., l], D, z[..., l], bias,
                                      True)
    torch.testing.assert_close(y, full[..., l], rtol=6e-4, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_state_update_in_cuda_graph():
    """The decode step captured once in a CUDA graph and replayed == the reference, step by step."""
    b, di, n = 2, 64, 16
    x, delta, z = (torch.randn(b, di, device="cuda") for _ in range(3))
    A = -torch.rand(di, n, device="cuda")
    B, C = (torch.randn(b, n, device="cuda") for _ in range(2))
    D, bias = torch.randn(di, device="cuda"), torch.rand(di, device="cuda")
    state = torch.randn(b, di, n, device="cuda")
    state_ref = state.clone()
    selective_state_update_triton(state.clone(), x, delta, A, B, C, D, z, bias, True)  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = selective_state_update_triton(state, x, delta, A, B, C, D, z, bias, True)
    for _ in range(3):
        graph.replay()
        y_ref = selective_state_update_ref(state_ref, x, delta, A, B, C, D, z, bias, True)
        torch.testing.assert_close(y, y_ref, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(state, state_ref, rtol=6e-4, atol=2e-3)
