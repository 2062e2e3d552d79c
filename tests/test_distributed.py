"""train.py under torchrun on the CPU (2 processes, gloo): FSDP trains exactly as DDP does, a
checkpoint written by any number of processes, sharded or not, resumes on any other number, and bad
samples never leave the processes out of step."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from safetensors.torch import load_file

from minivlmamba.shapes import make_scene, render

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--device", "cpu", "--batch-size", "8", "--log-every", "2", "--eval-per-family", "2",  # gloo, on any machine
         "--tower-steps", "10"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


def train(*args, processes=2, quick=QUICK):
    launch = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={processes}"] if processes > 1 else [])
    result = subprocess.run([*launch, str(ROOT / "train.py"), *quick, *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_same_checkpoint(a, b, atol=1e-5):
    """Weights and AdamW moments equal up to the order of float sums."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)
    sa, sb = (torch.load(x / "train_state.pt", weights_only=True) for x in (a, b))
    assert sa["step"] == sb["step"]
    for i, state in sb["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa["optimizer"]["state"][i][key], state[key], rtol=0, atol=atol)


def test_fsdp_trains_as_ddp_and_resumes_on_any_number_of_processes(tmp_path):
    train("--steps", 4, "--out", tmp_path / "ddp")
    log = train("--fsdp", "--steps", 4, "--out", tmp_path / "fsdp")
    assert "x2 FSDP" in log and "step     4/4" in log
    assert_same_checkpoint(tmp_path / "fsdp", tmp_path / "ddp")  # gathered shards = the whole model, same format

    # the DDP checkpoint resumed on 2 sharded processes continues exactly as on 2 DDP processes
    for name in ("ddp-resumed", "fsdp-resumed"):
        shutil.copytree(tmp_path / "ddp", tmp_path / name)
    train("--resume", "--steps", 6, "--out", tmp_path / "ddp-resumed")
    train("--fsdp", "--resume", "--steps", 6, "--out", tmp_path / "fsdp-resumed")
    assert_same_checkpoint(tmp_path / "fsdp-resumed", tmp_path / "ddp-resumed")

    # and the sharded checkpoint resumes in one plain process
    assert "step     6/6" in train("--resume", "--steps", 6, "--out", tmp_path / "fsdp", processes=1)


def test_a_micro_batch_one_process_has_no_good_sample_of_is_dropped_by_all(tmp_path):
    """One readable image and three missing ones, one sample a process and step: in the step that reads
    the good one, the other process has nothing to train on. Both must drop that micro-batch, or one runs
    a backward (DDP's all-reduce) that the other never joins."""
    rng = random.Random(0)
    (tmp_path / "images").mkdir()
    render(make_scene(rng, held_out=False), rng).save(tmp_path / "images" / "good.png")
    talk = [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "Shapes."}]
    records = [dict(id=str(i), image="good.png" if i == 0 else f"missing{i}.png", conversations=talk) for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    log = train("--data", tmp_path / "data.json", "--image-folder", tmp_path / "images", "--workers", 0,
                "--batch-size", 2, "--steps", 2, "--lr-vision", 1e-3, "--lr-lm", 1e-3, "--out", tmp_path / "run",
                quick=QUICK[:-2])  # no --tower-steps: the tower is pretrained on shapes only
    assert "3 bad samples skipped" in log  # counted over both processes


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--fsdp", "--out", tmp_path], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        "error: --fsdp shards the model over processes: start train.py with torchrun"]
