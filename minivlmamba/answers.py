"""Batch answers for benchmarks, `chat.py --questions FILE --answers FILE`: every question of a question
file (JSONL: question_id, image, text) answered into an answers file in LLaVA's model_vqa format, a
batch of questions decoded together. A run that was interrupted is resumed: the questions its answers
file holds already are not asked again."""

import json
import sys
import time
import uuid
from pathlib import Path

import torch

from minivlmamba.cli import check_text, decode
from minivlmamba.config import UserError
from minivlmamba.conversation import Conversation
from minivlmamba.data import image_in_folder


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


def answer_file(model, tokenizer, args):
    """Answer every question of --questions into --answers (LLaVA's model_vqa format), resuming; `args`:
    chat.py's flags (the files, --image-folder, --batch-size, the sampling ones and --ckpt)."""
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
