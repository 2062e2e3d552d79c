"""`python -m minivlmamba.bench train`: stage-2 training steps of VL-Mamba-2.8B's shapes with random
weights: tokens/s, MFU, peak memory, with and without gradient checkpointing.

A step is what a user's run does at the paper's global batch (128 in stage 2): as many micro-batches
as make it up, each a forward + backward adding into the fp32 gradients, then the clip and AdamW.
Under torchrun the same step runs data-parallel, the micro-batches shared among the GPUs (DDP, or
FSDP with --fsdp, as train.py does)."""

import os
import statistics

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from minivlmamba.bench.common import copy_bandwidth
from minivlmamba.cli import Number
from minivlmamba.config import preset
from minivlmamba.vlm import VLMamba, peak_bf16_flops

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


def forward_backward(model, batch, accumulation=1):
    with torch.autocast("cuda", torch.bfloat16):
        _, loss = model(*batch)
    (loss / accumulation).backward()  # as train.py: the step's gradient is the mean over its micro-batches


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
          f"training_flops {model.training_flops(text_tokens, text_tokens) / 1e12:.2f} T")


def trial_step(model, optimizer, params, cfg, micro, text_tokens):
    """Two micro-batches and AdamW: the second forward runs beside the gradients of the first, as in every
    step that accumulates several (the fp32 gradients, 11 GB at 2.8B, then add to the activations' peak)."""
    for _ in range(2):
        forward_backward(model, random_batch(cfg, micro, text_tokens), 2)
    optimizer_step(optimizer, params)


