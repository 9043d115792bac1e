"""Honest numbers for a soft prompt and its baselines, on the same examples.

Task kinds:
- classification: each candidate label (possibly several tokens, no EOS) is scored as a continuation of the
  input and the most likely one is the prediction (rank classification: no text parsing). Accuracy, macro-F1,
  and the answer loss.
- generation: greedy decoding, then exact match, token F1, ROUGE-L and BLEU (sacrebleu / rouge-score) against
  every reference of the input (rows with the same input are one example with several references).
- lm: loss and perplexity of the output text (held-out corpus; with an empty input template).

Systems compared in one table: the untuned model (template only), a hand-written instruction before the
input, k-shot in-context examples before the input, and any number of soft prompts.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .config import EvalConfig, from_call
from .data import Encoded, Encoder, Template, collate, label_set, read_rows
from .errors import SoftPromptError
from .hf_data import is_local_dataset
from .metrics import accuracy, generation_metrics, macro_f1
from .model import BaseModel, load_model
from .prompt import SoftPrompt, as_prompt, prompt_base_source
from .scoring import label_log_likelihoods

TASKS = ("auto", "classification", "generation", "lm")
BASELINES = ("untuned", "instruction", "kshot")


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


def _prompt_tensor(prompt: SoftPrompt | torch.Tensor | None) -> torch.Tensor | None:
    return prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt


@torch.no_grad()
def token_loss(base: BaseModel, prompt, examples: list[Encoded], batch_size: int = 16, progress: bool = False) -> float:
    """Mean NLL per answer token over all examples (token-weighted, as in training)."""
    tensor, nll, count = _prompt_tensor(prompt), 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in tqdm(range(0, len(order), batch_size), desc="loss", disable=not progress, leave=False):
        batch = collate([examples[i] for i in order[s:s + batch_size]], base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], tensor, batch["labels"])
        row_nll, row_count = base.sequence_nll(prompted)
        nll += row_nll.sum().item()
        count += row_count.sum().item()
    return nll / max(count, 1)


@torch.no_grad()
def label_scores(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Total log-likelihood of each candidate label after each input: [rows, labels].

    When every label is one token, one forward per row reads all of them from the last position's
    distribution; labels of several tokens run behind each input's cached keys/values (one input pass, see
    scoring.py); text-to-text models and caches that cannot be copied score each (row, label) pair by
    `sequence_nll`.
    """
    assert evalset.label_ids is not None
    tensor = _prompt_tensor(prompt)
    if _single_token_ok(evalset) and not base.is_encoder_decoder:
        return _single_token_label_scores(base, tensor, evalset, batch_size, progress)
    if all(evalset.inputs) and base.has_plain_kv_cache:
        return label_log_likelihoods(base, evalset.inputs, evalset.label_ids, tensor, batch_size, progress)
    return _pair_label_scores(base, tensor, evalset, batch_size, progress)


def _pair_label_scores(base: BaseModel, tensor, evalset: EvalSet, batch_size: int, progress: bool) -> torch.Tensor:
    pairs = [(i, j) for i in range(len(evalset.inputs)) for j in range(len(evalset.label_ids))]
    pairs.sort(key=lambda p: len(evalset.inputs[p[0]]) + len(evalset.label_ids[p[1]]))
    scores = torch.empty(len(evalset.inputs), len(evalset.label_ids))
    for s in tqdm(range(0, len(pairs), batch_size), desc="labels", disable=not progress, leave=False):
        chunk = pairs[s:s + batch_size]
        examples = [Encoded(evalset.inputs[i] + evalset.label_ids[j],
                            [-100] * len(evalset.inputs[i]) + evalset.label_ids[j], len(evalset.inputs[i]))
                    for i, j in chunk]
        batch = collate(examples, base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], tensor, batch["labels"])
        row_nll, _ = base.sequence_nll(prompted)
        for (i, j), v in zip(chunk, row_nll.tolist()):
            scores[i, j] = -v
    return scores


def _single_token_ok(evalset: EvalSet) -> bool:
    return bool(evalset.label_ids) and all(len(ids) == 1 for ids in evalset.label_ids) and all(evalset.inputs)


@torch.no_grad()
def _single_token_label_scores(base: BaseModel, tensor, evalset: EvalSet, batch_size: int, progress: bool) -> torch.Tensor:
    scores, _, _ = _one_pass(base, tensor, evalset, batch_size, progress, with_loss=False)
    return scores


