"""Prompt distillation benchmark (`softprompt distill`) on the embedded SmolLM2-135M-Instruct, 2 CPU cores.

    python bench/distill.py personas      # (a) persona system prompts -> 20 virtual tokens, held-out user messages
    python bench/distill.py compress      # (a') the deep init's other compression choices, first persona
    python bench/distill.py sst2          # (b) a 16-shot SST-2 prompt -> 20 virtual tokens: is the accuracy kept?
    python bench/distill.py serving       # (c) time to first token / tok/s, long hard prompt vs distilled, same scheduler
    python bench/distill.py all --quick   # a smoke run of all three (tiny numbers)

Each section is sized to a few minutes on 2 CPU cores: few inputs, few steps (the numbers are in the JSON).
Results: bench/results/distill-<section>.json; run folders under --workdir (default /tmp/softprompt-distill-bench).
Run under `flock /tmp/softprompt-heavy.lock` on the shared machine.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from softprompt import distill, load_model, train  # noqa: E402
from softprompt.data import read_rows  # noqa: E402
from softprompt.distill import TEACHER_CACHE, Targets, measure  # noqa: E402
from softprompt.generate import generate_ids  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")
RESULTS = ROOT / "bench" / "results"

# Generic things a user might ask any assistant persona (written for this benchmark).
USER_MESSAGES = [
    "What should I do this weekend?", "I feel tired all the time. Any advice?", "Tell me something about the ocean.",
    "How can I make new friends in a new city?", "What is a good way to start the morning?",
    "I have an exam tomorrow and I am nervous.", "Can you describe a rainy day?", "What do you think about cats?",
    "Give me an idea for a birthday present.", "How do I stay focused while working from home?",
    "What is the meaning of friendship?", "Tell me about the mountains.", "I just lost my job. What now?",
    "What is your favourite season and why?", "Describe the city at night.", "How can I be more patient?",
    "What should I cook for dinner tonight?", "Say something about the stars.", "I want to learn to paint.",
    "Why do people travel?", "How do I deal with a difficult coworker?", "Tell me about a quiet village.",
    "What makes a good teacher?", "I can't sleep. Help me.", "Describe a walk in the forest.",
    "How can I save more money?", "What is courage?", "Tell me about the sea in winter.",
    "I want to run a marathon next year.", "What do you think about old books?", "How should I spend a free afternoon?",
    "Describe your perfect day.", "I am afraid of public speaking.", "Tell me about trains.",
    "How do I start a garden?", "What is happiness?", "Describe a busy market.", "How can I learn a new language?",
    "Tell me about the desert.", "My friend is sad. What can I do?", "What is the best way to relax?",
    "Describe the first snow of the year.", "I want to change my career.", "Tell me about the moon.",
    "How do I write a good letter?", "What is the value of hard work?", "Describe an old lighthouse.",
    "Why is music important?",
]
PERSONAS = ["Poet", "Travel Guide", "Motivational Coach"]
FIRST_REQUEST = re.compile(r"\s*(my first|first request|first inquiry|requested information|starting query)\b.*$",
                           re.IGNORECASE | re.DOTALL)


def persona_text(act: str) -> str:
    rows = read_rows(DATA / "awesome_chatgpt_prompts" / "prompts.csv")
    text = next(r["prompt"] for r in rows if r["act"] == act)
    return FIRST_REQUEST.sub("", text).strip()  # the held-out messages are the requests


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def truncated(base, split: Targets, ids_of_input) -> Targets:
    """The held-out split with each row's input replaced (same teacher targets)."""
    out = Targets([ids_of_input(i) for i in range(len(split.student_ids))], split.teacher_ids,
                  split.continuation, split.top_ids, split.top_logprobs, split.tail_logprob)
    return out


def share_cache(src: Path, dst: Path) -> None:
    """Variants of one teacher share its cache (same key: the teacher's outputs do not depend on the student)."""
    if src != dst and (src / TEACHER_CACHE).exists():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / TEACHER_CACHE, dst / TEACHER_CACHE)


