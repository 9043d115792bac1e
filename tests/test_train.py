import hashlib
import json

import pytest
import torch

from softprompt import SoftPrompt, SoftPromptError, train
from softprompt.train import lr_at
from softprompt.config import TrainConfig


def _weights_digest(base):
    h = hashlib.sha256()
    for name, t in sorted(base.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _train(base, files, out, **kw):
    train_file, dev_file = files
    args = dict(data=str(train_file), output=str(out), steps=12, batch_size=8, lr=0.1, virtual_tokens=4,
                progress=False, save_every=4)
    args.update(kw)
    return train(base=base, **args)


def test_training_lowers_loss_and_leaves_base_bit_identical(tiny_base, sentiment_files, tmp_path):
    before = _weights_digest(tiny_base)
    result = _train(tiny_base, sentiment_files, tmp_path / "run", steps=40, lr=0.3)
    assert _weights_digest(tiny_base) == before
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 40
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < first - 0.3
    assert result.metrics["steps"] == 40 and result.metrics["examples_seen"] == 320


def test_artifact_contents(tiny_base, sentiment_files, tmp_path):
    _train(tiny_base, sentiment_files, tmp_path / "run", validation=str(sentiment_files[1]),
           input_template="{input}", output_template=" {output}")
    out = tmp_path / "run"
    for name in ("prompt.safetensors", "softprompt.json", "metrics.jsonl", "loss.png", "checkpoint.safetensors"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "softprompt.json").read_text())
    assert meta["base"]["embedding_sha256"] == tiny_base.fingerprint()["embedding_sha256"]
    assert meta["template"]["input"] == "{input}" and meta["training"]["lr"] == 0.1
    assert "best_val_accuracy" in meta["metrics"]
    assert SoftPrompt.load(out, tiny_base).n_virtual_tokens == 4


def test_best_validation_prompt_is_kept(tiny_base, sentiment_files, tmp_path):
    seen = {}

    def remember(step, record):
        if "val_accuracy" in record:
            seen[step] = record["val_accuracy"]

    result = _train(tiny_base, sentiment_files, tmp_path / "run", validation=str(sentiment_files[1]), eval_every=3,
                    on_step=remember)
    best_step = max(seen, key=lambda s: (seen[s], -s))
    assert result.metrics["best_step"] == best_step
    assert result.metrics["best_val_accuracy"] == seen[best_step]


def test_resume_after_interrupt_is_bit_exact(tiny_base, sentiment_files, tmp_path):
    full = _train(tiny_base, sentiment_files, tmp_path / "full", steps=10, save_every=100)

    def interrupt(step, record):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_base, sentiment_files, tmp_path / "cut", steps=10, save_every=100, on_step=interrupt)
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "cut" / "prompt.safetensors").exists()
    resumed = _train(tiny_base, sentiment_files, tmp_path / "cut", steps=10, save_every=100, resume=True)
    assert torch.equal(full.prompt.embeddings, resumed.prompt.embeddings)
    log = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert log == list(range(1, 11))


def test_resume_crosses_epochs_exactly(tiny_base, sentiment_files, tmp_path):
    # 48 rows / batch 8 = 6 steps per epoch; cut in the second epoch.
    full = _train(tiny_base, sentiment_files, tmp_path / "full", steps=14, save_every=100)

    def interrupt(step, record):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_base, sentiment_files, tmp_path / "cut", steps=14, on_step=interrupt, save_every=100)
    resumed = _train(tiny_base, sentiment_files, tmp_path / "cut", steps=14, resume=True, save_every=100)
    assert torch.equal(full.prompt.embeddings, resumed.prompt.embeddings)


def test_gradient_accumulation_gives_the_same_step(tiny_base, sentiment_files, tmp_path):
    a = _train(tiny_base, sentiment_files, tmp_path / "a", steps=3)
    b = _train(tiny_base, sentiment_files, tmp_path / "b", steps=3, grad_accum=4)
    assert torch.allclose(a.prompt.embeddings, b.prompt.embeddings, atol=1e-5)


