"""`python -m minivlmamba.bench scan`: the fused Triton scan against the reference, and its floors
(the fewest bytes over the copy bandwidth, one exponential per state element over the exp2 rate)."""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from minivlmamba.bench.common import copy_bandwidth
from minivlmamba.scan import selective_scan_ref
from minivlmamba.triton_scan import selective_scan_triton


@triton.jit
def _exp2_kernel(x_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    for _ in range(ITERS):
        x = tl.exp2(x * -0.5)  # one multiply per exponential: bound by the special-function unit
    tl.store(x_ptr + offs, x)


def exp_rate():
    """Exponentials per second the chip sustains (exp2 on the special-function units)."""
    x = torch.rand(2**22, device="cuda")
    iters, block = 256, 1024
    ms = do_bench(lambda: _exp2_kernel[(x.numel() // block,)](x, ITERS=iters, BLOCK=block), return_mode="median")
    return x.numel() * iters / (ms * 1e-3)


def scan_inputs(b, di, l, n, g, has_z, dtype=torch.bfloat16):
    """Inputs drawn as in the models: softplus(delta + bias) small, A = -(1..n)."""
    dev = "cuda"
    BC = (b, n, l) if g == 1 else (b, g, n, l)
    return dict(
        u=torch.randn(b, di, l, device=dev, dtype=dtype), delta=torch.randn(b, di, l, device=dev, dtype=dtype) - 4,
        A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(di, 1),
        B=torch.randn(*BC, device=dev, dtype=dtype), C=torch.randn(*BC, device=dev, dtype=dtype),
        D=torch.ones(di, device=dev), z=torch.randn(b, di, l, device=dev, dtype=dtype) if has_z else None,
        delta_bias=torch.rand(di, device=dev), delta_softplus=True)


def time_fwd_bwd(fn, args, rep=200):
    """Median ms of the forward (no autograd) and of forward + backward."""
    with torch.no_grad():
        fwd = do_bench(lambda: fn(**args), rep=rep, return_mode="median")
    leaves = [v.requires_grad_() for k, v in args.items() if torch.is_tensor(v) and v.is_floating_point()]
    out = fn(**args)
    dout = torch.randn_like(out)
    both = do_bench(lambda: fn(**args).backward(dout), rep=rep, grad_to_none=leaves, return_mode="median")
    for v in leaves:
        v.requires_grad_(False)
    return fwd, both


def scan_floors(b, di, l, n, g, has_z, bw, rate):
    """Fewest bytes over bandwidth, and one exponential per state element per pass over the rate."""
    act, bc = b * di * l * 2, 2 * b * g * n * l * 2  # bf16 bytes of one (b, di, l) tensor, of B and C
    fwd_bytes = act * (3 + has_z) + bc  # read u, delta, (z), B, C; write out
    bwd_bytes = act * (4 + has_z) + bc + act * (2 + has_z) + 2 * bc  # read the same + dout; write grads
    exps = b * di * l * n
    return max(fwd_bytes / bw, exps / rate) * 1e3, max((fwd_bytes + bwd_bytes) / bw, 2 * exps / rate) * 1e3


SHAPES = [  # (name, b, di, l, n, g, has_z, run the reference)
    ("Mamba-2.8B LM", 4, 5120, 1024, 16, 1, True, True),
    ("Mamba-2.8B LM", 4, 5120, 2048, 16, 1, True, False),
    ("LM, training step shape", 8, 5120, 1040, 16, 1, True, False),
    ("VSS connector, k=2, 27x27", 8, 2 * 5120, 729, 16, 2, False, False),
    ("long sequence", 1, 5120, 16384, 16, 1, True, False),
]


def bench_scan(args):
    bw, rate = copy_bandwidth(), exp_rate()
    print(f"device: {torch.cuda.get_device_name()}   copy bandwidth: {bw / 1e12:.2f} TB/s   "
          f"exp2 rate: {rate / 1e12:.2f} T/s")
    print(f"{'shape':<28} {'b':>2} {'di':>6} {'l':>6} {'g':>2} | {'triton fwd':>10} {'fwd+bwd':>9} | "
          f"{'ref fwd':>8} {'fwd+bwd':>8} | {'floor fwd':>9} {'fwd+bwd':>8}   (ms)")
    per_token = {}
    for name, b, di, l, n, g, has_z, run_ref in SHAPES:
        inputs = scan_inputs(b, di, l, n, g, has_z)
        fwd, both = time_fwd_bwd(selective_scan_triton, inputs)
        ref = time_fwd_bwd(selective_scan_ref, inputs, rep=1) if run_ref and args.ref else (float("nan"),) * 2
        floor = scan_floors(b, di, l, n, g, has_z, bw, rate)
        per_token[(name, l)] = (fwd / (b * l), both / (b * l))
        print(f"{name:<28} {b:>2} {di:>6} {l:>6} {g:>2} | {fwd:>10.3f} {both:>9.3f} | {ref[0]:>8.1f} {ref[1]:>8.1f} | "
              f"{floor[0]:>9.3f} {floor[1]:>8.3f}")
    long, short = per_token[("long sequence", 16384)], per_token[("Mamba-2.8B LM", 1024)]
    print(f"per-token time, l=16384 (b=1) over l=1024 (b=4): fwd {long[0] / short[0]:.2f}x, "
          f"fwd+bwd {long[1] / short[1]:.2f}x")
    if args.sweep:
        sweep(bw)


def sweep(bw):
    """Backward configurations on the LM shape (b=4, di=5120, l=2048), the forward at its defaults."""
    inputs = scan_inputs(4, 5120, 2048, 16, 1, True)
    leaves = [inputs[k].requires_grad_() for k in ("u", "delta", "B", "C", "z")]
    print(f"sweep, LM shape l=2048 (copy bandwidth {bw / 1e12:.2f} TB/s): bwd chunk block_d warps maxnreg | "
          f"fwd ms, bwd ms")
    for bwd_chunk, bwd_block_d, bwd_warps, bwd_maxnreg in [
            (128, 2, 1, 128), (128, 2, 1, 168), (128, 2, 1, None), (256, 1, 1, 168), (256, 2, 1, None)]:
        kw = dict(bwd_chunk=bwd_chunk, bwd_block_d=bwd_block_d, bwd_num_warps=bwd_warps, bwd_maxnreg=bwd_maxnreg)
        out = selective_scan_triton(**inputs, **kw)
        dout = torch.randn_like(out)
        with torch.no_grad():
            fwd = do_bench(lambda: selective_scan_triton(**inputs, **kw), return_mode="median")
        both = do_bench(lambda: selective_scan_triton(**inputs, **kw).backward(dout), grad_to_none=leaves,
                        return_mode="median")
        print(f"  {bwd_chunk:>9} {bwd_block_d:>7} {bwd_warps:>5} {str(bwd_maxnreg):>7} | {fwd:.3f}, {both - fwd:.3f}")


def add_parser(sub):
    scan = sub.add_parser("scan", help="selective scan: Triton kernels vs the reference, and their floors")
    scan.add_argument("--no-ref", dest="ref", action="store_false", help="skip the (slow) reference scan")
    scan.add_argument("--sweep", action="store_true", help="also time kernel configurations")
    scan.set_defaults(run=bench_scan)
