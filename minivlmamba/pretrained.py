"""Loading pretrained weights: Mamba LMs, CLIP / SigLIP vision towers and the GPT-NeoX tokenizer.

Where the files come from. `path_or_repo_id` is a local folder, or a Hugging Face repo id such as
"state-spaces/mamba-1.4b", looked up in the local cache ($HF_HOME/hub, by default
~/.cache/huggingface/hub, laid out as models--{org}--{name}/snapshots/{revision}/ with the current
revision named in refs/main). A repo missing from the cache is downloaded if `huggingface_hub` is
installed; otherwise the error says which file is missing and how to fetch it.

Mamba checkpoints come in two layouts:
- state-spaces (mamba_ssm's `save_pretrained`): config.json {d_model, n_layer, vocab_size, ssm_cfg,
  pad_vocab_size_multiple, ...} + pytorch_model.bin. Its tensor names are exactly ours, and it
  stores the tied lm_head.weight as well (a copy of the embedding, which we skip).
- transformers (the `*-hf` repos, MambaForCausalLM): config.json {hidden_size, num_hidden_layers,
  state_size, expand, conv_kernel, time_step_rank, layer_norm_epsilon, vocab_size, ...} +
  model.safetensors, or shards listed in model.safetensors.index.json. Its vocab_size already
  counts the padding rows (50280), and the tied lm_head.weight is usually left out.
The two differ in one tensor name: the only entry of RENAMES.

Vision towers are transformers' CLIPModel / SiglipModel checkpoints (a text tower beside the vision
one) or their vision-only CLIPVisionModel / SiglipVisionModel. In both, the tower's tensors are
named `vision_model.*` (transformers >= 5 writes vision-only ones without the prefix: we add it), and
so are our modules: we take those and ignore what our tower never runs (the layers after
`select_layer`, the post-LayerNorm, SigLIP's pooling head).

Loading is strict: a missing, unexpected or misshapen tensor is an error that names it. And it is
light: the model is built on the meta device (shapes, no storage) and the tensors of the
memory-mapped files become its parameters. Kept in the file's dtype on the CPU, nothing is copied:
the weights are paged in from the file as they are used, one copy of them in memory at most. Given
another dtype or a device, each tensor is converted in turn and (for .bin files) the file pages it
was read from are released at once, so the file and the converted weights are never both resident.
Safetensors are preferred; .bin files are read with weights_only=True, never unpickling code.
"""

import ctypes
import json
import mmap
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from minivlmamba.cli import ArgumentParser, one_line, run
from minivlmamba.config import UserError
from minivlmamba.mamba import MambaConfig, MambaLM
from minivlmamba.vision import CLIP_L_336, SIGLIP_SO400M_384, VisionConfig, VisionTower

LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None  # for madvise, see release_pages
MADV_DONTNEED = 4

RENAMES = {"backbone.embeddings.weight": "backbone.embedding.weight"}  # transformers Mamba -> ours (= state-spaces)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",  # in order of preference
                "pytorch_model.bin", "pytorch_model.bin.index.json")
MODEL_FILES = (("config.json",), WEIGHT_FILES)  # groups of alternatives: a model needs one file of each group
TOKENIZER_FILES = (("tokenizer.json",),)
REPO_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")  # "org/name", not "./name"

# transformers' CLIPVisionConfig / SiglipVisionConfig defaults, for the keys a config.json leaves out
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=224)
FAMILIES = {  # model_type -> (our preset of the family, its transformers defaults)
    "clip": (CLIP_L_336, dict(HF_VISION_DEFAULTS, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)),
    "siglip": (SIGLIP_SO400M_384, dict(HF_VISION_DEFAULTS, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                       layer_norm_eps=1e-6)),
}
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # transformers' -> ours


# ----------------------------------------------------------------------------- finding the files

def hub_cache() -> Path:
    hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub").expanduser()


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of repo_id's current revision in the Hugging Face cache, if it is there."""
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() else None
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)  # no ref: the newest
    return snapshots[-1] if snapshots else None


