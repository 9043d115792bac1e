"""Evaluation: rank classification (fast and general paths agree), metrics, generation, lm, baselines, CLI table."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import sentiment_rows, shared_prefix, write_jsonl
from softprompt import SoftPrompt, evaluate
from softprompt.cli import main
from softprompt.data import Template
from softprompt.evaluate import System, compare, format_table, kshot_prefix, label_scores, prepare, score
from softprompt.scoring import pair_label_scores, single_token_label_scores, single_token_scores_and_loss, token_loss
from softprompt.metrics import accuracy, generation_metrics, macro_f1, token_f1

SENTIMENT = Template(input="{input}", output=" {output}")


def test_single_token_fast_path_matches_pair_scoring(tiny_base):
    rows = sentiment_rows(12, 3)
    evalset = prepare(tiny_base, SENTIMENT, rows)
    assert all(len(ids) == 1 for ids in evalset.label_ids), "the tiny tokenizer has one token per label"
    prompt = SoftPrompt.initialise(tiny_base, 3, "random", seed=1).embeddings
    for p in (None, prompt):
        fast = single_token_label_scores(tiny_base, p, evalset, 5, False)
        slow = pair_label_scores(tiny_base, p, evalset, 7, False)
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_multi_token_labels_and_batch_independence(tiny_base):
    rows = [{"input": r["input"], "output": "very " + r["output"]} for r in sentiment_rows(10, 4)]
    evalset = prepare(tiny_base, SENTIMENT, rows)
    assert evalset.kind == "classification" and all(len(ids) > 1 for ids in evalset.label_ids)
    a = label_scores(tiny_base, None, evalset, batch_size=1)
    b = label_scores(tiny_base, None, evalset, batch_size=16)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    result = score(tiny_base, None, evalset)
    assert {"accuracy", "macro_f1", "loss", "perplexity", "predictions"} <= set(result)
    assert set(result["predictions"]) <= {" very positive", " very negative"}


def test_one_input_pass_label_scores_equal_pair_by_pair_scoring(tiny_base):
    """Multi-token labels of different lengths, scored behind each input's cached keys/values, give the same
    log-likelihoods as scoring every (row, label) pair on its own: no prompt, an input-embedding prompt, a deep
    prompt, and a different prompt per row (ensembles)."""
    from softprompt.scoring import label_log_likelihoods

    rows = [{"input": r["input"], "output": {"positive": "good", "negative": "very very bad"}[r["output"]]}
            for r in sentiment_rows(9, 5)]
    rows[0]["output"] = "so so"
    evalset = prepare(tiny_base, SENTIMENT, rows)
    lengths = sorted(len(ids) for ids in evalset.label_ids)
    assert evalset.kind == "classification" and lengths[0] < lengths[-1] and lengths[-1] > 2
    shallow = SoftPrompt.initialise(tiny_base, 3, "random", seed=1)
    deep = SoftPrompt.initialise(tiny_base, 2, "vocab", seed=2, deep=True)
    deep.embeddings.data += 0.1 * torch.randn_like(deep.embeddings)
    for p in (None, shallow.embeddings, deep.embeddings):
        one_pass = label_scores(tiny_base, p, evalset, batch_size=4)
        pairs = pair_label_scores(tiny_base, p, evalset, 5, False)
        torch.testing.assert_close(one_pass, pairs, atol=1e-4, rtol=1e-4)
    mixed = [shallow.embeddings if i % 2 else None for i in range(len(rows))]
    per_row = label_log_likelihoods(tiny_base, evalset.inputs, evalset.label_ids, mixed, batch_size=4)
    for i in range(len(rows)):
        alone = pair_label_scores(tiny_base, mixed[i], prepare(tiny_base, SENTIMENT, [rows[i]], labels=evalset.labels), 5, False)
        torch.testing.assert_close(per_row[i], alone[0], atol=1e-4, rtol=1e-4)


def test_classification_metrics():
    assert accuracy([0, 0, 1, 1], [0, 1, 1, 1]) == 0.75
    # class 0: F1 2/3, class 1: F1 4/5 -> macro (2/3 + 4/5) / 2
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)
    assert macro_f1([0, 0, 0], [0, 0, 0], 3) == 1.0  # absent classes are skipped
    assert macro_f1([1, 1], [0, 0], 2) == 0.0


def test_generation_metrics_multi_reference():
    perfect = generation_metrics(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rougeL"] == pytest.approx(1.0)
    assert perfect["exact_match"] == 1.0 and perfect["token_f1"] == 1.0
    # The best of several references counts; a variable number of references per row is fine.
    multi = generation_metrics(["a dog ran", "hello there"], [["the cat sat", "a dog ran"], ["hello there"]])
    assert multi["exact_match"] == 1.0 and multi["rougeL"] == pytest.approx(1.0)
    assert token_f1("The cat!", ["cat"]) == 1.0  # SQuAD normalisation
    bad = generation_metrics(["zzz qqq"], [["the cat sat on the mat"]])
    assert bad["bleu"] < 1 and bad["rougeL"] == 0.0


def test_generation_task_groups_references(tiny_base, tmp_path):
    rows = [{"mr": "name[A]", "ref": "A was great ."}, {"mr": "name[A]", "ref": "A was superb ."},
            {"mr": "name[B]", "ref": "B was awful ."}]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    result = evaluate(str(data), base=tiny_base, input_template="{mr} Review :", output_template=" {ref}",
                      task="generation", max_new_tokens=5, progress=False)
    assert result["task"] == "generation" and result["n_inputs"] == 2 and result["n"] == 3
    assert {"bleu", "rougeL", "token_f1", "exact_match", "loss"} <= set(result)
    assert len(result["predictions"]) == 2
    assert "bleu" in format_table(result)


def test_lm_task_and_prefix_baselines_score_the_same_tokens(tiny_base, tmp_path):
    rows = [{"quote": f"the film was {w} ."} for w in ("great", "awful", "superb", "poor", "lovely", "boring")]
    template = Template(input="", output="{quote}")
    plain = prepare(tiny_base, template, rows, task="lm")
    prefixed = prepare(tiny_base, template, rows, task="lm", prefix="Review : the plot was great .\n\n")
    count = lambda s: sum(t != -100 for e in s.examples for t in e.labels)  # noqa: E731
    assert plain.kind == "lm" and count(plain) == count(prefixed)
    report = compare(tiny_base, template, rows, [System("untuned"), System("1-shot", prefix="the meal was poor .\n\n")],
                     task="auto")
    assert report["task"] == "lm" and [r["system"] for r in report["systems"]] == ["untuned", "1-shot"]
    assert all(r["perplexity"] > 1 for r in report["systems"])


def test_kshot_prefix_is_seeded_formatted_and_covers_labels():
    rows = sentiment_rows(40, 5)
    a = kshot_prefix(SENTIMENT, rows, 4, seed=0)
    assert a == kshot_prefix(SENTIMENT, rows, 4, seed=0) and a != kshot_prefix(SENTIMENT, rows, 4, seed=1)
    shots = a.strip().split("\n\n")
    assert len(shots) == 4 and all(s.startswith("Review:") for s in shots)
    assert sum(s.endswith("positive") for s in shots) == 2 and sum(s.endswith("negative") for s in shots) == 2
    assert kshot_prefix(SENTIMENT, rows, 0) == ""
    # Chat templates give answers without a leading space (the assistant turn separates them); inline, the
    # shots keep one, so the shown examples read as the plain template's do.
    chat = Template(input="{input}", output="{output}", chat=True)
    assert kshot_prefix(chat, rows, 4, seed=0) == a


def test_evaluate_with_all_baselines_in_one_table(tiny_base, trained_prompt, sentiment_files):
    train_file, dev = sentiment_files
    result = evaluate(str(dev), str(trained_prompt), base=tiny_base, baselines="all", shots=2,
                      instruction="Say if the review is positive or negative.", progress=False)
    names = [r["system"] for r in result["systems"]]
    assert names == ["untuned", "instruction", "2-shot", "softprompt"]
    assert result["prompt"] == str(trained_prompt)
    assert result["accuracy"] == result["systems"][-1]["accuracy"]  # the prompt is the headline
    # The same examples for every row; the untuned row is what evaluating without a prompt gives.
    untuned = evaluate(str(dev), None, base=tiny_base, input_template="{input}", output_template=" {output}",
                       progress=False)
    assert untuned["prompt"] is None and untuned["accuracy"] == result["systems"][0]["accuracy"]
    assert all(r["n"] == result["n"] for r in result["systems"])
    with pytest.raises(Exception, match="instruction"):
        evaluate(str(dev), None, base=tiny_base, baselines="instruction", progress=False)


def test_cli_eval_table_and_json(trained_prompt, sentiment_files, capsys):
    train_file, dev = sentiment_files
    assert main(["eval", "--prompt", str(trained_prompt), "--data", str(dev), "--shots", "2", "--baselines", "all",
                 "--shots-from", str(train_file), "--limit", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "untuned" in out and "2-shot" in out and "softprompt" in out and "accuracy" in out
    assert main(["eval", "--prompt", str(trained_prompt), "--data", str(dev), "--baselines", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "classification" and [s["system"] for s in result["systems"]] == ["softprompt"]
    assert "predictions" not in result and {"accuracy", "macro_f1", "loss"} <= set(result)


@pytest.fixture
def trained_prompt(tiny_model_dir, tiny_base, sentiment_files, tmp_path):
    from softprompt import train

    train_file, dev = sentiment_files
    train(data=str(train_file), output=str(tmp_path / "run"), steps=6, batch_size=8, virtual_tokens=4,
          model=str(tiny_model_dir), base=tiny_base, progress=False, lr=0.1)
    return tmp_path / "run"


def test_one_pass_loss_and_scores_match_the_general_paths(tiny_base):
    rows = sentiment_rows(11, 6)
    evalset = prepare(tiny_base, SENTIMENT, rows)
    prompt = SoftPrompt.initialise(tiny_base, 2, "random", seed=2).embeddings
    for p in (None, prompt):
        scores, nll, count = single_token_scores_and_loss(tiny_base, p, evalset, 4, False)
        assert count == sum(t != -100 for e in evalset.examples for t in e.labels)
        assert nll / count == pytest.approx(token_loss(tiny_base, p, evalset.examples), rel=1e-4)
        torch.testing.assert_close(scores, pair_label_scores(tiny_base, p, evalset, 6, False), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["none", "input", "deep"])
def test_one_pass_with_a_common_template_prefix_matches_the_plain_path(tiny_base, kind):
    """Rows that all start with the template's words: the one-pass scores and loss, through the shared-prefix
    path (common leading tokens run once), equal the plain path's pair scores and loss."""
    template = Template(input="Review: the film was {input}\nSentiment:", output=" {output}")
    evalset = prepare(tiny_base, template, sentiment_rows(9, 7))
    prompt = {"none": None, "input": SoftPrompt.initialise(tiny_base, 3, "random", seed=3).embeddings,
              "deep": torch.randn(3, *tiny_base.kv_shape) * 0.3}[kind]
    with shared_prefix(tiny_base, True):
        scores, nll, count = single_token_scores_and_loss(tiny_base, prompt, evalset, 4, False)
    with shared_prefix(tiny_base, False):
        ref_scores = pair_label_scores(tiny_base, prompt, evalset, 5, False)
        ref_loss = token_loss(tiny_base, prompt, evalset.examples)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert nll / count == pytest.approx(ref_loss, rel=1e-4)
