"""A conversation with the model about one image, as chat.py holds it in the terminal, in batch answers
and on the web page: the model reads the image and each question once, and its recurrent state carries
everything said so far, so every new token costs the same however long the chat gets."""

import sys

import torch

from minivlmamba.templates import prompt_text


def warn(message):
    """The terminal's warning: a line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


class Conversation:
    """One image and the recurrent state of everything said about it so far."""

    def __init__(self, model, tokenizer, image, warn=warn):
        self.model, self.tokenizer, self.cache, self.warn = model, tokenizer, None, warn
        self.device = next(model.parameters()).device  # the model's
        self.pixel_values = model.vision.preprocess([image]).to(self.device)

    def prompt_ids(self, question):
        cfg = self.model.cfg
        ids = self.tokenizer.encode(prompt_text(question, cfg.template, first_turn=self.cache is None)).ids
        budget = cfg.max_len - cfg.vision.num_patches
        if len(ids) > budget:
            self.warn(f"prompt of {len(ids)} tokens truncated to the model's budget of {budget}")
            ids = ids[-budget:]
        return torch.tensor([ids], device=self.device)

    def ask(self, question, sampling):
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
