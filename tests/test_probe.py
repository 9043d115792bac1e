"""`softprompt inspect` and softprompt.probe: nearest tokens, norms, drift from init, prompt comparison."""

import itertools
import json

import pytest

from conftest import cli_error as _error
import torch

from softprompt import SoftPrompt, SoftPromptError, export_peft
from softprompt.cli import main
from softprompt.prompt import INIT_STRATEGIES
from softprompt.probe import (REPORT_KEYS, _max_matching, compare, drift_from_init, format_report, inspect_prompt,
                              nearest_tokens, norm_report, show_token, write_png)

TEXT = "Review: the film was great"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def text_prompt(tiny_base, tmp_path):
    prompt = SoftPrompt.initialise(tiny_base, 5, "text", init_text=TEXT)
    prompt.save(tmp_path / "text")
    return tmp_path / "text"


def test_text_init_has_its_tokens_as_nearest_neighbours(tiny_base):
    prompt = SoftPrompt.initialise(tiny_base, 5, "text", init_text=TEXT)
    ids = tiny_base.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:5]
    near = nearest_tokens(tiny_base, prompt, k=3)
    assert [n["tokens"][0]["id"] for n in near] == ids
    assert all(n["tokens"][0]["similarity"] == pytest.approx(1.0, abs=1e-5) for n in near)
    assert all(len(n["tokens"]) == 3 for n in near)
    sims = [t["similarity"] for t in near[0]["tokens"]]
    assert sims == sorted(sims, reverse=True)
    decoded = [tiny_base.tokenizer.decode([i]) for i in ids]
    assert [n["tokens"][0]["token"] for n in near] == decoded
    # k larger than the vocabulary is clamped; k < 1 is an error
    assert len(nearest_tokens(tiny_base, prompt, k=10_000)[0]["tokens"]) == len(tiny_base.tokenizer)
    with pytest.raises(SoftPromptError, match="k must be"):
        nearest_tokens(tiny_base, prompt, k=0)


def test_show_token_makes_whitespace_visible():
    assert show_token(" the") == "␣the"
    assert show_token("a\nb\t") == "a↵b⇥"
    assert show_token("") == "∅"
    assert show_token("\x1a") == "\\x1a"


def test_fresh_prompt_has_zero_drift_and_moved_prompt_does_not(tiny_base):
    for kwargs in ({"init": "vocab", "seed": 3}, {"init": "random", "seed": 1}, {"init": "text", "init_text": TEXT},
                   {"init": "labels", "labels": ["positive", "negative"]}):
        fresh = SoftPrompt.initialise(tiny_base, 4, **kwargs)
        drift = drift_from_init(tiny_base, fresh)
        assert drift["reproducible"] and drift["reason"] is None, kwargs
        assert drift["mean_l2"] == 0 and drift["total_l2"] == 0 and drift["mean_cosine"] == pytest.approx(1.0)
        assert len(drift["per_token"]) == 4
    shift = torch.zeros(tiny_base.hidden_size)
    shift[0] = 0.5
    moved = SoftPrompt(fresh.embeddings + shift, fresh.meta)
    drift = drift_from_init(tiny_base, moved)
    assert drift["reproducible"]
    assert all(t["l2"] == pytest.approx(0.5, abs=1e-5) for t in drift["per_token"])
    assert drift["mean_cosine"] < 1


def test_unreproducible_init_says_why(tiny_base, tmp_path):
    fresh = SoftPrompt.initialise(tiny_base, 3, "vocab")
    export_peft(fresh, tmp_path / "peft")
    report = inspect_prompt(tmp_path / "peft", base=tiny_base, k=2)
    assert report["drift"]["reproducible"] is False and "PEFT" in report["drift"]["reason"]
    assert "cannot be reproduced" in format_report(report)
    bare = SoftPrompt(fresh.embeddings, {})
    assert "no initialisation" in drift_from_init(tiny_base, bare)["reason"]



@pytest.mark.skipif("prompt" not in INIT_STRATEGIES, reason="transfer init ('prompt') not in this version")
def test_drift_of_a_transfer_init(tiny_base, text_prompt):
    fresh = SoftPrompt.initialise(tiny_base, 7, "prompt", init_prompt=str(text_prompt))
    assert drift_from_init(tiny_base, fresh)["mean_l2"] == 0
    fresh.meta["init"]["prompt"] = str(text_prompt) + "-gone"
    assert "not found" in drift_from_init(tiny_base, fresh)["reason"]

