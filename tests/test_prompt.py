import json

import pytest
import torch

from softprompt import SoftPrompt, SoftPromptError, load_model
from softprompt.prompt import FREQUENT_TOKENS


def test_random_init_is_uniform_half(tiny_base):
    p = SoftPrompt.initialise(tiny_base, 7, "random", seed=3)
    assert p.embeddings.shape == (7, tiny_base.hidden_size)
    assert p.embeddings.dtype == torch.float32 and p.embeddings.requires_grad
    assert p.embeddings.min() >= -0.5 and p.embeddings.max() <= 0.5
    assert torch.equal(p.embeddings, SoftPrompt.initialise(tiny_base, 7, "random", seed=3).embeddings)
    assert not torch.equal(p.embeddings, SoftPrompt.initialise(tiny_base, 7, "random", seed=4).embeddings)


def test_vocab_init_rows_are_frequent_token_embeddings(tiny_base):
    table = tiny_base.embedding_matrix()
    p = SoftPrompt.initialise(tiny_base, 5, "vocab", seed=0)
    special = set(tiny_base.tokenizer.all_special_ids)
    for row in p.embeddings:
        matches = (table == row).all(1).nonzero().flatten().tolist()
        assert matches and all(m < FREQUENT_TOKENS and m not in special for m in matches)


def test_text_init_repeats_and_truncates(tiny_base):
    ids = tiny_base.tokenizer("the film", add_special_tokens=False)["input_ids"]
    table = tiny_base.embedding_matrix()
    p = SoftPrompt.initialise(tiny_base, len(ids) * 2 + 1, "text", init_text="the film")
    expected = table[torch.tensor((ids * 3)[: len(ids) * 2 + 1])]
    assert torch.equal(p.embeddings, expected)
    short = SoftPrompt.initialise(tiny_base, 1, "text", init_text="the film")
    assert torch.equal(short.embeddings, table[ids[:1]])


def test_labels_init_uses_label_word_means(tiny_base):
    p = SoftPrompt.initialise(tiny_base, 4, "labels", labels=["positive", "negative"])
    table = tiny_base.embedding_matrix()
    ids = tiny_base.tokenizer(" positive", add_special_tokens=False)["input_ids"]
    assert torch.allclose(p.embeddings[0], table[ids].mean(0))


@pytest.mark.parametrize("kwargs, message", [
    ({"init": "bogus"}, "unknown init"),
    ({"init": "text"}, "init_text"),
    ({"init": "labels"}, "label words"),
    ({"init": "vocab", "n_virtual_tokens": 0}, ">= 1"),
])
def test_bad_init_is_a_clear_error(tiny_base, kwargs, message):
    kwargs = {"n_virtual_tokens": 4, **kwargs}
    with pytest.raises(SoftPromptError, match=message):
        SoftPrompt.initialise(tiny_base, **kwargs)


def test_save_load_roundtrip_is_exact(tiny_base, tmp_path):
    p = SoftPrompt.initialise(tiny_base, 6, "random", seed=1)
    p.meta["template"] = {"input": "Q: {q}", "output": " {a}"}
    p.save(tmp_path / "p")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["prompt.safetensors", "softprompt.json"]
    q = SoftPrompt.load(tmp_path / "p", tiny_base)
    assert torch.equal(p.embeddings, q.embeddings)
    assert q.template == {"input": "Q: {q}", "output": " {a}"}
    meta = json.loads((tmp_path / "p" / "softprompt.json").read_text())
    assert meta["base"]["embedding_sha256"] == tiny_base.fingerprint()["embedding_sha256"]
    assert meta["n_virtual_tokens"] == 6


def test_artifact_is_small(tiny_base, tmp_path):
    SoftPrompt.initialise(tiny_base, 20, "vocab").save(tmp_path / "p")
    assert (tmp_path / "p" / "prompt.safetensors").stat().st_size < 20 * tiny_base.hidden_size * 4 + 1024


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(tiny_base, tmp_path, damage):
    path = SoftPrompt.initialise(tiny_base, 4, "vocab").save(tmp_path / "p") / "prompt.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x80\x04pickle" + data[:10])
    with pytest.raises(SoftPromptError, match="not a readable safetensors"):
        SoftPrompt.load(tmp_path / "p")


def test_missing_prompt_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SoftPromptError, match="prompt not found"):
        SoftPrompt.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoftPromptError, match="holds no prompt.safetensors"):
        SoftPrompt.load(tmp_path / "empty")


def test_prompt_for_another_model_is_refused(tiny_base, tiny_model_dir, tmp_path):
    from conftest import make_tiny_model_dir

    other = load_model(str(make_tiny_model_dir(tmp_path / "other", seed=1)), device="cpu")
    SoftPrompt.initialise(other, 4, "vocab").save(tmp_path / "p")
    with pytest.raises(SoftPromptError, match="was trained for model"):
        SoftPrompt.load(tmp_path / "p", tiny_base)
    # The same weights loaded in another dtype are the same model.
    SoftPrompt.load(tmp_path / "p", load_model(str(tmp_path / "other"), dtype="bfloat16", device="cpu"))


def test_prompt_of_other_width_is_refused(tiny_base, tmp_path):
    SoftPrompt(torch.zeros(3, tiny_base.hidden_size + 1)).save(tmp_path / "p")
    with pytest.raises(SoftPromptError, match="does not match"):
        SoftPrompt.load(tmp_path / "p", tiny_base)
