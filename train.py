"""Train VL-Mamba.

With no arguments this trains the `tiny` preset from scratch on the embedded synthetic "shapes"
visual-QA set, on the CPU, in a few minutes, then reports held-out accuracy per question family.
With a paper preset and LLaVA data it runs the paper's two-stage recipe on pretrained weights:

    python train.py                                      # tiny, shapes, CPU
    python train.py --resume                             # continue out/tiny exactly where it stopped
    python train.py --preset vl-mamba-2.8b --stage 1 --data blip_laion_cc_sbu_558k.json \\
        --image-folder llava/pretrain --out out/stage1   # align: connector only, `plain` template
    python train.py --stage 2 --init out/stage1 --data llava_v1_5_mix665k.json \\
        --image-folder llava/finetune --out out/stage2   # instruct: connector + LM
    torchrun --nproc_per_node=8 train.py ...             # the same, data-parallel (DDP)
    torchrun --nproc_per_node=8 train.py --fsdp ...      # each process keeps 1/8 of the weights and optimizer
"""

import argparse
import collections
import ctypes
import dataclasses
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from minivlmamba import UserError, VLMamba, preset
from minivlmamba.checkpoint import COMPONENTS, TIED, build_model, load_model, save_model, save_train_state
from minivlmamba.connector import CONNECTORS, SCANS
from minivlmamba.data import LlavaDataset, collate, collate_good, encode_sample, sample_order
from minivlmamba.pretrained import load_tokenizer
from minivlmamba.shapes import FAMILIES, held_out_set, pretrain_tower, train_tokenizer, training_sample
from minivlmamba.vlm import peak_bf16_flops

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="tiny", help="model preset (see minivlmamba/config.py)")
parser.add_argument("--out", default="out/tiny", help="checkpoint folder to write (and --resume from)")
parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
parser.add_argument("--data", help="LLaVA-format JSON file (default: the embedded shapes set)")
parser.add_argument("--image-folder", default=".", help="folder the data file's images are relative to")
parser.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: align (connector), 2: instruct (+ LM)")
parser.add_argument("--init", help="stage 2: the stage-1 checkpoint folder to start from")
parser.add_argument("--vision", help="pretrained vision tower folder or repo id (default: the preset's)")
parser.add_argument("--lm", help="pretrained Mamba folder or repo id (default: the preset's)")
parser.add_argument("--tokenizer", default="EleutherAI/gpt-neox-20b",
                    help="tokenizer.json folder or repo id (paper presets)")
parser.add_argument("--steps", type=int, help="optimizer steps (default: 3000 for shapes, 1 epoch of --data)")
parser.add_argument("--batch-size", type=int, help="global batch (default: 16 shapes, 256 stage 1, 128 stage 2)")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and process")
parser.add_argument("--lr", type=float, help="peak learning rate (default: 5e-4 shapes, 1e-3 stage 1, 2e-5 stage 2)")
parser.add_argument("--lr-vision", type=float, help="vision tower lr (0 = frozen; frozen unless --tower-steps 0)")
parser.add_argument("--lr-connector", type=float, help="connector lr (0 = frozen; default --lr)")
parser.add_argument("--lr-lm", type=float, help="language model lr (0 = frozen; default --lr, frozen in stage 1)")
parser.add_argument("--tower-steps", type=int, default=300,
                    help="shapes: steps pretraining the tower to name each patch's object and cell, then frozen "
                         "(0: no pretraining, the tower trains with the rest)")
parser.add_argument("--warmup", type=float, default=0.03, help="fraction of steps of linear warmup")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute each LM block in the backward")
parser.add_argument("--connector", choices=CONNECTORS, help="override the preset's connector")
parser.add_argument("--scan", choices=SCANS, help="override the preset's scan order (bsm or csm)")
parser.add_argument("--fsdp", action="store_true",
                    help="(torchrun) shard weights, gradients and optimizer state over the processes (FSDP)")
parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="autocast dtype")
parser.add_argument("--workers", type=int, default=4, help="data loading processes (--data)")
parser.add_argument("--no-group-by-length", action="store_true", help="(--data) do not batch similar lengths together")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--log-every", type=int, default=50)
parser.add_argument("--save-every", type=int, default=500)
parser.add_argument("--eval-per-family", type=int, default=200, help="held-out questions per family (shapes)")
args = parser.parse_args()


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the system.

    A CPU training step allocates and frees the same few-MB tensors every step; by default each
    fresh allocation comes from the system again and every page costs a fault (a third of the
    tiny default's time). Other C libraries: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # allocations up to 32 MiB come from the reusable heap
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and the heap is never trimmed


def main():
    # ---------------------------------------------------------------- processes and devices
    distributed = "RANK" in os.environ  # started by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.fsdp and not distributed:
        raise UserError("--fsdp shards the model over processes: start train.py with torchrun")
    if distributed:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master, cuda = rank == 0, device.startswith("cuda")
    if not cuda:
        keep_freed_memory()
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
    autocast = torch.autocast("cuda", torch.bfloat16) if dtype == "bf16" else nullcontext()
    log = print if master else (lambda *a, **k: None)
    shapes = args.data is None

    # ---------------------------------------------------------------- model, tokenizer, recipe
    out = Path(args.out)
    torch.manual_seed(args.seed)
    state = None
    if args.resume:
        model, tokenizer = load_model(out)
        if not (out / "train_state.pt").is_file():
            raise UserError(f"{out}: nothing to resume (no train_state.pt)")
        state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True, mmap=True)
        model.load_state_dict(state["model"], strict=False)  # the trained weights, exactly as saved
    elif args.init:
        model, tokenizer = load_model(args.init)
    else:
        cfg = preset(args.preset)
        cfg.connector, cfg.scan = args.connector or cfg.connector, args.scan or cfg.scan
        if args.preset == "tiny":
            tokenizer = train_tokenizer(cfg.template, vocab_size=cfg.lm.vocab_size)
            cfg.lm = dataclasses.replace(cfg.lm, vocab_size=tokenizer.get_vocab_size())
            model = VLMamba(cfg)
        else:
            cfg.vision_path, cfg.lm_path = args.vision or cfg.vision_path, args.lm or cfg.lm_path
            tokenizer = load_tokenizer(args.tokenizer)
            model = build_model(cfg)
            lm_cfg = model.cfg.lm  # generation never samples the padding rows past the tokenizer's vocabulary
            lm_cfg.vocab_size = min(lm_cfg.vocab_size, tokenizer.get_vocab_size())
    cfg = model.cfg
    if shapes and cfg.vision_path:
        raise UserError(f"preset {args.preset!r} is trained on LLaVA data: give --data and --image-folder")
    stage = 0 if shapes else args.stage
    template = "plain" if stage == 1 else cfg.template  # stage 1 learns captions, not conversations
    default_lr = {0: 5e-4, 1: 1e-3, 2: 2e-5}[stage]
    lr = args.lr or default_lr  # the tower is frozen (unless shapes trains it from scratch), the LM in stage 1
    defaults = dict(vision=lr * (stage == 0 and args.tower_steps == 0), connector=lr, lm=lr * (stage != 1))
    given = {part: getattr(args, f"lr_{part}") for part in COMPONENTS}
    lrs = {part: defaults[part] if given[part] is None else given[part] for part in COMPONENTS}  # 0 = frozen
    trained = tuple(part for part in COMPONENTS if lrs[part] > 0)
    # a checkpoint holds what was trained and whatever no pretrained weights could rebuild
    saved = tuple(part for part in COMPONENTS if part in trained or not getattr(cfg, f"{part}_path", ""))
    batch_size = args.batch_size or {0: 16, 1: 256, 2: 128}[stage]
    if batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {batch_size} is not divisible by {world} processes x "
                        f"{args.grad_accum} accumulation steps")
    micro = batch_size // (world * args.grad_accum)

    n_params = sum(p.numel() for p in model.parameters())
    name = "from checkpoint" if args.resume or args.init else args.preset
    parallel = " FSDP" if args.fsdp else " DDP" if distributed else ""
    log(f"model: {name}, {n_params / 1e6:.2f}M parameters, connector {cfg.connector}, scan {cfg.scan}, "
        f"training {'+'.join(trained)}, device {device} x{world}{parallel}, {dtype}")
    model.lm.gradient_checkpointing = args.grad_checkpointing
    model.to(device).train()
    if shapes and not (args.resume or args.init) and args.tower_steps > 0:
        # The paper starts from a pretrained tower; the tiny default first pretrains its own.
        t = time.time()
        accuracy = pretrain_tower(model.vision, args.tower_steps, seed=args.seed, device=device)
        log(f"tower: {args.tower_steps} steps learning what each patch shows and where, {100 * accuracy:.1f}% of "
            f"held-out patches right ({time.time() - t:.0f} s); now frozen")
    for part in COMPONENTS:
        getattr(model, part).requires_grad_(part in trained)  # before DDP and FSDP, which read it
    raw_model = model
    if args.fsdp:
        # FSDP (VLMamba.shard): the weights travel in fp32 and are cast to bf16 for the products,
        # exactly as without FSDP. The mesh is named: by default FSDP takes a GPU if there is one.
        model.shard(init_device_mesh("cuda" if cuda else "cpu", (world,)))
    elif distributed:
        # gradients stored in DDP's all-reduce buckets: no second copy of them (11 GB for the 2.8B LM)
        model = DDP(model, device_ids=[torch.device(device).index] if cuda else None, gradient_as_bucket_view=True)

    # ---------------------------------------------------------------- optimizer
    # No weight decay on norms, biases and the SSM's A_log and D, as upstream Mamba.
    no_decay = lambda name, p: p.dim() < 2 or name.split(".")[-1] in ("A_log", "A_logs", "D", "Ds")
    groups = []
    for part in COMPONENTS:
        params = list(getattr(raw_model, part).named_parameters())
        if part in trained:
            for decay in (True, False):
                chosen = [p for n, p in params if no_decay(n, p) != decay]
                groups.append(dict(params=chosen, peak_lr=lrs[part], weight_decay=args.weight_decay * decay))
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=cuda)
    step = 0
    if state is not None:
        optimizer.load_state_dict(sharded_like_params(state["optimizer"], optimizer))
        step = state["step"]

    # ---------------------------------------------------------------- data
    # The micro-batch (step, i) of process `rank` is a fixed function of the seed, so a resumed run
    # sees exactly the batches the interrupted one would have seen, whatever the number of processes.
    max_text = cfg.max_len - cfg.vision.num_patches
    if shapes:
        steps = args.steps or 3000

        def micro_batches(step):
            for i in range(args.grad_accum):
                rng = random.Random(f"{args.seed}-{step}-{i}-{rank}")
                pixels, encoded = [], []
                for _ in range(micro):
                    image, turns = training_sample(rng)
                    pixels.append(raw_model.vision.preprocess([image])[0])
                    encoded.append(encode_sample(tokenizer, template, turns, max_text))
                yield collate(pixels, encoded), 0
    else:
        dataset = LlavaDataset(args.data, args.image_folder, tokenizer, template, cfg.vision, max_text)
        steps = args.steps or len(dataset) // batch_size
        order = sample_order(dataset.text_lengths(), batch_size, args.seed, group=not args.no_group_by_length)
        sampler = [order[(s * batch_size + (i * world + rank) * micro + j) % len(dataset)]
                   for s in range(step, steps) for i in range(args.grad_accum) for j in range(micro)]
        loader = iter(torch.utils.data.DataLoader(dataset, micro, sampler=sampler, num_workers=args.workers,
                                                  collate_fn=collate_good, pin_memory=cuda))

        def micro_batches(step):
            for _ in range(args.grad_accum):
                yield next(loader)

    def lr_factor(step):
        """Linear warmup, then cosine decay to 10% of the peak."""
        warmup = max(1, int(args.warmup * steps))
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, steps - warmup), 1.0)))

    # ---------------------------------------------------------------- training loop
    def save():
        # The whole weights and AdamW state (gathered from the shards under FSDP: every process
        # takes part), written by the master alone, so a run resumes on any number of processes.
        weights = {k: gathered(v, master) for k, v in raw_model.state_dict().items()
                   if k.split(".")[0] in saved and k != TIED}  # the tied head is the embedding
        opt_state = optimizer.state_dict()
        opt_state["state"] = {i: {k: gathered(v, master) for k, v in s.items()} for i, s in opt_state["state"].items()}
        if master:
            save_model(out, raw_model, tokenizer, saved, weights)
            save_train_state(out, dict(model=weights, optimizer=opt_state, step=step))

    # MFU: model FLOPs (VLMamba.training_flops) over the card's peak bf16 rate.
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if cuda else None
    t0, tokens, flops, skipped = time.time(), 0, 0, 0
    recent = collections.deque([(t0, step)], maxlen=6)  # (time, step) at the last few log lines: the ETA
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(step)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for batch, bad in micro_batches(step):
            # a micro-batch that one process has no good sample of is dropped by all, or their
            # collectives would stop pairing up; the bad samples are counted over all processes
            if distributed:
                counts = torch.tensor([batch is None, bad], dtype=torch.float32, device=device)
                dist.all_reduce(counts)
                empty, bad = counts.tolist()
                batch = None if empty else batch
            skipped += int(bad)
            if batch is None:  # every sample of this micro-batch was bad
                continue
            pixel_values, input_ids, labels = (t.to(device, non_blocking=True) for t in batch)
            with autocast:
                _, loss = model(pixel_values, input_ids, labels)
            if not torch.isfinite(loss):
                raise UserError(f"step {step}: loss is {loss.item()}; lower --lr or use --dtype fp32")
            (loss / args.grad_accum).backward()
            losses.append(loss.item())
            tokens += (input_ids.numel() + pixel_values.shape[0] * cfg.vision.num_patches) * world
            flops += raw_model.training_flops(input_ids.shape[1]) * input_ids.shape[0] * world
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)  # over all shards
        optimizer.step()
        step += 1
        if step % args.log_every == 0 or step == steps:
            now = time.time()
            elapsed, (then, step_then) = now - t0, recent[0]
            recent.append((now, step))
            eta = (now - then) / (step - step_then) * (steps - step)  # at the speed of the last few hundred steps
            loss = sum(losses) / max(1, len(losses))
            gpu = f" | MFU {flops / elapsed / (peak * world):.1%}" if peak else ""
            gpu += f" | {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
            log(f"step {step:5d}/{steps} | loss {loss:.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                f"grad norm {gathered(grad_norm).item():.2f} | {tokens / elapsed:,.0f} tok/s{gpu} | "
                f"ETA {eta / 60:.1f} min"
                + (f" | {skipped} bad samples skipped" if skipped else ""))
        if step % args.save_every == 0 or step == steps:
            save()

    # ---------------------------------------------------------------- held-out evaluation
    if shapes and (master or args.fsdp):
        accuracy = evaluate(raw_model, tokenizer, device, autocast)  # FSDP: every process, its forward needs all
        log(f"\n{'family':<10} {'accuracy':>8}")
        for family in FAMILIES:
            log(f"{family:<10} {100 * accuracy[family]:7.1f}%")
        log(f"saved {out}/ ({time.time() - t0:.0f} s)")
        log(f"held-out accuracy: {100 * sum(accuracy.values()) / len(accuracy):.1f}%")
    elif master:
        log(f"saved {out}/ ({time.time() - t0:.0f} s, {skipped} bad samples skipped)")
    if distributed:
        dist.destroy_process_group()


