"""Nothing a user has is lost, and no user mistake ends in a traceback (issue 14): every numeric flag is
checked, --resume keeps the run's flags, a checkpoint is never overwritten unasked, a run with no good
sample stops, saves clean up after a full disk, a torn answers line is dropped, images load as a viewer
shows them, and bad text, files and paths give one line; Ctrl-C neither shows a traceback nor lies."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer

import minivlmamba.cli
from minivlmamba import UserError
from minivlmamba.checkpoint import prepare_folder, save_train_state
from minivlmamba.cli import Number, device
from minivlmamba.data import load_image
from test_cli import QUICK, ROOT, assert_one_line_error, checkpoint, run  # noqa: F401 (checkpoint: a fixture)


def test_number_flags_take_only_their_range():
    steps, lr, warmup = Number(int, 1), Number(float, above=0), Number(float, 0, 1)
    top_p = Number(float, high=1, above=0)
    assert (steps("3"), lr("1e-4"), warmup("0"), top_p("1")) == (3, 1e-4, 0.0, 1.0)
    for number, text in [(steps, "0"), (steps, "-5"), (steps, "2.5"), (lr, "0"), (lr, "-1"), (lr, "nan"),
                         (lr, "inf"), (warmup, "1.5"), (top_p, "0"), (steps, "many")]:
        with pytest.raises(Exception, match="is not") as error:
            number(text)
        assert error.type.__name__ == "ArgumentTypeError"
    assert (str(steps), str(lr), str(warmup), str(top_p)) == (
        "an integer >= 1", "a number > 0", "a number in [0, 1]", "a number in (0, 1]")
    for text in ("tpu", "cuda:99", "gpu"):
        with pytest.raises(Exception, match="cuda"):
            device(text)
    assert device("cpu") == "cpu" and device("auto") in ("cpu", "cuda")


@pytest.mark.parametrize("script, flag, value", [
    ("train.py", "--steps", "0"), ("train.py", "--lr", "nan"), ("train.py", "--grad-accum", "-1"),
    ("train.py", "--workers", "-1"), ("train.py", "--device", "cuda:99"), ("chat.py", "--temperature", "nan"),
    ("chat.py", "--device", "tpu")])
def test_bad_flags_are_one_line_errors(script, flag, value):
    result = run(script, flag, value, check=False)
    assert result.returncode == 2
    assert_one_line_error(result, f"argument {flag}")


def test_help_shows_each_range():
    help = " ".join(run("train.py", "--help").stdout.split())
    for words in ("--steps STEPS optimizer steps", "(an integer >= 1)", "--lr LR peak", "(a number > 0)",
                  "--warmup WARMUP", "(a number in [0, 1])", "--overwrite"):
        assert words in help, words


def module(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_other_entry_points_give_one_line(tmp_path):
    assert_one_line_error(module("minivlmamba.bench", "train", "--steps", "0"), "--steps")
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert_one_line_error(module("minivlmamba.pretrained", tmp_path), "config.json", "not valid JSON")
    (tmp_path / "config.json").write_text(json.dumps(dict(d_model=16, n_layer=1, vocab_size=50)))
    torch.save({"weights": Namespace()}, tmp_path / "pytorch_model.bin")  # a pickle of a class: refused
    assert_one_line_error(module("minivlmamba.pretrained", tmp_path), "unreadable weights")


class Namespace:
    """Any class: torch.load(weights_only=True) refuses to unpickle it."""


# ----------------------------------------------------------------------------- train.py: runs and resumes

def test_resume_keeps_the_runs_flags_and_nothing_is_overwritten(tmp_path):
    out = tmp_path / "run"
    run("train.py", *QUICK, "--device", "cpu", "--out", out)
    weights = (out / "model.safetensors").read_bytes()
    refused = run("train.py", *QUICK, "--out", out, check=False)  # the README's first command, run again
    assert_one_line_error(refused, "--resume", "--out", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == weights
    assert_one_line_error(run("train.py", "--out", out, "--resume", "--lr", "0.1", check=False), "--lr 0.1", "0.001")

    state = torch.load(out / "train_state.pt", weights_only=True)
    state["step"] = 4  # as if killed half-way
    torch.save(state, out / "train_state.pt")
    log = run("train.py", "--out", out, "--resume").stdout  # no flag: the run's own, 8 steps
    assert "resuming" in log and "step     8/8" in log and "/4500" not in log
    log = run("train.py", *QUICK, "--out", out, "--overwrite").stdout
    assert "held-out accuracy" in log


def test_unwritable_out_is_found_before_training(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        result = run("train.py", *QUICK, "--out", out, check=False)
        assert_one_line_error(result, str(out), "--out")
        assert "tower:" not in result.stdout


def test_a_flag_that_would_do_nothing_is_refused(tmp_path):
    assert_one_line_error(run("train.py", "--image-folder", "imgs", "--out", tmp_path, check=False),
                          "--image-folder", "no effect")


def llava_data(tmp_path, images):
    """A data file with one sample per image name (written as red squares when given as (name, True))."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    records = []
    for name, write in images:
        if write:
            Image.new("RGB", (48, 48), "red").save(folder / name)
        records.append(dict(id=name, image=name, conversations=[
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    return ["--preset", "tiny", "--data", data, "--image-folder", folder, "--workers", 0, "--batch-size", 4,
            "--steps", 2, "--out", tmp_path / "out"]


def test_a_run_that_would_leave_random_frozen_parts_is_refused(tmp_path):
    args = llava_data(tmp_path, [("a.png", True)])
    assert_one_line_error(run("train.py", *args, check=False), "random and frozen", "--lr-vision", "--lr-lm")


def test_a_run_with_no_good_sample_stops_and_a_bad_share_is_reported(tmp_path):
    trains_all = ["--lr-vision", "1e-3", "--lr-lm", "1e-3"]
    args = llava_data(tmp_path, [(f"{i}.png", False) for i in range(4)])  # every image missing
    assert_one_line_error(run("train.py", *args, *trains_all, check=False), "none of its 4 samples", "no such image")
    for i in range(4):
        (tmp_path / "images" / f"{i}.png").write_text("not an image")  # there, but unreadable
    assert_one_line_error(run("train.py", *args, *trains_all, check=False), "were all bad", "not a readable image")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    args = llava_data(tmp_path, [("0.png", True), ("1.png", False), ("2.png", False), ("3.png", False)])
    result = run("train.py", *args, *trains_all, "--overwrite")
    assert "WARNING" in result.stderr and "were bad and skipped" in result.stderr


def test_bf16_really_runs_on_the_cpu(tmp_path):
    args = [*QUICK, "--steps", "2", "--device", "cpu"]
    run("train.py", *args, "--dtype", "fp32", "--out", tmp_path / "fp32")
    run("train.py", *args, "--dtype", "bf16", "--out", tmp_path / "bf16")
    fp32, bf16 = (load_file(tmp_path / dtype / "model.safetensors") for dtype in ("fp32", "bf16"))
    assert any(not torch.equal(fp32[name], bf16[name]) for name in fp32 if name.startswith("lm."))


def test_ctrl_c_shows_no_traceback_and_claims_no_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "a")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:  # from the first moment on, imports included
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr.read()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *QUICK, "--tower-steps", "100000", "--out",
                             str(tmp_path / "b")], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().startswith("model:")  # now pretraining the tower, long before a save
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "nothing was saved" in stderr and "intact" not in stderr


# ----------------------------------------------------------------------------- saves

def test_a_failed_save_leaves_the_previous_file_and_no_temporary_one(tmp_path, monkeypatch):
    save_train_state(tmp_path, dict(step=1))
    before = (tmp_path / "train_state.pt").read_bytes()

    def full_disk(state, path):  # torch.save on a full disk: half a file, then a cryptic RuntimeError
        open(path, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(minivlmamba.cli.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(UserError, match="disk full"):
        save_train_state(tmp_path, dict(step=2))
    assert (tmp_path / "train_state.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]


def test_the_temporary_files_a_kill_left_are_removed_at_the_start(tmp_path):
    (tmp_path / "train_state.pt.tmp").write_bytes(b"x" * 1000)
    (tmp_path / "notes.txt.tmp").write_text("the user's")
    prepare_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt.tmp"]


@pytest.mark.parametrize("case", ["garbage", "empty", "truncated", "foreign"])
def test_a_bad_train_state_is_a_one_line_error(checkpoint, tmp_path, case):  # noqa: F811
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    state = out / "train_state.pt"
    contents = dict(garbage=b"garbage", empty=b"", truncated=state.read_bytes()[:5000])
    if case == "foreign":
        torch.save({"model": {}, "step": "three"}, state)
    else:
        state.write_bytes(contents[case])
    assert_one_line_error(run("train.py", "--out", out, "--resume", check=False), "train_state.pt", "--overwrite")


# ----------------------------------------------------------------------------- checkpoints edited by hand

@pytest.mark.parametrize("key, value", [(("vision", "act"), "relu"), (("template",), "chatml"),
                                        (("connector",), "linear"), (("scan",), "zigzag"),
                                        (("vision", "width"), 96.5), (("lm", "d_model"), "96")])
def test_a_hand_edited_config_is_a_one_line_error(checkpoint, tmp_path, key, value):  # noqa: F811
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    cfg = json.loads((out / "config.json").read_text())
    (cfg[key[0]] if len(key) == 2 else cfg)[key[-1]] = value
    (out / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("chat.py", "--ckpt", out, "--demo", "--demo-file", tmp_path / "d.png", "-p", "hi",
                              check=False), "config.json", key[-1])


def test_a_tokenizer_larger_than_the_vocabulary_is_a_one_line_error(checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.add_tokens([f"<extra {i}>" for i in range(64)])
    tokenizer.save(str(out / "tokenizer.json"))
    assert_one_line_error(run("chat.py", "--ckpt", out, "--demo", "--demo-file", tmp_path / "d.png", "-p", "hi",
                              check=False), "tokenizer.json", "vocabulary")


# ----------------------------------------------------------------------------- chat.py: text, paths, answers

def test_bad_text_is_a_one_line_error(checkpoint, tmp_path):  # noqa: F811
    chat = ["chat.py", "--ckpt", checkpoint]
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--ckpt", str(checkpoint), "--demo",
                             "--demo-file", str(tmp_path / "d.png"), "-p", os.fsdecode(b"caf\xe9?")], cwd=ROOT,
                            capture_output=True, text=True)
    assert_one_line_error(result, "-p", "UTF-8")
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    for line, words in [(b'{"question_id": 1, "text": "caf\xe9?"}', ("q.jsonl:2", "UTF-8")),
                        (b'{"question_id": [1], "text": "hi"}', ("q.jsonl:2", "question_id")),
                        (b'{"question_id": 1, "text": "hi \\ud800"}', ("q.jsonl:2", "UTF-8"))]:
        questions.write_bytes(b'{"question_id": 0, "text": "hi"}\n' + line + b"\n")
        assert_one_line_error(run(*chat, "--questions", questions, "--answers", answers, check=False), *words)
    session = b"caf\xe9?\nIs there a circle?\nquit\n"  # the bad line is refused, the session goes on
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--ckpt", str(checkpoint), "--demo",
                             "--demo-file", str(tmp_path / "d.png")], cwd=ROOT, input=session, capture_output=True)
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    assert b"error: your question: not valid UTF-8" in result.stdout and result.stdout.count(b"> ") == 3


def test_bad_output_paths_are_found_before_the_model_loads(checkpoint, tmp_path):  # noqa: F811
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 0, "text": "hi"}\n')
    chat = ["chat.py", "--ckpt", checkpoint]
    for answers, words in [(tmp_path / "no" / "a.jsonl", "no such folder"), (tmp_path, "is a folder"),
                           (questions, "question file")]:
        assert_one_line_error(run(*chat, "--questions", questions, "--answers", answers, check=False), words)
    for demo, words in [(tmp_path / "no" / "d.png", "no such folder"), (tmp_path / "d.txt", "image file name")]:
        assert_one_line_error(run(*chat, "--demo", "--demo-file", demo, "-p", "hi", check=False), "--demo-file", words)


