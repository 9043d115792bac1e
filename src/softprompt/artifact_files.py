"""The files of a prompt artifact, and how they are read and written safely.

Our artifact: `prompt.safetensors` (one fp32 tensor under the key PEFT uses) + `softprompt.json` (the base model it
belongs to, the template, how it was made). PEFT's adapters: `adapter_config.json` + `adapter_model.safetensors`
(+ our `softprompt_template.json` beside them). Reads refuse pickle and name the file on any fault; writes are
atomic (temp file + rename), so a crash never leaves half a file; prompt values of a diverged run are refused both
ways. Plain data: prompt.py (SoftPrompt.save / load) and peft_io.py (export / import) both build on this.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import SoftPromptError

TENSOR_FILE = "prompt.safetensors"
META_FILE = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"  # the same key PEFT uses, so the tensor file is interchangeable
# A trained prompt's values are of the order of the model's embeddings / activations (|x| ~ 1-100); beyond this a
# prompt is the result of a diverged run (e.g. --lr 1e30), never something to load or save.
MAX_PROMPT_ABS = 1e6

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# PEFT's config has no place for how inputs are formatted (template, chat template, system message), yet the
# prompt only works with the format it was trained on: it travels beside the adapter and comes back on import.
TEMPLATE_FILE = "softprompt_template.json"


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """Read one tensor from a safetensors file; a corrupt or truncated file is a clear error, never pickle."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SoftPromptError(f"{path} is not a readable safetensors file ({e})") from None
    if key not in tensors:
        raise SoftPromptError(f"{path} has no tensor named {key!r} (has: {', '.join(tensors) or 'none'})")
    return tensors[key]


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a one-line error naming the file."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: JSONDecodeError, or an over-long integer
        raise SoftPromptError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise SoftPromptError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise SoftPromptError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_meta(path: Path) -> dict[str, Any]:
    """softprompt.json, with the fields code relies on checked for type (a hand-edited or foreign file)."""
    meta = read_json_object(path)
    for key in ("base", "template", "init", "metrics", "training", "kv_layout"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise SoftPromptError(f"{path}: field {key!r} must be an object, got {type(meta[key]).__name__}")
    template = meta.get("template") or {}
    for key in ("input", "output", "system"):
        if template.get(key) is not None and not isinstance(template[key], str):
            raise SoftPromptError(f"{path}: template field {key!r} must be a string, got {type(template[key]).__name__}")
    if template.get("label_map") is not None and not isinstance(template["label_map"], (dict, str)):
        raise SoftPromptError(f"{path}: template field 'label_map' must be an object")
    if template.get("chat") is not None and not isinstance(template["chat"], bool):
        raise SoftPromptError(f"{path}: template field 'chat' must be true or false")
    return meta


def check_prompt_values(emb: torch.Tensor, source: Path | str) -> None:
    """Refuse what no training should produce: no virtual tokens, NaN/inf, or values of a diverged run."""
    if emb.dim() in (2, 3) and (emb.shape[0] == 0 or emb.numel() == 0):
        raise SoftPromptError(f"{source}: the prompt has no virtual tokens (shape {tuple(emb.shape)})")
    if emb.is_floating_point() and emb.numel():
        if not bool(torch.isfinite(emb).all()):
            raise SoftPromptError(f"{source}: the prompt holds NaN or infinite values (a diverged training run?)")
        biggest = float(emb.abs().max())
        if biggest > MAX_PROMPT_ABS:
            raise SoftPromptError(f"{source}: the prompt holds values up to {biggest:.3g}, over {MAX_PROMPT_ABS:g} "
                                  "(a diverged training run? try a lower --lr)")


TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


def atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder, then rename: a crash never leaves a half-written file. A failed
    write (disk full, file-size limit) is one line naming the file; the previous file is untouched."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e).rpartition("I/O error: ")[2]  # safetensors wraps the OS error
        raise SoftPromptError(f"cannot write {path}: {reason}"
                              + (f" (the previous {path.name} is unchanged)" if path.exists() else "")) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete hidden `.NAME.tmp-PID` files left by writers that were killed (their PID is gone)."""
    removed = []
    with contextlib.suppress(OSError):
        for f in Path(directory).iterdir():
            m = TMP_RE.match(f.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    f.unlink()
                    removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours, or cannot tell: leave its file alone
    return True


def read_peft_adapter(directory: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """A PEFT PROMPT_TUNING / PREFIX_TUNING adapter directory -> (prompt tensor, softprompt meta): what a SoftPrompt
    is made of (no model fingerprint: only the width is checked, by the caller's `check_compatible`)."""
    directory = Path(directory)
    config = read_json_object(directory / PEFT_CONFIG)
    kind = config.get("peft_type")
    if kind not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise SoftPromptError(f"{directory}: PEFT adapter of type {kind!r}; only PROMPT_TUNING and PREFIX_TUNING "
                              "adapters are soft prompts")
    if config.get("num_transformer_submodules", 1) != 1:
        raise SoftPromptError(f"{directory}: adapters with num_transformer_submodules != 1 are not supported")
    weights = directory / PEFT_WEIGHTS
    if not weights.exists():
        raise SoftPromptError(f"{directory}: no {PEFT_WEIGHTS} (only safetensors adapters are read, never pickle)")
    emb = read_tensor(weights, TENSOR_KEY)
    check_prompt_values(emb, weights)
    n = config.get("num_virtual_tokens")
    if n is not None and emb.shape[0] != n:
        raise SoftPromptError(f"{directory}: config says {n} virtual tokens, tensor has {emb.shape[0]}")
    meta = {"base": {"source": config.get("base_model_name_or_path"), "hidden_size": config.get("token_dim")},
            "init": {"strategy": "peft-import"}, "imported_from": str(directory)}
    if kind == "PREFIX_TUNING":  # saved without projection: [n, layers * 2 * token_dim] (PEFT stores the output)
        layers, width = config.get("num_layers"), config.get("token_dim")
        if not isinstance(layers, int) or not isinstance(width, int) or not layers or not width or emb.dim() != 2 or emb.shape[1] != 2 * layers * width:
            raise SoftPromptError(f"{directory}: prefix tensor {tuple(emb.shape)} does not match num_layers {layers} "
                                  f"x 2 x token_dim {width}")
        emb = emb.reshape(emb.shape[0], 2 * layers, width)
        meta["base"] = {"source": config.get("base_model_name_or_path")}
        meta["kv_layout"] = {"kv_heads": config.get("num_attention_heads")}
    if (directory / TEMPLATE_FILE).exists():
        try:
            template = json.loads((directory / TEMPLATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise SoftPromptError(f"{directory / TEMPLATE_FILE}: cannot read ({e})") from None
        if not isinstance(template, dict):
            raise SoftPromptError(f"{directory / TEMPLATE_FILE}: expected a JSON object (the input template)")
        meta["template"] = template
    return emb, meta