def gathered(tensor, keep=True):
    """The whole tensor on the CPU (None unless keep). Under FSDP each process holds a shard of it
    and every process must take part in the gather."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.cpu() if keep else None


def sharded_like_params(optimizer_state, optimizer):
    """A saved (whole) optimizer state cut like the optimizer's parameters: under FSDP each process
    keeps its own shard of every tensor (cut from its local copy, no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, state in optimizer_state["state"].items():
        p = params[i]
        if isinstance(p, DTensor):
            optimizer_state["state"][i] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None) if v.dim() else v
                for k, v in state.items()}
    return optimizer_state


@torch.no_grad()
def evaluate(model, tokenizer, device, autocast, batch_size=100):
    """Greedy exact-match accuracy per family on held-out scenes (a seed never used for training).

    Greedy decoding reproduces an answer exactly iff every answer token, end-of-text included, is
    the argmax given the ones before it; so we score all answers at once with one forward pass.
    """
    model.eval()
    items = held_out_set(seed=10_000 + args.seed, per_family=args.eval_per_family)
    correct = {family: 0 for family in FAMILIES}
    max_text = model.cfg.max_len - model.cfg.vision.num_patches
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        pixels = model.vision.preprocess([image for image, *_ in chunk])
        encoded = [encode_sample(tokenizer, model.cfg.template, [(q, a)], max_text) for _, q, a, _ in chunk]
        pixel_values, input_ids, labels = (t.to(device) for t in collate(list(pixels), encoded))
        with autocast:
            logits, _ = model(pixel_values, input_ids)
        hit = (logits.argmax(-1) == labels) | (labels < 0)  # (b, l)
        for (_, _, _, family), ok in zip(chunk, hit.all(-1).tolist()):
            correct[family] += ok
    model.train()
    return {family: correct[family] / args.eval_per_family for family in FAMILIES}


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last checkpoint saved is intact; continue with --resume")
