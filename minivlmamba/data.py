"""From files and samples to tensors: safe image loading, LLaVA data, tokenized conversations, batches.

Shape legend: b batch, l text length.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from minivlmamba.config import UserError
from minivlmamba.templates import IGNORE, encode_conversation, encode_turn
from minivlmamba.vision import preprocess_image, to_rgb

PAD_ID = 1  # <|padding|>
MAX_IMAGE_PIXELS = 8192 * 8192  # more than this is refused as a possible decompression bomb


def eight_bit(img: Image.Image) -> Image.Image:
    """A 16- or 32-bit grayscale image (modes I;16*, I, F) -> 8 bits (L), scaled as a viewer shows it (Pillow's
    own conversion clips at 255, so most such images turn white); other modes as they are.
    I;16: 16 bits. I (32-bit integers, and 16-bit PNGs in older Pillow): the smallest range of 8, 16 or 32
    bits that holds its largest value. F: [0, 1] if it holds every value, else [0, 255]."""
    if not img.mode.startswith(("I", "F")):
        return img
    values = np.asarray(img, dtype=np.float64)
    top = values.max(initial=0)
    if img.mode == "F":
        full = 1.0 if top <= 1 else 255.0
    elif img.mode == "I":
        full = next(f for f in (255.0, 65535.0, 2.0**31 - 1) if top <= f)
    else:  # I;16, I;16B, ...
        full = 65535.0
    return Image.fromarray((np.clip(values / full, 0, 1) * 255).round().astype(np.uint8))


def load_image(path) -> Image.Image:
    """Open an image file as RGB, the way a viewer shows it (turned as its EXIF orientation says, 16-bit
    values scaled to 8), or raise a UserError that says in one line what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"{path}: image too large ({img.width}x{img.height} pixels)")
                img.load()
                return to_rgb(eight_bit(ImageOps.exif_transpose(img)))
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: image too large (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError) as e:  # unidentified, truncated or corrupt files
        raise UserError(f"{path}: not a readable image ({e})") from None


def image_path(folder: Path, name) -> Path:
    """The path of image `name` relative to the resolved `folder`; a name that escapes it is a UserError."""
    if not isinstance(name, str):
        raise UserError(f"{name!r}: an image must be a file name")
    path = (folder / name).resolve()
    if not path.is_relative_to(folder):
        raise UserError(f"{name}: outside the image folder")
    return path


def image_in_folder(folder: Path, name) -> Image.Image:
    return load_image(image_path(folder, name))


def encode_sample(tokenizer, template, turns, max_text_len, encode=encode_turn):
    """(question, answer) turns -> (ids, labels) tensors, cut to max_text_len tokens (`encode`: as
    encode_conversation's)."""
    ids, labels = encode_conversation(tokenizer, turns, template, encode)
    return torch.tensor(ids[:max_text_len]), torch.tensor(labels[:max_text_len])


def collate(pixel_values, encoded):
    """Right-pad a batch: a Mamba LM is causal, so padding after a sequence never changes it.

    pixel_values: list of (3, H, W), or (b, 3, H, W) already; encoded: list of (ids, labels)
    -> (b, 3, H, W), (b, l), (b, l).
    """
    l = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), l), PAD_ID)
    labels = torch.full((len(encoded), l), IGNORE)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, :len(ids)], labels[i, :len(lab)] = ids, lab
    return pixel_values if torch.is_tensor(pixel_values) else torch.stack(pixel_values), input_ids, labels


class BadSample(Exception):
    """A sample a long run skips and counts instead of crashing."""


def read_llava_json(path) -> list:
    """LLaVA's training file: a JSON list of {id, image?, conversations: [{from, value}, ...]}."""
    try:
        records = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read the data file ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty JSON list of samples")
    return records


def conversation_turns(record) -> list:
    """[{from: human, value}, {from: gpt, value}, ...] -> [(question, answer), ...], or BadSample."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise BadSample("conversations must be a non-empty list of human/gpt pairs")
    pairs = []
    for human, gpt in zip(turns[0::2], turns[1::2]):
        ok = all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (human, gpt))
        if not ok or human.get("from") != "human" or gpt.get("from") != "gpt":
            raise BadSample("a turn is not a {from: human|gpt, value} pair in order")
        pairs.append((human["value"], gpt["value"]))
    return pairs


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format samples -> (pixel_values (3, H, W), ids, labels), or for a bad sample why it is bad.

    `problems` says why each sample is bad that can be told without reading an image (a malformed
    conversation, a missing image file); a data file with no other sample is a UserError.

    Text-only samples are shown a blank image (the mean colour, zeros after normalisation), so
    every sequence of a batch has the image tokens in the same place.
    """

    def __init__(self, json_path, image_folder, tokenizer, template, vision_cfg, max_text_len):
        self.records = read_llava_json(json_path)
        self.folder = Path(image_folder).resolve()
        if not self.folder.is_dir():
            raise UserError(f"{image_folder}: no such image folder")
        self.tokenizer, self.template = tokenizer, template
        self.vision_cfg, self.max_text_len = vision_cfg, max_text_len
        self.problems = [problem for problem in map(self.problem, self.records) if problem]
        if len(self.problems) == len(self.records):
            raise UserError(f"{json_path}: none of its {len(self.records)} samples can be used (the first: "
                            f"{self.problems[0]}); check the file and --image-folder")

    def problem(self, record) -> str | None:
        """Why the sample is bad, if its text or the existence of its image tell."""
        try:
            conversation_turns(record)
            if "image" in record and not image_path(self.folder, record["image"]).is_file():
                raise UserError(f"{self.folder / record['image']}: no such image file")
        except (BadSample, UserError) as e:
            return str(e)
        return None

    def __len__(self):
        return len(self.records)

    def text_lengths(self):
        """Words in each sample's conversation: a cheap stand-in for its token count (0 if malformed)."""
        def words(record):
            try:
                return sum(len(turn["value"].split()) for turn in record["conversations"])
            except (TypeError, KeyError, AttributeError):
                return 0
        return [words(record) for record in self.records]

    def image(self, name):
        try:
            return preprocess_image(image_in_folder(self.folder, name), self.vision_cfg)
        except UserError as e:
            raise BadSample(str(e)) from None

    def __getitem__(self, i):
        record = self.records[i]
        try:
            turns = conversation_turns(record)
            size = self.vision_cfg.image_size
            pixels = self.image(record["image"]) if "image" in record else torch.zeros(3, size, size)
        except BadSample as e:
            return str(e)
        return pixels, *encode_sample(self.tokenizer, self.template, turns, self.max_text_len)


def sample_order(lengths, batch_size, seed, group=True, window=64):
    """The order a run visits the samples in: a seeded shuffle, fixed for the run (so a resume, on
    any number of processes, continues it exactly). With group, each stretch of `window` batches is
    sorted by length and cut into batches, which are shuffled again: every batch then holds samples
    of similar length, and padding (which a Mamba must still read) shrinks."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group:
        return order
    grouped = []
    for start in range(0, len(order), window * batch_size):
        stretch = sorted(order[start:start + window * batch_size], key=lengths.__getitem__)
        batches = [stretch[i:i + batch_size] for i in range(0, len(stretch), batch_size)]
        grouped += [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]
    return grouped


def collate_good(samples):
    """A DataLoader collate_fn: drop the bad samples (their reasons, strings), batch the rest (None if none)
    -> (batch, reasons)."""
    good = [s for s in samples if not isinstance(s, str)]
    bad = [s for s in samples if isinstance(s, str)]
    return (collate([s[0] for s in good], [s[1:] for s in good]) if good else None), bad