def lacking(folder: Path, needs) -> str | None:
    """The first group of `needs` with no file in folder, written out; None when nothing is lacking."""
    for group in needs:
        if not any((folder / name).is_file() for name in group):
            return " or ".join(group)
    return None


def download(repo_id: str, needs, cached: Path | None) -> Path:
    """Fetch what `needs` of repo_id into the Hugging Face cache: its safetensors if it has them, else its .bin."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        missing = lacking(cached, needs) if cached else needs[0][0]
        raise UserError(f"{repo_id}: {missing} is not in the Hugging Face cache {hub_cache()}; get it with "
                        f"`hf download {repo_id}` (pip install huggingface_hub)") from None
    patterns = [["*.json", "*.safetensors"], ["*.json", "*.bin"]] if WEIGHT_FILES in needs else [["*.json"]]
    for allow in patterns:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=allow))
        except Exception as e:  # not found, gated, offline, ...: each its own exception class
            raise UserError(f"{repo_id}: download failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not lacking(folder, needs):
            break
    return folder


def resolve(path_or_repo_id: str, needs) -> Path:
    """A local folder, or a Hugging Face repo id (cached, else downloaded) -> the folder with the files `needs`."""
    folder = Path(path_or_repo_id).expanduser()
    if not folder.is_dir() and REPO_ID.fullmatch(path_or_repo_id):
        folder = cached_snapshot(path_or_repo_id)
        if folder is None or lacking(folder, needs):
            folder = download(path_or_repo_id, needs, folder)
    elif not folder.is_dir():
        raise UserError(f"{path_or_repo_id}: no such folder, nor a Hugging Face repo id (org/name)")
    missing = lacking(folder, needs)
    if missing:
        raise UserError(f"{folder}: no {missing}")
    return folder


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path}: not valid JSON ({one_line(e)})") from None


def release_pages(tensor: torch.Tensor):
    """Tell Linux we are done with the file pages under a memory-mapped tensor, so they leave this
    process's memory now instead of when the whole file is unmapped. Only pages lying wholly inside
    the tensor are dropped, and a dropped page of a read-only file mapping is simply read again if
    touched, so this can never change a value."""
    if LIBC is None:
        return
    begin = tensor.data_ptr()
    first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # round inwards
    last = (begin + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def read_file(path: Path, dtype=None, device=None) -> dict:
    """One weights file -> {name: tensor} in dtype on device (None: as stored, memory-mapped, nothing read yet)."""
    if not path.is_file():
        raise UserError(f"{path}: missing (listed in the index beside it)")
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return {name: f.get_tensor(name).to(device=device, dtype=dtype) for name in f.keys()}
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors and torch.load each fail in their own way on a corrupt file
        raise UserError(f"{path}: unreadable weights ({type(e).__name__}: {one_line(e)})") from None
    for name, tensor in weights.items():  # convert one tensor at a time, and let its file pages go
        weights[name] = tensor.to(device=device, dtype=dtype)
        if weights[name].data_ptr() != tensor.data_ptr():
            release_pages(tensor)
    return weights


def read_weights(folder: Path, dtype=None, device=None) -> dict:
    """All tensors of the checkpoint in folder (one file or the shards of an index), in dtype on device."""
    name = next(name for name in WEIGHT_FILES if (folder / name).is_file())
    if not name.endswith(".index.json"):
        return read_file(folder / name, dtype, device)
    shards = sorted(set(read_json(folder / name)["weight_map"].values()))
    return {k: v for shard in shards for k, v in read_file(folder / shard, dtype, device).items()}


# ----------------------------------------------------------------------------- strict loading

def load_state_dict_strict(module: torch.nn.Module, weights: dict, source: str, ignore=(), assign=False):
    """Copy weights into module by name; any missing, unexpected or misshapen tensor is an error naming it.

    assign=True makes the given tensors the module's parameters instead of copying them (for a module
    built on the meta device): their dtype and device are kept.
    """
    expected = {k: v for k, v in module.state_dict().items() if k not in ignore}
    for name, tensor in weights.items():
        if name not in expected:
            raise UserError(f"{source}: unexpected tensor {name!r}")
        if tensor.shape != expected[name].shape:
            raise UserError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(expected[name].shape)}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{source}: missing tensor {missing[0]!r}{more}")
    module.load_state_dict(weights, strict=False, assign=assign)


def assign_weights(module, weights: dict, source, ignore=()):
    """Make weights the parameters of a module built on the meta device."""
    load_state_dict_strict(module, weights, str(source), ignore, assign=True)


# ----------------------------------------------------------------------------- Mamba

def auto(dt_rank):
    """Their dt rank "auto" is our 0: both mean ceil(d_model / 16)."""
    return 0 if dt_rank == "auto" else dt_rank


def mamba_config(c: dict, source: Path) -> MambaConfig:
    """config.json of either Mamba layout -> MambaConfig."""
    if not c.get("tie_embeddings", c.get("tie_word_embeddings", True)):
        raise UserError(f"{source}: an LM head untied from the embedding is not supported")
    if "d_model" in c:  # state-spaces
        ssm = c.get("ssm_cfg") or {}
        return MambaConfig(d_model=c["d_model"], n_layer=c["n_layer"], vocab_size=c["vocab_size"],
                           d_state=ssm.get("d_state", 16), expand=ssm.get("expand", 2), d_conv=ssm.get("d_conv", 4),
                           dt_rank=auto(ssm.get("dt_rank", "auto")),
                           pad_vocab_size_multiple=c.get("pad_vocab_size_multiple", 8))
    if c.get("model_type") == "mamba":  # transformers: vocab_size is the embedding's row count, no padding on top
        return MambaConfig(d_model=c["hidden_size"], n_layer=c["num_hidden_layers"], vocab_size=c["vocab_size"],
                           d_state=c.get("state_size", 16), expand=c.get("expand", 2), d_conv=c.get("conv_kernel", 4),
                           dt_rank=auto(c.get("time_step_rank", "auto")), norm_eps=c.get("layer_norm_epsilon", 1e-5),
                           pad_vocab_size_multiple=1)
    raise UserError(f"{source}: not a Mamba config (no d_model, and model_type is not 'mamba')")


def load_mamba(path_or_repo_id: str, dtype=None, device=None) -> MambaLM:
    """A state-spaces or transformers Mamba checkpoint -> MambaLM, in dtype on device (None: as stored, CPU)."""
    folder = resolve(path_or_repo_id, MODEL_FILES)
    try:
        cfg = mamba_config(read_json(folder / "config.json"), folder / "config.json")
    except KeyError as e:
        raise UserError(f"{folder / 'config.json'}: no {e.args[0]!r}") from None
    weights = {RENAMES.get(name, name): t for name, t in read_weights(folder, dtype, device).items()
               if name != "lm_head.weight"}
    with torch.device("meta"):
        model = MambaLM(cfg)
    assign_weights(model, weights, folder, ignore=("lm_head.weight",))
    model.lm_head.weight = model.backbone.embedding.weight  # tie again: the embedding is a new tensor now
    return model


# ----------------------------------------------------------------------------- vision towers

def side(size) -> int:
    """transformers writes an image size as 336, {"shortest_edge": 336} or {"height": 384, "width": 384}."""
    return size if isinstance(size, int) else size.get("shortest_edge") or size["height"]


def vision_config(c: dict, processor: dict | None, select_layer: int, source: Path) -> VisionConfig:
    """config.json (+ preprocessor_config.json) of a CLIP or SigLIP checkpoint -> VisionConfig."""
    family = c.get("model_type", "").removesuffix("_vision_model")
    if family not in FAMILIES:
        raise UserError(f"{source}: model_type {c.get('model_type')!r} is neither CLIP nor SigLIP")
    preset, defaults = FAMILIES[family]
    v = {**defaults, **c.get("vision_config", c)}  # full models nest the tower's config
    if v["hidden_act"] not in ACTIVATIONS:
        raise UserError(f"{source}: unsupported hidden_act {v['hidden_act']!r}")
    cfg = dict(preset, image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
               layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp=v["intermediate_size"],
               act=ACTIVATIONS[v["hidden_act"]], norm_eps=v["layer_norm_eps"], select_layer=select_layer)
    if processor:  # else the family's preprocessing (SPEC 3.3)
        sizes = {side(processor[k]) for k in ("size", "crop_size") if k in processor}
        if sizes != {cfg["image_size"]}:
            raise UserError(f"{source.parent / 'preprocessor_config.json'}: image sizes {sorted(sizes)} "
                            f"differ from the model's {cfg['image_size']}")
        cfg.update(image_mean=processor["image_mean"], image_std=processor["image_std"],
                   resize="crop" if processor.get("do_center_crop") else "squash")
    return VisionConfig(**cfg)


def unused(name: str, cfg: VisionConfig) -> bool:
    """A tensor our tower never runs: text tower, heads, post-LayerNorm, layers after select_layer."""
    layer = re.match(r"vision_model\.encoder\.layers\.(\d+)\.", name)
    return (not name.startswith("vision_model.") or name == "vision_model.embeddings.position_ids"
            or name.startswith(("vision_model.post_layernorm.", "vision_model.head."))
            or (layer is not None and int(layer[1]) >= cfg.layers_used))


def load_vision_tower(path_or_repo_id: str, select_layer=-2, dtype=None, device=None) -> VisionTower:
    """A transformers CLIP or SigLIP checkpoint (full or vision-only) -> VisionTower with layers up to select_layer."""
    folder = resolve(path_or_repo_id, MODEL_FILES)
    processor = folder / "preprocessor_config.json"
    try:
        cfg = vision_config(read_json(folder / "config.json"), read_json(processor) if processor.is_file() else None,
                            select_layer, folder / "config.json")
    except KeyError as e:
        raise UserError(f"{folder}: no {e.args[0]!r} in config.json or preprocessor_config.json") from None
    weights = read_weights(folder, dtype, device)
    if not any(name.startswith("vision_model.") for name in weights):  # vision-only, as transformers >= 5 writes it
        weights = {f"vision_model.{name}": t for name, t in weights.items()}
    weights = {name: t for name, t in weights.items() if not unused(name, cfg)}
    with torch.device("meta"):
        holder = torch.nn.ModuleDict(dict(vision_model=VisionTower(cfg)))  # so names match the file's
    assign_weights(holder, weights, folder)
    return holder.vision_model


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path_or_repo_id: str = "EleutherAI/gpt-neox-20b") -> Tokenizer:
    """tokenizer.json -> Tokenizer. Every Mamba-1 LM uses GPT-NeoX's: <|endoftext|> = 0, <|padding|> = 1."""
    return Tokenizer.from_file(str(resolve(path_or_repo_id, TOKENIZER_FILES) / "tokenizer.json"))


def main():
    import resource

    parser = ArgumentParser(description="Load a pretrained Mamba (or, with --vision, a vision tower), read every "
                                        "weight once, and report the peak memory it took.")
    parser.add_argument("path", help="a folder or a Hugging Face repo id")
    parser.add_argument("--vision", action="store_true", help="a CLIP or SigLIP checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as stored")
    args = parser.parse_args()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # GB (Linux reports kB)
    load = load_vision_tower if args.vision else load_mamba
    model = load(args.path, dtype=args.dtype and getattr(torch, args.dtype))
    for p in model.parameters():
        p.sum()  # read every weight once, as a first forward would: memory-mapped pages come in now
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"{type(model).__name__}: {weights:.2f} GB of weights; peak RSS {peak:.2f} GB, {peak - start:.2f} GB "
          f"above the {start:.2f} GB at start = {(peak - start) / weights:.2f}x the weights")


if __name__ == "__main__":
    run(main)
