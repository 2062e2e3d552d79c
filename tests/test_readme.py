"""Every command the README shows is run here, at a small size where the real one is long (STYLE.md
practice 9), so that a README command that stops working fails CI.

`SMALL` maps each command of the README (a line of a ```bash block or an inline `python ...`,
`pip ...`, `torchrun ...` or `hf ...`; `a && b` counts as two) to what stands in for it here:
- a command run in a scratch folder with the README's flags and paths, only the sizes made small
  ("python" is this interpreter, "torchrun" its torch.distributed.run): the tiny default in a few
  steps and chat.py on what it saved; the paper's recipe on toy checkpoints in the upstream layouts
  and a toy folder laid out as LLaVA's; the benchmarks' --help;
- a check, where the command needs the network: `pip install` against `.ci/run`, which runs those
  lines on a fresh clone; `hf download` against its --help and the files the presets read.
A README command missing from SMALL fails `test_every_readme_command_is_in_the_table`.
"""

import json
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_cli import ROOT
from test_recipe import toy_llava_folder

from minivlmamba.config import PRESETS
from minivlmamba.shapes import make_scene, render

README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
TINY = "--steps 8 --batch-size 8 --log-every 4 --eval-per-family 2 --tower-steps 10 --device cpu"
TOY = "--vision siglip --lm mamba --tokenizer tok --steps 2 --workers 0 --log-every 1 --device cpu"
RECIPE_1 = ("--preset vl-mamba-2.8b --stage 1 --data blip_laion_cc_sbu_558k.json --image-folder LLaVA-Pretrain/images "
            "--batch-size 4 --grad-accum 2 " + TOY)
RECIPE_2 = ("--stage 2 --init out/stage1 --data llava_v1_5_mix665k.json --image-folder llava_images --out out/stage2 "
            "--grad-accum 4 --grad-checkpointing --batch-size 8 --steps 2 --workers 0 --log-every 1 --device cpu")

SMALL = {
    # Install: .ci/run's lines (a line of it, or the words a line of it holds)
    "pip install torch --index-url https://download.pytorch.org/whl/cpu": "ci: pip install -q torch==2.13.0",
    "pip install torch==2.13.0": "ci: pip install -q torch==2.13.0",
    "pip install -e .": 'ci: pip install -q -e ".[test,web]"',
    'pip install -e ".[test,web]"': 'ci: pip install -q -e ".[test,web]"',
    'pip install -e ".[web]"': 'ci: pip install -q -e ".[test,web]"',
    "python -m pytest": "ci: python -m pytest -q",
    # The tiny default, then chat.py on the checkpoint it saved (out/tiny, chat.py's default)
    "python train.py": f"tiny: python train.py {TINY}",
    "time python train.py": f"tiny: python train.py {TINY}",
    'python chat.py --demo -p "How many shapes are there?"':
        'tiny: python chat.py --demo -p "How many shapes are there?"',
    "python chat.py --demo --seed 7": "tiny: python chat.py --demo --seed 7 < interactive.txt",
    'python chat.py --image photo.png -p "What is this?"': 'tiny: python chat.py --image photo.png -p "What is this?"',
    "python chat.py --questions q.jsonl --answers a.jsonl":
        "tiny: python chat.py --questions q.jsonl --answers a.jsonl",
    "python chat.py --web": "tiny: python chat.py --web --port PORT",
    # The paper's recipe: the downloads' repo ids and files against what the presets and the recipe read,
    # then the recipe itself on a toy LLaVA folder
    "pip install huggingface_hub": "hf: huggingface_hub",
    "hf download state-spaces/mamba-2.8b-slimpj": "hf: state-spaces/mamba-2.8b-slimpj",
    "hf download google/siglip-so400m-patch14-384": "hf: google/siglip-so400m-patch14-384",
    "hf download EleutherAI/gpt-neox-20b tokenizer.json": "hf: EleutherAI/gpt-neox-20b tokenizer.json",
    "hf download liuhaotian/LLaVA-Pretrain --repo-type dataset": "hf: blip_laion_cc_sbu_558k.json --repo-type",
    "hf download liuhaotian/LLaVA-Instruct-150K llava_v1_5_mix665k.json --repo-type dataset":
        "hf: llava_v1_5_mix665k.json --repo-type",
    "python train.py --preset vl-mamba-2.8b --stage 1 --data blip_laion_cc_sbu_558k.json --image-folder "
    "LLaVA-Pretrain/images --out out/stage1 --batch-size 256 --grad-accum 8":
        f"toy: python train.py {RECIPE_1} --out out/stage1",
    "torchrun --nproc_per_node=8 train.py ...same...":  # its own --out: a second run into out/stage1 is refused
        f"toy: torchrun --nproc_per_node=2 train.py {RECIPE_1} --out out/stage1-2",
    "torchrun --nproc_per_node=8 train.py --stage 2 --init out/stage1 --data llava_v1_5_mix665k.json --image-folder "
    "llava_images --out out/stage2 --grad-accum 4 --grad-checkpointing":
        f"toy: torchrun --nproc_per_node=2 train.py {RECIPE_2}",
    "python chat.py --ckpt out/stage2 --image photo.jpg":
        "toy: python chat.py --ckpt out/stage2 --image photo.jpg --max-new-tokens 4 < interactive.txt",
    "python chat.py --ckpt out/stage2 --questions llava-bench.jsonl --answers answers.jsonl --image-folder images":
        "toy: python chat.py --ckpt out/stage2 --questions llava-bench.jsonl --answers answers.jsonl "
        "--image-folder images --max-new-tokens 4",
    # The benchmarks time CUDA kernels: here, their --help
    "python -m minivlmamba.bench scan": "bench: python -m minivlmamba.bench scan --help",
    "python -m minivlmamba.bench generate": "bench: python -m minivlmamba.bench generate --help",
    "python -m minivlmamba.bench train": "bench: python -m minivlmamba.bench train --help",
    "torchrun --nproc_per_node=2 -m minivlmamba.bench train --fsdp":
        "bench: torchrun --nproc_per_node=2 -m minivlmamba.bench train --fsdp --help",
}