def chat_ids(base, system: str | None, user: str) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = base.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return base.tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- (a) personas ---------------------------------------------------------------------------------------


def run_personas(base, work: Path, quick: bool, personas: list[str] | None = None, variants: dict | None = None,
                 truncation: bool = True) -> dict:
    n_train, n_held = (8, 4) if quick else (36, 12)
    msgs = USER_MESSAGES[: n_train + n_held]
    train_file = write_jsonl(work / "personas" / "train.jsonl", [{"input": m} for m in msgs[:n_train]])
    held_file = write_jsonl(work / "personas" / "heldout.jsonl", [{"input": m} for m in msgs[n_train:]])
    held = msgs[n_train:]
    settings = dict(data=str(train_file), validation=str(held_file), chat=True, virtual_tokens=20,
                    max_new_tokens=8 if quick else 24, top_k=64, batch_size=6, steps=2 if quick else 48,
                    progress=False, overwrite=True)
    variants = variants or {"deep_teacher_kv_last": dict(deep=True, init="teacher", compress="last"),
                "deep_teacher_kv_even": dict(deep=True, init="teacher", compress="even"),
                "deep_vocab": dict(deep=True, init="vocab"),
                "shallow_teacher_tokens": dict(deep=False, init="teacher", compress="first"),
                "shallow_vocab": dict(deep=False, init="vocab")}
    personas = personas or (PERSONAS[:1] if quick else PERSONAS)
    out = {"settings": {**settings, "train_inputs": n_train, "heldout_inputs": n_held}, "personas": {}}
    for k, act in enumerate(personas):
        text = persona_text(act)
        rows = {}
        # All variants on the first persona (which init works); the best-known one on the others.
        names = list(variants) if k == 0 else ["deep_teacher_kv_even"]
        for name in names:
            t0 = time.perf_counter()
            share_cache(work / "personas" / f"{k}-deep_teacher_kv_last", work / "personas" / f"{k}-{name}")
            result = distill(teacher=text, output=str(work / "personas" / f"{k}-{name}"), base=base,
                             **settings, **variants[name])
            m = dict(result.metrics)
            m["wall_s"] = round(time.perf_counter() - t0, 1)
            rows[name] = m
            print(f"[personas] {act} {name}: agreement {m['teacher_agreement']:.3f} (untuned {m['baseline_agreement']:.3f}) "
                  f"kl {m['kl']:.3f} (untuned {m['baseline_kl']:.3f}) {m['wall_s']}s", flush=True)
        split = result.splits["heldout"]
        if not truncation:
            out["personas"][act] = {"teacher_tokens": m["teacher_tokens"], "results": rows}
            continue
        # Truncation: the persona cut to its first 20 tokens, as the system message (same targets, same measure).
        cut = base.tokenizer.decode(base.tokenizer(text, add_special_tokens=False)["input_ids"][:20])
        trunc = measure(base, None, truncated(base, split, lambda i: chat_ids(base, cut, held[i])), settings["max_new_tokens"])
        rows["truncated_to_20_tokens"] = trunc
        print(f"[personas] {act} truncated: agreement {trunc['agreement']:.3f} kl {trunc['kl']:.3f}", flush=True)
        out["personas"][act] = {"teacher_tokens": m["teacher_tokens"], "results": rows}
    return out


def run_compress(base, work: Path, quick: bool) -> dict:
    """The deep init's remaining compression choices on the first persona, same settings as `personas` (which
    measured last and even): sink (the first position + the last ones) and first."""
    out = run_personas(base, work, quick, personas=PERSONAS[:1], variants={
        "deep_teacher_kv_sink": dict(deep=True, init="teacher", compress="sink"),
        "deep_teacher_kv_first": dict(deep=True, init="teacher", compress="first")}, truncation=False)
    return out


# ---- (b) k-shot SST-2 ------------------------------------------------------------------------------------


def label_of(base, ids: list[int]) -> str | None:
    text = base.tokenizer.decode(ids, skip_special_tokens=True).strip().lower()
    return next((w for w in ("positive", "negative") if text.startswith(w)), None)


