"""Read rows (jsonl/json/csv/tsv/parquet, Hugging Face datasets), format them with templates, tokenise with loss
on the answer only, and batch by length.

A template turns a row into (input text, output text). Loss is on the output tokens only; with an empty
input template (`lm=True`) the whole text is the output, which is language modelling on a corpus.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import random
import string
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import SoftPromptError
from .hf_data import parse_source, read_hf_rows

csv.field_size_limit(2**31 - 1)


# ---- reading -------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows as dicts from a file, or from a Hugging Face dataset (a folder, `hf:ID[:CONFIG][@SPLIT]`; see
    hf_data.py). Errors name the file and line."""
    hf_source = parse_source(path)
    if hf_source is not None:
        return read_hf_rows(hf_source)
    path = Path(path)
    if not path.is_file():
        raise SoftPromptError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path)
    elif suffix == ".json":
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise SoftPromptError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        except ValueError as e:  # an integer over Python's 4,300-digit limit
            raise SoftPromptError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SoftPromptError(f"{path}: a .json data file must hold a list of objects")
    elif suffix in (".csv", ".tsv"):
        with io.StringIO(_read_text(path), newline="") as f:
            # skipinitialspace: hand-edited CSVs write `"a", "b, c"`; without it the space before the quote makes
            # the second cell unquoted and its commas split it (awesome-chatgpt-prompts has such a row).
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",",
                                    quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
                                    skipinitialspace=suffix == ".csv")
            if not reader.fieldnames:
                raise SoftPromptError(f"{path}: no header row")
            rows = []
            for row in reader:
                if None in row:  # more cells than headers
                    raise SoftPromptError(f"{path}:{reader.line_num}: more cells than the header has columns")
                rows.append(dict(row))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SoftPromptError("reading .parquet needs pyarrow: pip install pyarrow") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise SoftPromptError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
    if not rows:
        raise SoftPromptError(f"{path}: no rows")
    return rows