def readme_commands(text):
    """The commands of a README: each line of its ```bash blocks (continuations joined, comments
    dropped) and each inline code span that starts with a command; `a && b` gives a and b."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [re.sub(r"\s+#.*", "", line) for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:time )?(?:python|pip|torchrun|hf) [^`]*)`", text)
    commands = [" ".join(part.split()) for line in lines for part in line.split("&&")]
    return list(dict.fromkeys(command for command in commands if command))


def test_every_readme_command_is_in_the_table():
    commands = readme_commands(README)
    assert [c for c in commands if c not in SMALL] == [], "a README command without a test: add it to SMALL"
    assert [c for c in SMALL if c not in commands] == [], "SMALL lists a command the README no longer shows"


def run_group(group, folder, port=None):
    """Run, in order, the small commands of one group in `folder` (the README's commands are written
    to run in one folder, one after the other); returns {small command: its stdout + stderr}."""
    logs = {}
    for small in dict.fromkeys(v.split(": ", 1)[1] for v in SMALL.values() if v.startswith(group + ": ")):
        words, stdin = shlex.split(small.replace("PORT", str(port))), None
        if "<" in words:
            stdin = (folder / words[-1]).read_text()
            words = words[:-2]
        launch = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[words[0]]
        words = [str(ROOT / w) if w in ("train.py", "chat.py") else w for w in words[1:]]
        if "--web" in words:
            logs[small] = serve([*launch, *words], folder)
            continue
        result = subprocess.run([*launch, *words], cwd=folder, input=stdin, capture_output=True, text=True,
                                timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, f"{small}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{small}\n{result.stderr}"
        logs[small] = result.stdout + result.stderr
    return logs


def serve(command, folder):
    """Start `chat.py --web`, wait until it says where it serves, stop it."""
    log = folder / "web.log"
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("talk to out/tiny at http://127.0.0.1:"), line + log.read_text()
    finally:
        proc.terminate()
        proc.wait()
    return line


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_pattern(line):
    """A line of the README's quoted output as a regex: any numbers, any runs of spaces."""
    pattern = re.sub(r"\\ ", " ", re.escape(line))
    pattern = re.sub(r"\d+(?:,\d{3})*(?:\\\.\d+)?", r"[\\d,.]+", pattern)
    return re.sub(r" +", r"\\s+", pattern)


