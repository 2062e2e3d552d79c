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

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads just stops (cli.run catches it later)

import argparse
import collections
import functools
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from minivlmamba import UserError
from minivlmamba.checkpoint import (COMPONENTS, TIED, holds_checkpoint, load_model, load_state_dict_strict,
                                    prepare_folder, read_train_state, save_model, save_train_state)
from minivlmamba.cli import ArgumentParser, Number, device, one_line, run
from minivlmamba.connector import CONNECTORS, SCANS
from minivlmamba.data import LlavaDataset, collate, collate_good, encode_sample, sample_order
from minivlmamba.distributed import gathered, join_processes, keep_freed_memory, leave_processes, sharded_like_params
from minivlmamba.evaluate import evaluate
from minivlmamba.recipe import RECIPE, check_effect, fill_in_defaults, lr_factor, new_model, resumed
from minivlmamba.shapes import FAMILIES, pretrain_tower, training_sample
from minivlmamba.templates import IGNORE, encode_turn
from minivlmamba.vlm import peak_bf16_flops

parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("--preset", help="model preset (see minivlmamba/config.py; default tiny)")
parser.add_argument("--out", default="out/tiny", help="checkpoint folder to write (and --resume from)")
fresh_or_not = parser.add_mutually_exclusive_group()
fresh_or_not.add_argument("--resume", action="store_true",
                          help="continue the run saved in --out, with the flags it was started with (a flag "
                               "given must agree; --steps may go on to a new total, and --device, --dtype, --fsdp, "
                               "--workers, --grad-checkpointing, --log-every, --save-every and --eval-per-family "
                               "may change)")
fresh_or_not.add_argument("--overwrite", action="store_true", help="replace the checkpoint already in --out")
parser.add_argument("--data", help="LLaVA-format JSON file (default: the embedded shapes set)")
parser.add_argument("--image-folder", help="folder the data file's images are relative to (default .)")
parser.add_argument("--stage", type=int, choices=[1, 2], help="1: align (connector), 2: instruct (+ LM); default 1")
parser.add_argument("--init", help="the checkpoint folder to start from (stage 2: the stage-1 one)")
parser.add_argument("--vision", help="pretrained vision tower folder or repo id (default: the preset's)")
parser.add_argument("--lm", help="pretrained Mamba folder or repo id (default: the preset's)")
parser.add_argument("--tokenizer", help="tokenizer.json folder or repo id (paper presets; default "
                                        "EleutherAI/gpt-neox-20b)")
parser.add_argument("--steps", type=Number(int, 1),
                    help="optimizer steps (default: 4500 for shapes, 1 epoch of --data)")
parser.add_argument("--batch-size", type=Number(int, 1),
                    help="global batch (default: 16 shapes, 256 stage 1, 128 stage 2)")
parser.add_argument("--grad-accum", type=Number(int, 1), help="micro-batches per step and process (default 1)")
parser.add_argument("--lr", type=Number(float, above=0),
                    help="peak learning rate (default: 1.2e-3 shapes, 1e-3 stage 1, 2e-5 stage 2)")
parser.add_argument("--lr-vision", type=Number(float, 0),
                    help="vision tower lr (0 = frozen; frozen unless --tower-steps 0)")
parser.add_argument("--lr-connector", type=Number(float, 0),
                    help="connector lr (0 = frozen; default --lr, 5e-4 on shapes)")
parser.add_argument("--lr-lm", type=Number(float, 0),
                    help="language model lr (0 = frozen; default --lr, frozen in stage 1)")
parser.add_argument("--tower-steps", type=Number(int, 0),
                    help="shapes: steps pretraining the tower to name each patch's object and cell, then frozen "
                         "(0: no pretraining, the tower trains with the rest; default 300)")
parser.add_argument("--warmup", type=Number(float, 0, 1),
                    help="fraction of steps of linear warmup (default: 0.1 shapes, 0.03 LLaVA data)")
parser.add_argument("--weight-decay", type=Number(float, 0), help="default 0")
parser.add_argument("--grad-clip", type=Number(float, above=0), help="the gradients' largest norm (default 1)")
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute each LM block in the backward")
parser.add_argument("--connector", choices=CONNECTORS, help="override the preset's connector")
parser.add_argument("--scan", choices=SCANS, help="override the preset's scan order (bsm or csm)")
parser.add_argument("--fsdp", action="store_true",
                    help="(torchrun) shard weights, gradients and optimizer state over the processes (FSDP)")
