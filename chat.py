"""Talk to a trained VL-Mamba about an image.

    python chat.py --demo                                  # a fresh shapes scene, interactive
    python chat.py --image photo.png -p "What is this?"    # one question, print the answer, exit
    python chat.py --questions q.jsonl --answers a.jsonl --image-folder images/   # benchmark answers
    python chat.py --web                                   # a local web page (pip install -e ".[web]")

Interactive commands: /image PATH switches the image, /clear starts a new conversation, quit (or
Ctrl-D / Ctrl-C) exits. The model reads the image and each question once; its recurrent state
carries the conversation, so every new token costs the same however long the chat gets.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while torch loads just stops (cli.run catches it later)

import importlib.util
import json
import random
import sys
import time
import uuid
from pathlib import Path

import torch
from PIL import Image

from minivlmamba import UserError
from minivlmamba.checkpoint import load_model
from minivlmamba.cli import ArgumentParser, Number, check_text, decode, device, output_file, run
from minivlmamba.data import image_in_folder, load_image
from minivlmamba.shapes import CELLS, make_scene, render, with_article
from minivlmamba.templates import prompt_text

parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("--ckpt", default="out/tiny", help="checkpoint folder written by train.py")
parser.add_argument("--image", help="image file to talk about")
parser.add_argument("--demo", action="store_true", help="generate a shapes scene (saved to --demo-file)")
parser.add_argument("--demo-file", default="demo.png", help="where --demo saves its scene")
parser.add_argument("-p", "--prompt", help="ask one question, print the answer and exit")
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


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


class Conversation:
    """One image and the recurrent state of everything said about it so far."""

    def __init__(self, model, tokenizer, image, warn=warn):
        self.model, self.tokenizer, self.cache, self.warn = model, tokenizer, None, warn
        self.pixel_values = model.vision.preprocess([image]).to(args.device)

    def prompt_ids(self, question):
        cfg = self.model.cfg
        ids = self.tokenizer.encode(prompt_text(question, cfg.template, first_turn=self.cache is None)).ids
        budget = cfg.max_len - cfg.vision.num_patches
        if len(ids) > budget:
            self.warn(f"prompt of {len(ids)} tokens truncated to the model's budget of {budget}")
            ids = ids[-budget:]
        return torch.tensor([ids], device=args.device)

    def ask(self, question, sampling=args):
        """Yield the answer as text pieces while it is generated; `sampling` has max_new_tokens,
        temperature, top_k and top_p (chat.py's flags, or the web page's sliders)."""
        ids = self.prompt_ids(question)
        if self.cache is None:
            self.cache = self.model.lm.allocate_cache(1)
            logits = self.model.prefill(self.pixel_values, ids, self.cache)
        else:
            logits = self.model.extend(ids, self.cache)
        tokens, shown = [], ""
        answer = self.model.generate(logits, self.cache, sampling.max_new_tokens, sampling.temperature,
                                     sampling.top_k, sampling.top_p)
        for token in answer:
            tokens.append(token.item())
            text = self.tokenizer.decode(tokens)  # the end-of-text token is special: decode skips it
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text


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
                for piece in chat.ask(check_text(line, "your question")):
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                chat = Conversation(model, tokenizer, image)  # the state holds a half answer: start over
            except UserError as e:
                print(f"error: {e}", end="")
            print()


def read_questions(path):
    """A JSONL question file -> list of dicts; any malformed line is an error naming it."""
    try:
        lines = decode(Path(path).read_bytes(), path).splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the question file ({e.strerror})") from None
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            if not isinstance(q, dict) or not isinstance(q.get("text"), str) or "question_id" not in q:
                raise ValueError("needs question_id and text")
            if not isinstance(q["question_id"], (str, int)):
                raise ValueError("question_id must be a string or an integer")
        except ValueError as e:
            raise UserError(f"{path}:{number}: malformed question ({e})") from None
        check_text(q["text"], f"{path}:{number}")
        questions.append(q)
    return questions


def answered(path: Path) -> set:
    """The question ids an interrupted run already wrote to the answers file. A last line cut short (a kill,
    a full disk) is removed, so the next answer starts on a line of its own."""
    data = path.read_bytes() if path.exists() else b""
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    done = set()
    for number, line in enumerate(decode(whole, path).splitlines(), 1):
        try:
            done.add(json.loads(line)["question_id"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: not an answer; is --answers the answers file of a run?") from None
    return done


def answer_file(model, tokenizer):
    """Answer every question of --questions into --answers (LLaVA's model_vqa format), resuming."""
    questions = read_questions(args.questions)
    folder = Path(args.image_folder).resolve()
    if not folder.is_dir():
        raise UserError(f"{args.image_folder}: no such image folder")
    answers = Path(args.answers)
    done = answered(answers)  # resume: keep what an interrupted run already wrote
    todo = [q for q in questions if q["question_id"] not in done]
    print(f"{len(questions)} questions, {len(done)} already answered, {len(todo)} to go", file=sys.stderr)
    skipped, t0 = 0, time.time()
    try:
        with open(answers, "a") as out:
            for start in range(0, len(todo), args.batch_size):
                batch = []  # (question, Conversation) pairs whose image loaded
                for q in todo[start:start + args.batch_size]:
                    try:
                        batch.append((q, Conversation(model, tokenizer, image_in_folder(folder, q.get("image", "")))))
                    except UserError as e:
                        skipped += 1
                        print(f"skipped question {q['question_id']}: {e}", file=sys.stderr)
                if batch:
                    pixel_values = torch.cat([chat.pixel_values for _, chat in batch])  # (b, 3, H, W)
                    prompts = [chat.prompt_ids(q["text"])[0].tolist() for q, chat in batch]
                    replies = model.generate_batch(pixel_values, prompts, args.max_new_tokens, args.temperature,
                                                   args.top_k, args.top_p)
                    for (q, _), reply in zip(batch, replies):
                        out.write(json.dumps(dict(question_id=q["question_id"], prompt=q["text"],
                                                  text=tokenizer.decode(reply).strip(), answer_id=uuid.uuid4().hex,
                                                  model_id=Path(args.ckpt).name, metadata={})) + "\n")
                    out.flush()
                i = min(start + args.batch_size, len(todo))
                eta = (time.time() - t0) / i * (len(todo) - i)
                print(f"\r{i}/{len(todo)} answered, {skipped} skipped, ETA {eta:.0f} s", end="", file=sys.stderr,
                      flush=True)
    except OSError as e:  # a full disk, say: end the progress line, then say what to do
        print(file=sys.stderr)
        raise UserError(f"{answers}: cannot write ({e.strerror}); free space, then run again: it resumes") from None
    print(f"\nwrote {answers} ({skipped} questions skipped)", file=sys.stderr)


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
        return serve(*load_model(args.ckpt, args.device), Conversation, args)
    if args.prompt is not None:
        check_text(args.prompt, "-p")
    check_outputs()
    model, tokenizer = load_model(args.ckpt, args.device)
    if args.questions:
        return answer_file(model, tokenizer)
    if args.image and args.demo:
        raise UserError("give --image or --demo, not both")
    if not args.image and not args.demo:
        raise UserError("give an image: --image PATH, or --demo for a generated scene")
    image = load_image(args.image) if args.image else demo_image()
    if args.prompt is not None:
        for piece in Conversation(model, tokenizer, image).ask(args.prompt):
            print(piece, end="", flush=True)
        print()
    else:
        interactive(model, tokenizer, image)


if __name__ == "__main__":
    run(main)
