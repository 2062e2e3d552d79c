"""Pretrained loading: tiny random checkpoints written in the upstream file layouts load strictly and
exactly; errors name the missing tensor or file; and, when transformers is installed, our models and
preprocessing match transformers' MambaForCausalLM, CLIP / SigLIP vision models and image processors."""

import json
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from minivlmamba import MambaConfig, MambaLM, UserError, VisionConfig, VisionTower
from minivlmamba.pretrained import load_mamba, load_tokenizer, load_vision_tower
from minivlmamba.vision import CLIP_L_336, SIGLIP_SO400M_384


def randomized(module, seed):
    """Every parameter perturbed, so norms, biases and D are not their 1s and 0s: a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return randomized(MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, d_state=4)), seed)  # v = 56


def save_sharded(weights: dict, folder, shards: int):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json as transformers writes."""
    if shards == 1:
        return save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    names, weight_map = sorted(weights), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: weights[name] for name in names[i::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = dict(metadata=dict(total_size=sum(t.nbytes for t in weights.values())), weight_map=weight_map)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_state_spaces(folder, lm: MambaLM):
    """mamba_ssm's layout: the minimal config.json of the Pile models, pytorch_model.bin with lm_head.weight."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(d_model=lm.cfg.d_model, n_layer=lm.cfg.n_layer, vocab_size=lm.cfg.vocab_size,
                  ssm_cfg=dict(d_state=lm.cfg.d_state), rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                  pad_vocab_size_multiple=8)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(lm.state_dict(), folder / "pytorch_model.bin")  # both tied names, one storage, as upstream's
    return folder


def write_hf_mamba(folder, lm: MambaLM, shards=1, edit=lambda weights: None):
    """transformers' layout: the -hf config.json, `embeddings` (plural), no lm_head.weight."""
    folder.mkdir(parents=True, exist_ok=True)
    c = lm.cfg
    config = dict(architectures=["MambaForCausalLM"], model_type="mamba", hidden_size=c.d_model,
                  num_hidden_layers=c.n_layer, state_size=c.d_state, expand=c.expand, conv_kernel=c.d_conv,
                  time_step_rank=c.dt_rank, intermediate_size=c.d_inner, layer_norm_epsilon=1e-5, use_bias=False,
                  use_conv_bias=True, vocab_size=c.vocab_padded, pad_vocab_size_multiple=8, tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = {name.replace("embedding.", "embeddings."): t.contiguous()
               for name, t in lm.state_dict().items() if name != "lm_head.weight"}
    edit(weights)
    save_sharded(weights, folder, shards)
    return folder


def assert_same_lm(ours: MambaLM, lm: MambaLM):
    assert ours.cfg.vocab_padded == lm.cfg.vocab_padded and ours.lm_head.weight is ours.backbone.embedding.weight
    for name, tensor in lm.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    ids = torch.randint(0, lm.cfg.vocab_padded, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), lm(ids), rtol=0, atol=0)


def test_state_spaces_layout_loads_exactly(tmp_path):
    lm = tiny_lm()
    assert_same_lm(load_mamba(str(write_state_spaces(tmp_path, lm))), lm)


@pytest.mark.parametrize("shards", [1, 3])
def test_transformers_layout_loads_exactly(tmp_path, shards):
    lm = tiny_lm(1)
    assert_same_lm(MambaLM.from_pretrained(str(write_hf_mamba(tmp_path, lm, shards))), lm)


def test_dtype_converts_every_tensor_and_keeps_the_tie(tmp_path):
    lm = tiny_lm(2)
    ours = load_mamba(str(write_state_spaces(tmp_path, lm)), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert torch.equal(ours.backbone.layers[1].mixer.A_log, lm.backbone.layers[1].mixer.A_log.bfloat16())
    assert ours.lm_head.weight is ours.backbone.embedding.weight


def drop(name):
    return lambda weights: weights.pop(name)


def reshape(name):
    return lambda weights: weights.update({name: weights[name][:-1]})


def add(name):
    return lambda weights: weights.update({name: torch.zeros(4)})


@pytest.mark.parametrize("edit, message", [
    (drop("backbone.layers.1.mixer.D"), "missing tensor 'backbone.layers.1.mixer.D'"),
    (reshape("backbone.layers.0.mixer.conv1d.weight"),
     "tensor 'backbone.layers.0.mixer.conv1d.weight' has shape (31, 1, 4), expected (32, 1, 4)"),
    (add("backbone.layers.0.mixer.in_proj.bias"), "unexpected tensor 'backbone.layers.0.mixer.in_proj.bias'"),
])
def test_a_wrong_tensor_is_an_error_naming_it(tmp_path, edit, message):
    folder = write_hf_mamba(tmp_path, tiny_lm(), shards=2, edit=edit)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_mamba(str(folder))


def test_missing_files_are_named(tmp_path):
    folder = write_hf_mamba(tmp_path / "m", tiny_lm(), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors: missing"):
        load_mamba(str(folder))
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match="no model.safetensors or model.safetensors.index.json or pytorch_model.bin"):
        load_mamba(str(folder))
    with pytest.raises(UserError, match="no such folder"):
        load_mamba(str(tmp_path / "nowhere"))


def cache_snapshot(hf_home, repo_id, revision):
    """The folder the Hugging Face cache keeps one revision of a repo in."""
    return hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision


def test_repo_ids_resolve_in_the_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    lm = tiny_lm(3)
    write_state_spaces(cache_snapshot(tmp_path, "org/tiny-mamba", "0a1b2c"), lm)
    write_state_spaces(cache_snapshot(tmp_path, "org/tiny-mamba", "9f8e7d"), tiny_lm(4))  # another revision
    (tmp_path / "hub/models--org--tiny-mamba/refs").mkdir()
    (tmp_path / "hub/models--org--tiny-mamba/refs/main").write_text("0a1b2c")
    assert_same_lm(MambaLM.from_pretrained("org/tiny-mamba"), lm)

    tokenizer = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, "<|padding|>": 1, "a": 2, "b": 3, "ab": 4},
                                     merges=[("a", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    folder = cache_snapshot(tmp_path, "EleutherAI/gpt-neox-20b", "rev")
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    assert load_tokenizer().encode("abab").ids == [4, 4]


def test_a_repo_missing_from_the_cache_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed: no download
    with pytest.raises(UserError) as error:
        load_mamba("org/absent")
    assert "\n" not in str(error.value)
    assert "config.json is not in the Hugging Face cache" in str(error.value)
    assert "`hf download org/absent`" in str(error.value)
    folder = cache_snapshot(tmp_path, "org/partial", "rev")  # only config.json was fetched, as AutoConfig does
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError, match="org/partial: model.safetensors or .* is not in the Hugging Face cache"):
        load_mamba("org/partial")


def test_a_repo_missing_from_the_cache_is_downloaded_safetensors_first(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    lm, asked = tiny_lm(5), []

    def snapshot_download(repo_id, allow_patterns):  # a repo with only pytorch_model.bin, like state-spaces'
        asked.append(allow_patterns)
        folder = cache_snapshot(tmp_path, repo_id, "rev")
        return write_state_spaces(folder, lm) if "*.bin" in allow_patterns else folder

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert_same_lm(load_mamba("state-spaces/tiny"), lm)
    assert asked == [["*.json", "*.safetensors"], ["*.json", "*.bin"]]


# ----------------------------------------------------------------------------- vision towers, written by hand

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
FLAVOURS = {  # family -> (our tower's config, transformers' config.json of its vision model, extra tensors of the file)
    "clip": (dict(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp=64, act="quick_gelu", norm_eps=1e-5,
                  class_token=True, pre_norm=True, patch_bias=False),
             dict(TINY_VISION, image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5),
             ["vision_model.post_layernorm.weight", "vision_model.embeddings.position_ids"]),
    "siglip": (dict(image_size=32, patch_size=6, width=32, layers=3, heads=4, mlp=64, act="gelu_tanh", norm_eps=1e-6),
               dict(TINY_VISION, image_size=32, patch_size=6),  # SigLIP's config.json leaves the defaults out
               ["vision_model.post_layernorm.bias", "vision_model.head.probe"]),
}


def write_vision(folder, family, full: bool, fmt: str, processor=None):
    """A CLIP / SigLIP checkpoint as transformers writes it: the vision tower's tensors under vision_model.*,
    with the layers, norms and heads we never run, and for a full model a text tower and logit scale beside."""
    ours, vision_config, extra = FLAVOURS[family]
    torch.manual_seed(0)
    tower = randomized(VisionTower(VisionConfig(**ours, select_layer=-1)), 0)  # every layer, as the file has
    weights = {f"vision_model.{name}": t for name, t in tower.state_dict().items()}
    weights.update({name: torch.randn(32) for name in extra})
    if full:
        weights.update({"text_model.embeddings.token_embedding.weight": torch.randn(10, 32),
                        "logit_scale": torch.ones(())})
        config = dict(model_type=family, vision_config=vision_config, text_config=dict(hidden_size=32))
    else:
        config = dict(vision_config, model_type=f"{family}_vision_model")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if processor:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    if fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_sharded(weights, folder, shards=2 if fmt == "sharded" else 1)
    return tower


@pytest.mark.parametrize("family, full, fmt", [("clip", True, "bin"), ("clip", False, "safetensors"),
                                               ("siglip", True, "sharded"), ("siglip", False, "bin")])
def test_vision_layouts_load_the_layers_up_to_select_layer(tmp_path, family, full, fmt):
    source = write_vision(tmp_path, family, full, fmt)
    tower = load_vision_tower(str(tmp_path))
    family_preset = CLIP_L_336 if family == "clip" else SIGLIP_SO400M_384  # its preprocessing, as no processor config
    assert tower.cfg == VisionConfig(**{**family_preset, **FLAVOURS[family][0]})
    assert len(tower.encoder.layers) == 2
    for name, tensor in tower.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name
    pixels = torch.randn(2, 3, tower.cfg.image_size, tower.cfg.image_size)
    source.encoder.layers = source.encoder.layers[:2]  # hidden_states[-2] of the full tower
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), source(pixels), rtol=0, atol=0)


def test_vision_preprocessing_comes_from_the_processor_config(tmp_path):
    processor = dict(do_center_crop=False, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6],
                     size=dict(height=32, width=32))
    write_vision(tmp_path, "clip", False, "safetensors", processor)
    cfg = VisionTower.from_pretrained(str(tmp_path), select_layer=1, dtype=torch.float64).cfg
    assert (cfg.resize, cfg.image_mean, cfg.image_std) == ("squash", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert cfg.layers_used == 1
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(dict(processor, size=dict(shortest_edge=224))))
    with pytest.raises(UserError, match=r"image sizes \[224\] differ from the model's 32"):
        load_vision_tower(str(tmp_path))


