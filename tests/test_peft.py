import json

import pytest
import torch

peft = pytest.importorskip("peft")

from softprompt import SoftPrompt, SoftPromptError, export_peft, import_peft


def test_exported_adapter_loads_in_peft_with_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from softprompt import load_model

    tiny_base = load_model(str(tiny_model_dir), device="cpu")  # PEFT wraps the model: use a private copy

    prompt = SoftPrompt.initialise(tiny_base, 5, "text", init_text="the film was great")  # PEFT's TEXT init needs care
    prompt.save(tmp_path / "ours")
    export_peft(tmp_path / "ours", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5
    x = tiny_base.tokenizer("Review: the film was great", return_tensors="pt")
    with torch.no_grad():
        ours = tiny_base.forward(tiny_base.prepend_prompts(x.input_ids, x.attention_mask, prompt.embeddings)).logits
        peft_model = PeftModel.from_pretrained(tiny_base.model, str(tmp_path / "peft"))
        theirs = peft_model(input_ids=x.input_ids, attention_mask=x.attention_mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_peft_trained_adapter_imports_with_same_logits(tiny_model_dir, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from softprompt import load_model

    base = load_model(str(tiny_model_dir), device="cpu")  # PEFT wraps the model: use a private copy
    pm = get_peft_model(base.model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_()
    pm.save_pretrained(tmp_path / "adapter")
    x = base.tokenizer("Review: the plot was poor", return_tensors="pt")
    with torch.no_grad():
        theirs = pm(input_ids=x.input_ids, attention_mask=x.attention_mask).logits
    prompt = SoftPrompt.load(tmp_path / "adapter", base)  # read directly...
    import_peft(tmp_path / "adapter", tmp_path / "converted")  # ...or converted
    assert torch.equal(SoftPrompt.load(tmp_path / "converted").embeddings, prompt.embeddings)
    with torch.no_grad():
        ours = base.forward(base.prepend_prompts(x.input_ids, x.attention_mask, prompt.embeddings)).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_non_prompt_tuning_adapter_is_refused(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(SoftPromptError, match="only PROMPT_TUNING"):
        SoftPrompt.load(tmp_path / "lora")
