"""Benchmarks on a CUDA GPU.

    python -m minivlmamba.bench scan            # fused Triton scan vs the reference, with floors
    python -m minivlmamba.bench scan --sweep    # also try kernel configurations on the LM shape
    python -m minivlmamba.bench generate        # VL-Mamba-2.8B decode: whole request, batch, context, roofline
    python -m minivlmamba.bench train           # VL-Mamba-2.8B stage-2 training steps: tokens/s, MFU, memory

Every table starts with the device and the measured copy bandwidth: timings are comparable only
on the same card. Times are medians of `triton.testing.do_bench` (CUDA events).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from triton.testing import do_bench

from minivlmamba.config import preset
from minivlmamba.generate import CudaGraphDecoder, fused_step
from minivlmamba.scan import selective_scan_ref
from minivlmamba.triton_scan import selective_scan_triton
from minivlmamba.vlm import EOT_ID, VLMamba


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(2**28, device="cuda", dtype=torch.float32).uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


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
            (256, 2, 1, None), (256, 2, 1, 152), (256, 2, 1, 168), (256, 2, 1, 184), (256, 1, 1, None)]:
        kw = dict(bwd_chunk=bwd_chunk, bwd_block_d=bwd_block_d, bwd_num_warps=bwd_warps, bwd_maxnreg=bwd_maxnreg)
        out = selective_scan_triton(**inputs, **kw)
        dout = torch.randn_like(out)
        with torch.no_grad():
            fwd = do_bench(lambda: selective_scan_triton(**inputs, **kw), return_mode="median")
        both = do_bench(lambda: selective_scan_triton(**inputs, **kw).backward(dout), grad_to_none=leaves,
                        return_mode="median")
        print(f"  {bwd_chunk:>9} {bwd_block_d:>7} {bwd_warps:>5} {str(bwd_maxnreg):>7} | {fwd:.3f}, {both - fwd:.3f}")


# ---------------------------------------------------------------------------------------- generate

def paper_model(name):
    """The preset's VL-Mamba with random weights, built directly in bf16 on the GPU."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = VLMamba(preset(name)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        model.lm.backbone.embedding.weight[EOT_ID] = 0  # end-of-text scores 0: random weights never stop early
    return model


def replay_rate(decoder, batch_size):
    """Tokens per second of a captured decode step, replayed back to back."""
    return batch_size / (do_bench(decoder.graph.replay, return_mode="median") * 1e-3)


def products_rate(lm):
    """Tokens per second of a graph of the batch-1 step's matrix-vector products alone: each weight
    read once by cuBLAS, nothing else. The best a step built on them can do."""
    cfg, dev, bf16 = lm.cfg, "cuda", torch.bfloat16
    h, x, dt = (torch.randn(1, width, device=dev, dtype=bf16) for width in (cfg.d_model, cfg.d_inner, cfg.dt_rank))

    def products():
        for block in lm.backbone.layers:
            mixer = block.mixer
            F.linear(h, mixer.in_proj.weight)
            F.linear(x, mixer.x_proj.weight)
            F.linear(dt, mixer.dt_proj.weight)
            F.linear(x, mixer.out_proj.weight)
        lm.lm_head(h)

    products()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        products()
    return 1 / (do_bench(graph.replay, return_mode="median") * 1e-3)


def request(model, pixel_values, prompt, new_tokens):
    """One chat request as chat.py runs it: encode the image, prefill, stream new_tokens greedy tokens.
    -> (total seconds, seconds to the first token, tokens generated)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    cache = model.lm.allocate_cache(1)
    logits = model.prefill(pixel_values, prompt, cache)
    first, count = None, 0
    for token in model.generate(logits, cache, new_tokens):
        token.item()  # streaming: every token reaches the host
        first, count = first or time.perf_counter() - start, count + 1
    return time.perf_counter() - start, first, count


def transformers_rate(cfg, new_tokens=32):
    """Decode tokens/s of transformers' MambaForCausalLM of the same shapes (its PyTorch path), or None."""
    try:
        from transformers import MambaConfig as HFMambaConfig, MambaForCausalLM
    except ImportError:
        return None
    hf_cfg = HFMambaConfig(vocab_size=cfg.vocab_padded, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                           state_size=cfg.d_state, expand=cfg.expand, conv_kernel=cfg.d_conv,
                           time_step_rank=cfg.dt_rank, use_bias=False, use_conv_bias=True)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = MambaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(2, 50000, (1, 8), device="cuda")

    def seconds(n):  # generate exactly n tokens after the 8-token prompt
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=1)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds(2)  # warm-up
    rate = new_tokens / (seconds(new_tokens + 2) - seconds(2))  # the difference leaves out the prefill
    del hf
    torch.cuda.empty_cache()
    return rate


