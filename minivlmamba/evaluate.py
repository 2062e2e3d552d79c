"""The held-out evaluation of a model trained on shapes: greedy exact-match accuracy per question family,
on scenes drawn from a seed never used for training (train.py prints it at the end of a run)."""

import torch

from minivlmamba.data import collate, encode_sample
from minivlmamba.shapes import FAMILIES, held_out_set


@torch.no_grad()
def evaluate(model, tokenizer, device, autocast, seed, per_family, batch_size=100):
    """Greedy exact-match accuracy per family on `per_family` held-out questions of each -> {family: accuracy}.

    Greedy decoding reproduces an answer exactly iff every answer token, end-of-text included, is
    the argmax given the ones before it; so we score all answers at once with one forward pass.
    """
    model.eval()
    items = held_out_set(seed=10_000 + seed, per_family=per_family)
    correct = {family: 0 for family in FAMILIES}
    max_text = model.cfg.max_len - model.cfg.vision.num_patches
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        pixels = model.vision.preprocess([image for image, *_ in chunk])
        encoded = [encode_sample(tokenizer, model.cfg.template, [(q, a)], max_text) for _, q, a, _ in chunk]
        pixel_values, input_ids, labels = (t.to(device) for t in collate(list(pixels), encoded))
        with autocast:
            logits, _ = model(pixel_values, input_ids)
        hit = (logits.argmax(-1) == labels) | (labels < 0)  # (b, l)
        for (_, _, _, family), ok in zip(chunk, hit.all(-1).tolist()):
            correct[family] += ok
    model.train()
    return {family: correct[family] / per_family for family in FAMILIES}
