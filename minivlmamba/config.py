"""The VL-Mamba config and the named presets: every model this package builds is listed here."""

from dataclasses import asdict, dataclass, fields

from minivlmamba.mamba import MambaConfig
from minivlmamba.vision import CLIP_L_336, SIGLIP_SO400M_384, VisionConfig


class UserError(Exception):
    """A mistake in what the user gave us (a file, a flag, a folder). The scripts print it on one
    line and exit with status 1 instead of showing a traceback."""


@dataclass
class VLMConfig:
    vision: VisionConfig
    lm: MambaConfig
    connector: str = "vss-l2"  # "mlp", "vss-mlp" or "vss-l2" (paper section 3.3)
    scan: str = "bsm"  # "bsm" (k = 2) or "csm" (k = 4)
    vss_d_state: int = 16
    vss_expand: int = 2
    template: str = "zephyr"  # "plain", "zephyr", "base" or "compact" (see templates.py)
    max_len: int = 2048  # image tokens + text tokens the model is trained and prompted with
    vision_path: str = ""  # pretrained weights (a folder or Hugging Face repo id), empty if random
    lm_path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        def build(klass, values):
            names = {f.name for f in fields(klass) if f.init}
            return klass(**{k: v for k, v in values.items() if k in names})
        return build(cls, {**d, "vision": build(VisionConfig, d["vision"]), "lm": build(MambaConfig, d["lm"])})


SIGLIP = (SIGLIP_SO400M_384, "google/siglip-so400m-patch14-384")
CLIP = (CLIP_L_336, "openai/clip-vit-large-patch14-336")


def _paper(vision, lm_repo, d_model, n_layer, template="base"):
    """A preset of the paper: pretrained tower + pretrained Mamba; base LMs use the `base` template."""
    vision_cfg, vision_repo = vision
    return lambda: VLMConfig(vision=VisionConfig(**vision_cfg), lm=MambaConfig(d_model=d_model, n_layer=n_layer),
                             template=template, vision_path=vision_repo, lm_path=lm_repo)


PRESETS = {
    # The embedded default: a VL-Mamba small enough to train from scratch on a laptop CPU in minutes.
    # Its vision tower is pretrained first on the same synthetic images, then frozen (shapes.py); its
    # vocabulary comes from the byte-level BPE tokenizer trained on the synthetic data (train.py sets
    # vocab_size). d_model 96 learns as fast per sample as 128 did, at 0.6x the time a step. Its
    # mixer is 3x as wide (expand 3) with half the state a channel (d_state 8): against expand 2 with
    # 16, 91.1% against 89.0 over seeds 0-2, at 1.2x the time a step (notes/tiny-default.md). Its
    # embeddings start at 10x upstream's scale, nearer the connector's image tokens (norm ~6 against
    # 0.2): over eight seeds the run no longer fails to learn shapes on some (notes/tiny-default.md).
    # Its template spends two tokens a turn on the roles where zephyr spends seven: a sequence holds
    # 6.7 questions instead of 4.7, and the same steps learn more.
    "tiny": lambda: VLMConfig(
        vision=VisionConfig(image_size=48, patch_size=16, width=96, layers=2, heads=4, mlp=192, act="gelu",
                            norm_eps=1e-5, select_layer=-1),
        lm=MambaConfig(d_model=96, n_layer=3, expand=3, d_state=8, vocab_size=512, embedding_std=0.2),
        template="compact", max_len=96),
    # The paper's models (VL-Mamba final: SigLIP-SO400M/384 + Mamba-2.8B-SlimPJ + VSS-L2 + BSM).
    "vl-mamba-2.8b": _paper(SIGLIP, "state-spaces/mamba-2.8b-slimpj", 2560, 64),
    "vl-mamba-2.8b-clip": _paper(CLIP, "state-spaces/mamba-2.8b-slimpj", 2560, 64),
    "vl-mamba-1.4b": _paper(SIGLIP, "state-spaces/mamba-1.4b", 2048, 48),
    "vl-mamba-2.8b-zephyr": _paper(SIGLIP, "xiuyul/mamba-2.8b-zephyr", 2560, 64, template="zephyr"),
}


def preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
