import importlib
import json

import pytest
import torch

from conftest import SUBJECTS, WORDS_NEG, WORDS_POS, cli_error, write_jsonl
from softprompt import SoftPrompt, SoftPromptError, distill
from softprompt.distill import coarse_kl, keep_positions, top_k_targets

distill_module = importlib.import_module("softprompt.distill")  # `softprompt.distill` is the function

TEACHER = "Review : the plot was awful . Sentiment : negative\nReview : the meal was superb . Sentiment : positive"


@pytest.fixture
def inputs(tmp_path):
    rows = [{"input": f"Review : {s} was {w} . Sentiment :"} for s in SUBJECTS for w in (WORDS_POS + WORDS_NEG)[::3]]
    return write_jsonl(tmp_path / "inputs.jsonl", rows)


def _distill(base, inputs, out, **kw):
    args = dict(teacher=TEACHER, data=str(inputs), output=str(out), steps=6, batch_size=4, virtual_tokens=4,
                max_new_tokens=6, top_k=16, holdout=0.25, progress=False, save_every=100)
    args.update(kw)
    return distill(base=base, **args)


def _log(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_coarse_kl_is_the_full_kl_when_k_covers_the_vocabulary():
    torch.manual_seed(0)
    teacher, student = torch.randn(5, 11), torch.randn(5, 11)
    ids, lp, tail = top_k_targets(teacher, 11)
    full = (teacher.log_softmax(-1).exp() * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1)
    assert torch.allclose(coarse_kl(student, ids, lp, tail), full, atol=1e-5)
    ids, lp, tail = top_k_targets(teacher, 3)  # coarser: a lower bound, zero only when they agree
    assert (coarse_kl(student, ids, lp, tail) <= full + 1e-6).all()
    assert coarse_kl(teacher, ids, lp, tail).abs().max() < 1e-5


def test_student_holding_the_teacher_kv_is_the_teacher(tiny_base, inputs, tmp_path):
    # A deep prompt initialised from ALL of the teacher prompt's keys/values computes what the teacher computes;
    # with lr 0 it stays there: KL 0 and full agreement, while the untuned model is far off.
    result = _distill(tiny_base, inputs, tmp_path / "run", deep=True, virtual_tokens=200, lr=0.0, steps=2)
    m = result.metrics
    assert m["virtual_tokens"] == m["teacher_tokens"] > 20
    assert m["teacher_agreement"] == 1.0 and m["teacher_token_f1"] == 1.0 and m["teacher_token_agreement"] == 1.0
    assert m["kl"] < 1e-4 and m["baseline_kl"] > 100 * max(m["kl"], 1e-4)
    assert all(r["loss"] < 1e-4 for r in _log(tmp_path / "run"))
    assert m["baseline_agreement"] < 1.0


def test_distillation_lowers_the_kl(tiny_base, inputs, tmp_path):
    result = _distill(tiny_base, inputs, tmp_path / "run", steps=30, lr=0.3, init="vocab")
    log = _log(tmp_path / "run")
    assert sum(r["loss"] for r in log[-5:]) < 0.7 * sum(r["loss"] for r in log[:5])
    m = result.metrics
    assert m["kl"] < m["baseline_kl"]
    meta = json.loads((tmp_path / "run" / "softprompt.json").read_text())
    assert meta["metrics"]["kl"] == m["kl"] and meta["training"]["job"] == "distill"
    assert meta["template"]["input"] == "{input}" and not meta["template"]["system"]
    from softprompt.probe import inspect_prompt  # an ordinary artifact: inspect reads it

    report = inspect_prompt(str(tmp_path / "run"), base=tiny_base)
    assert len(report["nearest"]) == 4 and report["drift"]["reproducible"]


def test_teacher_is_cached_and_resume_is_exact(tiny_base, inputs, tmp_path, monkeypatch):
    full = _distill(tiny_base, inputs, tmp_path / "full", steps=8)
    assert full.metrics["teacher_cache"] == "built"

    def interrupt(step, record):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _distill(tiny_base, inputs, tmp_path / "cut", steps=8, on_step=interrupt)
    assert (tmp_path / "cut" / "teacher.safetensors").exists()

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(distill_module, "teacher_targets", no_teacher)
    resumed = _distill(tiny_base, inputs, tmp_path / "cut", steps=8, resume=True)
    assert resumed.metrics["teacher_cache"] == "reused"
    assert torch.equal(full.prompt.embeddings, resumed.prompt.embeddings)
    assert [r["step"] for r in _log(tmp_path / "cut")] == list(range(1, 9))
    # Another teacher is another run: resuming with it is refused, not silently mixed.
    with pytest.raises(SoftPromptError, match="differ"):
        _distill(tiny_base, inputs, tmp_path / "cut", steps=8, resume=True, teacher="Review : something else")


def test_compressed_deep_init_and_gold_answers(tiny_base, tmp_path):
    rows = [{"input": f"Review : {s} was {w} .", "output": "Sentiment : positive" if w in WORDS_POS else "Sentiment : negative"}
            for s in SUBJECTS for w in WORDS_POS[:2] + WORDS_NEG[:2]]
    data = write_jsonl(tmp_path / "gold.jsonl", rows)
    for how in ("last", "even", "first", "sink"):
        result = _distill(tiny_base, data, tmp_path / how, deep=True, compress=how, gold_weight=0.5, steps=3)
        assert result.prompt.is_deep and result.prompt.n_virtual_tokens == 4
        assert result.prompt.meta["init"]["compress"] == how and len(result.prompt.meta["init"]["positions"]) == 4
    assert result.prompt.meta["init"]["positions"][0] == 0 and result.prompt.meta["init"]["positions"][1] > 1
    assert keep_positions(10, 4, "last") == [6, 7, 8, 9] and keep_positions(10, 4, "first") == [0, 1, 2, 3]
    assert keep_positions(10, 4, "even") == [0, 3, 6, 9] and keep_positions(3, 4, "even") == [0, 1, 2]
    with pytest.raises(SoftPromptError, match="no row .* has a gold output"):
        _distill(tiny_base, data, tmp_path / "x", gold_weight=0.5, output_template=" {missing}")


def test_clear_errors(tiny_base, inputs, tmp_path, capsys):
    with pytest.raises(SoftPromptError, match="teacher file not found"):
        _distill(tiny_base, inputs, tmp_path / "a", teacher=str(tmp_path / "nope.txt"))
    with pytest.raises(SoftPromptError, match="teacher prompt is empty"):
        _distill(tiny_base, inputs, tmp_path / "b", teacher="   ")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SoftPromptError, match="empty.txt: the teacher file is empty"):
        _distill(tiny_base, inputs, tmp_path / "c", teacher=str(tmp_path / "empty.txt"))
    with pytest.raises(SoftPromptError, match="over max_length"):
        _distill(tiny_base, inputs, tmp_path / "d", max_length=40)
    assert not any((tmp_path / n).exists() for n in "abcd")
    err = cli_error(capsys, ["distill", "--teacher", str(tmp_path / "missing.md"), "--data", str(inputs),
                             "--output", str(tmp_path / "e")])
    assert "teacher file not found" in err


