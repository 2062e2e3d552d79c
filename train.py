"""Train VL-Mamba.

With no arguments this trains the `tiny` preset from scratch on the embedded synthetic "shapes"
visual-QA set, on the CPU, in a few minutes, then reports held-out accuracy per question family:

    python train.py
    python train.py --steps 200 --out out/quick          # a shorter run
    python train.py --resume                             # continue out/tiny exactly where it stopped
    torchrun --nproc_per_node=2 train.py                 # data-parallel (DDP) on 2 processes
"""

import argparse
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
from torch.nn.parallel import DistributedDataParallel as DDP

from minivlmamba import VLMamba, preset, UserError
from minivlmamba.checkpoint import load_model, save_model, save_train_state
from minivlmamba.connector import CONNECTORS, SCANS
from minivlmamba.data import collate, encode_sample
from minivlmamba.shapes import FAMILIES, held_out_set, train_tokenizer, training_sample

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="tiny", help="model preset (see minivlmamba/config.py)")
parser.add_argument("--out", default="out/tiny", help="checkpoint folder to write (and --resume from)")
parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
parser.add_argument("--batch-size", type=int, default=64, help="global batch size (split over processes)")
parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
parser.add_argument("--lr-vision", type=float, default=None, help="vision tower lr (default --lr; 0 = frozen)")
parser.add_argument("--lr-connector", type=float, default=None, help="connector lr (default --lr; 0 = frozen)")
parser.add_argument("--lr-lm", type=float, default=None, help="language model lr (default --lr; 0 = frozen)")
parser.add_argument("--warmup", type=float, default=0.03, help="fraction of steps of linear warmup")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--connector", choices=CONNECTORS, help="override the preset's connector")
parser.add_argument("--scan", choices=SCANS, help="override the preset's scan order (bsm or csm)")
parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="autocast dtype")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--log-every", type=int, default=50)
parser.add_argument("--save-every", type=int, default=500)
parser.add_argument("--eval-per-family", type=int, default=200, help="held-out questions per family")
args = parser.parse_args()


def main():
    # ---------------------------------------------------------------- processes and devices
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if ddp:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    autocast = torch.autocast("cuda", torch.bfloat16) if dtype == "bf16" else nullcontext()
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    log = print if master else (lambda *a, **k: None)

    # ---------------------------------------------------------------- model and tokenizer
    out = Path(args.out)
    torch.manual_seed(args.seed)
    if args.resume:
        model, tokenizer = load_model(out)
        state_path = out / "train_state.pt"
        if not state_path.is_file():
            raise UserError(f"{out}: nothing to resume (no train_state.pt)")
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        cfg = model.cfg
    else:
        cfg = preset(args.preset)
        if args.preset != "tiny":
            raise UserError(f"preset {args.preset!r} needs pretrained weights and real data (not in this version)")
        cfg.connector, cfg.scan = args.connector or cfg.connector, args.scan or cfg.scan
        tokenizer = train_tokenizer(cfg.template, vocab_size=cfg.lm.vocab_size)
        cfg.lm = dataclasses.replace(cfg.lm, vocab_size=tokenizer.get_vocab_size())
        model, state = VLMamba(cfg), None
    model.to(device).train()
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"model: {args.preset}, {n_params / 1e6:.2f}M parameters, connector {cfg.connector}, scan {cfg.scan}, "
        f"device {device} x{world}, {dtype}")

    # ---------------------------------------------------------------- optimizer
    # Per-component learning rates (0 freezes a component). No weight decay on norms, biases and
    # the SSM's A_log and D, as upstream Mamba.
    groups = []
    for part in ("vision", "connector", "lm"):
        lr = getattr(args, f"lr_{part}")
        lr = args.lr if lr is None else lr
        params = list(getattr(raw_model, part).named_parameters())
        for _, p in params:
            p.requires_grad_(lr > 0)
        if lr > 0:
            no_decay = lambda n, p: p.dim() < 2 or n.endswith(("A_log", "A_logs", "D", "Ds"))
            groups.append(dict(params=[p for n, p in params if not no_decay(n, p)], peak_lr=lr, weight_decay=args.weight_decay))
            groups.append(dict(params=[p for n, p in params if no_decay(n, p)], peak_lr=lr, weight_decay=0.0))
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]

    def lr_factor(step):
        """Linear warmup, then cosine decay to 10% of the peak."""
        warmup = max(1, int(args.warmup * args.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    # ---------------------------------------------------------------- data
    # Batch `step` of process `rank` is generated from its own seed, so a resumed run sees exactly
    # the batches the interrupted one would have seen.
    micro = args.batch_size // world
    max_text = cfg.max_len - cfg.vision.num_patches

    def batch(step):
        rng = random.Random(f"{args.seed}-{rank}-{step}")
        pixels, encoded = [], []
        for _ in range(micro):
            image, turns = training_sample(rng, max_turns=1)
            pixels.append(raw_model.vision.preprocess([image])[0])
            encoded.append(encode_sample(tokenizer, cfg.template, turns, max_text))
        return [t.to(device) for t in collate(pixels, encoded)]

    # ---------------------------------------------------------------- training loop
    def save():
        if master:
            save_model(out, raw_model, tokenizer)
            save_train_state(out, dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), step=step))

    t0, tokens, start_step = time.time(), 0, step
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(step)
        pixel_values, input_ids, labels = batch(step)
        with autocast:
            _, loss = model(pixel_values, input_ids, labels)
        if not torch.isfinite(loss):
            raise UserError(f"step {step}: loss is {loss.item()}; lower --lr or use --dtype fp32")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        tokens += (input_ids.numel() + pixel_values.shape[0] * cfg.vision.num_patches) * world
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.time() - t0
            eta = elapsed / (step - start_step) * (args.steps - step)
            log(f"step {step:5d}/{args.steps} | loss {loss.item():.4f} | lr {optimizer.param_groups[0]['lr']:.2e} | "
                f"{tokens / elapsed:,.0f} tok/s | ETA {eta / 60:.1f} min")
        if step % args.save_every == 0 or step == args.steps:
            save()

    # ---------------------------------------------------------------- held-out evaluation
    if master:
        accuracy = evaluate(raw_model, tokenizer, device, autocast)
        log(f"\n{'family':<10} {'accuracy':>8}")
        for family in FAMILIES:
            log(f"{family:<10} {100 * accuracy[family]:7.1f}%")
        log(f"saved {out}/ ({time.time() - t0:.0f} s)")
        log(f"held-out accuracy: {100 * sum(accuracy.values()) / len(accuracy):.1f}%")
    if ddp:
        dist.destroy_process_group()


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