def test_a_torn_last_answer_line_is_dropped(checkpoint, tmp_path):  # noqa: F811
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions.write_text("".join(json.dumps(dict(question_id=i, image="a.png", text="Colour?")) + "\n"
                                 for i in range(3)))
    answers.write_text(json.dumps(dict(question_id=0, text="red")) + '\n{"question_id": 1, "prom')  # cut by a kill
    run("chat.py", "--ckpt", checkpoint, "--questions", questions, "--answers", answers, "--image-folder", tmp_path,
        "--max-new-tokens", 2)
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == [0, 1, 2]


# ----------------------------------------------------------------------------- images as a viewer shows them

def test_16_and_32_bit_grayscale_images_are_scaled_to_8_bits(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "16.png")
    Image.fromarray((ramp * 65535).astype(np.int32)).save(tmp_path / "16-in-32.tif")
    Image.fromarray((ramp * (2**31 - 1)).astype(np.int32)).save(tmp_path / "32.tif")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    for name in ("16.png", "16-in-32.tif", "32.tif", "float.tif"):
        image = load_image(tmp_path / name)
        values = np.asarray(image)
        assert image.mode == "RGB" and abs(values.mean() - 127.5) < 2, name
        assert values.min() == 0 and values.max() == 255, name


def test_the_exif_orientation_is_applied(tmp_path):
    photo = Image.new("RGB", (40, 20), "white")
    photo.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer turns it 90 degrees clockwise
    photo.save(tmp_path / "phone.jpg", exif=exif)
    shown = load_image(tmp_path / "phone.jpg")
    assert shown.size == (20, 40)
    assert shown.getpixel((10, 2))[1] < 50 and shown.getpixel((10, 37))[1] > 200  # red now on top