@torch.no_grad()
def _one_pass(base: BaseModel, tensor, evalset: EvalSet, batch_size: int, progress: bool,
              with_loss: bool = True) -> tuple[torch.Tensor, float, int]:
    """Single-token labels: ONE forward per row over input + gold answer gives both every label's score (the
    distribution after the last input token) and the answer loss (the answer's own positions).

    Returns ([rows, labels] log-likelihoods, summed answer NLL, answer tokens) - the same numbers as
    `_pair_label_scores` and `token_loss`, at a third (binary labels) of the cost.
    """
    candidates = torch.tensor([ids[0] for ids in evalset.label_ids])
    # Without the loss, a stand-in answer token marks the position whose distribution scores the labels.
    rows_all = evalset.examples if with_loss else [
        Encoded(ids + [int(candidates[0])], [-100] * (len(ids) + 1), len(ids)) for ids in evalset.inputs]
    order = sorted(range(len(rows_all)), key=lambda i: len(rows_all[i].input_ids))
    scores = torch.empty(len(rows_all), len(candidates))
    nll, count = 0.0, 0
    for s in tqdm(range(0, len(order), batch_size), desc="labels+loss" if with_loss else "labels",
                  disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        examples = [rows_all[i] for i in rows]
        # Every answer token labelled: the logits come back at the last input token and at each answer token.
        marked = [Encoded(e.input_ids, [-100] * e.n_input + list(e.input_ids[e.n_input:]), e.n_input) for e in examples]
        batch = collate(marked, base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], tensor, batch["labels"])
        logits, _ = base.logits_at_labels(prompted)  # [N, V], row by row
        logp = torch.log_softmax(logits, -1).cpu()
        for b, (e, answer) in enumerate(zip(examples, logp.split([len(e.input_ids) - e.n_input for e in examples]))):
            scores[rows[b]] = answer[0, candidates]
            for k, t in enumerate(range(e.n_input, len(e.input_ids))):
                if e.labels[t] != -100:  # answer token t, predicted at answer row k
                    nll -= float(answer[k, e.labels[t]])
                    count += 1
    return scores, nll, count


@torch.no_grad()
def generate_predictions(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 16,
                         progress: bool = False) -> list[str]:
    """Greedy continuations of each distinct input, cut at EOS and the stop strings."""
    from .generate import cut_at_stop, generate_ids

    tensor = _prompt_tensor(prompt)
    order = sorted(range(len(evalset.gen_inputs)), key=lambda i: len(evalset.gen_inputs[i]))
    out: list[str] = [""] * len(order)
    for s in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        new = generate_ids(base, [evalset.gen_inputs[i] for i in rows], tensor, max_new_tokens=evalset.max_new_tokens,
                           stop=evalset.stop)
        for i, ids in zip(rows, new):
            out[i] = cut_at_stop(base.tokenizer.decode(ids, skip_special_tokens=True), evalset.stop).strip()
    return out


def score(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """{'loss', 'perplexity', 'n'}; classification adds accuracy, macro_f1, labels, predictions; generation
    adds exact_match, token_f1, rougeL, bleu, predictions (one per distinct input)."""
    scores = None
    if evalset.labels and _single_token_ok(evalset) and not base.is_encoder_decoder:
        scores, nll, count = _one_pass(base, _prompt_tensor(prompt), evalset, batch_size, progress)
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
    bar = tqdm(systems, desc="eval", disable=not progress or len(systems) < 2, leave=False)
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
    tensor = _prompt_tensor(prompt)
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
        report["systems"] += _ensemble_rows(base, template, rows, loaded, source, cfg.max_length, cfg.batch_size,
                                            cfg.progress)
    primary = report["systems"][len(systems) - len(loaded)] if loaded else report["systems"][0]
    return {**{k: v for k, v in primary.items() if k != "system"}, **report,
            "prompt": None if not loaded else primary["prompt"]}


def _ensemble_rows(base, template, rows, prompts, source, max_length, batch_size, progress) -> list[dict[str, Any]]:
    """Several prompts for one task: add their mean-log-prob and majority-vote ensembles (Lester et al. 2021)."""
    from .ensemble import combine, ensemble_label_scores

    evalset = prepare(base, template, rows, source=source, max_length=max_length, task="classification")
    scores = ensemble_label_scores(base, prompts, evalset, batch_size * 2, progress)
    out = []
    for how in ("mean", "vote"):
        predictions = combine(scores, how).tolist()
        out.append({"system": f"ensemble ({how})", "prompt": None, "n": len(rows),
                    "accuracy": accuracy(predictions, evalset.gold),
                    "macro_f1": macro_f1(predictions, evalset.gold, len(evalset.labels)),
                    "labels": evalset.labels, "predictions": [evalset.labels[p] for p in predictions]})
    return out


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
