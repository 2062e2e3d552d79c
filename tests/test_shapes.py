"""The embedded shapes set: held-out layouts, the words of its answers, and the tower's pretraining."""

import random
from collections import Counter

import torch

from minivlmamba import preset
from minivlmamba.shapes import (COLOURS, FAMILIES, Shape, caption, held_out_set, is_held_out, make_scene, patch_targets,
                                pretrain_tower, train_tokenizer, training_sample)
from minivlmamba.templates import encode_conversation, encode_turn
from minivlmamba.vision import VisionTower


def characters(question, answer, first_turn):
    return len(question) + len(answer)


def test_training_scenes_never_use_a_held_out_layout():
    rng = random.Random(0)
    assert not any(is_held_out(make_scene(rng, held_out=False)) for _ in range(500))
    assert all(is_held_out(make_scene(rng, held_out=True)) for _ in range(100))


def test_captions_and_questions_take_the_right_article():
    scene = (Shape("orange", "circle", 0), Shape("red", "cross", 4))
    assert caption(scene) == "an orange circle and a red cross."
    questions = [q for _, turns in (training_sample(random.Random(i), 200, characters) for i in range(300)) for q, _ in turns]
    assert not any(f"a {c}" in q for q in questions for c in COLOURS if c[0] in "aeiou")
    assert any("an orange" in q for q in questions)


def test_training_samples_fill_the_budget_with_questions_about_one_scene():
    tokenizer = train_tokenizer("zephyr")

    def length(*turn):
        return sum(map(len, encode_turn(tokenizer, "zephyr", *turn)))

    counts = Counter()
    for i in range(200):
        _, turns = training_sample(random.Random(i), 87, length)
        ids, _ = encode_conversation(tokenizer, turns, "zephyr")
        assert len(ids) <= 87 or len(turns) == 1  # a first question always, even one that is cut
        counts[len(turns)] += 1
    assert 4 <= sum(n * c for n, c in counts.items()) / 200 <= 6 and min(counts) >= 1
    _, turns = training_sample(random.Random(0), 1, length)
    assert len(turns) == 1
    assert training_sample(random.Random(5), 87, length)[1] == training_sample(random.Random(5), 87, length)[1]


def test_patch_targets_name_each_patch_object_and_cell():
    scene = (Shape("red", "circle", 0), Shape("blue", "cross", 8))
    red_circle, blue_cross = 1 + 0 * 4 + 0, 1 + 2 * 4 + 3  # 1 + colour index * 4 + shape index
    assert patch_targets(scene, 3) == ([red_circle, 0, 0, 0, 0, 0, 0, 0, blue_cross], list(range(9)))
    objects, cells = patch_targets(scene, 6)  # 2 x 2 patches a cell
    assert cells[:6] == [0, 0, 1, 1, 2, 2] and cells[6:12] == [0, 0, 1, 1, 2, 2] and cells[-1] == 8
    assert objects[:2] == [red_circle] * 2 and objects[-1] == blue_cross and objects.count(0) == 36 - 8


def test_pretraining_teaches_the_tower_what_and_where_on_held_out_scenes():
    torch.manual_seed(0)
    tower = VisionTower(preset("tiny").vision)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    assert pretrain_tower(tower, steps=0, batch_size=32) < 0.2  # chance: 25 objects x 9 cells
    assert pretrain_tower(tower, steps=200, batch_size=32) > 0.9
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert all(p.grad is None for p in tower.parameters())  # else they would count in train.py's clipping


def test_held_out_set_has_every_family_in_equal_numbers():
    families = Counter(family for *_, family in held_out_set(seed=1, per_family=5))
    assert families == {family: 5 for family in FAMILIES}
