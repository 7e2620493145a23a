"""Training data from a JSON or JSONL file, for ``badam-ext train --model PATH --data FILE``.

Each record is one example in one of the common shapes (the first that matches):

- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``:
  rendered with the tokenizer's chat template; the loss is on the assistant turns;
- ``{"instruction": ..., "input": ..., "output": ...}`` (alpaca; ``input`` and ``system`` optional):
  a user turn and an assistant turn through the chat template when the tokenizer has one, else a
  plain ``### Instruction / ### Input / ### Response`` prompt; the loss is on ``output``;
- ``{"prompt": ..., "completion": ...}``: the two strings joined, the loss on ``completion``;
- ``{"text": ...}``: the loss on every token.

Plain-text shapes get the tokenizer's leading special tokens (BOS) and end with its EOS (trained).
Labels are -100 on prompt tokens and padding. Examples are padded to ``seq_len``, or packed: whole
examples placed one after another in rows of ``seq_len`` (an example then attends to the examples
before it in its row). A file is read whole and every record checked before training starts; a bad
one raises :class:`DataError` naming the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

IGNORE_INDEX = -100
SHAPES = "text; prompt + completion; instruction + output (alpaca); messages"
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Record:
    """One JSON object of the file and the line it starts on (1-based)."""

    data: Any
    line: int


def read_records(path: str | Path) -> list[Record]:
    """The records of a JSONL file (one object per line) or a JSON file (an array of objects, or one object)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    start = len(text) - len(text.lstrip())
    if start < len(text) and text[start] == "[":
        records = list(_json_array(path, text, start))
    elif path.suffix == ".json" and _one_object(text) is not None:  # a .json file holding a single record
        records = [Record(_one_object(text), text.count("\n", 0, start) + 1)]
    else:
        records = list(_json_lines(path, text))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _one_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # read as JSONL, whose errors name the line
    return value if isinstance(value, dict) else None


def _json_lines(path: Path, text: str) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield Record(json.loads(line), number)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None


def _json_array(path: Path, text: str, start: int) -> Iterator[Record]:
    """The elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, start + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield Record(value, line)
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: text after the closing ']'")
            return
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' in the JSON array")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ------------------------------------------------------------------------------- formatting
Segments = list[tuple[str, bool]]  # (text, trained) in order


def record_segments(data: Any, tokenizer: Any) -> tuple[Segments, bool]:
    """The record as text segments marked trained or not, and whether it went through the chat template.

    Raises ValueError (without the location; :func:`load_examples` adds it) for a record of no known shape.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a record must be a JSON object with one of the fields {SHAPES}; got {type(data).__name__}")
    if "messages" in data:
        return _chat_segments(_messages(data["messages"]), tokenizer), True
    if "instruction" in data and "output" in data:
        instruction = _string(data, "instruction")
        extra = _string(data, "input") if data.get("input") else ""
        output = _string(data, "output")
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": _string(data, "system")}] if data.get("system") else []
            user = f"{instruction}\n\n{extra}" if extra else instruction
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            return _chat_segments(messages, tokenizer), True
        prompt = f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "") + "### Response:\n"
        return [(prompt, False), (output, True)], False
    if "prompt" in data and "completion" in data:
        return [(_string(data, "prompt"), False), (_string(data, "completion"), True)], False
    if "text" in data:
        return [(_string(data, "text"), True)], False
    raise ValueError(f"the record has none of the known fields ({SHAPES}); its fields: {sorted(data)}")


def _string(data: dict, key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a role in {ROLES} and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("the conversation has no assistant message: nothing to train on")
    return out


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> Segments:
    """Split the rendered conversation into prompt parts and assistant parts by rendering prefixes."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, needed for 'messages' records "
                         "(set tokenizer.chat_template, or use prompt/completion records)")

    def render(upto: int, generation_prompt: bool) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    segments: Segments = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render the conversation prefix by prefix, so the "
                             "assistant tokens cannot be located")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = render(len(messages), False)
    if whole.startswith(done) and len(whole) > len(done):
        segments.append((whole[len(done):], False))
    return [(text, trained) for text, trained in segments if text]


def tokenize_segments(segments: Segments, tokenizer: Any, templated: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not trained) of one example."""
    ids: list[int] = []
    labels: list[int] = []
    if not templated:  # the BOS the tokenizer itself would add, never trained
        lead = _leading_bos(tokenizer)
        ids += lead
        labels += [IGNORE_INDEX] * len(lead)
    for text, trained in segments:
        part = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
    eos = getattr(tokenizer, "eos_token_id", None)
    if not templated and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def _leading_bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if list(tokenizer("a", add_special_tokens=True)["input_ids"])[:1] == [bos] else []


# --------------------------------------------------------------------------------- examples
@dataclass(eq=False)
class Examples(torch.utils.data.Dataset):
    """Rows of ``seq_len`` tokens: ``input_ids``, ``labels`` (-100 on prompts and padding), ``attention_mask``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    num_examples: int
    source: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows ``indices`` as model keyword arguments."""
        return {"input_ids": self.input_ids[indices], "labels": self.labels[indices],
                "attention_mask": self.attention_mask[indices]}

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def load_examples(path: str | Path, tokenizer: Any, seq_len: int, pack: bool = False) -> Examples:
    """Read, check and tokenize every record of ``path``; rows padded (or packed) to ``seq_len``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    encoded: list[tuple[list[int], list[int]]] = []
    for record in read_records(path):
        where = f"{path}:{record.line}"
        try:
            segments, templated = record_segments(record.data, tokenizer)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        ids, labels = tokenize_segments(segments, tokenizer, templated)
        if len(ids) > seq_len:
            raise DataError(f"{where}: the example is {len(ids)} tokens, longer than --seq-len {seq_len} "
                            "(raise --seq-len, or shorten or drop the example)")
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{where}: the example has no response tokens to train on")
        encoded.append((ids, labels))
    rows = _pack(encoded, seq_len) if pack else [[e] for e in encoded]
    pad = _pad_id(tokenizer)
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    labels_t = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        ids = [t for e, _ in row for t in e]
        lab = [t for _, e in row for t in e]
        input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels_t[r, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[r, :len(ids)] = 1
    return Examples(input_ids, labels_t, mask, num_examples=len(encoded), source=str(path))


def _pack(encoded: Sequence[tuple[list[int], list[int]]], seq_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """Whole examples in file order, a new row whenever the next one does not fit."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len
    for example in encoded:
        if used + len(example[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example[0])
    return rows


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
