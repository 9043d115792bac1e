"""Honest numbers for a soft prompt and its baselines, on the same examples.

Task kinds:
- classification: each candidate label (possibly several tokens, no EOS) is scored as a continuation of the
  input and the most likely one is the prediction (rank classification: no text parsing). Accuracy, macro-F1,
  and the answer loss.
- generation: greedy decoding, then exact match, token F1, ROUGE-L and BLEU (sacrebleu / rouge-score) against
  every reference of the input (rows with the same input are one example with several references).
- lm: loss and perplexity of the output text (held-out corpus; with an empty input template).

Systems compared in one table: the untuned model (template only), a hand-written instruction before the
input, k-shot in-context examples before the input, and any number of soft prompts (and, for several prompts
on a classification task, their ensembles: ensemble.py). The rows are encoded by evalset.py and scored by
scoring.py.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import EvalConfig, from_call
from .data import Template, label_set, read_rows
from .ensemble import evaluate_ensemble
from .errors import SoftPromptError
from .evalset import EvalSet, prepare, resolve_task
from .hf_data import is_local_dataset
from .metrics import accuracy, generation_metrics, macro_f1
from .model import BaseModel, load_model
from .progress import progress_bar
from .prompt import SoftPrompt, as_prompt, prompt_base_source
from .sampling import cut_at_stop
from .scoring import label_scores, prompt_tensor, single_token_ok, single_token_scores_and_loss, token_loss

BASELINES = ("untuned", "instruction", "kshot")


def kshot_prefix(template: Template, rows: list[dict[str, Any]], k: int, seed: int = 0, source: str = "shots") -> str:
    """k training rows, formatted with the template (input + answer), each followed by a blank line.

    With a small label set the rows are drawn round-robin over labels (a seeded draw within each label), so
    every class is shown; otherwise a seeded sample.
    """
    if k <= 0 or not rows:
        return ""
    rng = random.Random(seed)
    labels = label_set(template, rows) if template.input else None
    if labels:
        by_label: dict[str, list[dict]] = {}
        for row in rows:
            by_label.setdefault(template.render_output(row, source), []).append(row)
        pools = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
        picked, i = [], 0
        while len(picked) < k and any(pools):
            if pools[i % len(pools)]:
                picked.append(pools[i % len(pools)].pop())
            i += 1
        rng.shuffle(picked)
    else:
        picked = rng.sample(rows, min(k, len(rows)))
    shots = []
    for r in picked:
        answer = template.render_output(r, source)
        # In chat mode the answer has no leading space (the assistant turn separates it); inline it needs one.
        shots.append(template.render_input(r, source) + (" " + answer.lstrip() if template.chat else answer))
    return "".join(s.strip("\n") + "\n\n" for s in shots)


@torch.no_grad()
def generate_predictions(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 16,
                         progress: bool = False) -> list[str]:
    """Greedy continuations of each distinct input, cut at EOS and the stop strings."""
    from .generate import generate_ids

    new = generate_ids(base, evalset.gen_inputs, prompt_tensor(prompt), max_new_tokens=evalset.max_new_tokens,
                       stop=evalset.stop, batch_size=batch_size)
    return [cut_at_stop(base.tokenizer.decode(ids, skip_special_tokens=True), evalset.stop).strip() for ids in new]


def score(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """{'loss', 'perplexity', 'n'}; classification adds accuracy, macro_f1, labels, predictions; generation
    adds exact_match, token_f1, rougeL, bleu, predictions (one per distinct input)."""
    scores = None
    if evalset.labels and single_token_ok(evalset) and not base.is_encoder_decoder:
        scores, nll, count = single_token_scores_and_loss(base, prompt_tensor(prompt), evalset, batch_size, progress)
        loss = nll / max(count, 1)
    else:
        loss = token_loss(base, prompt, evalset.examples, batch_size, progress)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(evalset.examples)}
    if evalset.labels:
        if scores is None:
            scores = label_scores(base, prompt, evalset, batch_size * 2, progress)
        predictions = scores.argmax(1).tolist()
        result["accuracy"] = accuracy(predictions, evalset.gold)
        result["macro_f1"] = macro_f1(predictions, evalset.gold, len(evalset.labels))
        result["labels"] = evalset.labels
        result["predictions"] = [evalset.labels[p] for p in predictions]
    elif evalset.kind == "generation":
        predictions = generate_predictions(base, prompt, evalset, batch_size, progress)
        result.update(generation_metrics(predictions, evalset.refs))
        result["n_inputs"] = len(evalset.gen_inputs)
        result["predictions"] = predictions
    return result


# ---- several systems on the same examples -----------------------------------------------------------


@dataclass
class System:
    """One row of the comparison: a soft prompt (or none) and text placed before the input (or none)."""

    name: str
    prompt: SoftPrompt | torch.Tensor | None = None
    prefix: str = ""
    source: str | None = None  # where the prompt came from, for the report


def compare(base: BaseModel, template: Template, rows: list[dict[str, Any]], systems: Sequence[System], *,
            task: str = "auto", source: str = "data", max_length: int = 512, batch_size: int = 16,
            max_new_tokens: int | None = None, stop: Sequence[str] | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Score every system on the same rows. Returns {'task', 'data', 'n', 'systems': [metrics + 'system']}."""
    kind = resolve_task(task, template, rows)
    max_length = min(max_length, base.max_positions - max((_n_virtual(s.prompt) for s in systems), default=0))
    sets: dict[str, EvalSet] = {}
    results = []
    bar = progress_bar(systems, desc="eval", disable=not progress or len(systems) < 2, leave=False)
    for system in bar:
        bar.set_postfix_str(system.name)
        if system.prefix not in sets:
            sets[system.prefix] = prepare(base, template, rows, source=source, max_length=max_length, task=kind,
                                          prefix=system.prefix, max_new_tokens=max_new_tokens, stop=stop)
        metrics = score(base, system.prompt, sets[system.prefix], batch_size, progress)
        results.append({"system": system.name, "prompt": system.source, **metrics})
    report: dict[str, Any] = {"task": kind, "data": source, "n": len(rows), "systems": results}
    if kind == "classification" and results:
        report["labels"] = results[0]["labels"]
    return report


