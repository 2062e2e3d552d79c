"""`python -m minivlmamba.bench generate`: decode speed of VL-Mamba-2.8B's shapes (random weights,
bf16): a whole chat request, batch-1 decode against the HBM roofline, batches, long contexts."""

import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from minivlmamba.bench.common import copy_bandwidth
from minivlmamba.cli import Number
from minivlmamba.config import preset
from minivlmamba import generate
from minivlmamba.cuda_graphs import CudaGraphDecoder
from minivlmamba.generate import fused_step, ssm_step
from minivlmamba.triton_scan import selective_scan_triton
from minivlmamba.vlm import EOT_ID, VLMamba


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


def seconds(fn, repeats=5):
    """Median wall-clock seconds of fn(), the device synchronised before and after each run."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def first_token_parts(model, pixel_values, prompt):
    """The first token's pieces, each timed alone: image encoder and LM prefill eager (readable, fused),
    then the whole prefill as chat.py runs it (one CUDA graph)."""
    embeds = model.embed(pixel_values, prompt)  # (1, p + l, d)
    cache = model.lm.allocate_cache(1)
    parts = {
        "image encoder (tower + connector), eager": lambda: model.connector(model.vision(pixel_values)),
        f"LM prefill of {embeds.shape[1]} tokens, readable": lambda: model.lm.hidden_states(embeds, cache, fused=False),
        f"LM prefill of {embeds.shape[1]} tokens, fused": lambda: model.lm.hidden_states(embeds, cache),
        "whole prefill + LM head, one CUDA graph": lambda: model.prefill(pixel_values, prompt, cache),
    }
    for fn in parts.values():
        fn()  # warm-up: compiles, captures
    return {name: seconds(fn) for name, fn in parts.items()}


def scan_sweep(di=5120, n=16):
    """Batch-1 prefill scan (bf16, z, softplus) under a few launch shapes: (l, chunk, block_d, segments) -> ms;
    segments None: the default's choice."""
    out = {}
    for l in (768, 16384):
        u, delta, z = (torch.randn(1, di, l, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        B, C = (torch.randn(1, n, l, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        A = -torch.rand(di, n, device="cuda") - 0.5
        D, bias = torch.rand(di, device="cuda"), torch.rand(di, device="cuda") - 4
        for chunk, block_d, segments in ((8, 4, 1), (16, 4, 1), (8, 16, 1), (8, 16, 2), (8, 16, 4), (8, 16, 8),
                                         (8, 16, 16), (8, 16, 32), (16, 16, 4), (16, 16, 8), (8, 8, 8), (8, 16, None)):
            fn = lambda: selective_scan_triton(u, delta, A, B, C, D, z, bias, True, True, chunk=chunk, block_d=block_d,
                                               segments=segments)
            out[l, chunk, block_d, segments] = do_bench(fn, return_mode="median")
    return out


def ssm_step_sweep(mixer, batches=(8, 64)):
    """The decode step's SSM kernel alone (bf16 activations, fp32 state) under a few launch shapes:
    (b, block_d, rows, warps) -> us; the first shape is today's."""
    di, n = mixer.A_log.shape
    r = mixer.dt_proj.weight.shape[1]
    out = {}
    for b in batches:
        state = torch.randn(b, di, n, device="cuda")
        x, xz, dt_B_C = (torch.randn(b, width, device="cuda", dtype=torch.bfloat16) for width in (di, 2 * di, r + 2 * n))
        for block_d, rows, warps in ((16, 1, 4), (32, 1, 4), (16, 4, 4), (16, 8, 4), (32, 4, 4), (32, 8, 4),
                                     (32, 8, 2), (64, 8, 8)):
            fn = lambda: ssm_step(state, x, xz, dt_B_C, mixer, block_d, rows, warps)
            out[b, block_d, rows, warps] = do_bench(fn, return_mode="median") * 1e3
    return out


def kernel_profile(fn, runs, top=8):
    """(kernel name, microseconds a run, launches a run) of all kernels together, then of the `top`
    kernels by device time, over `runs` calls of fn (all together against fn's wall time: is it bound
    by the GPU or by the launches?)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = ("all kernels", sum(e.device_time_total for e in rows) / runs, sum(e.count for e in rows) // runs)
    return [total] + [(e.key[:60], e.device_time_total / runs, e.count // runs) for e in rows[:top]]


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
    pdl, generate.PDL = generate.PDL, False
    rates["CUDA graph, fused step, no PDL"] = replay_rate(CudaGraphDecoder(lm, 1), 1)
    generate.PDL = pdl
    print("(b) decode at batch 1:")
    for name, rate in rates.items():
        print(f"    {name:<36} {rate:>6.0f} tok/s  {rate / roofline:>4.0%} of the roofline")
    decoders = {}
    state_bytes = lm.allocate_cache(1).ssm_state.nbytes  # read and written every step, per sequence
    for b in (1, 8, 64):
        decoders[b] = CudaGraphDecoder(lm, b)
        rate, own = replay_rate(decoders[b], b), b * bw / (weight_bytes + 2 * b * state_bytes)
        print(f"    CUDA graph, fused step, batch {b:<3}     {rate:>6.0f} tok/s  {rate / own:>4.0%} of its roofline "
              f"({own:.0f} tok/s: weights + SSM state read and written)")
    rows, generate.BATCH_ROWS = generate.BATCH_ROWS, 0  # batch 8 again, every product in cuBLAS
    rate = replay_rate(CudaGraphDecoder(lm, 8), 8)
    generate.BATCH_ROWS = rows
    print(f"    {'the same at batch 8, cuBLAS products':<38}{rate:>6.0f} tok/s")
    print("(b') first token, each piece alone (median of 5):")
    for name, sec in first_token_parts(model, pixel_values, prompt).items():
        print(f"    {name:<48} {sec * 1e3:>6.1f} ms")

    print("(c) batch 1 at long context (prefill eager, then decode):")
    decoder = decoders[1]
    for context in (1024, 16384):
        embeds = lm.backbone.embedding(torch.randint(2, 50000, (1, context), device="cuda"))
        lm.hidden_states(embeds, decoder.cache)  # warm-up (a new length class compiles once)
        readable = seconds(lambda: lm.hidden_states(embeds, decoder.cache, fused=False), 3)
        prefill = seconds(lambda: lm.hidden_states(embeds, decoder.cache), 3)  # prefill into the graph's cache
        torch.cuda.reset_peak_memory_stats()
        rate = replay_rate(decoder, 1)
        print(f"    context {context:>5}: prefill {prefill * 1e3:>5.0f} ms fused ({context / prefill:>6.0f} tok/s; "
              f"readable {readable * 1e3:.0f} ms), decode {rate:.0f} tok/s, peak GPU memory while decoding "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    fused = replay_rate(decoder, 1)
    print(f"(d) roofline: {weight_bytes / 1e9:.2f} GB / {bw / 1e12:.2f} TB/s = {roofline:.0f} tok/s; fused CUDA-graph "
          f"step at batch 1: {fused:.0f} tok/s = {fused / roofline:.0%} of it")
    if args.sweep:
        print("(e) batch-1 prefill scan, di 5120, n 16, bf16 (l, chunk, block_d, segments: ms):")
        print("    " + "  ".join(f"{k}: {ms:.3f}" for k, ms in scan_sweep().items()))
        layer_bytes = 2 * 64 * state_bytes / lm.cfg.n_layer  # one layer's state at batch 64, read and written
        print(f"(f) decode SSM step alone, one layer, di {lm.cfg.d_inner}, n {lm.cfg.d_state} (batch, channels, rows and "
              f"warps a program: us; at batch 64 its state at the copy bandwidth: {layer_bytes / bw * 1e6:.1f} us):")
        print("    " + "  ".join(f"{k}: {us:.1f}" for k, us in ssm_step_sweep(lm.backbone.layers[0].mixer).items()))
        print("(g) kernels by device time, us a run (calls a run):")
        embeds = lm.backbone.embedding(torch.randint(2, 50000, (1, 761), device="cuda"))
        for title, fn, runs in (("decode step, batch 1, graph", decoder.graph.replay, 20),
                                ("whole prefill, graph", lambda: model.prefill(pixel_values, prompt, cache), 5),
                                ("fused LM prefill, 761 tokens", lambda: lm.hidden_states(embeds, decoder.cache), 3)):
            rows = kernel_profile(fn, runs)
            print(f"    {title}: " + "; ".join(f"{name} {us:.0f} ({count})" for name, us, count in rows))
    hf = transformers_rate(lm.cfg) if args.transformers else None
    if hf is not None:
        print(f"    transformers MambaForCausalLM (PyTorch path), same shapes, batch 1: {hf:.1f} tok/s "
              f"({fused / hf:.1f}x slower than ours)")


def add_parser(sub):
    generate = sub.add_parser("generate", help="decode speed of the paper's model shapes (random weights, bf16)")
    generate.add_argument("--preset", default="vl-mamba-2.8b", help="model shapes (minivlmamba.config.PRESETS)")
    generate.add_argument("--prompt-tokens", type=Number(int, 1), default=32, help="text tokens after the image")
    generate.add_argument("--new-tokens", type=Number(int, 1), default=256, help="tokens generated per request")
    generate.add_argument("--no-transformers", dest="transformers", action="store_false",
                          help="skip the comparison with transformers' MambaForCausalLM")
    generate.add_argument("--sweep", action="store_true",
                          help="also sweep the launch shapes of the batch-1 prefill scan and of the decode SSM step, "
                               "and profile the step and the prefill")
    generate.set_defaults(run=bench_generate)