def accuracy(base, prompt, inputs: list[list[int]], gold: list[str]) -> float:
    preds = []
    for s in range(0, len(inputs), 16):
        preds += [label_of(base, g) for g in generate_ids(base, inputs[s:s + 16], prompt, max_new_tokens=2)]
    return sum(p == g for p, g in zip(preds, gold)) / len(gold)


def run_sst2(base, work: Path, quick: bool) -> dict:
    words = {"0": "negative", "1": "positive"}
    rows = read_rows(DATA / "sst2" / "train.tsv")
    rng = random.Random(0)
    rng.shuffle(rows)
    pos = [r for r in rows if r["label"] == "1"][:8]
    neg = [r for r in rows if r["label"] == "0"][:8]
    shots = pos + neg
    rng.shuffle(shots)
    used = {id(r) for r in shots}
    teacher = "\n\n".join(f"Review: {r['sentence'].strip()}\nSentiment: {words[r['label']]}" for r in shots)
    n_train, n_held = (16, 16) if quick else (64, 96)
    pool = [r for r in rows if id(r) not in used][:n_train]
    val = read_rows(DATA / "sst2" / "validation.tsv")
    random.Random(1).shuffle(val)
    val = val[:n_held]
    tmpl = "Review: {sentence}\nSentiment:"
    train_file = write_jsonl(work / "sst2" / "train.jsonl", [{"sentence": r["sentence"].strip(), "output": words[r["label"]]} for r in pool])
    held_file = write_jsonl(work / "sst2" / "heldout.jsonl", [{"sentence": r["sentence"].strip(), "output": words[r["label"]]} for r in val])
    gold = [words[r["label"]] for r in val]
    steps = 2 if quick else 32
    common = dict(data=str(train_file), validation=str(held_file), input_template=tmpl, virtual_tokens=20,
                  max_new_tokens=2, top_k=64, batch_size=16, steps=steps, progress=False, overwrite=True)
    out = {"settings": {**common, "shots": len(shots), "train_inputs": n_train, "heldout_inputs": n_held}, "results": {}}
    for name, extra in {"deep_teacher_kv_even": dict(deep=True, init="teacher", compress="even"),
                        "shallow_teacher_tokens_last": dict(deep=False, init="teacher", compress="last"),
                        "deep_teacher_kv_even_gold0.5": dict(deep=True, init="teacher", compress="even", gold_weight=0.5)}.items():
        t0 = time.perf_counter()
        share_cache(work / "sst2" / "deep_teacher_kv_even", work / "sst2" / name)
        result = distill(teacher=teacher, output=str(work / "sst2" / name), base=base, **common, **extra)
        split = result.splits["heldout"]
        m = dict(result.metrics)
        m["wall_s"] = round(time.perf_counter() - t0, 1)
        m["accuracy"] = accuracy(base, result.prompt.embeddings, split.student_ids, gold)
        if "teacher_accuracy" not in out:
            out["teacher_tokens"] = m["teacher_tokens"]
            out["teacher_accuracy"] = sum(label_of(base, split.generated(i, base.tokenizer.eos_token_id)) == g
                                          for i, g in enumerate(gold)) / len(gold)
            out["untuned_zero_shot_accuracy"] = accuracy(base, None, split.student_ids, gold)
            ids = base.tokenizer(teacher + "\n\n")["input_ids"]
            for where, cut in (("first", ids[:20]), ("last", ids[-20:])):  # last: the end of the last example
                out[f"truncated_{where}_20_tokens_accuracy"] = accuracy(base, None, [cut + s for s in split.student_ids], gold)
        out["results"][name] = m
        print(f"[sst2] {name}: accuracy {m['accuracy']:.3f} (teacher {out['teacher_accuracy']:.3f}, untuned "
              f"{out['untuned_zero_shot_accuracy']:.3f}) agreement {m['teacher_agreement']:.3f} kl {m['kl']:.3f} {m['wall_s']}s", flush=True)
    # A prompt trained on the labels directly: same inputs, same steps, same size.
    for deep in (False, True):
        t0 = time.perf_counter()
        res = train(data=str(train_file), output=str(work / "sst2" / f"labels-{'deep' if deep else 'shallow'}"),
                    input_template=tmpl, output_template=" {output}", virtual_tokens=20, deep=deep, steps=steps,
                    batch_size=16, progress=False, overwrite=True, base=base)
        acc = accuracy(base, res.prompt.embeddings, split.student_ids, gold)
        out["results"][f"trained_on_labels_{'deep' if deep else 'shallow'}"] = {"accuracy": acc, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"[sst2] trained on labels ({'deep' if deep else 'shallow'}): accuracy {acc:.3f}", flush=True)
    return out


