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
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from minivlmamba.cli import disk_full, one_line
from minivlmamba.config import UserError, VLMConfig
from minivlmamba.connector import CONNECTORS, SCANS
from minivlmamba.pretrained import load_state_dict_strict
from minivlmamba.scan import BACKENDS
from minivlmamba.mamba import MambaLM
from minivlmamba.templates import TEMPLATES
from minivlmamba.vision import ACTIVATIONS, VisionTower
from minivlmamba.vlm import VLMamba

TIED = "lm.lm_head.weight"  # the same tensor as the embedding: stored once
COMPONENTS = ("vision", "connector", "lm")
FILES = ("config.json", "model.safetensors", "tokenizer.json", "train_state.pt")
TRAIN_STATE = {"model", "optimizer", "step", "recipe"}  # the keys of train_state.pt


def atomic_write(path: Path, write):
    """write(tmp_path) then rename over path, so path is always either the old or the new file. A write
    that fails (a full disk, Ctrl-C) leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and disk_full(e, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise UserError(f"{path.parent}: disk full while saving {path.name} (the one saved before, if any, is "
                            "intact); free some space") from None
        raise


def prepare_folder(folder):
    """Before training: make the checkpoint folder, check that a save can write there, and remove the
    temporary files of a save that a kill interrupted."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file, not a folder; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{folder}: cannot write checkpoints there ({e.strerror}); choose another --out") from None
    for name in FILES:
        (folder / (name + ".tmp")).unlink(missing_ok=True)


def holds_checkpoint(folder) -> bool:
    return any((Path(folder) / name).exists() for name in FILES)


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


def read_train_state(folder, recipe) -> dict:
    """train_state.pt -> {model, optimizer, step, recipe}, or a UserError if it is missing or not a state of
    train.py (its recipe: the flags named in `recipe`)."""
    path = Path(folder) / "train_state.pt"
    if not path.is_file():
        raise UserError(f"{folder}: nothing to resume (no train_state.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, empty, garbage, a refused pickle: each its own exception
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {one_line(e)}); start over with --overwrite") \
            from None
    ours = isinstance(state, dict) and set(state) == TRAIN_STATE and isinstance(state["step"], int)
    if not ours or not isinstance(state["recipe"], dict) or set(state["recipe"]) != set(recipe):
        raise UserError(f"{path}: not the train state of a minivlmamba run; start over with --overwrite")
    return state


# the hand-editable values of config.json that must be one of a few names
CHOICES = {("connector",): CONNECTORS, ("scan",): SCANS, ("template",): tuple(TEMPLATES),
           ("vision", "act"): tuple(ACTIVATIONS), ("vision", "resize"): ("squash", "crop", "pad"),
           ("lm", "scan_backend"): ("auto", *BACKENDS)}


def check_config(cfg: VLMConfig, source):
    """A UserError naming the first value of a (hand-edited) config that has the wrong type or an unknown name."""
    for config, prefix in ((cfg, ""), (cfg.vision, "vision."), (cfg.lm, "lm.")):
        for field in fields(config):
            value, kind = getattr(config, field.name), field.type
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok:
                raise UserError(f"{source}: {prefix}{field.name} is {value!r}, not a {kind.__name__}")
    for keys, names in CHOICES.items():
        value = cfg
        for key in keys:
            value = getattr(value, key)
        if value not in names:
            raise UserError(f"{source}: {'.'.join(keys)} {value!r} is none of {', '.join(names)}")


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


def check_vocabulary(tokenizer: Tokenizer, model: VLMamba, source):
    """Every token of the tokenizer needs a row of the LM's embedding."""
    rows = model.lm.backbone.embedding.num_embeddings
    if tokenizer.get_vocab_size() > rows:
        raise UserError(f"{source}: {tokenizer.get_vocab_size()} tokens, more than the {rows} of the language "
                        "model's vocabulary; give the tokenizer the model was trained with")


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
        raise UserError(f"{folder}: corrupt checkpoint ({type(e).__name__}: {one_line(e)})") from None
    check_config(cfg, folder / "config.json")
    try:
        model = build_model(cfg, components, dtype)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:  # e.g. heads that do not divide width
        raise UserError(f"{folder / 'config.json'}: describes no model that can be built ({one_line(e)})") from None
    check_vocabulary(tokenizer, model, folder / "tokenizer.json")
    for part in components:
        prefix = part + "."
        part_weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        load_state_dict_strict(getattr(model, part), part_weights,
                               str(folder / "model.safetensors"), ignore=("lm_head.weight",))
    unexpected = [k for k in weights if k.split(".")[0] not in components]
    if unexpected:
        raise UserError(f"{folder / 'model.safetensors'}: unexpected tensor {unexpected[0]!r}")
    return model.to(device=device, dtype=dtype).eval(), tokenizer