def _n_virtual(prompt) -> int:
    tensor = prompt_tensor(prompt)
    return 0 if tensor is None else int(tensor.shape[0])


METRIC_COLUMNS = {
    "classification": ("accuracy", "macro_f1", "loss"),
    "generation": ("bleu", "rougeL", "token_f1", "exact_match", "loss"),
    "lm": ("loss", "perplexity"),
}


def format_table(report: dict[str, Any]) -> str:
    """A plain aligned text table of a `compare` report."""
    columns = METRIC_COLUMNS[report["task"]]
    header = ["system", *columns]
    body = []
    for r in report["systems"]:
        cells = [r["system"]]
        for c in columns:
            v = r.get(c)
            if v is None:
                cells.append("-")
            elif c in ("accuracy", "macro_f1", "rougeL", "token_f1", "exact_match"):
                cells.append(f"{100 * v:.1f}")
            elif c == "bleu":
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.4f}" if c == "loss" else f"{v:.2f}")
        body.append(cells)
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for row in body:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    n_note = f"{report['n']} rows"
    if report["task"] == "generation" and report["systems"]:
        n_note += f", {report['systems'][0]['n_inputs']} distinct inputs"
    head = f"{report['task']} on {report['data']} ({n_note})"
    if report.get("labels"):
        head += f"; labels {report['labels']}"
    note = "accuracy / macro_f1 in %, loss in nats per answer token" if report["task"] == "classification" else (
        "BLEU 0-100 (sacrebleu), ROUGE-L / token F1 / exact match in %" if report["task"] == "generation" else
        "loss in nats per token, perplexity = exp(loss)")
    return "\n".join([head, *lines, note])


