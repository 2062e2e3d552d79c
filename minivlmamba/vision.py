"""The vision tower: a ViT that turns an image into a grid of patch features, and its preprocessing.

Shape legend: b batch, p image patches (hp * wp), hp, wp patch grid, dv vision width,
h attention heads, hd the width of a head (dv / h).

One class expresses both families VL-Mamba tried (paper section 4.3):
- CLIP ViT-L/14-336 (transformers `modeling_clip.py`): class token, pre-LayerNorm, quick_gelu,
  patch conv without bias; 577 positions.
- SigLIP-SO400M/14-384 (transformers `modeling_siglip.py`): no class token, no pre-norm, gelu-tanh,
  patch conv with bias; 27 x 27 = 729 patches.
Module names follow transformers' `vision_model.*` keys, so pretrained weights load by name.
Like LLaVA we take the features of the penultimate layer (`select_layer=-2`), so we build only the
layers up to it: the last layer and the post-LayerNorm would never be used.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image


@dataclass
class VisionConfig:
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152  # dv
    layers: int = 27
    heads: int = 16
    mlp: int = 4304
    act: str = "gelu_tanh"  # "gelu_tanh" (SigLIP), "quick_gelu" (CLIP) or "gelu"
    norm_eps: float = 1e-6
    class_token: bool = False
    pre_norm: bool = False
    patch_bias: bool = True
    select_layer: int = -2  # as hidden_states[select_layer] of transformers: -2 is the penultimate layer
    resize: str = "squash"  # "squash" to a square, "crop" short side then center crop, "pad" to a square first
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)

    def __post_init__(self):
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)  # JSON gives lists
        self.grid = self.image_size // self.patch_size  # hp = wp (a valid conv: 384 // 14 = 27)
        self.num_patches = self.grid ** 2  # p
        # hidden_states has layers + 1 entries (the embeddings first): how many layers we must run
        self.layers_used = self.select_layer % (self.layers + 1)


CLIP_L_336 = dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp=4096, act="quick_gelu",
                  norm_eps=1e-5, class_token=True, pre_norm=True, patch_bias=False, resize="crop",
                  image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))
SIGLIP_SO400M_384 = dict(image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp=4304,
                         act="gelu_tanh", norm_eps=1e-6)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.randn(cfg.width) * 0.02)
        self.position_embedding = nn.Embedding(cfg.num_patches + cfg.class_token, cfg.width)
        nn.init.normal_(self.position_embedding.weight, std=0.02)  # small, as transformers inits them

    def forward(self, pixel_values):
        """pixel_values (b, 3, H, W) -> (b, p (+1 class token), dv)"""
        x = rearrange(self.patch_embedding(pixel_values), "b dv hp wp -> b (hp wp) dv")  # row-major patches
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        """x (b, p, dv) -> (b, p, dv)"""
        q, k, v = (rearrange(proj(x), "b p (h hd) -> b h p hd", h=self.heads)  # (b, h, p, hd) each
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (b, h, p, hd), every patch sees every patch
        return self.out_proj(rearrange(y, "b h p hd -> b p (h hd)"))  # (b, p, dv)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """pixel_values (b, 3, H, W) -> patch features (b, p, dv) of layer `select_layer`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        if cfg.pre_norm:
            self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)  # sic: the upstream name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers_used))

    @classmethod
    def from_pretrained(cls, path_or_repo_id, select_layer=-2, dtype=None, device=None) -> "VisionTower":
        """A transformers CLIP or SigLIP checkpoint (a folder or a Hugging Face repo id): see pretrained.py."""
        from minivlmamba.pretrained import load_vision_tower  # here, as pretrained.py imports this module
        return load_vision_tower(path_or_repo_id, select_layer=select_layer, dtype=dtype, device=device)

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        if self.cfg.pre_norm:
            x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:] if self.cfg.class_token else x  # (b, p, dv): the class token is dropped

    def preprocess(self, images) -> torch.Tensor:
        """A list of PIL images -> pixel_values (b, 3, image_size, image_size), normalised.

        Resized one by one, normalised together: a few passes over the batch instead of a few an image
        (the tiny default's 16 images in 1.7 ms instead of 2.3)."""
        return normalise(torch.stack([resized(img, self.cfg) for img in images]), self.cfg)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels become white (as transformers' convert_to_rgb)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resized(img: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """One PIL image -> (image_size, image_size, 3) uint8, resized like the transformers image processors."""
    img, size = to_rgb(img), cfg.image_size
    if cfg.resize == "pad":  # LLaVA's expand2square: centre the image on a square of the mean colour
        side = max(img.size)
        square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in cfg.image_mean))
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = square
    if cfg.resize == "crop":
        w, h = img.size  # short side -> size, as transformers: h * (size / w) would make 49 x 49 into 32 x 31
        w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BICUBIC)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)


def normalise(x: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """Resized images (b, H, W, 3) uint8 -> (b, 3, H, W) fp32, normalised by the config's mean and std."""
    x = x.permute(0, 3, 1, 2).contiguous().float() / 255  # (b, 3, H, W) in [0, 1]
    mean, std = torch.tensor(cfg.image_mean)[:, None, None], torch.tensor(cfg.image_std)[:, None, None]
    return (x - mean) / std


def preprocess_image(img: Image.Image, cfg: VisionConfig) -> torch.Tensor:
    """One PIL image -> (3, image_size, image_size), like the transformers image processors."""
    return normalise(resized(img, cfg)[None], cfg)[0]