def _read_text(path: Path) -> str:
    """The whole file as text: UTF-8, a BOM dropped (Excel writes one), else a one-line error naming the line."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise SoftPromptError(f"{path}: the file is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        what = "binary data, not text" if b"\x00" in data[:4096] else f"not UTF-8 text (byte {data[e.start]:#04x})"
        raise SoftPromptError(f"{path}:{line}: {what}; data files must be UTF-8") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    # split on "\n" only: str.splitlines would also split inside strings holding U+2028 (valid JSON)
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SoftPromptError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        except ValueError as e:  # an integer over Python's 4,300-digit limit
            raise SoftPromptError(f"{path}:{lineno}: invalid JSON ({e})") from None
        if not isinstance(row, dict):
            raise SoftPromptError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


# ---- templates ------------------------------------------------------------------------------------


def parse_label_map(text: str | dict | None) -> dict[str, str] | None:
    """'0=negative,1=positive' -> {'0': 'negative', '1': 'positive'}."""
    if text is None or isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()} if text else None
    mapping = {}
    for part in text.split(","):
        if "=" not in part:
            raise SoftPromptError(f"label map entry {part!r} is not KEY=WORD (e.g. 0=negative,1=positive)")
        key, word = part.split("=", 1)
        mapping[key.strip()] = word.strip()
    return mapping


@dataclass
class Template:
    """How a row becomes (input, output) text. Saved with the prompt so eval/generate/serve reuse it."""

    input: str = "{input}"
    output: str | None = None  # default: " {output}" (one space after the input), or "{output}" with chat
    label_map: dict[str, str] | None = None
    chat: bool = False  # wrap the input in the tokenizer's chat template (instruct models)
    system: str | None = None  # system message for chat mode

    def __post_init__(self):
        if self.output is None:
            self.output = "{output}" if self.chat or not self.input else " {output}"
        self.label_map = parse_label_map(self.label_map)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Template:
        d = d or {}
        return cls(**{k: d[k] for k in ("input", "output", "label_map", "chat", "system") if k in d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fields(self, which: str = "both") -> list[str]:
        texts = {"input": [self.input], "output": [self.output], "both": [self.input, self.output]}[which]
        return [name for t in texts for _, name, _, _ in string.Formatter().parse(t) if name]

    def render_input(self, row: dict[str, Any], where: str = "row") -> str:
        return _format(self.input, self._mapped(row), where)

    def render_output(self, row: dict[str, Any], where: str = "row") -> str:
        text = _format(self.output, self._mapped(row), where, output=True)
        # The assistant turn starts the answer: " positive" (inline data's usual leading space) is "positive" there.
        return text.lstrip() if self.chat else text

    def _mapped(self, row: dict[str, Any]) -> dict[str, Any]:
        if not self.label_map:
            return row
        # The label map applies to the fields the output template reads (e.g. {label}).
        return {k: self.label_map.get(str(v), v) if k in self.fields("output") else v for k, v in row.items()}


@functools.lru_cache(maxsize=256)
def _plain_fields(template: str) -> tuple[str, ...]:
    """Fields a template uses whole (`{x}`, not `{x[0]}` or `{x.y}`)."""
    return tuple(n for _, n, _, _ in string.Formatter().parse(template) if n and n.isidentifier())


def _check_values(template: str, row: dict[str, Any], where: str, output: bool) -> None:
    """Values that would train on garbage text ("nan", "{'a': 1}", or an empty answer for null): refuse them."""
    for name in _plain_fields(template):
        v = row.get(name)
        if isinstance(v, float) and not math.isfinite(v):
            raise SoftPromptError(f"{where}: field {name!r} is {v} (NaN/Infinity), not text")
        if isinstance(v, (dict, list)):
            raise SoftPromptError(f"{where}: field {name!r} is a nested {'object' if isinstance(v, dict) else 'list'}, "
                                  "not text: flatten it, or use a template field like {" + name + "[key]}")
        if v is None and output and name in row:
            raise SoftPromptError(f"{where}: field {name!r} is null: there is no answer to learn or score")


def _format(template: str, row: dict[str, Any], where: str, *, output: bool = False) -> str:
    _check_values(template, row, where, output)
    try:
        return template.format(**{k: "" if v is None else v for k, v in row.items()})
    except KeyError as e:
        raise SoftPromptError(f"{where}: template field {e.args[0]!r} is missing (row has: {', '.join(row) or 'nothing'})") from None
    except (IndexError, ValueError) as e:
        raise SoftPromptError(f"{where}: bad template {template!r} ({e})") from None


# ---- tokenising -----------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on input tokens
    n_input: int  # how many of input_ids are the input (the rest is the output)


@dataclass
class Encoder:
    """Tokenises rows with a Template. Input and output are tokenised separately and concatenated, so
    the output's tokens are the same whatever the input (as label scoring needs)."""

    tokenizer: Any
    template: Template
    max_length: int = 1024  # tokens per row, virtual tokens not counted
    append_eos: bool = True
    # A row with no input: its first token is predicted by the last virtual token when an input-embedding prompt
    # is in front (training: PEFT trains it too); without one (untuned, deep prompt) nothing precedes it.
    score_first: bool = False
    truncated: int = field(default=0, init=False)  # rows whose input lost its start
    answers_cut: int = field(default=0, init=False)  # rows whose output (LM: the text) alone was too long: end cut

    def input_ids(self, text: str) -> list[int]:
        if self.template.chat:
            messages = ([{"role": "system", "content": self.template.system}] if self.template.system else [])
            messages.append({"role": "user", "content": text})
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if not text:
            bos = self.tokenizer.bos_token_id
            return [bos] if bos is not None and _adds_bos(self.tokenizer) else []
        return self.tokenizer(text)["input_ids"]

    def output_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if self.append_eos and eos is not None else ids

    def encode_pair(self, input_ids: list[int], output_ids: list[int]) -> Encoded:
        # Too long: keep the answer, drop the start of the input (left truncation), and count it.
        overflow = len(input_ids) + len(output_ids) - self.max_length
        if overflow > 0:
            cut = min(overflow, len(input_ids))
            input_ids = input_ids[cut:]
            if len(output_ids) > self.max_length - len(input_ids):
                self.answers_cut += 1
                output_ids = output_ids[: self.max_length - len(input_ids)]
            else:
                self.truncated += 1
        labels = [-100] * len(input_ids) + output_ids
        if not input_ids and not self.score_first:
            # Nothing precedes the first token without a prompt: evaluation leaves it unscored so that tuned and
            # untuned losses cover the same tokens.
            labels[0] = -100
        return Encoded(input_ids + output_ids, labels, len(input_ids))

    def encode_rows(self, rows: list[dict[str, Any]], source: str = "data") -> list[Encoded]:
        out = []
        for i, row in enumerate(rows, 1):
            where = f"{source}: row {i}"
            ids_in = self.input_ids(self.template.render_input(row, where))
            ids_out = self.output_ids(self.template.render_output(row, where))
            if not ids_out or (len(ids_out) == 1 and self.append_eos and not self.template.render_output(row, where)):
                raise SoftPromptError(f"{where}: the output is empty, so there is nothing to learn")
            out.append(self.encode_pair(ids_in, ids_out))
        if self.truncated:
            warnings.warn(f"{source}: {self.truncated} rows longer than {self.max_length} tokens were truncated "
                          "from the left of the input (the answer is kept)", stacklevel=2)
        if self.answers_cut:
            warnings.warn(f"{source}: {self.answers_cut} rows were cut at the end: their output alone is longer than "
                          f"{self.max_length} tokens (--max-length raises the limit)", stacklevel=2)
        self.truncated = self.answers_cut = 0
        return out


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def label_set(template: Template, rows: list[dict[str, Any]], max_labels: int = 20) -> list[str] | None:
    """The distinct outputs when they form a small label set (classification), else None."""
    if template.label_map:
        return list(dict.fromkeys(template.render_output({f: k for f in template.fields("output")})
                                  for k in template.label_map))
    outputs = list(dict.fromkeys(template.render_output(r) for r in rows))
    if 1 < len(outputs) <= max_labels and len(outputs) * 2 <= len(rows):
        return outputs
    return None


# ---- batching -------------------------------------------------------------------------------------


def collate(examples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids / attention_mask / labels, each [B, T]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int, by_length: bool = True) -> list[list[int]]:
    """Index batches for one epoch, a pure function of (seed, epoch) so a resumed run sees the same order.

    by_length: shuffle, cut into chunks of 50 batches, sort each chunk by length, then shuffle the batches:
    little padding, but still random order.
    """
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if by_length:
        chunk = batch_size * 50
        order = [i for s in range(0, len(order), chunk) for i in sorted(order[s:s + chunk], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if by_length:
        rng.shuffle(batches)
    return batches


def iter_chunks(items: list, size: int) -> Iterator[list]:
    for s in range(0, len(items), size):
        yield items[s:s + size]
