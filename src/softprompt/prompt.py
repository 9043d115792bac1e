"""SoftPrompt: the trainable [n_virtual, d_model] tensor (or, for a deep prompt, [n_virtual, 2 * layers, kv_dim]
keys/values for every layer), its initialisations, and its on-disk form.

The artifact is plain data, as in PEFT's prompt tuning: `prompt.safetensors` (one fp32 tensor) and
`softprompt.json` (which base model it belongs to, the template, how it was made, final metrics).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import SoftPromptError

if TYPE_CHECKING:
    from .model import BaseModel

TENSOR_FILE = "prompt.safetensors"
META_FILE = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"  # the same key PEFT uses, so the tensor file is interchangeable
FORMAT_VERSION = 1
INIT_STRATEGIES = ("random", "vocab", "text", "labels", "prompt")
# BPE vocabularies are ordered roughly by merge frequency, so low ids are the frequent tokens
# (Lester et al. sample from the 5,000 most common tokens).
FREQUENT_TOKENS = 5000


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
        base: BaseModel,
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
        tensor = {TENSOR_KEY: self.embeddings.detach().float().cpu().contiguous()}
        atomic_write(out / TENSOR_FILE, lambda tmp: save_file(tensor, str(tmp), metadata={"format": "pt"}))
        meta = {"format_version": FORMAT_VERSION, "n_virtual_tokens": self.n_virtual_tokens, "dim": self.dim, **self.meta}
        atomic_write(out / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n"))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, base: BaseModel | None = None, *, strict: bool = True) -> SoftPrompt:
        """Load our artifact or a PEFT prompt-tuning adapter directory; with `base`, check they belong together."""
        path = Path(path)
        if not path.exists():
            raise SoftPromptError(f"prompt not found: {path}")
        if path.is_dir() and (path / "adapter_config.json").exists() and not (path / TENSOR_FILE).exists():
            from .peft_io import read_peft_prompt

            prompt = read_peft_prompt(path)
        else:
            directory = path if path.is_dir() else path.parent
            tensor_path = directory / TENSOR_FILE if path.is_dir() else path
            if not tensor_path.exists():
                raise SoftPromptError(f"{directory} holds no {TENSOR_FILE} (nor a PEFT adapter_config.json)")
            meta = _read_json(directory / META_FILE) if (directory / META_FILE).exists() else {}
            emb = read_tensor(tensor_path, TENSOR_KEY)
            prompt = cls(emb, {k: v for k, v in meta.items() if k not in ("format_version", "n_virtual_tokens", "dim")})
        prompt.meta.setdefault("name", path.name if path.is_dir() else path.parent.name)
        if base is not None:
            base.check_compatible(prompt, source=str(path), strict=strict)
        return prompt

    @property
    def template(self) -> dict[str, Any]:
        return self.meta.get("template") or {}


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """Read one tensor from a safetensors file; a corrupt or truncated file is a clear error, never pickle."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SoftPromptError(f"{path} is not a readable safetensors file ({e})") from None
    if key not in tensors:
        raise SoftPromptError(f"{path} has no tensor named {key!r} (has: {', '.join(tensors) or 'none'})")
    return tensors[key]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SoftPromptError(f"{path} is not valid JSON ({e})") from None


def atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _frequent_token_ids(base: BaseModel, n: int, gen: torch.Generator) -> torch.Tensor:
    special = set(base.tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(FREQUENT_TOKENS, base.vocab_size)) if i not in special])
    if n <= len(pool):
        return pool[torch.randperm(len(pool), generator=gen)[:n]]
    return pool[torch.randint(len(pool), (n,), generator=gen)]