parser.add_argument("--device", type=device, default="auto", help="cpu, cuda, cuda:N, or auto")
parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="autocast dtype (auto: bf16 on a GPU, fp32 on the CPU; bf16 also runs on the CPU)")
parser.add_argument("--workers", type=Number(int, 0), default=4, help="data loading processes (--data)")
parser.add_argument("--no-group-by-length", action="store_true", default=None,
                    help="(--data) do not batch similar lengths together")
parser.add_argument("--seed", type=Number(int, 0, 2**63 - 1), help="default 0")
parser.add_argument("--log-every", type=Number(int, 1), default=50)
parser.add_argument("--save-every", type=Number(int, 1), default=500)
parser.add_argument("--eval-per-family", type=Number(int, 1), default=200,
                    help="held-out questions per family (shapes)")
args = parser.parse_args()
saved_step = None  # the step of this run's last checkpoint (for the message on Ctrl-C)


def main():
    # ---------------------------------------------------------------- processes and devices
    distributed, rank, world, device = join_processes(args.device)  # (a run not started by torchrun: 0 of 1)
    if args.fsdp and not distributed:
        raise UserError("--fsdp shards the model over processes: start train.py with torchrun")
    master, cuda = rank == 0, device.startswith("cuda")
    if not cuda:
        keep_freed_memory()
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "fp32")
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16) if dtype == "bf16" else nullcontext()
    log = print if master else (lambda *a, **k: None)
    warn = (lambda message: print(message, file=sys.stderr)) if master else (lambda message: None)

    # ---------------------------------------------------------------- the run's flags, its folder
    out = Path(args.out)
    given = {name: getattr(args, name) for name in RECIPE if getattr(args, name) is not None}
    state = None
    if args.resume:
        model, tokenizer = load_model(out)
        state = read_train_state(out, RECIPE)
        recipe = resumed(state, given, out)
    else:
        if holds_checkpoint(out) and not args.overwrite:
            raise UserError(f"{out} holds a checkpoint already: continue it with --resume, write to another "
                            "--out, or replace it with --overwrite")
        recipe = {**RECIPE, **given}
    r = argparse.Namespace(**recipe)
    shapes = r.data is None
    if not args.resume:
        check_effect(given, shapes, r)
    prepare_folder(out)

    # ---------------------------------------------------------------- model, tokenizer, recipe
    torch.manual_seed(r.seed)
    if r.init and not args.resume:
        model, tokenizer = load_model(r.init)
    elif not args.resume:  # (a resumed model is loaded above)
        model, tokenizer = new_model(r)
    cfg = model.cfg
    if shapes and cfg.vision_path:
        raise UserError(f"preset {r.preset!r} is trained on LLaVA data: give --data and --image-folder")
    stage = 0 if shapes else r.stage
    template = "plain" if stage == 1 else cfg.template  # stage 1 learns captions, not conversations
    fill_in_defaults(r, stage)
    lrs = {part: getattr(r, f"lr_{part}") for part in COMPONENTS}  # 0 = frozen
    trained = tuple(part for part in COMPONENTS if lrs[part] > 0)
    pretrained = dict(vision=bool(cfg.vision_path) or (shapes and r.tower_steps > 0), connector=False,
                      lm=bool(cfg.lm_path))
    frozen_random = [part for part in COMPONENTS if part not in trained and not pretrained[part]]
    if frozen_random and not (args.resume or r.init):
        flags = " and ".join(f"--lr-{part}" for part in frozen_random)
        raise UserError(f"the {' and '.join(frozen_random)} would stay as initialised, random and frozen: no "
                        f"pretrained weights and a learning rate of 0; give {flags} a rate, or use a preset with "
                        "pretrained weights")
    # a checkpoint holds what was trained and whatever no pretrained weights could rebuild
    saved = tuple(part for part in COMPONENTS if part in trained or not getattr(cfg, f"{part}_path", ""))
    if r.batch_size % (world * r.grad_accum):
        raise UserError(f"--batch-size {r.batch_size} is not divisible by {world} processes x "
                        f"{r.grad_accum} accumulation steps")
    micro = r.batch_size // (world * r.grad_accum)
    if state is not None:  # the trained weights, exactly as saved
        names = [name for name in model.state_dict() if name.split(".")[0] not in saved or name == TIED]
        load_state_dict_strict(model, state["model"], str(out / "train_state.pt"), ignore=names)

    n_params = sum(p.numel() for p in model.parameters())
    name = "from checkpoint" if args.resume or r.init else r.preset
    parallel = " FSDP" if args.fsdp else " DDP" if distributed else ""
    log(f"model: {name}, {n_params / 1e6:.2f}M parameters, connector {cfg.connector}, scan {cfg.scan}, "
        f"training {'+'.join(trained)}, device {device} x{world}{parallel}, {dtype}")
    model.lm.gradient_checkpointing = args.grad_checkpointing
    model.to(device).train()
    if shapes and not (args.resume or r.init) and r.tower_steps > 0:
        # The paper starts from a pretrained tower; the tiny default first pretrains its own.
        t = time.time()
        accuracy = pretrain_tower(model.vision, r.tower_steps, seed=r.seed, device=device)
        log(f"tower: {r.tower_steps} steps learning what each patch shows and where, {100 * accuracy:.1f}% of "
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
                groups.append(dict(params=chosen, peak_lr=lrs[part], weight_decay=r.weight_decay * decay))
    # foreach on the CPU: the same update as the default per-parameter loop (byte-identical checkpoints), in
    # a few calls a group instead of a dozen a parameter (0.4 ms a step less at the tiny default)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=cuda, foreach=not cuda)
    step = 0
    if state is not None:
        try:
            optimizer.load_state_dict(sharded_like_params(state["optimizer"], optimizer))
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
            raise UserError(f"{out / 'train_state.pt'}: its optimizer state does not fit the model ({one_line(e)}); "
                            "start over with --overwrite") from None
        step = state["step"]

    # ---------------------------------------------------------------- data
    # The micro-batch (step, i) of process `rank` is a fixed function of the seed, so a resumed run
    # sees exactly the batches the interrupted one would have seen, whatever the number of processes.
    max_text = cfg.max_len - cfg.vision.num_patches
    if shapes:
        steps = r.steps or 4500

        # a few thousand distinct turns, each encoded to count its tokens, then to build the sample:
        # remembered (lists shared between calls, only read), a batch takes 7.8 ms instead of 13.9
        encode = functools.lru_cache(maxsize=None)(encode_turn)

        def turn_length(*turn):
            return sum(map(len, encode(tokenizer, template, *turn)))

        def micro_batches(step):
            for i in range(r.grad_accum):
                rng = random.Random(f"{r.seed}-{step}-{i}-{rank}")
                images, encoded = [], []
                for _ in range(micro):
                    image, turns = training_sample(rng, max_text, turn_length)
                    images.append(image)
                    encoded.append(encode_sample(tokenizer, template, turns, max_text, encode))
                yield collate(raw_model.vision.preprocess(images), encoded), []
    else:
        dataset = LlavaDataset(r.data, r.image_folder, tokenizer, template, cfg.vision, max_text)
        if dataset.problems:
            warn(f"warning: {len(dataset.problems)} of the {len(dataset)} samples of {r.data} cannot be used and "
                 f"will be skipped (the first: {dataset.problems[0]})")
        steps = r.steps or max(1, len(dataset) // r.batch_size)
        order = sample_order(dataset.text_lengths(), r.batch_size, r.seed, group=not r.no_group_by_length)
        sampler = [order[(s * r.batch_size + (i * world + rank) * micro + j) % len(dataset)]
                   for s in range(step, steps) for i in range(r.grad_accum) for j in range(micro)]
        loader = iter(torch.utils.data.DataLoader(dataset, micro, sampler=sampler, num_workers=args.workers,
                                                  collate_fn=collate_good, pin_memory=cuda))

        def micro_batches(step):
            for _ in range(r.grad_accum):
                yield next(loader)
    r.steps = steps
    if state is not None:
        log(f"resuming {out} at step {step}/{steps}, with the flags the run was started with")

    # ---------------------------------------------------------------- training loop
    def save():
        global saved_step
        # The whole weights and AdamW state (gathered from the shards under FSDP: every process
        # takes part), written by the master alone, so a run resumes on any number of processes.
        weights = {k: gathered(v, master) for k, v in raw_model.state_dict().items()
                   if k.split(".")[0] in saved and k != TIED}  # the tied head is the embedding
        opt_state = optimizer.state_dict()
        opt_state["state"] = {i: {k: gathered(v, master) for k, v in s.items()} for i, s in opt_state["state"].items()}
        if master:
            save_model(out, raw_model, tokenizer, saved, weights)
            save_train_state(out, dict(model=weights, optimizer=opt_state, step=step, recipe=vars(r)))
        saved_step = step

    # MFU: model FLOPs (VLMamba.training_flops) over the card's peak bf16 rate.
    peak = peak_bf16_flops(torch.cuda.get_device_name()) if cuda else None
    t0, tokens, flops, skipped, learned, first_bad = time.time(), 0, 0, 0, 0, None
    recent = collections.deque([(t0, step)], maxlen=6)  # (time, step) at the last few log lines: the ETA
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_factor(step, steps, r.warmup)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for batch, bad in micro_batches(step):  # bad: why each of the micro-batch's bad samples is
            first_bad = first_bad or next(iter(bad), None)
            # a micro-batch that one process has no good sample of is dropped by all, or their
            # collectives would stop pairing up; the samples are counted over all processes
            counts = torch.tensor([batch is None, len(bad), 0 if batch is None else len(batch[0])])
            if distributed:
                counts = counts.to(device)
                dist.all_reduce(counts)
            empty, n_bad, n_good = counts.tolist()
            skipped += n_bad
            if empty:  # every sample of this micro-batch was bad
                continue
            learned += n_good
            pixel_values, input_ids, labels = (t.to(device, non_blocking=True) for t in batch)
            with autocast:
                _, loss = model(pixel_values, input_ids, labels)
            if not torch.isfinite(loss):
                raise UserError(f"step {step}: loss is {loss.item()}; lower --lr or use --dtype fp32")
            (loss / r.grad_accum).backward()
            losses.append(loss.item())
            tokens += (input_ids.numel() + pixel_values.shape[0] * cfg.vision.num_patches) * world
            samples, labelled = len(input_ids), (batch[2] != IGNORE).sum().item()  # batch: still on the CPU
            flops += raw_model.training_flops(input_ids.shape[1], labelled / samples) * samples * world
        if skipped and not learned and skipped >= min(100, len(dataset)):  # nothing to learn from: stop before saving
            raise UserError(f"the first {skipped} samples of {r.data} were all bad (the first: {first_bad}); "
                            "check --data and --image-folder")
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), r.grad_clip)  # over all shards
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
            lr_now = max(group["lr"] for group in optimizer.param_groups)  # the fastest part's
            log(f"step {step:5d}/{steps} | loss {loss:.4f} | lr {lr_now:.2e} | "
                f"grad norm {gathered(grad_norm).item():.2f} | {tokens / elapsed:,.0f} tok/s{gpu} | "
                f"ETA {eta / 60:.1f} min"
                + (f" | {skipped} bad samples skipped" if skipped else ""))
        if step % args.save_every == 0 or step == steps:
            save()

    seen = skipped + learned
    if skipped > 0.1 * seen:
        warn(f"WARNING: {skipped} of the {seen} samples this run read ({skipped / seen:.0%}) were bad and skipped "
             f"(the first: {first_bad}); the model learned from the rest only")

    # ---------------------------------------------------------------- held-out evaluation
    if shapes and (master or args.fsdp):
        # under FSDP every process evaluates: the forward needs all of them
        accuracy = evaluate(raw_model, tokenizer, device, autocast, r.seed, args.eval_per_family)
        log(f"\n{'family':<10} {'accuracy':>8}")
        for family in FAMILIES:
            log(f"{family:<10} {100 * accuracy[family]:7.1f}%")
        log(f"saved {out}/ ({time.time() - t0:.0f} s)")
        log(f"held-out accuracy: {100 * sum(accuracy.values()) / len(accuracy):.1f}%")
    elif master:
        log(f"saved {out}/ ({time.time() - t0:.0f} s, {skipped} bad samples skipped)")
    if distributed:
        leave_processes()


def interrupted():
    """What Ctrl-C leaves behind."""
    if saved_step is not None:
        return f"interrupted: the checkpoint of step {saved_step} in {args.out} is intact; continue with --resume"
    if args.resume:
        return f"interrupted: {args.out} is as it was; continue with --resume"
    return "interrupted before the first checkpoint: nothing was saved"


if __name__ == "__main__":
    run(main, interrupted)
