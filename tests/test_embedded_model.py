"""End to end on the embedded SmolLM2-135M-Instruct (GGUF, dequantised): the real model, the real path."""

import json

import pytest
import torch

from softprompt import SoftPrompt, evaluate, export_peft, generate, train

pytestmark = pytest.mark.slow


def test_embedded_model_loads_frozen_with_its_fingerprint(smol_base):
    fp = smol_base.fingerprint()
    assert fp["source"] == "SmolLM2-135M-Instruct" and fp["hidden_size"] == 576 and fp["vocab_size"] == 49152
    assert all(not p.requires_grad for p in smol_base.model.parameters())


def test_parity_with_prepended_text_on_the_real_model(smol_base):
    tok = smol_base.tokenizer
    init = "Classify the sentiment of this review:"
    t_ids = tok(init, add_special_tokens=False)["input_ids"]
    prompt = SoftPrompt.initialise(smol_base, len(t_ids), "text", init_text=init)
    x = tok(" A gripping, funny film.\nSentiment:", return_tensors="pt")
    with torch.no_grad():
        ours = smol_base.forward(smol_base.prepend_prompts(x.input_ids, x.attention_mask, prompt.embeddings)).logits
        plain = smol_base.model(input_ids=torch.cat([torch.tensor([t_ids]), x.input_ids], 1)).logits
    assert torch.allclose(ours, plain, atol=1e-3)
    assert ours[0, -1].argmax() == plain[0, -1].argmax()


def test_train_eval_generate_export_on_the_embedded_model(smol_base, tmp_path):
    from softprompt.demo import make_rows

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24, 1)))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in make_rows(12, 2)))
    result = train(base=smol_base, data=str(data), output=str(tmp_path / "run"), input_template="Ticket: {ticket}\nTeam:",
                   output_template=" {team}", virtual_tokens=4, init="labels", steps=6, batch_size=4, lr=0.03, progress=False)
    assert result.metrics["steps"] == 6
    before = evaluate(str(dev), None, base=smol_base, input_template="Ticket: {ticket}\nTeam:", output_template=" {team}", progress=False)
    after = evaluate(str(dev), str(tmp_path / "run"), base=smol_base, progress=False)
    assert after["loss"] < before["loss"]  # even six steps move the answer loss on the real model
    text = generate("My parcel never came.", str(tmp_path / "run"), base=smol_base, max_new_tokens=4)
    assert isinstance(text, str)

    peft = pytest.importorskip("peft")
    export_peft(result.prompt, tmp_path / "peft")
    x = smol_base.tokenizer("Ticket: I cannot log in.\nTeam:", return_tensors="pt")
    with torch.no_grad():
        ours = smol_base.forward(smol_base.prepend_prompts(x.input_ids, x.attention_mask, result.prompt.embeddings)).logits
        wrapped = peft.PeftModel.from_pretrained(smol_base.model, str(tmp_path / "peft"))
        try:
            theirs = wrapped(input_ids=x.input_ids, attention_mask=x.attention_mask).logits
        finally:
            smol_base.model = wrapped.get_base_model()  # PEFT prompt tuning adds no layers; unwrap for later tests
    assert torch.allclose(ours, theirs, atol=1e-3)


def _same_model(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = a.tokenizer("The capital of France is", return_tensors="pt")
    assert x.input_ids.tolist() == b.tokenizer("The capital of France is", return_tensors="pt").input_ids.tolist()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert a.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        b.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        assert torch.equal(a.model(**x).logits, b.model(**x).logits)  # non-persistent buffers (RoPE) too
    assert a.fingerprint() == b.fingerprint()


def test_gguf_is_dequantised_once_then_loaded_as_a_folder(smol_base, tmp_path, monkeypatch):
    from softprompt import load_model
    from softprompt.model import load

    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path))
    first = load_model(None, dtype="float32", device="cpu")
    (folder,) = (tmp_path / "gguf").iterdir()
    assert (folder / "model.safetensors").is_file() and not list((tmp_path / "gguf").glob(".converting-*"))
    assert json.loads((folder / load.SOURCE_FILE).read_text())["gguf"] == str(load.embedded_model_file().resolve())
    _same_model(first, smol_base)

    def no_second_conversion(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(load, "convert_gguf", no_second_conversion)
    again = load_model(None, dtype="float32", device="cpu")
    assert again.model.config._name_or_path == str(folder)
    _same_model(again, smol_base)


def test_a_damaged_converted_folder_falls_back_to_the_gguf_file_and_is_removed(smol_base, tmp_path, monkeypatch,
                                                                                caplog):
    from softprompt import load_model
    from softprompt.model import load

    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path))
    folder = load.converted_folder(load.embedded_model_file())
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(smol_base.model.config.to_dict()))
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # truncated
    with caplog.at_level("WARNING", logger="softprompt.load"):
        base = load_model(None, dtype="float32", device="cpu")
    assert "loading the GGUF file itself and removing" in caplog.text and str(folder) in caplog.text
    assert not folder.exists()  # converted again by the next load
    _same_model(base, smol_base)


@pytest.mark.parametrize("why", ["unwritable cache", "large file"])
def test_the_gguf_file_itself_is_loaded_when_it_is_not_converted(smol_base, tmp_path, monkeypatch, caplog, why):
    from softprompt import load_model
    from softprompt.model import load

    if why == "unwritable cache":
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(blocker))  # mkdir under a file fails
    else:
        monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(load, "GGUF_CACHE_MAX_BYTES", 1000)  # the embedded file is ~100 MB
    with caplog.at_level("WARNING", logger="softprompt.load"):
        base = load_model(None, dtype="float32", device="cpu")
    assert ("could not keep the converted model" in caplog.text) == (why == "unwritable cache")
    assert why == "unwritable cache" or not (tmp_path / "gguf").exists()
    _same_model(base, smol_base)