def largest_micro_batch(model, optimizer, params, cfg, text_tokens):
    """Predict from the peak memory at 1 and 2 samples, then step down from the prediction until a
    step runs."""
    trial_step(model, optimizer, params, cfg, 1, text_tokens)  # AdamW allocates its state: not a per-sample cost
    peaks = []
    for micro in (1, 2):
        torch.cuda.reset_peak_memory_stats()
        trial_step(model, optimizer, params, cfg, micro, text_tokens)
        peaks.append(torch.cuda.max_memory_allocated())
    per_sample = peaks[1] - peaks[0]
    usable = 0.97 * (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved())  # 3% kept for fragmentation
    micro = int((usable - (peaks[0] - per_sample)) // per_sample)
    while micro > 1:
        try:
            trial_step(model, optimizer, params, cfg, micro, text_tokens)
            return micro
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
        micro -= 1
    return 1


def time_steps(model, optimizer, params, batch, accumulation, steps):
    """Median ms of a step's forward + backward passes (`accumulation` micro-batches, the same data each
    time) and of its clip + AdamW over `steps` steps, and the peak memory in bytes. The warm-up is one
    micro-batch and AdamW: the kernels are compiled and every buffer allocated by then."""
    forward_backward(model, batch)
    optimizer_step(optimizer, params)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, backward_done, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        for _ in range(accumulation):
            forward_backward(model, batch, accumulation)
        backward_done.record()
        optimizer_step(optimizer, params)
        end.record()
        end.synchronize()
        times.append((start.elapsed_time(backward_done), backward_done.elapsed_time(end)))
    fwd_bwd, optim = (statistics.median(column) for column in zip(*times))
    return fwd_bwd, optim, torch.cuda.max_memory_allocated()


def profile_step(model, optimizer, params, batch, accumulation, say, rows=20):
    """The kernels that take the time of one micro-batch's forward + backward (adding into the existing
    gradients, as all but the first of a step do) and of the clip + AdamW, by total GPU time."""
    forward_backward(model, batch, accumulation)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward_backward(model, batch, accumulation)
        optimizer_step(optimizer, params)
        torch.cuda.synchronize()
    say(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def parallel(model, fsdp):
    """The model wrapped as train.py wraps it under torchrun: DDP, or with fsdp VLMamba.shard."""
    if not fsdp:
        return DDP(model, device_ids=[torch.cuda.current_device()], gradient_as_bucket_view=True)
    model.shard(init_device_mesh("cuda", (dist.get_world_size(),)))
    return model


def bench_train(args):
    distributed = "RANK" in os.environ  # started by torchrun: one process per GPU
    if distributed:
        if not args.micro_batch:
            raise SystemExit("under torchrun give --micro-batch: a process out of memory would stall the others")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    world = dist.get_world_size() if distributed else 1
    say = print if not distributed or dist.get_rank() == 0 else (lambda *a, **k: None)
    card = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(card)
    if peak is None:
        raise SystemExit(f"no peak bf16 FLOP/s known for {card!r}: pass --peak-tflops")
    bw = copy_bandwidth()
    model = training_model(args.preset)
    cfg, text = model.cfg, args.text_tokens
    count = lambda module: sum(p.numel() for p in module.parameters())
    image = cfg.vision.num_patches
    flops = model.training_flops(text, text)  # random_batch labels every text token
    flops_issue = 6 * (count(model.lm) + count(model.connector)) * (image + text) + 2 * count(model.vision) * image
    mode = f"{world} GPUs, {'FSDP' if args.fsdp else 'DDP'}" if distributed else "1 GPU"
    say(f"device: {card}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB   copy bandwidth "
        f"{bw / 1e12:.2f} TB/s   peak dense bf16 {peak / 1e12:.0f} TFLOP/s   {args.preset}, random weights, {mode}")
    say(f"trained: LM {count(model.lm) / 1e9:.3f}B + connector {count(model.connector) / 1e6:.1f}M parameters, "
        f"fp32 master weights, bf16 autocast, fused AdamW; frozen tower {count(model.vision) / 1e6:.1f}M in bf16")
    say(f"sample: {image} image + {text} text tokens; model FLOPs a sample for 'MFU': {flops / 1e12:.2f} T = 6 x "
        f"LM body x {image + text} + 6 x LM head x {text} + 6 x connector x {image} + 2 x tower x {image} (each "
        f"weight x the tokens it multiplies); for 'MFU*', the issue's count: {flops_issue / 1e12:.2f} T = 6 x (LM + "
        f"connector) x {image + text} + 2 x tower x {image}")
    if distributed:
        model = parallel(model, args.fsdp)
    else:
        check_autocast(model, random_batch(cfg, 1, text), text)
    raw = model.module if isinstance(model, DDP) else model
    params = [p for p in raw.parameters() if p.requires_grad]  # connector + LM (shards under FSDP)
    optimizer = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    rows = []
    for checkpointing in {"no": [False], "yes": [True], "both": [False, True]}[args.checkpointing]:
        raw.lm.gradient_checkpointing = checkpointing
        micro = args.micro_batch or largest_micro_batch(model, optimizer, params, cfg, text)
        accumulation = -(-args.global_batch // (micro * world))  # micro-batches a step and GPU, rounded up
        batch = random_batch(cfg, micro, text)
        fwd_bwd, optim, memory = time_steps(model, optimizer, params, batch, accumulation, args.steps)
        step, samples = (fwd_bwd + optim) * 1e-3, accumulation * micro  # samples a step and GPU
        rows.append((checkpointing, micro, accumulation, fwd_bwd / accumulation, optim, fwd_bwd + optim,
                     world * samples * (image + text) / step, samples * flops / step / peak,
                     samples * flops / (fwd_bwd * 1e-3) / peak, samples * flops_issue / step / peak, memory))
        if args.profile and not checkpointing:
            profile_step(model, optimizer, params, batch, accumulation, say)
        del batch

    say(f"{'checkpointing':<13} {'micro':>5} {'x':>2} | {'fwd+bwd':>7} {'AdamW':>5} {'step':>6} (ms) | "
        f"{'tokens/s':>8} | {'MFU':>5} {'fwd+bwd':>7} {'MFU*':>5} | {'peak GiB':>8}   "
        f"({card}, {mode}, copy {bw / 1e12:.2f} TB/s)")
    for checkpointing, micro, accumulation, fwd_bwd, optim, step, tokens, mfu, mfu_fb, mfu_issue, memory in rows:
        say(f"{'yes' if checkpointing else 'no':<13} {micro:>5} {accumulation:>2} | {fwd_bwd:>7.0f} {optim:>5.0f} "
            f"{step:>6.0f}      | {tokens:>8.0f} | {mfu:>5.1%} {mfu_fb:>7.1%} {mfu_issue:>5.1%} | "
            f"{memory / 2**30:>8.1f}")
    say(f"A step: x micro-batches of 'micro' samples a GPU (global batch {args.global_batch}, rounded up), each "
        "forward + backward ('fwd+bwd', ms a micro-batch), then clip + AdamW. MFU = model FLOPs of the step / step "
        "time / peak, per GPU; 'fwd+bwd' leaves the optimizer out; MFU* uses the issue's count. Recomputed "
        "forwards are not model FLOPs. tokens/s: all GPUs together; micro and peak memory: per GPU.")
    if distributed:
        dist.destroy_process_group()


def add_parser(sub):
    train = sub.add_parser("train", help="stage-2 training steps of the paper's model shapes: tokens/s, MFU, memory")
    train.add_argument("--preset", default="vl-mamba-2.8b", help="model shapes (minivlmamba.config.PRESETS)")
    train.add_argument("--text-tokens", type=Number(int, 1), default=300,
                       help="text tokens after the image in each sample")
    train.add_argument("--micro-batch", type=Number(int, 1),
                       help="samples a forward + backward and GPU (default: the largest "
                       "that fits)")
    train.add_argument("--checkpointing", choices=["no", "yes", "both"], default="both",
                       help="gradient checkpointing of the LM blocks")
    train.add_argument("--fsdp", action="store_true", help="(torchrun) FSDP instead of DDP")
    train.add_argument("--global-batch", type=Number(int, 1), default=128,
                       help="samples a step, all GPUs together (the paper's stage 2: 128)")
    train.add_argument("--steps", type=Number(int, 1), default=2, help="timed optimizer steps, after one warm-up")
    train.add_argument("--peak-tflops", type=Number(float, above=0),
                       help="the card's dense bf16 peak (default: known H100/H200)")
    train.add_argument("--profile", action="store_true",
                       help="also list the kernels of one micro-batch and the optimizer (no checkpointing)")
    train.set_defaults(run=bench_train)
