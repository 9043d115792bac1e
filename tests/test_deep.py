"""Deep prompts (Prefix-Tuning / P-tuning v2): keys/values at every layer, on the tiny GQA Llama (4 query heads,
2 key/value heads), through training, resume, activation checkpointing, generation, the server and PEFT."""

import json

import pytest
import torch

from softprompt import SoftPrompt, SoftPromptError, export_peft, load_model, train
from softprompt.generate import generate_ids
from softprompt.scheduler import PromptEntry, SamplingParams, Scheduler, Sequence

TEXTS = ["Review: the film was great .\nSentiment:", "the plot", "Review: this phone was awful ."]


def _batch(base, texts=TEXTS):
    b = base.tokenizer(texts, return_tensors="pt", padding=True)
    return b.input_ids, b.attention_mask, b.input_ids.masked_fill(b.attention_mask == 0, -100)


def _run(base, files, out, **kw):
    args = dict(data=str(files[0]), output=str(out), steps=12, batch_size=8, lr=0.03, virtual_tokens=4, deep=True,
                progress=False, save_every=100)
    return train(base=base, **{**args, **kw})


def test_layout_follows_the_cache_gqa(tiny_base):
    layers, heads, head_dim = tiny_base.kv_layout
    cfg = tiny_base.config
    assert (layers, heads, head_dim) == (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    deep = SoftPrompt.initialise(tiny_base, 5, "vocab", deep=True)
    assert deep.is_deep and deep.embeddings.shape == (5, 2 * layers, heads * head_dim)


def test_deep_prompt_from_a_prompt_computes_the_same(tiny_base):
    """Initialised with the keys/values an input-embedding prompt leaves at every layer, a deep prompt gives the
    same logits as that prompt, row padding included (token positions continue after the prefix)."""
    shallow = SoftPrompt.initialise(tiny_base, 5, "vocab", seed=3)
    deep = SoftPrompt.initialise(tiny_base, 5, "vocab", seed=3, deep=True)
    ids, mask, _ = _batch(tiny_base)
    pa, pb = tiny_base.prepend_prompts(ids, mask, shallow.embeddings), tiny_base.prepend_prompts(ids, mask, deep.embeddings)
    with torch.no_grad():
        a, b = tiny_base.forward(pa).logits[:, -ids.shape[1]:], tiny_base.forward(pb).logits  # [B, T, V] each
    real = pb.attention_mask[:, -ids.shape[1]:].bool()  # rows are left-aligned: [pad | tokens]
    assert torch.allclose(a[real], b[real], atol=1e-5)
    assert generate_ids(tiny_base, [tiny_base.tokenizer(t).input_ids for t in TEXTS], deep.embeddings, max_new_tokens=6) == \
        generate_ids(tiny_base, [tiny_base.tokenizer(t).input_ids for t in TEXTS], shallow.embeddings, max_new_tokens=6)


def test_mixed_batch_of_deep_shallow_and_none_equals_alone(tiny_base):
    deep = SoftPrompt.initialise(tiny_base, 3, "random", seed=1, deep=True)
    with torch.no_grad():
        deep.embeddings.mul_(0.5).add_(torch.randn_like(deep.embeddings))  # a deep prompt no shallow one can be
    shallow = SoftPrompt.initialise(tiny_base, 6, "vocab", seed=2)
    ids, mask, labels = _batch(tiny_base)
    mixed = tiny_base.sequence_nll(tiny_base.prepend_prompts(ids, mask, [deep, shallow, None], labels))[0]
    for i, p in enumerate([deep.embeddings, shallow.embeddings, None]):
        alone = tiny_base.sequence_nll(tiny_base.prepend_prompts(ids[i:i + 1], mask[i:i + 1], p, labels[i:i + 1]))[0]
        assert torch.allclose(mixed[i], alone[0], atol=1e-4), i
    rows = [tiny_base.tokenizer(t).input_ids for t in TEXTS]
    together = generate_ids(tiny_base, rows, [deep, shallow, None], max_new_tokens=5)
    for i, p in enumerate([deep.embeddings, shallow.embeddings, None]):
        assert together[i] == generate_ids(tiny_base, rows[i:i + 1], p, max_new_tokens=5)[0]


def test_deep_training_lowers_loss_saves_and_resumes_exactly(tiny_base, sentiment_files, tmp_path):
    full = _run(tiny_base, sentiment_files, tmp_path / "full", steps=20)
    log = [json.loads(line)["loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert sum(log[-4:]) / 4 < sum(log[:4]) / 4
    loaded = SoftPrompt.load(tmp_path / "full", tiny_base)
    assert loaded.is_deep and torch.equal(loaded.embeddings, full.prompt.embeddings)

    def stop(step, record):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_base, sentiment_files, tmp_path / "cut", steps=20, on_step=stop)
    resumed = _run(tiny_base, sentiment_files, tmp_path / "cut", steps=20, resume=True)
    assert torch.equal(full.prompt.embeddings, resumed.prompt.embeddings)


def test_deep_with_projection_exports_plain_prefixes(tiny_base, sentiment_files, tmp_path):
    result = _run(tiny_base, sentiment_files, tmp_path / "mlp", reparam="mlp", lr=0.003)
    assert SoftPrompt.load(tmp_path / "mlp").embeddings.shape == result.prompt.embeddings.shape == (4, *tiny_base.kv_shape)


def test_activation_checkpointing_gives_the_same_loss_and_gradient(tiny_model_dir):
    """PEFT's prefix tuning cannot checkpoint (HF drops the cache); ours keeps a prefix cache that never stores."""
    results = []
    for checkpointing in (False, True):
        base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
        if checkpointing:
            base.enable_activation_checkpointing()
        deep = SoftPrompt.initialise(base, 4, "vocab", seed=5, deep=True)
        ids, mask, labels = _batch(base)
        nll, count = base.sequence_nll(base.prepend_prompts(ids, mask, deep.embeddings, labels))
        (nll.sum() / count.sum()).backward()
        results.append((nll.detach(), deep.embeddings.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert results[1][1].abs().sum() > 0 and torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_server_scheduler_serves_deep_prompts_mixed_with_others(tiny_base):
    deep = SoftPrompt.initialise(tiny_base, 3, "random", seed=4, deep=True)
    shallow = SoftPrompt.initialise(tiny_base, 5, "vocab", seed=6)
    entries = [PromptEntry("deep", deep.embeddings.detach()), PromptEntry("shallow", shallow.embeddings.detach()), None]
    rows = [tiny_base.tokenizer(t).input_ids for t in TEXTS]
    sched = Scheduler(tiny_base, autostart=False)
    seqs = [Sequence(r, SamplingParams(max_tokens=6, temperature=0.0), e, lambda ev: None)
            for r in rows for e in entries]
    sched.submit(seqs)
    sched.run_until_idle()
    assert sched.stats["max_batch_rows"] == len(seqs)
    for s in seqs:
        p = None if s.prompt is None else s.prompt.embeddings
        assert s.generated == generate_ids(tiny_base, [s.input_ids], p, max_new_tokens=6)[0]
    assert entries[0].kv.shape == (2, *tiny_base.kv_layout[:2], 3, tiny_base.kv_layout[2])


def test_peft_prefix_tuning_round_trip_same_logits(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, PrefixTuningConfig, TaskType, get_peft_model

    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    deep = SoftPrompt.initialise(base, 4, "vocab", seed=7, deep=True)
    with torch.no_grad():
        deep.embeddings.add_(0.3 * torch.randn_like(deep.embeddings))
    deep.save(tmp_path / "ours")
    export_peft(tmp_path / "ours", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_attention_heads"] == base.config.num_key_value_heads
    x = base.tokenizer("Review: the film was great", return_tensors="pt")
    with torch.no_grad():
        ours = base.forward(base.prepend_prompts(x.input_ids, x.attention_mask, deep.embeddings)).logits
        theirs = PeftModel.from_pretrained(base.model, str(tmp_path / "peft"))(**x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)

    # ...and a prefix adapter PEFT trained loads directly, with the same logits
    fresh = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    pm = get_peft_model(fresh.model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = pm(**x).logits
    other = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    loaded = SoftPrompt.load(tmp_path / "adapter", other)
    assert loaded.is_deep
    with torch.no_grad():
        ours = other.forward(other.prepend_prompts(x.input_ids, x.attention_mask, loaded.embeddings)).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_deep_prompt_errors(tiny_base, tmp_path):
    deep = SoftPrompt.initialise(tiny_base, 2, "vocab", deep=True)
    wrong = SoftPrompt(deep.embeddings[:, :2], deep.meta)  # as if from a model with one layer
    with pytest.raises(SoftPromptError, match="does not fit model"):
        tiny_base.check_compatible(wrong)
    with pytest.raises(SoftPromptError, match="only start another deep prompt"):
        SoftPrompt.initialise(tiny_base, 2, "prompt", init_prompt=deep)


def test_cli_deep_train_eval_generate_export_import(tiny_model_dir, sentiment_files, tmp_path, capsys):
    from softprompt.cli import main

    train_file, dev_file = map(str, sentiment_files)
    run = str(tmp_path / "run")
    assert main(["train", "--deep", "--data", train_file, "--model", str(tiny_model_dir), "--output", run, "--steps", "6",
                 "--batch-size", "8", "--virtual-tokens", "3", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "run" / "softprompt.json").read_text())
    assert meta["training"]["deep"] is True and meta["training"]["lr"] == 0.01  # the deep default
    capsys.readouterr()
    assert main(["eval", "--prompt", run, "--data", dev_file, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] is not None
    assert main(["generate", "--prompt", run, "--max-new-tokens", "3", "Review: the film was great .\nSentiment:"]) == 0
    assert main(["export", "--prompt", run, "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    assert main(["import", str(tmp_path / "peft"), "--output", str(tmp_path / "back")]) == 0
    assert torch.equal(SoftPrompt.load(tmp_path / "back").embeddings, SoftPrompt.load(run).embeddings)


def test_malformed_peft_prefix_adapter_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "num_layers": 2, "token_dim": 16}))
    save_file({"prompt_embeddings": torch.zeros(2, 50)}, str(tmp_path / "bad" / "adapter_model.safetensors"))
    with pytest.raises(SoftPromptError, match="does not match num_layers 2"):
        SoftPrompt.load(tmp_path / "bad")


def test_inspect_reads_a_deep_prompt(tiny_base, tmp_path):
    """A deep prompt (the default kind for rows with an input) has no vocabulary neighbours, but its norms, drift
    and comparisons are reported: its keys/values against those real text leaves, layer by layer."""
    from softprompt.probe import REPORT_KEYS, format_report, inspect_prompt, write_png

    fresh = SoftPrompt.initialise(tiny_base, 3, "vocab", seed=4, deep=True)
    fresh.meta["init"] = {"strategy": "vocab", "seed": 4}
    report = inspect_prompt(fresh, base=tiny_base)
    assert tuple(report) == REPORT_KEYS and report["norms"]["kind"] == "keys/values"
    assert report["drift"]["reproducible"] and report["drift"]["mean_l2"] == 0  # the init, rebuilt exactly
    layers = tiny_base.kv_layout[0]
    assert len(report["norms"]["per_layer"]) == layers and len(report["norms"]["per_token_layer_rms"][0]) == layers
    # the init IS keys/values of real tokens: its norms sit inside the reference distribution
    ref = report["norms"]["vocab"]
    assert all(ref["min"] * 0.5 <= t["norm"] <= ref["max"] * 2 for t in report["norms"]["per_token"])
    moved = SoftPrompt(fresh.embeddings * 3, dict(fresh.meta))
    report = inspect_prompt(moved, base=tiny_base, compare=fresh)
    assert report["drift"]["mean_l2"] > 0 and report["drift"]["mean_cosine"] > 0.999  # scaled, same direction
    assert report["compare"]["mean_per_token_cosine"] > 0.999
    assert all(t["ratio_to_median"] > 1.5 * r["ratio_to_median"]
               for t, r in zip(report["norms"]["per_token"], inspect_prompt(fresh, base=tiny_base)["norms"]["per_token"]))
    text = format_report(report)
    assert "deep prompt" in text and "by layer" in text and "nearest tokens: none" in text
    assert write_png(inspect_prompt(moved, base=tiny_base), tmp_path / "deep.png").stat().st_size > 0