def test_existing_run_is_never_clobbered(tiny_base, sentiment_files, tmp_path):
    _train(tiny_base, sentiment_files, tmp_path / "run", steps=2)
    before = (tmp_path / "run" / "prompt.safetensors").read_bytes()
    with pytest.raises(SoftPromptError, match="already holds a run"):
        _train(tiny_base, sentiment_files, tmp_path / "run", steps=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(SoftPromptError, match="bad.jsonl:1"):
        _train(tiny_base, (bad, None), tmp_path / "run", steps=2, overwrite=True)
    assert (tmp_path / "run" / "prompt.safetensors").read_bytes() == before
    with pytest.raises(SoftPromptError, match="different settings.*lr"):
        _train(tiny_base, sentiment_files, tmp_path / "run", steps=2, resume=True, lr=0.5)
    with pytest.raises(SoftPromptError, match="no checkpoint"):
        _train(tiny_base, sentiment_files, tmp_path / "fresh", resume=True)
    with pytest.raises(SoftPromptError, match="system message needs --chat"):
        _train(tiny_base, sentiment_files, tmp_path / "fresh", system="Be brief.")
    assert not (tmp_path / "fresh").exists()


def test_failed_start_creates_nothing(tiny_base, tmp_path):
    with pytest.raises(SoftPromptError, match="data file not found"):
        train(base=tiny_base, data=str(tmp_path / "none.jsonl"), output=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_lm_mode_trains_on_a_corpus(tiny_base, tmp_path):
    corpus = tmp_path / "quotes.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the film was great and the plot was superb {i}"}) + "\n" for i in range(16)))
    r = train(base=tiny_base, data=str(corpus), output=str(tmp_path / "lm"), lm=True, steps=15, batch_size=4, lr=0.3,
              virtual_tokens=4, progress=False)
    log = [json.loads(line)["loss"] for line in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1] < log[0]
    assert r.prompt.template["input"] == ""


def test_an_lm_prompt_learns_how_texts_begin(tiny_base, tmp_path):
    # With no input, a text's first token is predicted by the last virtual token (PEFT trains it too): a prompt
    # trained on texts that all open with "great" starts a text from nothing with "great".
    from softprompt.data import Encoder, Template
    from softprompt.generate import generate_ids

    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"great . the plot was superb {i}"}) + "\n" for i in range(16)))
    first = tiny_base.tokenizer("great")["input_ids"][0]
    enc = Encoder(tiny_base.tokenizer, Template(input="", output="{text}"), score_first=True)
    assert enc.encode_rows([{"text": "great film"}])[0].labels[0] == first
    assert Encoder(tiny_base.tokenizer, Template(input="", output="{text}")).encode_rows([{"text": "great film"}])[0].labels[0] == -100
    r = train(base=tiny_base, data=str(corpus), output=str(tmp_path / "lm"), lm=True, steps=30, batch_size=4, lr=0.3,
              virtual_tokens=4, progress=False)
    assert generate_ids(tiny_base, [[]], r.prompt, max_new_tokens=1) == [[first]]
    # A deep prompt has no virtual position to predict from: the first token stays unscored, and training works.
    d = train(base=tiny_base, data=str(corpus), output=str(tmp_path / "deep"), lm=True, deep=True, steps=10,
              batch_size=4, lr=0.05, virtual_tokens=4, progress=False)
    log = [json.loads(line)["loss"] for line in (tmp_path / "deep" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1] < log[0] and d.prompt.is_deep


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(data="x", output="y", lr=1.0, warmup=10, schedule="cosine")
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01
    assert lr_at(50, TrainConfig(data="x", output="y", lr=1.0, warmup=0, schedule="constant"), 100) == 1.0


def test_config_rejects_unknown_and_missing_fields():
    with pytest.raises(SoftPromptError, match="unknown TrainConfig field"):
        train(data="x", output="y", learning_rate=3)
    with pytest.raises(SoftPromptError, match="missing required field"):
        train(data="x")


def test_activation_checkpointing_gives_the_same_training(tiny_model_dir, sentiment_files, tmp_path):
    from softprompt import load_model

    plain = _train(load_model(str(tiny_model_dir), device="cpu"), sentiment_files, tmp_path / "a", steps=3)
    base = load_model(str(tiny_model_dir), device="cpu")
    ckpt = _train(base, sentiment_files, tmp_path / "b", steps=3, activation_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) and m.training for m in base.model.modules())
    assert not any(m.training for m in base.model.modules() if isinstance(m, torch.nn.Dropout))
    assert torch.allclose(plain.prompt.embeddings, ckpt.prompt.embeddings, atol=1e-6)
