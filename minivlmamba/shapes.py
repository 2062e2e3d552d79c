"""The embedded synthetic visual-QA set ("shapes"): generated from a seed with pillow, nothing downloaded.

A scene is 1-4 coloured shapes in the cells of a 3x3 grid. Each question belongs to one of seven
families, reported separately at evaluation: colour, shape, count, position, relation, exist and
caption. Held-out scenes are never seen in training: every scene layout is assigned to the
training or the held-out split by a hash of its content, and the two splits also use different
seeds.

The tiny default's vision tower is pretrained here too (`pretrain_tower`): it learns what each patch
shows and where before the VLM is trained, as CLIP and SigLIP arrive pretrained for the paper's models.
"""

import random
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minivlmamba.templates import EOT, PAD, TEMPLATES, prompt_text

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 230), "yellow": (230, 200, 20),
           "purple": (150, 60, 190), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
CELLS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
FAMILIES = ("colour", "shape", "count", "position", "relation", "exist", "caption")
RELATIONS = {"left of": lambda a, b: a[1] < b[1], "right of": lambda a, b: a[1] > b[1],
             "above": lambda a, b: a[0] < b[0], "below": lambda a, b: a[0] > b[0]}
HELD_OUT_EVERY = 5  # one scene layout in five is reserved for evaluation


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cell: int  # 0..8, row-major

    @property
    def row_col(self):
        return divmod(self.cell, 3)

    @property
    def name(self):
        return f"{self.colour} {self.kind}"


def with_article(name: str) -> str:
    """"a red circle", "an orange circle"."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def is_held_out(scene) -> bool:
    key = ";".join(f"{s.colour},{s.kind},{s.cell}" for s in scene)
    return zlib.crc32(key.encode()) % HELD_OUT_EVERY == 0


def make_scene(rng: random.Random, held_out: bool):
    """1-4 shapes in distinct cells, no two alike, from the requested split."""
    while True:
        cells = sorted(rng.sample(range(9), rng.randint(1, 4)))
        looks = rng.sample([(c, k) for c in COLOURS for k in SHAPES], len(cells))
        scene = tuple(Shape(colour, kind, cell) for (colour, kind), cell in zip(looks, cells))
        if is_held_out(scene) == held_out:
            return scene


def render(scene, rng: random.Random, size=96) -> Image.Image:
    """Draw the scene; each shape gets a little random size and position jitter."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw, cell = ImageDraw.Draw(img), size / 3
    for s in scene:
        row, col = s.row_col
        r = cell * rng.uniform(0.28, 0.4)
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.kind == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:
            w = r * 0.35
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def caption(scene) -> str:
    names = [with_article(s.name) for s in scene]  # row-major order
    return (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]) + "."


def families_for(scene):
    """Every family can be asked about a scene, except relations when it holds a single shape."""
    return FAMILIES if len(scene) > 1 else tuple(f for f in FAMILIES if f != "relation")


def ask(scene, family: str, rng: random.Random):
    """One (question, answer) pair of the given family about the scene."""
    pick = rng.choice(scene)
    if family == "colour":
        if sum(s.kind == pick.kind for s in scene) == 1 and rng.random() < 0.5:
            return f"What colour is the {pick.kind}?", pick.colour
        return f"What colour is the shape at the {CELLS[pick.cell]}?", pick.colour
    if family == "shape":
        if sum(s.colour == pick.colour for s in scene) == 1 and rng.random() < 0.5:
            return f"What shape is the {pick.colour} object?", pick.kind
        return f"What shape is at the {CELLS[pick.cell]}?", pick.kind
    if family == "count":
        if rng.random() < 0.5:
            return "How many shapes are there?", NUMBERS[len(scene)]
        colour = rng.choice(list(COLOURS))
        return f"How many {colour} shapes are there?", NUMBERS[sum(s.colour == colour for s in scene)]
    if family == "position":
        return f"Where is the {pick.name}?", CELLS[pick.cell]
    if family == "relation":
        a, b = rng.sample(scene, 2)
        relation = rng.choice(list(RELATIONS))
        answer = "yes" if RELATIONS[relation](a.row_col, b.row_col) else "no"
        return f"Is the {a.name} {relation} the {b.name}?", answer
    if family == "exist":
        if rng.random() < 0.5:
            return f"Is there {with_article(pick.name)}?", "yes"
        present = {s.name for s in scene}
        absent = rng.choice([f"{c} {k}" for c in COLOURS for k in SHAPES if f"{c} {k}" not in present])
        return f"Is there {with_article(absent)}?", "no"
    if family == "caption":
        return rng.choice(["Describe the image.", "What is in the picture?"]), caption(scene)
    raise ValueError(f"unknown family {family!r}")


