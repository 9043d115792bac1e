"""Text-to-text (encoder-decoder) models: the prompt goes before the encoder input. A tiny T5 built offline."""

import pytest
import torch

from softprompt import SoftPrompt, evaluate, export_peft, generate, load_model, train


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # the tiny BPE tokenizer
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5(t5_dir):
    return load_model(str(t5_dir), device="cpu")


def test_prompt_goes_before_the_encoder_input_and_answer_to_the_decoder(t5):
    assert t5.is_encoder_decoder and t5.fingerprint()["is_encoder_decoder"]
    prompt = SoftPrompt.initialise(t5, 3, "random").embeddings
    ids = torch.tensor([[10, 11, 12, 20, 21], [13, 14, 22, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 20, 21], [-100, -100, 22, -100, -100]])
    p = t5.prepend_prompts(ids, mask, prompt, labels)
    assert p.labels.tolist() == [[20, 21], [22, -100]]
    # Encoder rows: 3 virtual + the input tokens only (the answer moved to the decoder), padding first.
    assert p.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    with torch.no_grad():
        nll, count = t5.sequence_nll(p)
        # Reference: the plain HF call with the prompt before the encoder tokens.
        emb = t5.model.get_input_embeddings()(torch.tensor([[10, 11, 12]]))
        ref = t5.model(inputs_embeds=torch.cat([prompt[None], emb], 1), labels=torch.tensor([[20, 21]])).loss * 2
    assert count.tolist() == [2, 1]
    assert torch.allclose(nll[0], ref, atol=1e-4)


def test_logits_at_labels_on_the_decoder_side(t5):
    """Scoring's logits (one row per labelled answer token) give sequence_nll's loss."""
    prompt = SoftPrompt.initialise(t5, 3, "random").embeddings
    ids = torch.tensor([[10, 11, 12, 20, 21], [13, 14, 22, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 20, 21], [-100, -100, 22, -100, -100]])
    p = t5.prepend_prompts(ids, mask, prompt, labels)
    with torch.no_grad():
        logits, rows = t5.logits_at_labels(p)
        nll, _ = t5.sequence_nll(p)
    assert rows.tolist() == [0, 0, 1] and logits.shape == (3, t5.vocab_size) and logits.dtype == torch.float32
    picked = -torch.log_softmax(logits, -1)[torch.arange(3), torch.tensor([20, 21, 22])]
    torch.testing.assert_close(torch.stack([picked[:2].sum(), picked[2]]), nll, rtol=1e-5, atol=1e-5)


def test_train_eval_generate_export_a_t5_prompt(t5, t5_dir, sentiment_files, tmp_path):
    train_file, dev_file = sentiment_files
    result = train(base=t5, data=str(train_file), output=str(tmp_path / "run"), steps=15, batch_size=8, lr=0.3,
                   virtual_tokens=4, progress=False)
    log = [float(line.split('"loss": ')[1].split(",")[0]) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(log[-3:]) / 3 < sum(log[:3]) / 3
    scores = evaluate(str(dev_file), str(tmp_path / "run"), base=t5, progress=False)
    assert "accuracy" in scores and scores["loss"] > 0
    text = generate("Review: the film was great .\nSentiment:", str(tmp_path / "run"), base=t5, max_new_tokens=4)
    assert isinstance(text, str)

    peft = pytest.importorskip("peft")
    export_peft(result.prompt, tmp_path / "peft")
    assert '"SEQ_2_SEQ_LM"' in (tmp_path / "peft" / "adapter_config.json").read_text()
    private = load_model(str(t5_dir), device="cpu")
    wrapped = peft.PeftModel.from_pretrained(private.model, str(tmp_path / "peft"))
    x = t5.tokenizer("Review: the plot was poor .", return_tensors="pt")
    y = torch.tensor([t5.tokenizer(" negative", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        theirs = wrapped(input_ids=x.input_ids, attention_mask=x.attention_mask, labels=y).logits
        ours_p = t5.prepend_prompts(torch.cat([x.input_ids, y], 1), torch.ones(1, x.input_ids.shape[1] + y.shape[1], dtype=torch.long),
                                    result.prompt.embeddings, torch.cat([torch.full_like(x.input_ids, -100), y], 1))
        ours = t5.forward(ours_p).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
