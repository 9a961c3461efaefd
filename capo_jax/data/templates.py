"""Prompt templates and reference-answer normalisation shared by training data and benchmarks."""
from __future__ import annotations

import re
import string
from typing import Any

# The default math prompt (the Qwen2.5-Math style instruction).
MATH_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
# Multiple choice: the question already carries its lettered options.
CHOICE_TEMPLATE = (
    "{question}\nPlease reason step by step, and put the letter of the correct option within \\boxed{{}}."
)
ANSWER_FORMATS = ("raw", "gsm8k", "boxed")


_ESCAPE = re.compile(r"\\(\\|n|t(?![a-z]))")
_ESCAPED = {"\\": "\\", "n": "\n", "t": "\t"}


def read_escapes(text: str) -> str:
    """A template typed in a shell with its escapes read: `\\n` -> newline, `\\t` -> tab, `\\\\` -> backslash.

    Other backslashes stay as typed (LaTeX such as `\\boxed`, `\\frac`, and `\\t` before a letter: `\\text`, `\\times`);
    `\\n` is always a newline, so LaTeX's `\\neq` is typed `\\\\neq`.
    """
    return _ESCAPE.sub(lambda m: _ESCAPED[m.group(1)[0]], text)


def literal_newline_warning(template: str) -> str | None:
    """A warning when a template still holds a literal backslash-n (almost always a newline meant), else None."""
    if "\\n" not in template:
        return None
    return ("the prompt template holds a literal backslash-n (two characters), not a newline: pass --template "
            "'{question}\\n' (read as a newline) or a real newline; ignore this if the backslash is meant (LaTeX such as \\neq)")


def check_template(template: str) -> str:
    """Return `template` if it is a format string whose only field is `{question}`; raise otherwise."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"prompt template {template!r} is not a valid format string ({e}); write literal braces as {{{{ }}}}") from None
    if fields != {"question"}:
        raise ValueError(
            f"prompt template {template!r} must use exactly the field {{question}} (found {sorted(fields)}); "
            "write literal braces as {{ }}"
        )
    return template


def render_prompt(
    question: str,
    template: str,
    *,
    tokenizer: Any = None,
    use_chat_template: bool = False,
    system_prompt: str = "",
) -> str:
    """The prompt text: `template` filled with the question, optionally wrapped by the tokenizer's chat template."""
    text = template.format(question=question)
    if not use_chat_template:
        return text
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template is set but the tokenizer has no chat template; unset it or use an instruct tokenizer")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, prompt: str, *, use_chat_template: bool = False) -> list[int]:
    """Token ids of a rendered prompt: a chat-templated prompt already holds its special tokens."""
    return list(tokenizer(prompt, add_special_tokens=not use_chat_template)["input_ids"])


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def normalize_answer(value: Any, answer_format: str) -> str | None:
    """The reference answer of a record as text, or None when it is missing or cannot be extracted."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if value is None or isinstance(value, (dict, list, tuple)):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # e.g. AMC23 stores 10.0 for the answer 10
    text = str(value).strip()
    if answer_format == "gsm8k":
        if "####" not in text:
            return None
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_format == "boxed":
        text = last_boxed(text) or ""
    return text or None