def training_sample(rng: random.Random, budget: int, turn_length):
    """A training scene as (image, [(question, answer), ...]): questions about it until the next one
    would pass `budget` tokens, as turn_length(question, answer, first_turn) counts them.

    A later question about the same image costs only its own tokens (the image's are already paid
    for) and, asked after the earlier answers, trains the model to keep the whole image in its
    state; filling the model's context this way (4.7 questions a scene on average) also leaves no
    padding in a batch, and learns more a step than up to four questions did (notes/tiny-default.md).
    """
    scene = make_scene(rng, held_out=False)
    turns, used = [], 0
    while True:
        question, answer = ask(scene, rng.choice(families_for(scene)), rng)
        used += turn_length(question, answer, not turns)
        if turns and used > budget:
            return render(scene, rng), turns
        turns.append((question, answer))


def held_out_set(seed: int, per_family: int):
    """Evaluation questions: per_family (image, question, answer, family) for each family, held-out scenes."""
    rng, items = random.Random(seed), []
    for family in FAMILIES:
        while sum(item[3] == family for item in items) < per_family:
            scene = make_scene(rng, held_out=True)
            if family in families_for(scene):
                items.append((render(scene, rng), *ask(scene, family, rng), family))
    return items


def train_tokenizer(template: str, vocab_size: int = 512, seed: int = 0) -> Tokenizer:
    """A byte-level BPE (like GPT-NeoX's, ids 0 and 1 = end-of-text and padding) fit to the shapes text."""
    rng, texts = random.Random(seed), []
    for _ in range(3000):
        scene = make_scene(rng, held_out=False)
        question, answer = ask(scene, rng.choice(families_for(scene)), rng)
        texts.append(prompt_text(question, template) + answer + EOT + TEMPLATES[template].separator)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, PAD, "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def patch_targets(scene, grid: int):
    """What each of the grid x grid patches shows: (object ids, cell ids), two lists of p ints.

    A patch belongs to the cell of the scene's 3x3 grid its centre falls in (one patch a cell in the
    tiny preset). Its object is 0 where that cell is empty, else 1 + the index of its (colour, shape)
    pair among the 24."""
    cells = [(row * 3 // grid) * 3 + col * 3 // grid for row in range(grid) for col in range(grid)]
    objects = {s.cell: 1 + list(COLOURS).index(s.colour) * len(SHAPES) + SHAPES.index(s.kind) for s in scene}
    return [objects.get(c, 0) for c in cells], cells


def pretrain_tower(tower, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, device="cpu"):
    """The tiny default's stand-in for CLIP's or SigLIP's pretraining: the tower learns what each patch
    shows and where it is.

    A linear head on every patch feature (b, p, dv) classifies the object in that patch's cell (one
    of the 24 colour-shape pairs, or empty) and which of the 9 cells it is, on training-split scenes
    drawn from their own seed. The head is then thrown away and train.py freezes the tower, as the
    paper freezes its pretrained one. Why these two targets (notes/tiny-default.md): trained on
    colour and shape alone, the features say what a patch shows but not where (a linear probe finds
    the cell no better than chance). Colour and shape are named together, as one of 24 objects, so
    that "the red circle" is one feature (in the sweeps about as good as naming them apart).
    Returns the share of held-out patches whose object and cell are both right.
    """
    sizes = (len(COLOURS) * len(SHAPES) + 1, 9)
    head = nn.Linear(tower.cfg.width, sum(sizes)).to(device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)

    def batch(rng, held_out):
        """-> pixel_values (b, 3, H, W) and the targets (2, b, p) of b scenes."""
        scenes = [make_scene(rng, held_out) for _ in range(batch_size)]
        pixel_values = tower.preprocess([render(scene, rng) for scene in scenes])
        targets = torch.tensor([patch_targets(scene, tower.cfg.grid) for scene in scenes]).transpose(0, 1)
        return pixel_values.to(device), targets.to(device)

    def logits(pixel_values):
        return head(tower(pixel_values)).split(sizes, dim=-1)  # (b, p, 25), (b, p, 9)

    tower.train()
    for step in range(steps):
        pixel_values, targets = batch(random.Random(f"tower-{seed}-{step}"), held_out=False)
        loss = sum(F.cross_entropy(x.flatten(0, 1), y.flatten()) for x, y in zip(logits(pixel_values), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no gradient left on the tower (train.py clips over all gradients)
    with torch.no_grad():
        pixel_values, targets = batch(random.Random(f"tower-held-out-{seed}"), held_out=True)
        right = torch.stack([x.argmax(-1) == y for x, y in zip(logits(pixel_values), targets)]).all(0)  # (b, p)
    return right.float().mean().item()
