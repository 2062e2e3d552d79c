"""The training fast paths == their readable twins, values and gradients: the channels-first Mamba
mixer (with the reference scan and with the Triton scan) against the readable mixer, the fused LM
(padded sequences, fused residual add + RMSNorm, with and without checkpointing) against the
readable LM, the product that keeps fp32 weights against autocast's (and, with its cast kept a step and
its gradients added into .grad, against a fresh cast and autograd's accumulation over several
steps), the fused causal convolution +
SiLU against torch's, the fused add + RMSNorm and torch's RMSNorm against their formula. On a
machine without CUDA the Triton kernels run in Triton's interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

import torch.distributed as dist
import torch.nn.functional as F

from minivlmamba.mamba import MambaConfig, MambaLM, MambaMixer, RMSNorm
from minivlmamba.weight_product import WeightProduct, cast_weight
from minivlmamba.triton_conv import causal_conv1d_silu
from minivlmamba.triton_norm import add_rms_norm

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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_lm_equals_the_readable_lm(checkpointing):
    torch.manual_seed(0)
    readable = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, d_state=4, scan_backend="ref"))
    fast = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, d_state=4, scan_backend="triton")).to(DEVICE)
    fast.load_state_dict(readable.state_dict())
    fast.gradient_checkpointing = checkpointing
    embeds = torch.randn(3, 13, 16)  # b * l = 39: padded to 3 x 16 steps
    want = values_and_grads(readable, lambda e: readable(inputs_embeds=e), embeds)
    got = values_and_grads(fast, lambda e: fast.lm_head(fast.hidden_states_fused(e)), embeds.to(DEVICE))
    for name, a, b in zip(["logits", "embeds"] + [n for n, _ in fast.named_parameters()], got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=2e-3, msg=name)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("weight_first", [True, False])
def test_weight_product_equals_the_autocast_product(weight_first, frozen):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(DEVICE).requires_grad_(not frozen)  # fp32 master weight
    x, grad = product_operands(weight_first, generator)
    x.requires_grad_()
    results = []
    for product in (lambda: weight @ x if weight_first else x @ weight.t(),  # autocast casts the weight
                    lambda: WeightProduct.apply(weight, x, weight_first)):
        with torch.autocast(DEVICE, torch.bfloat16):
            out = product()
        out.backward(grad)
        results.append((out, x.grad, weight.grad))
        x.grad = weight.grad = None
    (want_out, want_dx, want_dw), (got_out, got_dx, got_dw) = results
    assert got_out.dtype == want_out.dtype == torch.bfloat16
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(got_dx, want_dx, rtol=0, atol=0)
    if frozen:  # a frozen weight gets no gradient (and none is computed)
        assert got_dw is None and want_dw is None
    else:
        assert got_dw.dtype == torch.float32
        torch.testing.assert_close(got_dw, want_dw, rtol=1e-2, atol=1e-2)  # on CUDA ours is not rounded to bf16


def plain_weight_gradient(a, b):
    """a @ b in fp32 as WeightProduct's backward returns it to autograd: unrounded on CUDA."""
    return torch.mm(a, b, out_dtype=torch.float32) if a.is_cuda else (a @ b).float()


def product_operands(weight_first, generator):
    """x and the output's gradient for a (24, 40) weight, bf16."""
    x = torch.randn((40, 56) if weight_first else (56, 40), generator=generator)
    grad = torch.randn((24, 56) if weight_first else (56, 24), generator=generator)
    return x.to(DEVICE, torch.bfloat16), grad.to(DEVICE, torch.bfloat16)


def record_handed_back(out, handed_back):
    """Notes, when out's backward runs, whether it handed the weight's gradient to autograd."""
    out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: handed_back.append(grad_inputs[0] is not None))


@pytest.mark.parametrize("weight_first", [True, False])
def test_weight_product_trains_like_the_plain_path(weight_first):
    """3 steps of 3 accumulated micro-batches and fused AdamW: the cast kept for a step and the
    gradients added into .grad by the backward give exactly the values of a fresh cast for every
    product and autograd's accumulation. A cast kept past an optimizer step, or a gradient added
    twice or lost, would differ."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(DEVICE).requires_grad_()
    plain = weight.detach().clone().requires_grad_()
    optimizers = [torch.optim.AdamW([w], lr=0.1, fused=True) for w in (weight, plain)]
    handed_back = []
    for step in range(3):
        for micro in range(3):
            x, grad = product_operands(weight_first, generator)
            out = WeightProduct.apply(weight, x, weight_first)
            record_handed_back(out, handed_back)
            out.backward(grad)
            w = plain.detach().to(torch.bfloat16)  # the plain path: a fresh cast, autograd's accumulation
            want = w @ x if weight_first else x @ w.t()
            dw = plain_weight_gradient(grad, x.t()) if weight_first else plain_weight_gradient(grad.t(), x)
            plain.grad = dw if plain.grad is None else plain.grad + dw
            torch.testing.assert_close(out, want, rtol=0, atol=0)
            torch.testing.assert_close(weight.grad, plain.grad, rtol=0, atol=0)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(weight, plain, rtol=0, atol=0)
    assert handed_back == [True, False, False] * 3  # the first micro-batch of a step creates .grad


def test_weight_cast_is_kept_until_the_weight_changes():
    weight = torch.randn(24, 40, device=DEVICE, requires_grad=True)
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)  # writes without bumping weight._version

    def optimizer_step():
        weight.grad = torch.ones_like(weight)
        optimizer.step()

    def in_place_write():
        with torch.no_grad():
            weight.mul_(2)

    def new_storage():
        weight.data = torch.randn_like(weight)

    def cast():  # as WeightProduct's forward and backward call it: grad mode off
        with torch.no_grad():
            return cast_weight(weight, torch.bfloat16)

    kept = cast()
    assert cast() is kept  # one cast for all the products until a change
    for change in (optimizer_step, in_place_write, new_storage):
        change()
        new = cast()
        assert new is not kept, change.__name__
        torch.testing.assert_close(new, weight.detach().to(torch.bfloat16), rtol=0, atol=0, msg=change.__name__)
        kept = new


def test_weight_product_has_the_second_order_gradients_of_the_plain_product():
    """A backward with create_graph (e.g. a gradient penalty): the weight's second-order gradient flows
    through the cast of the backward, which the kept copy (detached) would cut."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(DEVICE).requires_grad_()
    x, grad = product_operands(True, generator)
    x.requires_grad_()
    with torch.no_grad():
        cast_weight(weight, x.dtype)  # a copy kept, as an earlier forward leaves it
    got, want = [], []
    for product, out in ((WeightProduct.apply, got), (lambda w, x, _: w.to(x.dtype) @ x, want)):
        (dx,) = torch.autograd.grad(product(weight, x, True), x, grad, create_graph=True)
        out.append(torch.autograd.grad(dx.float().square().sum(), weight)[0])
    torch.testing.assert_close(got[0], want[0])


