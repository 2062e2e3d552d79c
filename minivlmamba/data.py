"""From files and samples to tensors: safe image loading, tokenized conversations, padded batches.

Shape legend: b batch, l text length.
"""

import warnings

import torch
from PIL import Image

from minivlmamba.config import UserError
from minivlmamba.templates import IGNORE, encode_conversation
from minivlmamba.vision import to_rgb

PAD_ID = 1  # <|padding|>
MAX_IMAGE_PIXELS = 8192 * 8192  # more than this is refused as a possible decompression bomb


def load_image(path) -> Image.Image:
    """Open an image file as RGB, or raise a UserError that says in one line what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise UserError(f"{path}: image too large ({img.width}x{img.height} pixels)")
                img.load()
                return to_rgb(img)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path}: image too large (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError) as e:  # unidentified, truncated or corrupt files
        raise UserError(f"{path}: not a readable image ({e})") from None


def encode_sample(tokenizer, template, turns, max_text_len):
    """(question, answer) turns -> (ids, labels) tensors, cut to max_text_len tokens."""
    ids, labels = encode_conversation(tokenizer, turns, template)
    return torch.tensor(ids[:max_text_len]), torch.tensor(labels[:max_text_len])


def collate(pixel_values, encoded):
    """Right-pad a batch: a Mamba LM is causal, so padding after a sequence never changes it.

    pixel_values: list of (3, H, W); encoded: list of (ids, labels) -> (b, 3, H, W), (b, l), (b, l).
    """
    l = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), l), PAD_ID)
    labels = torch.full((len(encoded), l), IGNORE)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, :len(ids)], labels[i, :len(lab)] = ids, lab
    return torch.stack(pixel_values), input_ids, labels