def test_cli_artifact_generates_and_exports(tiny_model_dir, inputs, tmp_path, capsys):
    from softprompt.cli import main

    (tmp_path / "teacher.txt").write_text(TEACHER)
    out = tmp_path / "run"
    argv = ["distill", "--model", str(tiny_model_dir), "--teacher", str(tmp_path / "teacher.txt"), "--data", str(inputs),
            "--output", str(out), "--steps", "3", "--virtual-tokens", "4", "--max-new-tokens", "4", "--top-k", "8",
            "--deep", "--no-progress", "--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "virtual tokens" in printed and "untuned, no prompt" in printed and "prefill" in printed
    meta = json.loads((out / "softprompt.json").read_text())
    for key in ("teacher_agreement", "kl", "baseline_agreement", "baseline_kl", "teacher_tokens", "virtual_tokens",
                "prefill_speedup"):
        assert key in meta["metrics"], key
    assert main(["generate", "--prompt", str(out), "--model", str(tiny_model_dir), "--max-new-tokens", "4",
                 "Review : the film was great . Sentiment :"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["export", "--prompt", str(out), "--output", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    assert SoftPrompt.load(tmp_path / "peft").is_deep


def test_shifted_prompt_kv_keeps_the_states(tiny_base):
    # Rotary models see only distances: shifting the positions changes the keys' rotation, never the values, so the
    # last keys/values of a long prompt can sit at 0..n-1 in a shorter prefix (compress 'last').
    emb = tiny_base.embedding_matrix()[torch.arange(10, 22)]
    plain, shifted = tiny_base.prompt_kv(emb), tiny_base.prompt_kv(emb, first_position=-7)
    values = slice(1, None, 2)  # [P, 2 x layers, kv]: keys at even, values at odd indices
    assert torch.allclose(plain[:, values], shifted[:, values], atol=1e-5)
    assert not torch.allclose(plain[:, 0::2], shifted[:, 0::2], atol=1e-3)


def test_teacher_text_or_file(tmp_path):
    from softprompt.distill import read_teacher

    long_line = "You are a poet who answers in rhymes and " * 8  # longer than a file name can be
    assert read_teacher(long_line) == long_line
    assert read_teacher("Be brief.") == "Be brief."
    (tmp_path / "t.txt").write_text("  Act as a pirate.\n")
    assert read_teacher(str(tmp_path / "t.txt")) == "Act as a pirate."