@torch.inference_mode()
def bench_generate(args):
    bw = copy_bandwidth()
    model = paper_model(args.preset)
    lm, vision = model.lm, model.cfg.vision
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())  # the tied lm_head counted once
    roofline = bw / weight_bytes
    print(f"device: {torch.cuda.get_device_name()}   copy bandwidth: {bw / 1e12:.2f} TB/s   "
          f"preset {args.preset}, random weights, bf16")
    print(f"LM weights {weight_bytes / 1e9:.2f} GB: HBM roofline at batch 1 = {roofline:.0f} tok/s")

    pixel_values = torch.randn(1, 3, vision.image_size, vision.image_size, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randint(2, 50000, (1, args.prompt_tokens), device="cuda")
    request(model, pixel_values, prompt, 4)  # warm-up: compiles the kernels, captures the graph
    total, first, count = sorted(request(model, pixel_values, prompt, args.new_tokens) for _ in range(3))[1]
    print(f"(a) whole request, {vision.num_patches} image tokens + {args.prompt_tokens}-token prompt + {count} new "
          f"tokens: {total:.3f} s (first token after {first * 1e3:.0f} ms), {count / total:.0f} tok/s overall")

    rates = {}
    cache, ids = lm.allocate_cache(1), torch.randint(2, 50000, (1,), device="cuda")
    rates["eager, readable step"] = 1 / (do_bench(lambda: lm.step(ids, cache), return_mode="median") * 1e-3)
    rates["eager, fused step"] = 1 / (do_bench(lambda: fused_step(lm, ids, cache), return_mode="median") * 1e-3)
    rates["CUDA graph, readable step"] = replay_rate(CudaGraphDecoder(lm, 1, fused=False), 1)
    rates["CUDA graph, matrix products alone"] = products_rate(lm)
    print("(b) decode at batch 1:")
    for name, rate in rates.items():
        print(f"    {name:<36} {rate:>6.0f} tok/s  {rate / roofline:>4.0%} of the roofline")
    decoders = {}
    for b in (1, 8, 64):
        decoders[b] = CudaGraphDecoder(lm, b)
        print(f"    CUDA graph, fused step, batch {b:<3}     {replay_rate(decoders[b], b):>6.0f} tok/s")

    print("(c) batch 1 at long context (prefill eager, then decode):")
    decoder = decoders[1]
    for context in (1024, 16384):
        ids = torch.randint(2, 50000, (1, context), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        lm.hidden_states(lm.backbone.embedding(ids), decoder.cache)  # prefill into the graph's cache
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        rate = replay_rate(decoder, 1)
        print(f"    context {context:>5}: prefill {prefill * 1e3:>5.0f} ms ({context / prefill:>6.0f} tok/s), decode "
              f"{rate:.0f} tok/s, peak GPU memory while decoding {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    fused = replay_rate(decoder, 1)
    print(f"(d) roofline: {weight_bytes / 1e9:.2f} GB / {bw / 1e12:.2f} TB/s = {roofline:.0f} tok/s; fused CUDA-graph "
          f"step at batch 1: {fused:.0f} tok/s = {fused / roofline:.0%} of it")
    hf = transformers_rate(lm.cfg) if args.transformers else None
    if hf is not None:
        print(f"    transformers MambaForCausalLM (PyTorch path), same shapes, batch 1: {hf:.1f} tok/s "
              f"({fused / hf:.1f}x slower than ours)")


# ---------------------------------------------------------------------------------------- train

PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H200": 989e12}  # dense bf16 FLOP/s, SXM datasheets (no sparsity)
MATRIX_OPS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
              torch.ops.aten.convolution, torch.ops.aten.convolution_backward}


def training_model(name):
    """The preset with random weights, set up as train.py's stage 2: connector + LM trained in fp32
    master weights (run under bf16 autocast), the frozen vision tower stored in bf16."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VLMamba(preset(name)).train()
    model.vision.to(torch.bfloat16).requires_grad_(False)
    return model


def random_batch(cfg, micro, text_tokens):
    """A stage-2 micro-batch of random data: one image and text_tokens labelled tokens a sample."""
    size = cfg.vision.image_size
    pixel_values = torch.randn(micro, 3, size, size, device="cuda", dtype=torch.bfloat16)
    input_ids = torch.randint(2, cfg.lm.vocab_size, (micro, text_tokens), device="cuda")
    return pixel_values, input_ids, input_ids.clone()


def forward_backward(model, batch):
    with torch.autocast("cuda", torch.bfloat16):
        _, loss = model(*batch)
    loss.backward()


def optimizer_step(optimizer, params):
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class MatrixDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product and convolution that runs, backward included."""

    def __init__(self):
        super().__init__()
        self.seen = {}  # (op name, dtypes) -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATRIX_OPS:
            dtypes = tuple(str(a.dtype).removeprefix("torch.") for a in args if torch.is_tensor(a))
            key = (func.overloadpacket.__name__, dtypes)
            self.seen[key] = self.seen.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def check_autocast(model, batch, text_tokens):
    """One forward + backward of one sample, watched: which dtypes reach the matrix units, and how many
    FLOPs torch's counter sees against VLMamba.training_flops."""
    dtypes, counter = MatrixDtypes(), FlopCounterMode(display=False)
    with counter, dtypes:
        forward_backward(model, batch)
    model.zero_grad(set_to_none=True)
    print("matrix products and convolutions, forward + backward (calls by input dtypes):")
    for (name, types), calls in sorted(dtypes.seen.items()):
        print(f"    {name:<22} {'/'.join(types):<26} {calls:>5}")
    products = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "convolution" not in str(op))
    print(f"FLOPs of one sample: torch's FlopCounterMode {products / 1e12:.2f} T (matrix products and attention, "
          f"convolutions left out: it counts a depthwise one's backward as dense), "
          f"training_flops {model.training_flops(text_tokens) / 1e12:.2f} T")


def largest_micro_batch(model, optimizer, params, cfg, text_tokens):
    """Predict from the peak memory at 1 and 2 samples, then step down from the prediction until a
    step runs."""
    forward_backward(model, random_batch(cfg, 1, text_tokens))
    optimizer_step(optimizer, params)  # AdamW allocates its state in its first step: not a per-sample cost
    peaks = []
    for micro in (1, 2):
        torch.cuda.reset_peak_memory_stats()
        forward_backward(model, random_batch(cfg, micro, text_tokens))
        optimizer_step(optimizer, params)
        peaks.append(torch.cuda.max_memory_allocated())
    per_sample = peaks[1] - peaks[0]
    usable = 0.97 * (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())  # 3% kept for fragmentation
    micro = int((usable - (peaks[0] - per_sample)) // per_sample)
    while micro > 1:
        try:
            forward_backward(model, random_batch(cfg, micro, text_tokens))
            optimizer_step(optimizer, params)
            return micro
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
        micro -= 1
    return 1


def time_steps(model, optimizer, params, batch, steps):
    """Median ms of forward + backward and of clip + AdamW over `steps` steps (after one warm-up), and
    the peak memory in bytes."""
    forward_backward(model, batch)
    optimizer_step(optimizer, params)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, backward_done, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        forward_backward(model, batch)
        backward_done.record()
        optimizer_step(optimizer, params)
        end.record()
        end.synchronize()
        times.append((start.elapsed_time(backward_done), backward_done.elapsed_time(end)))
    fwd_bwd, optim = (statistics.median(column) for column in zip(*times))
    return fwd_bwd, optim, torch.cuda.max_memory_allocated()


def profile_step(model, optimizer, params, batch, rows=15):
    """The kernels that take the time of one training step, by total GPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward_backward(model, batch)
        optimizer_step(optimizer, params)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def bench_train(args):
    card = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (flops for name, flops in PEAK_BF16.items() if name in card), None)
    if peak is None:
        raise SystemExit(f"no peak bf16 FLOP/s known for {card!r}: pass --peak-tflops")
    model = training_model(args.preset)
    cfg, text = model.cfg, args.text_tokens
    params = [p for p in model.parameters() if p.requires_grad]  # connector + LM
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    count = lambda module: sum(p.numel() for p in module.parameters())
    flops = model.training_flops(text)
    print(f"device: {card}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB   "
          f"peak dense bf16 {peak / 1e12:.0f} TFLOP/s   preset {args.preset}, random weights")
    print(f"trained: LM {count(model.lm) / 1e9:.3f}B + connector {count(model.connector) / 1e6:.1f}M parameters, "
          f"fp32 master weights, bf16 autocast, fused AdamW; frozen tower {count(model.vision) / 1e6:.1f}M in bf16")
    print(f"sample: {cfg.vision.num_patches} image + {text} text tokens; model FLOPs a sample "
          f"{flops / 1e12:.2f} T = 6 x LM body x {cfg.vision.num_patches + text} + 6 x LM head x {text} "
          f"+ 6 x connector x {cfg.vision.num_patches} + 2 x tower x {cfg.vision.num_patches}")
    check_autocast(model, random_batch(cfg, 1, text), text)

    rows = []
    for checkpointing in (False, True):
        model.lm.gradient_checkpointing = checkpointing
        micro = args.micro_batch or largest_micro_batch(model, optimizer, params, cfg, text)
        batch = random_batch(cfg, micro, text)
        fwd_bwd, optim, memory = time_steps(model, optimizer, params, batch, args.steps)
        step = (fwd_bwd + optim) * 1e-3
        rows.append((checkpointing, micro, fwd_bwd, optim, micro * (cfg.vision.num_patches + text) / step,
                     micro * flops / step / peak, micro * flops / (fwd_bwd * 1e-3) / peak, memory))
        if args.profile and not checkpointing:
            profile_step(model, optimizer, params, batch)
        del batch

    print(f"{'checkpointing':<13} {'micro':>5} | {'fwd+bwd':>8} {'AdamW':>6} {'step':>7} (ms) | {'tokens/s':>8} | "
          f"{'MFU':>5} {'fwd+bwd':>7} | {'peak GiB':>8}   ({card})")
    for checkpointing, micro, fwd_bwd, optim, tokens, mfu, mfu_fb, memory in rows:
        print(f"{'yes' if checkpointing else 'no':<13} {micro:>5} | {fwd_bwd:>8.0f} {optim:>6.0f} "
              f"{fwd_bwd + optim:>7.0f}      | {tokens:>8.0f} | {mfu:>5.1%} {mfu_fb:>7.1%} | {memory / 2**30:>8.1f}")
    print("MFU = model FLOPs of the step / step time / peak; 'fwd+bwd' leaves the optimizer out, as a step "
          "accumulating many micro-batches would. Recomputed forwards are not counted as model FLOPs.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="selective scan: Triton kernels vs the reference, and their floors")
    scan.add_argument("--no-ref", dest="ref", action="store_false", help="skip the (slow) reference scan")
    scan.add_argument("--sweep", action="store_true", help="also time kernel configurations")
    scan.set_defaults(run=bench_scan)
    generate = sub.add_parser("generate", help="decode speed of the paper's model shapes (random weights, bf16)")
    generate.add_argument("--preset", default="vl-mamba-2.8b", help="model shapes (minivlmamba.config.PRESETS)")
    generate.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image")
    generate.add_argument("--new-tokens", type=int, default=256, help="tokens generated per request")
    generate.add_argument("--no-transformers", dest="transformers", action="store_false",
                          help="skip the comparison with transformers' MambaForCausalLM")
    generate.set_defaults(run=bench_generate)
    train = sub.add_parser("train", help="stage-2 training steps of the paper's model shapes: tokens/s, MFU, memory")
    train.add_argument("--preset", default="vl-mamba-2.8b", help="model shapes (minivlmamba.config.PRESETS)")
    train.add_argument("--text-tokens", type=int, default=300, help="text tokens after the image in each sample")
    train.add_argument("--micro-batch", type=int, help="samples a step (default: the largest that fits)")
    train.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up")
    train.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: known H100/H200)")
    train.add_argument("--profile", action="store_true", help="also list the kernels of one step (no checkpointing)")
    train.set_defaults(run=bench_train)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
