"""The paper's two-stage recipe end to end, at toy size: pretrained checkpoints in the upstream layouts,
a LLaVA-format data folder with a bad sample, stage 1 (connector) -> stage 2 (connector + LM) -> chat."""

import json
import random
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from minivlmamba import MambaConfig, MambaLM
from minivlmamba.data import sample_order
from minivlmamba.shapes import make_scene, render, train_tokenizer
from test_pretrained import randomized, write_state_spaces, write_vision

ROOT = Path(__file__).resolve().parents[1]


def train(*args):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def components(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return f.metadata()["components"], {name.split(".")[0] for name in f.keys()}


def toy_llava_folder(tmp_path):
    """Toy pretrained checkpoints (tok/, mamba/ in the state-spaces layout, siglip/ vision-only) and a
    LLaVA-format data.json over images/: four scenes, one missing image, one text-only sample."""
    tokenizer = train_tokenizer("zephyr")
    (tmp_path / "tok").mkdir()
    tokenizer.save(str(tmp_path / "tok" / "tokenizer.json"))
    torch.manual_seed(0)
    lm = randomized(MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=tokenizer.get_vocab_size(), d_state=4)), 0)
    write_state_spaces(tmp_path / "mamba", lm)
    write_vision(tmp_path / "siglip", "siglip", full=False, fmt="safetensors")

    images, rng, records = tmp_path / "images", random.Random(0), []
    images.mkdir()
    for i in range(4):
        render(make_scene(rng, held_out=False), rng).save(images / f"{i}.png")
        records.append(dict(id=str(i), image=f"{i}.png", conversations=[
            dict(**{"from": "human"}, value="<image>\nWhat is in the picture?"), dict(**{"from": "gpt"}, value="shapes.")]))
    records.append(dict(id="gone", image="missing.png", conversations=records[0]["conversations"]))
    records.append(dict(id="text", conversations=[dict(**{"from": "human"}, value="Hi"), dict(**{"from": "gpt"}, value="Hello.")]))
    (tmp_path / "data.json").write_text(json.dumps(records))


def test_stage1_stage2_chat(tmp_path):
    toy_llava_folder(tmp_path)
    data, images = tmp_path / "data.json", tmp_path / "images"
    common = ["--data", data, "--image-folder", images, "--steps", 3, "--batch-size", 6, "--workers", 0, "--log-every", 1]
    log = train("--preset", "vl-mamba-2.8b", "--vision", tmp_path / "siglip", "--lm", tmp_path / "mamba",
                "--tokenizer", tmp_path / "tok", "--stage", 1, "--out", tmp_path / "stage1", *common)
    assert "bad samples skipped" in log
    assert components(tmp_path / "stage1") == ("connector", {"connector"})  # megabytes, not the whole model

    train("--stage", 2, "--init", tmp_path / "stage1", "--out", tmp_path / "stage2", *common)
    assert components(tmp_path / "stage2") == ("connector,lm", {"connector", "lm"})

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(dict(question_id=i, image=f"{i}.png", text="Describe the image.")) + "\n"
                                 for i in range(3)))
    answers = tmp_path / "a.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--ckpt", str(tmp_path / "stage2"), "--questions",
                             str(questions), "--answers", str(answers), "--image-folder", str(images),
                             "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [0, 1, 2]


def test_sample_order_is_a_seeded_permutation_that_groups_lengths():
    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]
    order = sample_order(lengths, batch_size=8, seed=1, window=16)
    assert sorted(order) == list(range(1000)) and order == sample_order(lengths, 8, seed=1, window=16)
    spread = lambda o: sum(max(lengths[i] for i in o[k:k + 8]) - min(lengths[i] for i in o[k:k + 8])
                           for k in range(0, 1000, 8))
    assert spread(order) < spread(sample_order(lengths, 8, seed=1, group=False)) / 4