def test_weight_product_hands_the_gradient_back_where_autograd_needs_it():
    """torch.autograd.grad, backward(inputs=...) without the weight, torch.distributed (whose DDP and
    FSDP hooks watch the weight's AccumulateGrad): the gradient goes through autograd, .grad is left
    alone, and under torch.distributed every product casts afresh."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(DEVICE).requires_grad_()
    x, grad = product_operands(True, generator)
    x.requires_grad_()
    want = plain_weight_gradient(grad, x.t())
    weight.grad = torch.zeros_like(weight)
    (dw,) = torch.autograd.grad(WeightProduct.apply(weight, x, True), weight, grad)
    torch.testing.assert_close(dw, want, rtol=0, atol=0)
    WeightProduct.apply(weight, x, True).backward(grad, inputs=[x])
    assert not weight.grad.any()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        handed_back = []
        out = WeightProduct.apply(weight, x, True)
        record_handed_back(out, handed_back)
        out.backward(grad)
        assert handed_back == [True]
        torch.testing.assert_close(weight.grad, want, rtol=0, atol=0)
        with torch.no_grad():  # as inside WeightProduct
            assert cast_weight(weight, torch.bfloat16) is not cast_weight(weight, torch.bfloat16)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("b, l", [(3, 13), (2, 2), (1, 300)])  # odd l, l shorter than the kernel, several tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_causal_conv_silu_equals_torch(b, l, dtype):
    torch.manual_seed(0)
    di, k = 6, 4
    conv = torch.nn.Conv1d(di, di, k, groups=di, padding=k - 1)
    xz = torch.randn(2, 2 * di, b * l)[:, :di].view(2, di, b, l).to(dtype)  # (2, di, b, l), strided channels
    readable = lambda xz: (F.silu(conv(xz[0].float().transpose(0, 1))[..., :l]).transpose(0, 1), xz[1])  # noqa: E731
    fused = lambda xz: causal_conv1d_silu(xz, conv.weight[:, 0], conv.bias, block_c=4, block_t=128)  # noqa: E731
    want = values_and_grads(conv, lambda xz: torch.cat(readable(xz)), xz)
    got = values_and_grads(conv.to(DEVICE), lambda xz: torch.cat(fused(xz)), xz.to(DEVICE))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(["out and z", "xz", "weight", "bias"], got, want):
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


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual, x_used", [(True, True), (False, True), (True, False)])
def test_fused_add_rms_norm_equals_its_formula(out_dtype, with_residual, x_used):
    torch.manual_seed(0)
    rows, d = 6, 40  # d not a power of two: masked columns
    norm = RMSNorm(d)
    with torch.no_grad():
        norm.weight.normal_()
    out = torch.randn(rows, d).to(out_dtype)
    residual = 3 * torch.randn(rows, d) if with_residual else None
    dx, dnormed = torch.randn(rows, d), torch.randn(rows, d).to(out_dtype)

    def formula(out, residual, weight):
        x = out.float() + residual if residual is not None else out.float()
        return x, (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * weight).to(out.dtype)

    results = []
    for fn, device in ((formula, "cpu"), (lambda o, r, w: add_rms_norm(o, r, w, norm.eps), DEVICE)):
        inputs = [t.detach().clone().to(device).requires_grad_() if t is not None else None
                  for t in (out, residual, norm.weight)]
        x, normed = fn(*inputs)
        if x_used:
            torch.autograd.backward((x, normed), (dx.to(device), dnormed.to(device)))
        else:  # the final norm: only normed goes on
            normed.backward(dnormed.to(device))
        results.append([t.detach().cpu().float() for t in [x, normed] + [t.grad for t in inputs if t is not None]])
    names = ["x", "normed", "out"] + (["residual"] if with_residual else []) + ["weight"]
    tol = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, got, want in zip(names, results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, **tol, msg=name)
