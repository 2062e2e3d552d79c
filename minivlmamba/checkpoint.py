"""Saving and loading our own checkpoints, atomically.

A checkpoint is a folder: config.json (the full resolved VLMConfig), model.safetensors,
tokenizer.json, and train_state.pt beside them (trained weights, optimizer and step, all in one
file so a resume never mixes two versions). Every file is written to a temporary name and then
renamed over the old one: a run killed at any moment leaves the previous checkpoint intact.

model.safetensors holds only the components that were trained (its metadata lists them); the
others come from the pretrained weights the config names (vision_path, lm_path). So a stage-1
checkpoint of the 2.8B model is just its connector: megabytes, not gigabytes.
"""

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from minivlmamba.config import UserError, VLMConfig
from minivlmamba.pretrained import load_state_dict_strict
from minivlmamba.mamba import MambaLM
from minivlmamba.vision import VisionTower
from minivlmamba.vlm import VLMamba

TIED = "lm.lm_head.weight"  # the same tensor as the embedding: stored once
COMPONENTS = ("vision", "connector", "lm")


def atomic_write(path: Path, write):
    """write(tmp_path) then rename over path, so path is always either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(folder, model: VLMamba, tokenizer: Tokenizer, components=COMPONENTS, state_dict=None):
    """state_dict: the whole weights where the model holds only a shard of them (train.py --fsdp)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in (state_dict or model.state_dict()).items()
               if k.split(".")[0] in components and k != TIED}
    metadata = {"components": ",".join(components)}
    atomic_write(folder / "model.safetensors", lambda p: save_file(weights, str(p), metadata=metadata))
    atomic_write(folder / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(model.cfg.to_dict(), indent=2)))


def save_train_state(folder, state: dict):
    atomic_write(Path(folder) / "train_state.pt", lambda p: torch.save(state, p))


def build_model(cfg: VLMConfig, components=(), dtype=None) -> VLMamba:
    """A VLMamba whose vision tower and LM come from cfg's pretrained weights, except the listed
    components (left random, to be trained or loaded from our own checkpoint)."""
    vision = lm = None
    if "vision" not in components and cfg.vision_path:
        vision = VisionTower.from_pretrained(cfg.vision_path, cfg.vision.select_layer, dtype=dtype)
    if "lm" not in components and cfg.lm_path:
        lm = MambaLM.from_pretrained(cfg.lm_path, dtype=dtype)
    for part, module in (("vision", vision), ("lm", lm)):
        if module is None and part not in components:
            raise UserError(f"the {part} has neither trained weights in the checkpoint nor a pretrained path")
    cfg = replace(cfg, vision=vision.cfg if vision else cfg.vision, lm=lm.cfg if lm else cfg.lm)
    return VLMamba(cfg, vision, lm)


def load_model(folder, device="cpu", dtype=None):
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
        with safe_open(folder / "model.safetensors", "pt") as f:
            components = tuple((f.metadata() or {}).get("components", ",".join(COMPONENTS)).split(","))
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # json, the config, tokenizers and safetensors each fail in their own way
        raise UserError(f"{folder}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    model = build_model(cfg, components, dtype)
    for part in components:
        prefix = part + "."
        part_weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        load_state_dict_strict(getattr(model, part), part_weights,
                               str(folder / "model.safetensors"), ignore=("lm_head.weight",))
    unexpected = [k for k in weights if k.split(".")[0] not in components]
    if unexpected:
        raise UserError(f"{folder / 'model.safetensors'}: unexpected tensor {unexpected[0]!r}")
    return model.to(device=device, dtype=dtype).eval(), tokenizer
