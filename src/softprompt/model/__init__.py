"""The frozen base model, by job: `load` (what the user typed -> a loaded model: resolving, device, dtype,
quantisation), `base` (`BaseModel`: the ONE place a prompt meets the model, `prepend_prompts` + `sequence_nll`),
`loss` (the LM-head NLL fast path), `kv` (KV-cache pieces: prefix layers, slot caches, repeated rows) and
`fast_forward` (the forward of new tokens behind a KV buffer, written out for Llama-family decoders).
"""

from .base import BaseModel, Prompted, SharedPrefix, split_prompts, stack_prompts
from .fast_forward import NewTokens
from .kv import cache_layers, cache_of, prefix_layer, repeat_cache, slot_cache
from .load import (DTYPES, EMBEDDED_ALIASES, EMBEDDED_FILE, EMBEDDED_MODEL, EMBEDDED_PACKAGE, embedded_model_file,
                   load_model, mlp_shape, pick_device, pick_dtype, resolve_model)
from .loss import head_nll

__all__ = ["DTYPES", "EMBEDDED_ALIASES", "EMBEDDED_FILE", "EMBEDDED_MODEL", "EMBEDDED_PACKAGE", "BaseModel", "NewTokens", "Prompted",
           "SharedPrefix", "cache_layers", "cache_of", "embedded_model_file", "head_nll", "load_model", "mlp_shape", "pick_device",
           "pick_dtype", "prefix_layer", "repeat_cache", "resolve_model", "slot_cache", "split_prompts",
           "stack_prompts"]
