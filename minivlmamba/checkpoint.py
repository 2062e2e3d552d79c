"""Saving and loading our own checkpoints, atomically.

A checkpoint is a folder: config.json (the full resolved VLMConfig), model.safetensors (the
weights), tokenizer.json, and train_state.pt beside them (weights, optimizer and step, all in one
file so a resume never mixes two versions). Every file is written to a temporary name and then
renamed over the old one: a run killed at any moment leaves the previous checkpoint intact.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from minivlmamba.config import UserError, VLMConfig
from minivlmamba.pretrained import load_state_dict_strict
from minivlmamba.vlm import VLMamba

TIED = "lm.lm_head.weight"  # the same tensor as the embedding: stored once


def atomic_write(path: Path, write):
    """write(tmp_path) then rename over path, so path is always either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(folder, model: VLMamba, tokenizer: Tokenizer):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != TIED}
    atomic_write(folder / "model.safetensors", lambda p: save_file(weights, str(p)))
    atomic_write(folder / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(model.cfg.to_dict(), indent=2)))


def save_train_state(folder, state: dict):
    atomic_write(Path(folder) / "train_state.pt", lambda p: torch.save(state, p))


def load_model(folder, device="cpu"):
    """A checkpoint folder -> (VLMamba in eval mode, tokenizer)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such checkpoint folder (train one with `python train.py`)")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: not a minivlmamba checkpoint (no {name})")
    try:
        cfg = VLMConfig.from_dict(json.loads((folder / "config.json").read_text()))
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        weights = load_file(folder / "model.safetensors")
    except Exception as e:  # json, the config, tokenizers and safetensors each fail in their own way
        raise UserError(f"{folder}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    model = VLMamba(cfg)
    load_state_dict_strict(model, weights, str(folder / "model.safetensors"), ignore=(TIED,))
    return model.to(device).eval(), tokenizer
