"""SoftPrompt: the trainable [n_virtual, d_model] tensor (or, for a deep prompt, [n_virtual, 2 * layers, kv_dim]
keys/values for every layer), its initialisations, and its on-disk form.

The artifact is plain data, as in PEFT's prompt tuning: `prompt.safetensors` (one fp32 tensor) and
`softprompt.json` (which base model it belongs to, the template, how it was made, final metrics); its files are
read and written by artifact_files.py. This layer never imports the model: a base is anything `BaseModelLike`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import nn

from .artifact_files import (MAX_PROMPT_ABS, META_FILE, PEFT_CONFIG, TENSOR_FILE, TENSOR_KEY,  # noqa: F401  (re-exported)
                             atomic_write, check_prompt_values, read_meta, read_peft_adapter, read_tensor,
                             remove_stale_temps)
from .errors import SoftPromptError

FORMAT_VERSION = 1
INIT_STRATEGIES = ("random", "vocab", "text", "labels", "prompt")
# BPE vocabularies are ordered roughly by merge frequency, so low ids are the frequent tokens
# (Lester et al. sample from the 5,000 most common tokens).
FREQUENT_TOKENS = 5000


class BaseModelLike(Protocol):
    """What a prompt needs of the frozen model it is made for (`model.BaseModel` is one). The prompt layer is
    plain data and never imports the model: it is handed one."""

    tokenizer: Any

    @property
    def vocab_size(self) -> int: ...

    @property
    def kv_layout(self) -> tuple[int, int, int]: ...

    def embedding_matrix(self) -> torch.Tensor: ...

    def prompt_kv(self, prompt: torch.Tensor, *, first_position: int = 0) -> torch.Tensor: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def check_compatible(self, prompt: SoftPrompt, *, source: str = "prompt", strict: bool = True) -> None: ...


class SoftPrompt(nn.Module):
    """`n_virtual_tokens` trainable vectors, kept in fp32 whatever the base model's dtype: input embeddings
    [n, d], or for a deep prompt (Prefix-Tuning / P-tuning v2) each virtual token's key and value at every
    layer, [n, 2 * layers, kv_heads * head_dim] (PEFT's PREFIX_TUNING layout, unflattened)."""

    def __init__(self, embeddings: torch.Tensor, meta: dict[str, Any] | None = None):
        super().__init__()
        if embeddings.dim() not in (2, 3):
            raise SoftPromptError("a soft prompt is a tensor [n_virtual, d_model] (or [n_virtual, 2*layers, kv_dim] "
                                  f"for a deep prompt), got shape {tuple(embeddings.shape)}")
        self.embeddings = nn.Parameter(embeddings.detach().float().clone())  # [n, d] or [n, 2l, kv]
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def n_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def is_deep(self) -> bool:
        return self.embeddings.dim() == 3

    @property
    def dim(self) -> int:
        return self.embeddings.shape[-1]

    def forward(self) -> torch.Tensor:
        return self.embeddings

    # ---- initialisation -------------------------------------------------------------------------

    @classmethod
    def initialise(
        cls,
        base: BaseModelLike,
        n_virtual_tokens: int,
        init: str = "vocab",
        *,
        init_text: str | None = None,
        labels: list[str] | None = None,
        init_prompt: str | os.PathLike | SoftPrompt | None = None,
        seed: int = 0,
        deep: bool = False,
    ) -> SoftPrompt:
        """Make a new prompt for `base`. `init` is one of random | vocab | text | labels | prompt (transfer:
        start from `init_prompt`, ours or PEFT's, repeated/truncated to n tokens).

        `deep=True` makes a deep prompt holding the keys/values the same input-embedding prompt leaves at every
        layer, so it starts out computing exactly what that prompt computes (Li & Liang initialise prefixes
        from real words' activations for the same reason: random prefixes train badly)."""
        if n_virtual_tokens < 1:
            raise SoftPromptError(f"virtual_tokens must be >= 1, got {n_virtual_tokens}")
        table = base.embedding_matrix().detach().float()  # [V, d]
        gen = torch.Generator().manual_seed(seed)
        n, d = n_virtual_tokens, table.shape[1]
        if init == "random":
            emb = torch.rand(n, d, generator=gen) - 0.5  # uniform(-0.5, 0.5), Lester et al. 2021
        elif init == "vocab":
            emb = table[_frequent_token_ids(base, n, gen)]
        elif init == "text":
            if not init_text:
                raise SoftPromptError("init 'text' needs init_text (the words to start from)")
            ids = base.tokenizer(init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise SoftPromptError(f"init_text {init_text!r} tokenises to nothing")
            ids = (ids * (n // len(ids) + 1))[:n]  # repeat, then truncate to n
            emb = table[torch.tensor(ids)]
        elif init == "labels":
            if not labels:
                raise SoftPromptError("init 'labels' needs the label words (give a label map or data with a small label set)")
            rows = []
            for word in labels[:n]:  # one virtual token per class: the mean of its word pieces
                ids = base.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
                rows.append(table[torch.tensor(ids)].mean(0))
            rest = table[_frequent_token_ids(base, n - len(rows), gen)]
            emb = torch.cat([torch.stack(rows), rest]) if rows else rest
        elif init == "prompt":
            if init_prompt is None:
                raise SoftPromptError("init 'prompt' needs init_prompt (a prompt artifact or PEFT adapter to start from)")
            source = init_prompt if isinstance(init_prompt, SoftPrompt) else SoftPrompt.load(init_prompt, base, strict=False)
            if source.is_deep and not deep:
                raise SoftPromptError("init_prompt is a deep prompt: it can only start another deep prompt (--deep)")
            if not source.is_deep and source.dim != d:
                raise SoftPromptError(f"init_prompt has width {source.dim}, the model {d}")
            rows = source.embeddings.detach().float().cpu()
            emb = rows.repeat(n // len(rows) + 1, *[1] * (rows.dim() - 1))[:n]
        else:
            raise SoftPromptError(f"unknown init {init!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        if deep and emb.dim() == 2:
            with torch.no_grad():
                emb = base.prompt_kv(emb).float().cpu()  # [n, 2 * layers, kv_dim]
        meta = {"init": {"strategy": init, "text": init_text, "labels": labels, "seed": seed}}
        if init == "prompt":
            meta["init"]["prompt"] = str(init_prompt) if not isinstance(init_prompt, SoftPrompt) else init_prompt.meta.get("name")
        meta["base"] = base.fingerprint()
        if emb.dim() == 3:
            layers, heads, head_dim = base.kv_layout
            meta["kv_layout"] = {"layers": layers, "kv_heads": heads, "head_dim": head_dim}  # for PEFT export
        return cls(emb, meta)

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write prompt.safetensors + softprompt.json into `directory` (each file atomically)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        check_prompt_values(self.embeddings.detach(), out / TENSOR_FILE)
        tensor = {TENSOR_KEY: self.embeddings.detach().float().cpu().contiguous()}
        atomic_write(out / TENSOR_FILE, lambda tmp: save_file(tensor, str(tmp), metadata={"format": "pt"}))
        meta = {"format_version": FORMAT_VERSION, "n_virtual_tokens": self.n_virtual_tokens, "dim": self.dim, **self.meta}
        atomic_write(out / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n"))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, base: BaseModelLike | None = None, *, strict: bool = True) -> SoftPrompt:
        """Load our artifact or a PEFT prompt-tuning adapter directory; with `base`, check they belong together."""
        path = Path(path)
        if not path.exists():
            raise SoftPromptError(f"prompt not found: {path}")
        if path.is_dir() and (path / PEFT_CONFIG).exists() and not (path / TENSOR_FILE).exists():
            prompt = cls(*read_peft_adapter(path))
        else:
            directory = path if path.is_dir() else path.parent
            tensor_path = directory / TENSOR_FILE if path.is_dir() else path
            if not tensor_path.exists():
                raise SoftPromptError(f"{directory} holds no {TENSOR_FILE} (nor a PEFT adapter_config.json)")
            if (directory / META_FILE).exists():
                meta = read_meta(directory / META_FILE)
            elif path.is_dir() and base is not None and strict:
                # A save writes the tensor first: alone, it is a half-saved artifact (or a bare tensor) with
                # nothing to check the base model against. Loading the file itself says "I know".
                raise SoftPromptError(f"{directory}: {TENSOR_FILE} without {META_FILE} (an interrupted save?): "
                                      f"cannot check which model it belongs to; pass {tensor_path} itself to load it anyway")
            else:
                meta = {}
            emb = read_tensor(tensor_path, TENSOR_KEY)
            check_prompt_values(emb, tensor_path)
            saved_n = meta.get("n_virtual_tokens")
            if isinstance(saved_n, int) and emb.dim() in (2, 3) and saved_n != emb.shape[0]:
                raise SoftPromptError(f"{directory}: {META_FILE} says {saved_n} virtual tokens, {TENSOR_FILE} has "
                                      f"{emb.shape[0]} (files from different saves: an interrupted save?)")
            prompt = cls(emb, {k: v for k, v in meta.items() if k not in ("format_version", "n_virtual_tokens", "dim")})
        prompt.meta.setdefault("name", path.name if path.is_dir() else path.parent.name)
        if base is not None:
            base.check_compatible(prompt, source=str(path), strict=strict)
        return prompt

    @property
    def template(self) -> dict[str, Any]:
        return self.meta.get("template") or {}


def as_prompt(prompt: SoftPrompt | str | os.PathLike | None, base: BaseModelLike | None = None) -> SoftPrompt | None:
    """A prompt given as an artifact path, a loaded SoftPrompt or None -> a SoftPrompt (checked against `base` when
    loaded here) or None: the one "load it if it is a path" rule of every command."""
    if prompt is None or isinstance(prompt, SoftPrompt):
        return prompt
    if isinstance(prompt, (str, os.PathLike)):
        return SoftPrompt.load(prompt, base)
    raise SoftPromptError(f"a prompt is a path or a SoftPrompt, not {type(prompt).__name__}")


def prompt_base_source(prompt: SoftPrompt | str | os.PathLike | None) -> str | None:
    """The base model a prompt artifact was trained on (what `--model` defaults to for eval, generate and inspect)."""
    prompt = as_prompt(prompt)
    return None if prompt is None else (prompt.meta.get("base") or {}).get("source")


def _frequent_token_ids(base: BaseModelLike, n: int, gen: torch.Generator) -> torch.Tensor:
    special = set(base.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(FREQUENT_TOKENS, base.vocab_size)) if i not in special])
    if n <= len(pool):
        return pool[torch.randperm(len(pool), generator=gen)[:n]]
    return pool[torch.randint(len(pool), (n,), generator=gen)]
