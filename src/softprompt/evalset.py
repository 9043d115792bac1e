"""The rows of an evaluation, encoded once: what `prepare` makes and every scorer (scoring.py), the evaluation
(evaluate.py) and the ensembles (ensemble.py) read.

Task kinds: classification (a small label set, scored label by label), generation (distinct inputs and their
references), lm (loss and perplexity of the output text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .data import Encoded, Encoder, Template, label_set
from .errors import SoftPromptError
from .model import BaseModel

TASKS = ("auto", "classification", "generation", "lm")


@dataclass
class EvalSet:
    """Rows encoded once, reusable for every prompt evaluated on them."""

    examples: list[Encoded]  # input + gold output, for the loss
    inputs: list[list[int]]  # input ids per row, for label scoring
    labels: list[str] | None  # candidate label texts (classification) or None
    label_ids: list[list[int]] | None  # tokenised candidates
    gold: list[int] | None  # index into labels per row
    kind: str = "lm"  # classification | generation | lm (loss and perplexity only)
    gen_inputs: list[list[int]] = field(default_factory=list)  # generation: one per distinct input
    refs: list[list[str]] = field(default_factory=list)  # generation: the references of each distinct input
    stop: list[str] = field(default_factory=list)  # generation: stop strings
    max_new_tokens: int = 64


def resolve_task(task: str | None, template: Template, rows: list[dict[str, Any]],
                 labels: list[str] | None = None) -> str:
    """'auto' -> lm for an empty input template, classification for a small label set, else generation."""
    if task not in (None, *TASKS):
        raise SoftPromptError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task and task != "auto":
        return task
    if not template.input:
        return "lm"
    return "classification" if (labels or label_set(template, rows)) else "generation"


def with_prefix(template: Template, prefix: str) -> Template:
    """The same template with fixed text (an instruction, in-context examples) before the input."""
    if not prefix:
        return template
    escaped = prefix.replace("{", "{{").replace("}", "}}")
    return Template(input=escaped + template.input, output=template.output, label_map=template.label_map,
                    chat=template.chat, system=template.system)


def prepare(base: BaseModel, template: Template, rows: list[dict[str, Any]], *, source: str = "data",
            max_length: int = 512, labels: list[str] | None = None, task: str | None = None, prefix: str = "",
            max_new_tokens: int | None = None, stop: Sequence[str] | None = None) -> EvalSet:
    """Encode `rows` for evaluation. `task` None keeps the training-time behaviour: classification when the
    outputs form a small label set, else loss only. `prefix` is text placed before every input (baselines)."""
    if task is None:
        kind = "classification" if (labels or label_set(template, rows)) else "lm"
    else:
        kind = resolve_task(task, template, rows, labels)
    unprefixed = template
    template = with_prefix(template, prefix)
    encoder = Encoder(base.tokenizer, template, max_length=max_length)
    examples = encoder.encode_rows(rows, source)
    if prefix and not unprefixed.input:
        # Without a prefix the first token of a corpus row is unscored (nothing precedes it); keep the scored
        # tokens identical across systems so their losses compare.
        for e in examples:
            if e.n_input < len(e.labels):
                e.labels[e.n_input] = -100
    inputs = [e.input_ids[: e.n_input] for e in examples]
    if kind == "classification":
        labels = labels if labels is not None else label_set(unprefixed, rows)
        if not labels:
            raise SoftPromptError(f"{source}: classification needs a small label set (a --label-map, or few "
                                  "distinct outputs), found none")
        # Rank classification scores the label's own tokens, without EOS: fair to an untuned model, which
        # has no reason to stop right after the label.
        label_ids = [Encoder(base.tokenizer, template, append_eos=False).output_ids(text) for text in labels]
        if any(not ids for ids in label_ids):
            raise SoftPromptError(f"{source}: a label tokenises to nothing: {labels}")
        gold = []
        for i, row in enumerate(rows, 1):
            answer = template.render_output(row, f"{source}: row {i}")
            gold.append(labels.index(answer) if answer in labels else -1)
        return EvalSet(examples, inputs, labels, label_ids, gold, kind="classification")
    evalset = EvalSet(examples, inputs, None, None, None, kind=kind)
    if kind == "generation":
        groups: dict[str, int] = {}
        for i, row in enumerate(rows):
            key = template.render_input(row, f"{source}: row {i + 1}")
            if key not in groups:
                groups[key] = len(evalset.gen_inputs)
                evalset.gen_inputs.append(inputs[i])
                evalset.refs.append([])
            evalset.refs[groups[key]].append(template.render_output(row).strip())
        longest = max(len(e.input_ids) - e.n_input for e in examples)
        evalset.max_new_tokens = max_new_tokens or min(256, int(longest * 1.25) + 8)
        no_newlines = not any("\n" in r for refs in evalset.refs for r in refs)
        evalset.stop = list(stop) if stop is not None else (["\n"] if no_newlines else [])
    return evalset
