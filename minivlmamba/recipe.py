"""What a training run computes, its recipe: the flags of train.py that decide it, the model a new run
starts from, the flags' defaults for each stage, and the learning-rate schedule. The recipe is saved
with the run (train_state.pt) and --resume keeps it, so a flag given must agree with it; a flag the
run would not use is refused.

Stages: 0 is a run on the embedded shapes set (no --data); 1 aligns (the connector learns from
captions) and 2 instructs (connector + LM learn from conversations), as in the paper.
"""

import dataclasses
import math
from pathlib import Path

from minivlmamba.checkpoint import COMPONENTS, build_model, check_vocabulary
from minivlmamba.config import UserError, preset
from minivlmamba.pretrained import load_tokenizer
from minivlmamba.shapes import train_tokenizer
from minivlmamba.vlm import VLMamba

# The flags that decide what a run computes, with their defaults. The parser leaves them None when not
# given; they are saved with the run, and --resume keeps them (a flag given must agree with them).
RECIPE = dict(preset="tiny", data=None, image_folder=".", stage=1, init=None, vision=None, lm=None,
              tokenizer="EleutherAI/gpt-neox-20b", steps=None, batch_size=None, grad_accum=1, lr=None,
              lr_vision=None, lr_connector=None, lr_lm=None, tower_steps=300, warmup=None, weight_decay=0.0,
              grad_clip=1.0, connector=None, scan=None, no_group_by_length=False, seed=0)


def resumed(state, given, out):
    """The recipe of the run whose train state is `state`, saved in `out`: the flags `given` must agree
    with it, but --steps may go on to a new total."""
    recipe = {**state["recipe"], "steps": given.get("steps", state["recipe"]["steps"])}
    changed = [f"--{name.replace('_', '-')} {value} (the run's: {recipe[name]})"
               for name, value in given.items() if value != recipe[name]]
    if recipe["steps"] < state["step"]:
        raise UserError(f"--steps {recipe['steps']}: the run in {out} is at step {state['step']} already")
    if changed:
        raise UserError(f"--resume continues the run in {out} with its own flags, so not with "
                        f"{', '.join(changed)}: leave them out, or start a new run from it with --init {out} "
                        "--out NEW")
    return recipe


def check_effect(given, shapes, r):
    """A flag given that this run would not use is a mistake: say so instead of ignoring it."""
    unused = {}
    if shapes:
        unused.update(dict.fromkeys(("image_folder", "stage", "no_group_by_length"), "without --data (the shapes set)"))
    else:
        unused["tower_steps"] = "with --data (the tower is pretrained on shapes only)"
    if r.init:
        unused.update(dict.fromkeys(("preset", "connector", "scan", "vision", "lm", "tokenizer"),
                                    "with --init (the model is the checkpoint's)"))
    elif r.preset == "tiny":
        unused.update(dict.fromkeys(("vision", "lm", "tokenizer"), "with the tiny preset (trained from scratch)"))
    for name in given:
        if name in unused:
            raise UserError(f"--{name.replace('_', '-')} has no effect {unused[name]}; leave it out")


def new_model(r):
    """The model a new run of the recipe `r` starts from (not --init) -> (VLMamba, tokenizer): the preset,
    with the recipe's connector and scan; the tiny one random, with a tokenizer trained on shapes, a paper
    preset on the pretrained tower and LM."""
    cfg = preset(r.preset)
    cfg.connector, cfg.scan = r.connector or cfg.connector, r.scan or cfg.scan
    if r.preset == "tiny":
        tokenizer = train_tokenizer(cfg.template, vocab_size=cfg.lm.vocab_size)
        cfg.lm = dataclasses.replace(cfg.lm, vocab_size=tokenizer.get_vocab_size())
        return VLMamba(cfg), tokenizer
    # a local folder is saved as an absolute path, so the checkpoint loads from anywhere
    absolute = lambda path: str(Path(path).resolve()) if Path(path).is_dir() else path
    cfg.vision_path, cfg.lm_path = absolute(r.vision or cfg.vision_path), absolute(r.lm or cfg.lm_path)
    tokenizer = load_tokenizer(r.tokenizer)
    model = build_model(cfg)
    check_vocabulary(tokenizer, model, r.tokenizer)
    lm_cfg = model.cfg.lm  # generation never samples the padding rows past the tokenizer's vocabulary
    lm_cfg.vocab_size = min(lm_cfg.vocab_size, tokenizer.get_vocab_size())
    return model, tokenizer


def fill_in_defaults(r, stage):
    """Give the recipe's flags left unset the stage's values (learning rates, warmup, batch size), so the
    recipe saved with the run says what it ran with."""
    shapes = stage == 0
    r.lr = {0: 1.2e-3, 1: 1e-3, 2: 2e-5}[stage] if r.lr is None else r.lr
    r.warmup = (0.1 if shapes else 0.03) if r.warmup is None else r.warmup  # LLaVA's 3%
    # the tower is frozen (unless shapes trains it from scratch), the LM in stage 1
    # on shapes the connector learns at 5e-4: with 1.2e-3 one seed in eight never learned shapes
    defaults = dict(vision=r.lr * (shapes and r.tower_steps == 0), connector=5e-4 if shapes else r.lr,
                    lm=r.lr * (stage != 1))
    for part in COMPONENTS:  # a learning rate of 0: frozen
        if getattr(r, f"lr_{part}") is None:
            setattr(r, f"lr_{part}", defaults[part])
    r.batch_size = {0: 16, 1: 256, 2: 128}[stage] if r.batch_size is None else r.batch_size


def lr_factor(step, steps, warmup):
    """The learning rate at `step` of `steps` as a share of the peak: linear warmup over the fraction
    `warmup` of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, int(warmup * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, steps - warmup), 1.0)))