def evaluate(
    data: EvalConfig | dict | str | os.PathLike | None = None,
    prompt: str | os.PathLike | SoftPrompt | Sequence[str | os.PathLike | SoftPrompt] | None = None,
    *,
    base: BaseModel | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate soft prompt(s) (or, without one, the untuned model with the same template) on `data`.

    Takes an EvalConfig (or a dict of its fields): `evaluate(EvalConfig(data=..., prompt=[...]), base=base)`, or
    the data, the prompt(s) and any other field as keyword arguments: `evaluate("dev.jsonl", prompt, shots=2)`.
    `base` reuses an already loaded model (else `model`, else the prompt's base, is loaded).

    The template comes from the (first) prompt's artifact unless given here. Returns the first system's metrics
    at the top level (loss, perplexity; accuracy and macro_f1 for classification; BLEU, ROUGE-L, token F1 and
    exact match for generation) and every system's under 'systems'.

    `baselines`: any of 'untuned', 'instruction' (the `instruction` text, else the prompt's init text), 'kshot'
    (`shots` rows of `shots_from`, else of the prompt's training data), or 'auto' for those whose inputs are
    available. Baselines come first in the table, prompts last.
    """
    cfg = from_call(EvalConfig, data, "data", {"prompt": prompt}, kwargs)
    rows = read_rows(cfg.data)[:cfg.limit] if cfg.limit else read_rows(cfg.data)
    prompts = [] if cfg.prompt is None else list(cfg.prompt) if isinstance(cfg.prompt, (list, tuple)) else [cfg.prompt]
    if base is None:
        first = prompts[0] if prompts else None
        base = load_model(cfg.model if cfg.model is not None else prompt_base_source(first), dtype=cfg.dtype,
                          device=cfg.device)
    loaded = [as_prompt(p, base) for p in prompts]
    saved = dict(loaded[0].template) if loaded else {}
    overrides = {"input": cfg.input_template, "output": cfg.output_template, "label_map": cfg.label_map,
                 "chat": cfg.chat}
    template = Template.from_dict({**saved, **{k: v for k, v in overrides.items() if v is not None}})

    wanted = _parse_baselines(cfg.baselines)
    auto = "auto" in wanted
    meta = loaded[0].meta if loaded else {}
    systems: list[System] = []
    if "untuned" in wanted or auto or not loaded:
        systems.append(System("untuned"))
    text = cfg.instruction or ((meta.get("init") or {}).get("text") if meta else None)
    if "instruction" in wanted and not text:
        raise SoftPromptError("the instruction baseline needs --instruction TEXT (or a prompt trained with --init-text)")
    if text and ("instruction" in wanted or auto):
        systems.append(System("instruction", prefix=text.rstrip() + "\n"))
    shots = cfg.shots
    shot_file = cfg.shots_from or ((meta.get("training") or {}).get("data") if meta else None)
    if "kshot" in wanted and (not shot_file or shots <= 0):
        raise SoftPromptError("the k-shot baseline needs --shots-from FILE (or a prompt whose training data exists) "
                              "and --shots > 0")
    readable = shot_file and (os.path.isfile(shot_file) or is_local_dataset(shot_file))  # no network for a baseline
    if shot_file and shots > 0 and ("kshot" in wanted or (auto and readable)):
        shot_rows = read_rows(shot_file)
        systems.append(System(f"{shots}-shot", prefix=kshot_prefix(template, shot_rows, shots, cfg.seed, str(shot_file))))
    for p, sp in zip(prompts, loaded):
        name = str(p) if isinstance(p, (str, os.PathLike)) else str(sp.meta.get("name") or "prompt")
        systems.append(System(f"prompt {name}" if len(loaded) > 1 else "softprompt", sp, source=name))

    source = str(cfg.data)
    report = compare(base, template, rows, systems, task=cfg.task, source=source, max_length=cfg.max_length,
                     batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop, progress=cfg.progress)
    if len(loaded) > 1 and report["task"] == "classification":
        # Several prompts for one task: add their mean-log-prob and majority-vote ensembles (Lester et al. 2021).
        evalset = prepare(base, template, rows, source=source, max_length=cfg.max_length, task="classification")
        names = [s.name for s in systems[len(systems) - len(loaded):]]
        report["systems"] += evaluate_ensemble(base, loaded, names, evalset, cfg.batch_size * 2, cfg.progress)["ensembles"]
    primary = report["systems"][len(systems) - len(loaded)] if loaded else report["systems"][0]
    return {**{k: v for k, v in primary.items() if k != "system"}, **report,
            "prompt": None if not loaded else primary["prompt"]}


def _parse_baselines(baselines: Sequence[str] | str | None) -> set[str]:
    if not baselines:
        return set()
    items = baselines.split(",") if isinstance(baselines, str) else list(baselines)
    names = {b.strip().lower().replace("-", "").replace("_", "") for b in items if b.strip()}
    names = {"kshot" if n in ("kshot", "fewshot", "shots") else n for n in names}
    if "all" in names:  # every baseline whose inputs are available
        names = (names - {"all"}) | {"auto"}
    unknown = names - {*BASELINES, "auto", "none"}
    if unknown:
        raise SoftPromptError(f"unknown baseline(s) {', '.join(sorted(unknown))}; choose from "
                              f"{', '.join(BASELINES)}, all, auto or none")
    return names - {"none"}