def test_vision_errors_name_the_tensor_and_the_model_type(tmp_path):
    write_vision(tmp_path, "siglip", True, "safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 5  # hidden_states[-2] needs layers 0-3, the file has 0-2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="missing tensor 'vision_model.encoder.layers.3.layer_norm1.bias'"):
        load_vision_tower(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="vit")))
    with pytest.raises(UserError, match="model_type 'vit' is neither CLIP nor SigLIP"):
        load_vision_tower(str(tmp_path))


# ----------------------------------------------------------------------------- parity with transformers

def test_mamba_logits_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=56, hidden_size=16, state_size=4, num_hidden_layers=2, use_bias=False)
    theirs = randomized(transformers.MambaForCausalLM(config), 0)
    theirs.save_pretrained(tmp_path, max_shard_size="10KB")
    ids = torch.randint(0, 56, (2, 9))
    with torch.no_grad():
        diff = (load_mamba(str(tmp_path))(ids) - theirs(ids).logits).abs().max()
    assert diff <= 1e-4


def hf_vision(transformers, family, full):
    """A tiny random transformers model of the family and its image processor (PIL backend, the reference one)."""
    prefix = "CLIP" if family == "clip" else "Siglip"
    vision_config = getattr(transformers, f"{prefix}VisionConfig")(**FLAVOURS[family][1])
    if full:
        text_config = getattr(transformers, f"{prefix}TextConfig")(hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=1, num_attention_heads=4)
        config = getattr(transformers, f"{prefix}Config")(text_config=text_config.to_dict(),
                                                          vision_config=vision_config.to_dict())
        model = getattr(transformers, f"{prefix}Model")(config)
    else:
        model = getattr(transformers, f"{prefix}VisionModel")(vision_config)
    processor_class = getattr(transformers, f"{prefix}ImageProcessorPil", None) or \
        getattr(transformers, f"{prefix}ImageProcessor")
    side = vision_config.image_size
    if family == "clip":
        processor = processor_class(size=dict(shortest_edge=side), crop_size=dict(height=side, width=side))
    else:
        processor = processor_class(size=dict(height=side, width=side))
    return randomized(model, 1), processor


@pytest.mark.parametrize("family, full", [("clip", True), ("clip", False), ("siglip", True), ("siglip", False)])
def test_vision_features_and_pixels_match_transformers(tmp_path, family, full):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    theirs, processor = hf_vision(transformers, family, full)
    theirs.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    tower = load_vision_tower(str(tmp_path))

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
              for h, w in [(98, 49), (49, 49), (40, 70)]]  # 49 and 98 at size 32: resizes that round
    images += [images[0].convert("L"), images[2].convert("RGBA")]
    pixels = tower.preprocess(images)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert (pixels - expected).abs().max() <= 2e-2

    with torch.no_grad():
        vision_model = theirs.vision_model if full else theirs
        hidden = vision_model(pixel_values=expected, output_hidden_states=True).hidden_states[-2]
        features = hidden[:, 1:] if family == "clip" else hidden
        assert (tower(expected) - features).abs().max() <= 1e-4
