"""Conversation templates: how (question, answer) turns become token ids and training labels.

The image is not in the text: its visual tokens always come first (paper figure 1), so a literal
`<image>` in the data is removed. Labels are IGNORE on the user's side of each turn; the model
learns only the assistant's answers, each ending with the end-of-text token (which is also the
stop token at generation time).
- plain  (stage-1 captioning, as LLaVA's `plain`): the caption follows the image directly.
- zephyr (chat-tuned LMs, as mamba-chat / Cobra): <|user|>\\n{q}<|endoftext|>\\n<|assistant|>\\n{a}<|endoftext|>
- base   (base LMs, as Cobra's `In:/Out:` prompt): In: {q}\\nOut: {a}<|endoftext|>
- compact (the tiny preset, trained from scratch): zephyr's role tokens alone, <|user|>{q}<|assistant|>{a}<|endoftext|>
Later turns are prefixed by a newline (compact: by nothing).
"""

from dataclasses import dataclass

EOT = "<|endoftext|>"  # GPT-NeoX's end of text, id 0
PAD = "<|padding|>"  # id 1
IGNORE = -100  # label of positions that carry no loss


@dataclass(frozen=True)
class Template:
    user: str  # the prompt of one turn, with {q}
    separator: str  # put in front of every turn but the first


TEMPLATES = {
    "plain": Template(user="", separator=""),
    "zephyr": Template(user="<|user|>\n{q}" + EOT + "\n<|assistant|>\n", separator="\n"),
    "base": Template(user="In: {q}\nOut: ", separator="\n"),
    "compact": Template(user="<|user|>{q}<|assistant|>", separator=""),
}


def prompt_text(question: str, template: str, first_turn: bool = True) -> str:
    """The text the model reads before it answers a question."""
    t = TEMPLATES[template]
    return ("" if first_turn else t.separator) + t.user.format(q=question.replace("<image>", "").strip())


def encode_turn(tokenizer, template: str, question: str, answer: str, first_turn: bool):
    """One (question, answer) turn -> (prompt ids, reply ids); the loss is on the reply alone."""
    return (tokenizer.encode(prompt_text(question, template, first_turn)).ids,
            tokenizer.encode(answer.strip() + EOT).ids)


def encode_conversation(tokenizer, turns, template: str, encode=encode_turn):
    """turns: [(question, answer), ...] -> (ids, labels), two equal-length lists of ints. `encode` is
    encode_turn or a function like it (train.py's remembers the shapes set's turns)."""
    ids, labels = [], []
    for i, (question, answer) in enumerate(turns):
        prompt, reply = encode(tokenizer, template, question, answer, i == 0)
        ids += prompt + reply
        labels += [IGNORE] * len(prompt) + reply
    return ids, labels
