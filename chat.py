"""Talk to a trained VL-Mamba about an image.

    python chat.py --demo                                  # a fresh shapes scene, interactive
    python chat.py --image photo.png -p "What is this?"    # one question, print the answer, exit
    python chat.py --demo -p "Describe the image." -p "What colour is the circle?"   # one conversation
    python chat.py --questions q.jsonl --answers a.jsonl --image-folder images/   # benchmark answers
    python chat.py --web                                   # a local web page (pip install -e ".[web]")

Interactive commands: /image PATH switches the image, /clear starts a new conversation, quit (or
Ctrl-D / Ctrl-C) exits. The model reads the image and each question once; its recurrent state
carries the conversation, so every new token costs the same however long the chat gets.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads just stops (cli.run catches it later)

import importlib.util
import random
import sys
from pathlib import Path

import torch
from PIL import Image

from minivlmamba import UserError
from minivlmamba.answers import answer_file
from minivlmamba.checkpoint import load_model
from minivlmamba.cli import ArgumentParser, Number, check_text, device, output_file, run
from minivlmamba.conversation import Conversation
from minivlmamba.data import load_image
from minivlmamba.shapes import CELLS, make_scene, render, with_article

parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("--ckpt", default="out/tiny", help="checkpoint folder written by train.py")
parser.add_argument("--image", help="image file to talk about")
parser.add_argument("--demo", action="store_true", help="generate a shapes scene (saved to --demo-file)")
parser.add_argument("--demo-file", default="demo.png", help="where --demo saves its scene")
parser.add_argument("-p", "--prompt", action="append",
                    help="ask a question, print the answer and exit; repeated, the questions of one conversation")
parser.add_argument("--questions", help="question file (JSONL: question_id, image, text) to answer in batch")
parser.add_argument("--answers", help="answers file (JSONL) to write; an interrupted one is resumed")
parser.add_argument("--image-folder", default=".", help="folder the question file's images are relative to")
parser.add_argument("--batch-size", type=Number(int, 1), default=8, help="questions of --questions decoded together")
parser.add_argument("--web", action="store_true", help="serve a chat page in the browser instead (Gradio)")
parser.add_argument("--host", default="127.0.0.1", help="address --web listens on (0.0.0.0: every network)")
parser.add_argument("--port", type=Number(int, 1, 65535), default=7860, help="port --web listens on")
parser.add_argument("--max-new-tokens", type=Number(int, 1), default=128)
parser.add_argument("--temperature", type=Number(float, 0), default=0.0, help="0 = greedy")
parser.add_argument("--top-k", type=Number(int, 0), default=0, help="0 = all tokens")
parser.add_argument("--top-p", type=Number(float, high=1, above=0), default=1.0)
parser.add_argument("--seed", type=Number(int, 0, 2**63 - 1), help="seed for --demo and sampling")
parser.add_argument("--device", type=device, default="auto", help="cpu, cuda, cuda:N, or auto")
args = parser.parse_args()


def demo_image():
    """A held-out shapes scene: the same one for the same --seed, so a question can be asked again."""
    seed = random.randrange(10_000) if args.seed is None else args.seed
    rng = random.Random(seed)
    scene = make_scene(rng, held_out=True)
    image = render(scene, rng)
    image.save(args.demo_file)
    shown = ", ".join(f"{with_article(s.name)} at the {CELLS[s.cell]}" for s in scene)
    print(f"demo scene {seed} ({shown}) saved to {args.demo_file}; --seed {seed} draws it again", file=sys.stderr)
    return image


def interactive(model, tokenizer, image):
    chat = Conversation(model, tokenizer, image)
    print("ask about the image; /image PATH switches it, /clear forgets the conversation, quit exits")
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach check_text, not input()
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("quit", "exit", "/quit"):
            return
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                image = load_image(path)
            except UserError as e:
                print(f"error: {e}")
                continue
            chat = Conversation(model, tokenizer, image)
            print(f"(now talking about {path}: a new conversation)")
        elif line == "/clear":
            chat = Conversation(model, tokenizer, image)
            print("(conversation cleared: same image)")
        elif line:
            try:
                for piece in chat.ask(check_text(line, "your question"), args):
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                chat = Conversation(model, tokenizer, image)  # the state holds a half answer: start over
            except UserError as e:
                print(f"error: {e}", end="")
            print()


def check_outputs():
    """The files this run writes can be written, before the model loads."""
    if args.questions:
        if not args.answers:
            raise UserError("--questions needs --answers FILE")
        if Path(args.answers).resolve() == Path(args.questions).resolve():
            raise UserError("--answers is the question file; give another file")
        output_file(args.answers, "--answers")
    elif args.demo:
        output_file(args.demo_file, "--demo-file")
        if Image.registered_extensions().get(Path(args.demo_file).suffix.lower()) not in Image.SAVE:
            raise UserError(f"--demo-file {args.demo_file}: not an image file name; end it in .png")


def main():
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.web:
        if importlib.util.find_spec("gradio") is None:
            raise UserError('--web needs Gradio, an optional extra: pip install -e ".[web]"')
        from minivlmamba.web import serve  # here: only this mode imports Gradio
        return serve(*load_model(args.ckpt, args.device), args)
    for prompt in args.prompt or ():
        if not check_text(prompt, "-p").strip():
            raise UserError("-p: an empty question; ask something, or leave -p out to chat")
    check_outputs()
    model, tokenizer = load_model(args.ckpt, args.device)
    if args.questions:
        return answer_file(model, tokenizer, args)
    if args.image and args.demo:
        raise UserError("give --image or --demo, not both")
    if not args.image and not args.demo:
        raise UserError("give an image: --image PATH, or --demo for a generated scene")
    image = load_image(args.image) if args.image else demo_image()
    if args.prompt:
        chat = Conversation(model, tokenizer, image)
        for prompt in args.prompt:  # one answer a line
            for piece in chat.ask(prompt, args):
                print(piece, end="", flush=True)
            print()
    else:
        interactive(model, tokenizer, image)


if __name__ == "__main__":
    run(main)