def test_the_tiny_default_and_chat(tmp_path):
    scene = random.Random(0)
    render(make_scene(scene, held_out=True), scene).save(tmp_path / "photo.png")
    question = dict(question_id=1, image="photo.png", text="Is there a circle?")
    (tmp_path / "q.jsonl").write_text(json.dumps(question) + "\n")
    (tmp_path / "interactive.txt").write_text("How many shapes are there?\n/clear\nWhat colour is the circle?\nquit\n")
    logs = run_group("tiny", tmp_path, port=free_port())

    train_log = logs[f"python train.py {TINY}"].splitlines()
    quoted = re.search(r"A real run .*?\n```\n(.*?)```", README, re.S).group(1)
    for line in quoted.splitlines():
        if line.strip() and line != "...":  # every line of the quoted run has its like in a real one
            assert any(re.fullmatch(as_pattern(line), real) for real in train_log), line
    assert (tmp_path / "demo.png").is_file()
    assert "(conversation cleared: same image)" in logs["python chat.py --demo --seed 7 < interactive.txt"]
    assert [json.loads(a)["question_id"] for a in (tmp_path / "a.jsonl").read_text().splitlines()] == [1]


def test_the_papers_recipe_on_a_toy_llava_folder(tmp_path):
    toy_llava_folder(tmp_path)
    for name in ("blip_laion_cc_sbu_558k.json", "llava_v1_5_mix665k.json"):  # the README's names and folders
        shutil.copy(tmp_path / "data.json", tmp_path / name)
    for folder in ("LLaVA-Pretrain/images", "llava_images"):
        shutil.copytree(tmp_path / "images", tmp_path / folder)
    (tmp_path / "llava-bench.jsonl").write_text("".join(
        json.dumps(dict(question_id=i, image=f"{i}.png", text="Describe the image.")) + "\n" for i in range(2)))
    Image.open(tmp_path / "images" / "0.png").save(tmp_path / "photo.jpg")
    (tmp_path / "interactive.txt").write_text("What is in the picture?\nquit\n")
    logs = run_group("toy", tmp_path)
    assert [log.count("device cpu x2") for small, log in logs.items() if small.startswith("torchrun")] == [1, 1]
    assert (tmp_path / "out" / "stage2" / "model.safetensors").is_file()
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2


def test_the_benchmarks_help(tmp_path):
    for small, log in run_group("bench", tmp_path).items():
        command = small.split("minivlmamba.bench ")[1].split()[0]  # scan, generate or train
        assert log.startswith(f"usage: python -m minivlmamba.bench {command}"), log  # (each process's, under torchrun)


def test_the_install_lines_are_what_ci_runs():
    ci_lines = [" ".join(line.split("#")[0].split()) for line in CI.splitlines()]
    for small in (v for v in SMALL.values() if v.startswith("ci: ")):
        assert small[4:] in ci_lines, small
    ci = ci_lines.index('pip install -q -e ".[test,web]"')
    assert ci_lines.index("pip install -q torch==2.13.0") < ci < ci_lines.index("python -m pytest -q")  # torch first
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in ("test = [", "web = [", 'hf = ["huggingface_hub"]'):
        assert "\n" + extra in pyproject, extra


def test_hf_download_gets_what_the_presets_read():
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")  # the venv's first
    if hf is None:
        pytest.skip("no `hf` command (huggingface_hub not installed)")
    help = subprocess.run([hf, "download", "--help"], capture_output=True, text=True).stdout
    assert "--repo-type" in help
    paper = PRESETS["vl-mamba-2.8b"]()
    recipe_py = (ROOT / "minivlmamba" / "recipe.py").read_text()  # train.py's flags' defaults
    for small in (v[4:] for v in SMALL.values() if v.startswith("hf: ")):
        name = small.split()[0]
        if name.endswith(".json") and "tokenizer" not in name:  # LLaVA's data files: the recipe reads them
            assert f"--data {name}" in README
        elif name != "huggingface_hub":
            assert name in (paper.vision_path, paper.lm_path) or f'tokenizer="{name}"' in recipe_py, name


def test_the_readmes_links_reach_their_files_and_headings():
    anchor = lambda heading: re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")  # GitHub's rule
    for path, heading in re.findall(r"\]\(((?:notes|tests)/[^)#]+)(?:#([^)]+))?\)", README):
        assert (ROOT / path).is_file(), path
        if heading:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            assert heading in map(anchor, headings), f"{path}#{heading}"
