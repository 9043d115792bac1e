"""To and from PEFT's prompt-tuning adapter format: adapter_config.json + adapter_model.safetensors.

The formats are the same data (one tensor named `prompt_embeddings`), so conversion is a copy; PEFT is not
needed to export or import, only to load the result with `PeftModel.from_pretrained`. Input-embedding prompts
are PROMPT_TUNING adapters ([n, d]); deep prompts are PREFIX_TUNING adapters without projection, whose tensor
is ours flattened: [n, 2 * layers * kv_dim], each layer's key then value, kv_dim = kv_heads * head_dim (PEFT's
grouped-query layout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .artifact_files import PEFT_CONFIG, PEFT_WEIGHTS, TEMPLATE_FILE, TENSOR_KEY, atomic_write, read_peft_adapter
from .errors import SoftPromptError
from .prompt import SoftPrompt, as_prompt


def export_peft(prompt: SoftPrompt | str | os.PathLike, output: str | os.PathLike, *, base_model: str | None = None,
                num_layers: int | None = None, num_attention_heads: int | None = None) -> Path:
    """Write `prompt` as a PEFT PROMPT_TUNING adapter directory."""
    from safetensors.torch import save_file

    prompt = as_prompt(prompt)
    base = prompt.meta.get("base") or {}
    init = prompt.meta.get("init") or {}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if base.get("is_encoder_decoder") else "CAUSAL_LM",
        "num_virtual_tokens": prompt.n_virtual_tokens,
        "token_dim": prompt.dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        # "RANDOM" always: the trained weights are loaded over the init anyway, and PEFT's "TEXT" would demand a
        # tokenizer path at load time. The init text stays in softprompt.json.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    if prompt.is_deep:  # [n, 2l, kv]: PEFT derives head_dim = token_dim / num_attention_heads (= the KV heads)
        heads = (prompt.meta.get("kv_layout") or {}).get("kv_heads") or num_attention_heads
        if not heads:
            raise SoftPromptError("exporting a deep prompt needs the model's number of key/value heads "
                                  "(num_attention_heads); it is in prompts trained by this version")
        config = {**config, "peft_type": "PREFIX_TUNING", "num_layers": prompt.embeddings.shape[1] // 2,
                  "num_attention_heads": heads, "encoder_hidden_size": prompt.dim, "prefix_projection": False}
        for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
            config.pop(key)
    config.update({
        "base_model_name_or_path": base_model or base.get("source"),
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "modules_to_save": None,
    })
    flat = prompt.embeddings.detach().float().cpu().reshape(prompt.n_virtual_tokens, -1)
    tensor = {TENSOR_KEY: flat.contiguous()}
    atomic_write(out / PEFT_WEIGHTS, lambda tmp: save_file(tensor, str(tmp), metadata={"format": "pt"}))
    atomic_write(out / PEFT_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    if prompt.template:
        atomic_write(out / TEMPLATE_FILE, lambda tmp: tmp.write_text(json.dumps(prompt.template, indent=2) + "\n"))
        atomic_write(out / "README.md", lambda tmp: tmp.write_text(usage_note(prompt.template)))
    return out


def usage_note(template: dict) -> str:
    """How to format inputs for this adapter in plain transformers + PEFT: the prompt was trained on this format."""
    system = template.get("system")
    messages = ([f'{{"role": "system", "content": {json.dumps(system)}}}, '] if system else []) + [
        '{"role": "user", "content": text}']
    if template.get("chat"):
        fmt = (f"text = {json.dumps(template.get('input', '{input}'))}.format(**row)\n"
               f"prompt = tokenizer.apply_chat_template([{''.join(messages)}], tokenize=False, add_generation_prompt=True)\n"
               "inputs = tokenizer(prompt, add_special_tokens=False, return_tensors='pt')")
    else:
        fmt = (f"prompt = {json.dumps(template.get('input', '{input}'))}.format(**row)\n"
               "inputs = tokenizer(prompt, return_tensors='pt')")
    return ("# Soft prompt exported by softprompt\n\nLoad with `PeftModel.from_pretrained(base, this_folder)`. The prompt "
            "was trained on inputs formatted like this (`softprompt_template.json` holds the same):\n\n"
            f"```python\n{fmt}\n```\n\nThe answer follows as `{template.get('output')}` (label map: "
            f"{template.get('label_map')}).\n")


def read_peft_prompt(directory: str | os.PathLike) -> SoftPrompt:
    """Read a PEFT PROMPT_TUNING adapter directory as a SoftPrompt (no model fingerprint: only width is checked)."""
    return SoftPrompt(*read_peft_adapter(directory))


def import_peft(adapter_dir: str | os.PathLike, output: str | os.PathLike, *, template: dict | None = None) -> Path:
    """Convert a PEFT adapter directory into a softprompt artifact directory."""
    prompt = read_peft_prompt(adapter_dir)  # keeps an exported template
    if template:
        prompt.meta["template"] = template
    return prompt.save(output)
