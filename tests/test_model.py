"""The model's pieces: decoding == full forward, scan orders invert, every connector trains, masks, save/load."""

import dataclasses

import pytest
import torch

from minivlmamba import MambaConfig, MambaLM, VisionConfig, VisionTower, VLMamba, preset
from minivlmamba.checkpoint import load_model, save_model
from minivlmamba.connector import CONNECTORS, SCANS, VSS, Connector, scan_orders
from minivlmamba.shapes import train_tokenizer
from minivlmamba.templates import IGNORE, encode_conversation


def tiny_config(**overrides):
    cfg = preset("tiny")
    cfg.lm = dataclasses.replace(cfg.lm, vocab_size=50)
    return dataclasses.replace(cfg, **overrides)


def test_lm_step_decoding_equals_full_forward():
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        full = lm(ids)  # (b, l, v)
        cache = lm.allocate_cache(2)
        prefix = lm(ids[:, :2], cache=cache)  # prefill shorter than the conv width
        stepped = [lm.step(ids[:, t], cache) for t in range(2, 11)]
    torch.testing.assert_close(prefix, full[:, :2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(stepped, 1), full[:, 2:], rtol=1e-4, atol=1e-4)


def test_lm_prefill_longer_than_conv_then_steps():
    torch.manual_seed(1)
    lm = MambaLM(MambaConfig(d_model=16, n_layer=3, vocab_size=30, d_state=8)).eval()
    ids = torch.randint(0, 30, (3, 12))
    with torch.no_grad():
        full = lm(ids)
        cache = lm.allocate_cache(3)
        lm(ids[:, :7], cache=cache)
        stepped = torch.stack([lm.step(ids[:, t], cache) for t in range(7, 12)], 1)
    torch.testing.assert_close(stepped, full[:, 7:], rtol=1e-4, atol=1e-4)


def test_vlm_prefill_and_steps_equal_full_forward():
    torch.manual_seed(0)
    model = VLMamba(tiny_config()).eval()
    pixel_values, ids = torch.randn(2, 3, 48, 48), torch.randint(0, 50, (2, 8))
    full, _ = model(pixel_values, ids)  # (b, l, v): logits[:, i] predicts ids[:, i]
    cache = model.lm.allocate_cache(2)
    first = model.prefill(pixel_values, ids[:, :3], cache)  # predicts ids[:, 3]
    later = [model.extend(ids[:, t:t + 1], cache) for t in range(3, 7)]
    torch.testing.assert_close(first, full[:, 3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(later, 1), full[:, 4:8], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scan", SCANS)
def test_scan_orders_are_permutations_and_unscan_inverts_them(scan):
    hp, wp = 3, 5
    vss = VSS(8, hp, wp, scan)
    grid = torch.arange(hp * wp).float().view(1, 1, -1)  # (b, di, p): each patch holds its own index
    scanned = vss.cross_scan(grid.expand(1, 2, -1))  # (b, k, di, p)
    assert scanned.shape == (1, 2 if scan == "bsm" else 4, 2, hp * wp)
    torch.testing.assert_close(scanned[0, 0, 0], grid[0, 0])  # direction 0 is row-major
    torch.testing.assert_close(scanned[0, 1 if scan == "bsm" else 2, 0], grid[0, 0].flip(0))  # ... and its reverse
    if scan == "csm":
        column_major = torch.arange(hp * wp).view(hp, wp).t().reshape(-1).float()
        torch.testing.assert_close(scanned[0, 1, 0], column_major)
    k = scanned.shape[1]
    torch.testing.assert_close(vss.cross_merge(scanned), k * grid.expand(1, 2, -1))  # each direction restored, summed
    for order in scan_orders(hp, wp, scan):
        assert sorted(order.tolist()) == list(range(hp * wp))


@pytest.mark.parametrize("kind", CONNECTORS)
@pytest.mark.parametrize("scan", SCANS)
def test_every_connector_and_scan_builds_and_backpropagates(kind, scan):
    torch.manual_seed(0)
    connector = Connector(kind, dv=12, d=16, grid=3, scan=scan, d_state=4)
    x = torch.randn(2, 9, 12, requires_grad=True)
    y = connector(x)
    assert y.shape == (2, 9, 16)
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0
    for name, p in connector.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_vss_output_depends_on_patches_on_both_sides():
    torch.manual_seed(0)
    vss = VSS(8, 3, 3, "bsm")
    x = torch.randn(1, 9, 8, requires_grad=True)
    vss(x)[0, 4].sum().backward()  # the centre patch
    assert x.grad[0, 0].abs().sum() > 0 and x.grad[0, 8].abs().sum() > 0  # it hears the first and the last patch


@pytest.mark.parametrize("flavour", ["clip", "siglip"])
def test_vision_tower_flavours_shapes(flavour):
    common = dict(image_size=28, patch_size=14, width=16, layers=3, heads=2, mlp=32)
    cfg = VisionConfig(**common, act="quick_gelu", class_token=True, pre_norm=True, patch_bias=False) \
        if flavour == "clip" else VisionConfig(**common)
    tower = VisionTower(cfg)
    assert len(tower.encoder.layers) == 2  # select_layer -2: the last layer is never run, so never built
    assert tower(torch.randn(2, 3, 28, 28)).shape == (2, 4, 16)  # class token dropped for CLIP


@pytest.mark.parametrize("template, text", [
    ("zephyr", "<|user|>\nWhat colour is the circle?<|endoftext|>\n<|assistant|>\nred<|endoftext|>"
               "\n<|user|>\nWhere is the red circle?<|endoftext|>\n<|assistant|>\ncenter<|endoftext|>"),
    ("compact", "<|user|>What colour is the circle?<|assistant|>red<|endoftext|>"
                "<|user|>Where is the red circle?<|assistant|>center<|endoftext|>")])
def test_labels_mask_prompts_and_keep_answers_with_end_of_text(template, text):
    tokenizer = train_tokenizer(template)
    turns = [("What colour is the circle?", "red"), ("Where is the red circle?", "center")]
    ids, labels = encode_conversation(tokenizer, turns, template)
    decoded = lambda positions: tokenizer.decode([ids[i] for i in positions], skip_special_tokens=False)
    learned = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert all(labels[i] == ids[i] for i in learned)
    assert decoded(learned) == "red<|endoftext|>center<|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_loss_counts_only_labelled_positions():
    torch.manual_seed(0)
    model = VLMamba(tiny_config())
    pixel_values, ids = torch.randn(1, 3, 48, 48), torch.randint(2, 50, (1, 6))
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4:] = ids[0, 4:]
    logits, loss = model(pixel_values, ids, labels)  # the head runs on the labelled positions only
    every, _ = model(pixel_values, ids)
    torch.testing.assert_close(logits, every[0, 4:])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(every[0, 4:], ids[0, 4:]))


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    tokenizer = train_tokenizer("zephyr")
    cfg = tiny_config(connector="vss-mlp", scan="csm")
    cfg.lm = dataclasses.replace(cfg.lm, vocab_size=tokenizer.get_vocab_size())  # a row for every token
    model = VLMamba(cfg).eval()
    save_model(tmp_path, model, tokenizer)
    loaded, loaded_tokenizer = load_model(tmp_path)
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm.lm_head.weight is loaded.lm.backbone.embedding.weight  # still tied
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    assert not list(tmp_path.glob("*.tmp"))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = VLMamba(tiny_config())
    pixel_values, ids = torch.randn(4, 3, 48, 48), torch.randint(2, 50, (4, 6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(pixel_values, ids, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    logits, _ = model(pixel_values, ids)
    assert torch.equal(logits.argmax(-1), ids)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50))
    ids = torch.randint(0, 50, (2, 9))
    grads = []
    for checkpointing in (False, True):
        lm.gradient_checkpointing = checkpointing
        lm.zero_grad()
        lm(ids).square().mean().backward()
        grads.append([p.grad.clone() for p in lm.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
