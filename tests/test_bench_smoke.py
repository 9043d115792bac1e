"""The quality benchmark, a few steps on tiny data in the real file formats, so bench/quality.py cannot rot."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from conftest import SUBJECTS, WORDS_NEG, WORDS_POS

ROOT = Path(__file__).resolve().parent.parent


def _sentence(rng: random.Random) -> tuple[str, bool]:
    good = rng.random() < 0.5
    return f"{rng.choice(SUBJECTS)} was {rng.choice(WORDS_POS if good else WORDS_NEG)} .", good


def make_data(d: Path, n: int = 40) -> Path:
    """Every file bench/quality.py reads, with the columns and formats of ../shared/data."""
    rng = random.Random(0)
    (d / "sst2").mkdir(parents=True)
    for name in ("train.tsv", "validation.tsv"):
        lines = ["sentence\tlabel"] + [f"{s} \t{int(g)}" for s, g in (_sentence(rng) for _ in range(n))]
        (d / "sst2" / name).write_text("\n".join(lines) + "\n")
    (d / "rte_glue").mkdir()
    for name in ("train.tsv", "validation.tsv"):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            (a, g), (b, _) = _sentence(rng), _sentence(rng)
            lines.append(f"{i}\t{a}\t{b}\t{'entailment' if g else 'not_entailment'}")
        (d / "rte_glue" / name).write_text("\n".join(lines) + "\n")
    for task, labels in (("BoolQ", [True, False]), ("CB", ["entailment", "contradiction", "neutral"])):
        (d / "superglue_fewglue" / task).mkdir(parents=True)
        for name in ("train.jsonl", "val.jsonl"):
            rows = []
            for i in range(n):
                (a, _), (b, _) = _sentence(rng), _sentence(rng)
                row = {"passage": a, "question": b} if task == "BoolQ" else {"premise": a, "hypothesis": b}
                rows.append({**row, "idx": i, "label": labels[i % len(labels)]})
            (d / "superglue_fewglue" / task / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "awesome_chatgpt_prompts").mkdir()
    with (d / "awesome_chatgpt_prompts" / "prompts.csv").open("w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["act", "prompt"])
        for i in range(n):
            w.writerow([f"act {i}", "I want you to act as " + _sentence(rng)[0]])
    (d / "english_quotes").mkdir()
    (d / "english_quotes" / "quotes.jsonl").write_text(
        "".join(json.dumps({"quote": f"“{_sentence(rng)[0]}”", "author": "A", "tags": ["t"]}) + "\n" for _ in range(n)))
    (d / "e2e_nlg").mkdir()
    for name in ("devset.csv", "testset_w_refs.csv"):
        with (d / "e2e_nlg" / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["mr", "ref"])
            for i in range(n):
                w.writerow([f"name[{SUBJECTS[i % 6]}], eatType[pub{i // 6}]", _sentence(rng)[0]])
    return d


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# The tiny model's short context truncates CB's k-shot rows, as it should (and says so): expected here.
@pytest.mark.filterwarnings("ignore:cb. .* rows longer than .* tokens were truncated:UserWarning")
def test_quality_benchmark_smoke(quality, tiny_model_dir, tmp_path, capsys):
    data = make_data(tmp_path / "data")
    out = tmp_path / "bench"
    argv = ["--smoke", "--model", str(tiny_model_dir), "--data-dir", str(data), "--output", str(out),
            "--peft-time", "2", "--curve-rows", "5"]
    assert quality.main(argv) == 0
    results = json.loads((out / "quality.json").read_text())
    assert [t["task"] for t in results["tasks"]] == [t.name for t in quality.TASKS if t.in_all]
    for t in results["tasks"]:
        names = [r["system"] for r in t["systems"]]
        assert names[0] == "untuned" and names[-2:] == ["softprompt", "PEFT prompt tuning"], names
        assert t["training"]["PEFT prompt tuning"]["steps"] >= 1 and t["training"]["softprompt"]["steps"] == 3
        key = {"classification": "accuracy", "generation": "bleu", "lm": "perplexity"}[t["kind"]]
        assert all(key in r for r in t["systems"])
    sst2 = results["tasks"][0]
    assert [p["step"] for p in sst2["curve"]["softprompt"]][0] == 0 and (out / "sst2-curve.png").exists()
    assert {p["rows"] for p in sst2["curve"]["softprompt"][1:-1]} == {5}  # --curve-rows; the last point: all rows
    assert set(sst2["time_to_accuracy"]["0.88"]) == {"softprompt", "PEFT"}
    table = (out / "quality.md").read_text()
    assert "| sst2 | softprompt |" in table and "| e2e | PEFT prompt tuning |" in table
    assert "sst2: training seconds to reach an accuracy" in table


def test_time_to_accuracy_is_the_first_point_at_or_above_the_target(quality):
    def pts(*acc_at):
        return [{"step": i, "elapsed_s": float(t), "accuracy": a} for i, (t, a) in enumerate(acc_at)]

    curve = {"softprompt": pts((0, 0.80), (50, 0.88), (100, 0.87)), "PEFT": pts((0, 0.80), (60, 0.86), (120, 0.85))}
    table = quality.time_to_accuracy(curve, targets=(0.86, 0.88))
    assert table["0.88"]["softprompt"] == {"elapsed_s": 50.0, "step": 1}
    assert table["0.88"]["PEFT"] == {"elapsed_s": None, "not_within_s": 120.0}  # trained 120 s without reaching it
    assert table["0.86"]["PEFT"] == {"elapsed_s": 60.0, "step": 1}


def test_quality_benchmark_method_rows_smoke(quality, tiny_model_dir, tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "bench"
    argv = ["--smoke", "--methods", "--tasks", "sst2,rte", "--no-curve", "--model", str(tiny_model_dir),
            "--data-dir", str(data), "--output", str(out)]
    assert quality.main(argv) == 0
    results = json.loads((out / "quality.json").read_text())
    for t in results["tasks"]:
        names = [r["system"] for r in t["systems"]]
        transfer = ["transfer (SPoT) from sst2"] if t["task"] == "rte" else []  # from the sst2 prompt just trained
        # the softprompt row of a task with an input is a deep prompt by default: its method row is not repeated
        methods = [m for m in quality.METHODS if m != "deep prompt (P-tuning v2)"]
        assert names[3:] == ["softprompt", "PEFT prompt tuning", *methods, *transfer, "ensemble (mean)",
                             "ensemble (vote)"]
        assert all(t["training"][m]["steps"] == 3 for m in methods)
        assert t["training"]["softprompt"]["config"]["deep"] is True
        assert t["training"]["input-embedding prompt (--no-deep)"]["config"]["deep"] is False
    assert "| rte | input-embedding prompt (--no-deep) |" in (out / "quality.md").read_text()


def test_quality_benchmark_chat_recipe_smoke(quality, tiny_model_dir, tmp_path):
    """`--tasks sst2-chat` (the 90 % recipe): chat template + system message for every system, deep prompt."""
    from conftest import chat_model_copy

    model = chat_model_copy(tiny_model_dir, tmp_path / "tiny-chat")
    data, out = make_data(tmp_path / "data"), tmp_path / "bench"
    argv = ["--smoke", "--tasks", "sst2-chat", "--model", str(model), "--data-dir", str(data), "--output", str(out)]
    assert quality.main(argv) == 0
    [t] = json.loads((out / "quality.json").read_text())["tasks"]
    assert t["task"] == "sst2-chat" and t["training"]["softprompt"]["config"]["deep"] is True
    assert t["training"]["softprompt"]["config"]["lr"] == 0.05 and t["training"]["PEFT prompt tuning"]["steps"] >= 1
    assert (out / "sst2-chat-curve.png").exists()


@pytest.mark.parametrize("flag", ["--peft-time", "--curve-rows"])
def test_non_positive_time_or_rows_is_refused_by_name(quality, tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        quality.main([flag, "0", "--data-dir", str(tmp_path), "--output", str(tmp_path / "bench")])
    assert "--peft-time and --curve-rows must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()  # refused before anything ran


def test_prompt_lookup_replay_counts_tokens_per_forward():
    """bench/engine_ab.py draft: the yield of prompt-lookup drafting, replayed by hand on a short sequence."""
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench_engine_ab", ROOT / "bench" / "engine_ab.py")
    engine_ab = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(engine_ab)  # it puts bench/ on sys.path for its `serve` helpers
    finally:
        sys.path[:] = saved
    s = SimpleNamespace(input_ids=[1, 2, 3, 1, 2], generated=[3, 1, 2, 3, 9])
    # forward 1: context ..1 2 3, whose last trigram follows the start: draft [1, 2], both right, +3 tokens;
    # forward 2: draft [1, 2] again, the model says 9: +1 token. 4 tokens after the prefill's in 2 forwards.
    assert engine_ab.lookup_yield([s], k=2) == (2.0, 1.0)
    assert engine_ab.lookup_yield([s], k=0) == (1.0, 0.0)  # no drafts: one token a forward
