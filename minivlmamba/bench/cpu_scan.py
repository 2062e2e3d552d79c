"""`python -m minivlmamba.bench cpu-scan`, or `python -m minivlmamba.bench.cpu_scan` (which needs no
Triton): the CPU scans, `selective_scan_c` (the C kernel) and `selective_scan_torch`, against the
reference at the tiny default's training shapes, fp32.

The inputs are laid out as the models pass them. LM layer (mamba.py's `MambaMixer.forward`): u,
delta, z, B, C transposed views of (b, l, .) tensors (u the convolution's output, z half of
in_proj's output, B and C slices of x_proj's); the output's gradient as out_proj gives it.
Connector (connector.py, VSS with k = 2 directions): u, delta contiguous (b, k * di, p); B, C
grouped, slices of the (k, b, p, r + 2n) projection. Times are medians of single calls: the forward
without autograd, and forward + backward. The machine should be otherwise idle (`uptime`).
"""

import platform
import statistics
import time

import torch

from minivlmamba.cli import ArgumentParser, Number, run
from minivlmamba.cpu_scan import available
from minivlmamba.scan import selective_scan_c, selective_scan_ref, selective_scan_torch

SHAPES = [  # (name, b, di, l, n, g): g = 1 is the LM layer (ungrouped B, C, a gate z), g = 2 the connector
    ("LM layer", 16, 192, 96, 16, 1),  # the tiny default: batch 16, d_model 96, 9 image + 87 text tokens
    ("LM layer", 32, 256, 51, 16, 1),  # the previous default's (batch 32, d_model 128)
    ("VSS connector, k=2", 16, 384, 9, 16, 2),
]


def cpu_model():
    """The CPU's name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def scan_inputs(b, di, l, n, g, r=8, seed=0):
    """The leaves (what gradients are taken of), the scan's keyword arguments as views of them, and
    the output's gradient; values drawn as at initialisation (A = -(1..n), delta about 0.01-0.3)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    leaves = dict(A=-torch.arange(1.0, n + 1).repeat(di, 1), D=torch.ones(di), delta_bias=torch.rand(di, generator=gen))
    if g == 1:
        leaves.update(u=rand(b, l, di), delta=rand(b, l, di) - 4, xz=rand(b, l, 2 * di), proj=rand(b, l, r + 2 * n))
        args = lambda: dict(u=leaves["u"].transpose(1, 2), delta=leaves["delta"].transpose(1, 2),
                            z=leaves["xz"][..., di:].transpose(1, 2), B=leaves["proj"][..., r:r + n].transpose(1, 2),
                            C=leaves["proj"][..., r + n:].transpose(1, 2))  # (b, di or n, l) views
        dout = rand(b, l, di).transpose(1, 2)  # (b, di, l) view
    else:
        leaves.update(u=rand(b, di, l), delta=rand(b, di, l) - 4, proj=rand(g, b, l, r + 2 * n))
        args = lambda: dict(u=leaves["u"], delta=leaves["delta"], B=leaves["proj"][..., r:r + n].permute(1, 0, 3, 2),
                            C=leaves["proj"][..., r + n:].permute(1, 0, 3, 2))  # (b, g, n, l) views
        dout = rand(b, di, l)
    kwargs = lambda: dict(args(), A=leaves["A"], D=leaves["D"], delta_bias=leaves["delta_bias"], delta_softplus=True)
    return leaves, kwargs, dout


def timers(scan, leaves, kwargs, dout):
    """Two callables: the forward without autograd, and forward + backward (gradients dropped after)."""
    def forward():
        with torch.no_grad():
            scan(**kwargs())

    def forward_backward():
        for v in leaves.values():
            v.requires_grad_()
        scan(**kwargs()).backward(dout)
        for v in leaves.values():
            v.requires_grad_(False)
            v.grad = None
    return forward, forward_backward


def median_ms(fn, repeats):
    """Median ms of repeats calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_cpu_scan(args):
    print(f"CPU: {cpu_model()}   torch {torch.__version__}   threads: {torch.get_num_threads()}")
    scans = {"C": selective_scan_c, "torch": selective_scan_torch, "ref": selective_scan_ref}
    if not available():
        del scans["C"]
    print(f"{'shape':<20} {'b':>3} {'di':>4} {'l':>3} {'g':>2} | "
          + " | ".join(f"{name + ' fwd':>9} {'fwd+bwd':>8}" for name in scans) + f"   (ms, median of {args.repeats})")
    for name, b, di, l, n, g in SHAPES:
        inputs = scan_inputs(b, di, l, n, g)
        times = [[median_ms(fn, args.repeats) for fn in timers(scan, *inputs)] for scan in scans.values()]
        print(f"{name:<20} {b:>3} {di:>4} {l:>3} {g:>2} | "
              + " | ".join(f"{fwd:>9.2f} {both:>8.2f}" for fwd, both in times))


def add_arguments(parser):
    parser.add_argument("--repeats", type=Number(int, 1), default=30, help="timed calls of each (the median is kept)")


def add_parser(sub):
    cpu = sub.add_parser("cpu-scan",
                         help="selective scan on the CPU: the C and torch paths vs the reference, tiny shapes")
    add_arguments(cpu)
    cpu.set_defaults(run=bench_cpu_scan)


if __name__ == "__main__":
    parser = ArgumentParser(prog="python -m minivlmamba.bench.cpu_scan", description=__doc__)
    add_arguments(parser)
    run(lambda: bench_cpu_scan(parser.parse_args()))