# ---- (c) serving -----------------------------------------------------------------------------------------


def run_serving(base, work: Path, quick: bool) -> dict:
    from softprompt.scheduler import PromptEntry, SamplingParams, Scheduler, Sequence

    act = PERSONAS[0]
    text = persona_text(act)
    folder = work / "personas" / "0-deep_teacher_kv_even"
    if not (folder / "prompt.safetensors").exists():
        raise SystemExit(f"run `python bench/distill.py personas` first (needs {folder})")
    from softprompt import SoftPrompt

    prompt = SoftPrompt.load(folder, base)
    entry = PromptEntry(name="distilled", embeddings=prompt.embeddings.to(base.device, base.dtype))
    msgs = USER_MESSAGES[-(4 if quick else 16):]
    max_tokens = 8 if quick else 32
    systems = {"hard_prompt": ([chat_ids(base, text, m) for m in msgs], None),
               "distilled": ([chat_ids(base, None, m) for m in msgs], entry)}
    out = {"persona": act, "requests": len(msgs), "max_tokens": max_tokens, "results": {}}
    for name, (inputs, p) in systems.items():
        for concurrency in (1, len(msgs)):
            sched = Scheduler(base, autostart=False, max_running=32)
            done, ttft, t0 = [], [], time.perf_counter()
            for s in range(0, len(inputs), concurrency):
                seqs = [Sequence(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), p, lambda e: None)
                        for ids in inputs[s:s + concurrency]]
                sched.submit(seqs)
                sched.run_until_idle()
                done += seqs
            wall = time.perf_counter() - t0
            ttft = [s.t_first - s.t_submit for s in done if s.t_first is not None]
            tokens = sum(len(s.generated) for s in done)
            out["results"][f"{name}_c{concurrency}"] = {
                "input_tokens_mean": statistics.mean(map(len, inputs)), "ttft_median_ms": round(statistics.median(ttft) * 1e3, 1),
                "tok_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2), "generated_tokens": tokens}
            print(f"[serving] {name} concurrency {concurrency}: {out['results'][f'{name}_c{concurrency}']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", nargs="+", choices=["personas", "compress", "sst2", "serving", "all"])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny numbers")
    ap.add_argument("--workdir", default="/tmp/softprompt-distill-bench")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(args.workdir)
    t0 = time.perf_counter()
    base = load_model(args.model, dtype="float32", device="cpu" if args.model is None else "auto")
    print(f"loaded model in {time.perf_counter() - t0:.0f}s; torch threads {torch.get_num_threads()}", flush=True)
    sections = ["personas", "compress", "sst2", "serving"] if "all" in args.section else args.section
    for section in sections:
        t0 = time.perf_counter()
        result = {"personas": run_personas, "compress": run_compress, "sst2": run_sst2, "serving": run_serving}[section](base, work, args.quick)
        result["section_wall_s"] = round(time.perf_counter() - t0, 1)
        result["command"] = " ".join(["python", "bench/distill.py", section, *(["--quick"] if args.quick else [])])
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"distill-{section}{'-quick' if args.quick else ''}.json"
        (RESULTS / name).write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"[{section}] {result['section_wall_s']}s -> bench/results/{name}", flush=True)


if __name__ == "__main__":
    main()