def test_norm_report(tiny_base):
    table = tiny_base.embedding_matrix().detach().float()
    norms = table.norm(dim=1)
    big = table[norms.argmax()] * 10
    prompt = SoftPrompt(torch.stack([big, table[7]]), {})
    report = norm_report(tiny_base, prompt)
    vocab = report["vocab"]
    assert vocab["count"] == len(tiny_base.tokenizer)
    assert vocab["mean"] == pytest.approx(norms.mean().item(), rel=1e-5)
    assert vocab["median"] == pytest.approx(norms.median().item(), rel=1e-2)
    assert vocab["min"] <= vocab["p5"] <= vocab["median"] <= vocab["p95"] <= vocab["max"]
    first, second = report["per_token"]
    assert first["vocab_percentile"] == 100 and first["ratio_to_median"] > 5
    assert second["norm"] == pytest.approx(norms[7].item(), rel=1e-5)


def test_compare_with_itself_permuted_and_shorter(tiny_base):
    a = SoftPrompt.initialise(tiny_base, 6, "vocab", seed=0)
    same = compare(a, a)
    assert same["same_length"] and all(c == pytest.approx(1.0, abs=1e-5) for c in same["per_token_cosine"])
    assert same["mean_per_token_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["mean_vector_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["matching"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    shuffled = compare(a, SoftPrompt(a.embeddings[perm], {}))
    assert shuffled["mean_per_token_cosine"] < 0.99  # position-aligned sees the shuffle ...
    assert shuffled["matching"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)  # ... the matching does not
    assert sorted((i, j) for i, j, _ in shuffled["matching"]["pairs"]) == sorted((int(p), k) for k, p in enumerate(perm))
    short = compare(a, SoftPrompt(a.embeddings[:2], {}))
    assert not short["same_length"] and short["per_token_cosine"] is None and short["mean_per_token_cosine"] is None
    assert len(short["matching"]["pairs"]) == 2 and short["matching"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert len(short["cosine_matrix"]) == 6 and len(short["cosine_matrix"][0]) == 2


def test_matching_is_optimal():
    gen = torch.Generator().manual_seed(0)
    for n, m in [(3, 3), (2, 4), (4, 2), (1, 3), (4, 4)]:
        score = torch.randn(n, m, generator=gen).tolist()
        pairs = _max_matching(score)
        got = sum(score[i][j] for i, j in pairs)
        if n <= m:
            best = max(sum(score[i][j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n))
        else:
            best = max(sum(score[i][j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(n), m))
        assert len(pairs) == min(n, m) and got == pytest.approx(best)


def test_inspect_report_and_png(tiny_base, text_prompt, tmp_path):
    other = SoftPrompt.initialise(tiny_base, 5, "vocab", seed=2)
    report = inspect_prompt(text_prompt, base=tiny_base, k=3, compare=other)
    assert tuple(report) == REPORT_KEYS
    assert report["n_virtual_tokens"] == 5 and report["k"] == 3 and report["compare"]["n_b"] == 5
    json.dumps(report)  # JSON-able
    table = format_report(report)
    assert "cos other" in table and "reproduced" in table and len(table.splitlines()) == 4 + 1 + 5
    for name, rep in [("near.png", {**report, "compare": None}), ("cmp.png", report)]:
        path = write_png(rep, tmp_path / name)
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_cli_inspect(tiny_model_dir, text_prompt, tmp_path, capsys):
    # The model comes from the prompt's meta["base"]["source"]: no --model needed.
    assert main(["inspect", str(text_prompt), "-k", "2", "--json", "--png", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert tuple(report) == REPORT_KEYS and report["drift"]["mean_l2"] == 0
    assert report["nearest"][0]["tokens"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["inspect", str(text_prompt), "--model", str(tiny_model_dir), "--compare", str(text_prompt),
                 "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "mean per-token cosine 1.000" in out and "nearest tokens" in out
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_inspect_errors(tiny_base, tiny_model_dir, text_prompt, tmp_path, capsys):
    assert "not found" in _error(capsys, ["inspect", str(tmp_path / "nope")])
    foreign = SoftPrompt.load(text_prompt)
    foreign.meta["base"] = {**foreign.meta["base"], "embedding_sha256": "0" * 16}
    foreign.save(tmp_path / "foreign")
    assert "trained for model" in _error(capsys, ["inspect", str(tmp_path / "foreign")])
    narrow = SoftPrompt(torch.zeros(3, 16), {"base": {"source": str(tiny_model_dir)}})
    narrow.save(tmp_path / "narrow")
    assert "width 16" in _error(capsys, ["inspect", str(tmp_path / "narrow")])
    assert "trained for model" in _error(capsys, ["inspect", str(text_prompt), "--compare", str(tmp_path / "foreign")])
    assert "k must be" in _error(capsys, ["inspect", str(text_prompt), "-k", "0"])
    assert "does not exist" in _error(capsys, ["inspect", str(text_prompt), "--png", str(tmp_path / "no" / "x.png")])
