"""`BaseModel`: a frozen model, and the ONE place where soft prompts meet it.

Everything else goes through `prepend_prompts` and `sequence_nll` / `BaseModel.forward` (training, scoring), or
runs tokens behind the keys/values those leave with `extend` and `forward_in_place` (the decoding engine under generate,
eval and serve: a prompt's cache is `forward(prepend_prompts(empty input, prompt))`), so there is a single
definition of what prompt tuning computes:

    row layout after injection:  [pad ... pad | virtual tokens | input tokens]
    position ids count real tokens only, so a row's result does not depend on its batch's padding.

A prompt is one tensor: [P, d] input embeddings (prompt tuning), or [P, 2*layers, kv_dim] keys and values
for every layer (a deep prompt: Prefix-Tuning / P-tuning v2), which reach the model as a KV-cache prefix
ahead of the virtual tokens: [pad | deep prefix] + [pad | virtual | tokens].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import SoftPromptError
from ..precision import DtypeChoice
from .fast_forward import NewTokens, fast_forward
from .kv import cache_of, prefix_layer, slot_cache
from .loss import head_nll

if TYPE_CHECKING:
    from ..prompt import SoftPrompt


@dataclass
class Prompted:
    """Model inputs after prompt injection. B rows, L = P (virtual) + T (tokens)."""

    inputs_embeds: torch.Tensor  # [B, L, d] in the model's dtype
    attention_mask: torch.Tensor  # [B, L] 0/1
    position_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor | None = None  # [B, L], -100 where no loss
    # Deep prompts: per-layer keys/values ahead of the row, [B, K, 2*layers, kv_dim]; attention_mask then
    # covers K + L columns (the prefix's first), as HF expects with a cache.
    prefix: torch.Tensor | None = None
    # One prompt (or none) for every row: the pieces before injection, so `sequence_nll` can run the virtual
    # tokens and the rows' common leading tokens once for the whole batch instead of once per row (their states
    # do not depend on the row). None for per-row prompts.
    shared: SharedPrefix | None = field(default=None, repr=False)


@dataclass
class SharedPrefix:
    prompt: torch.Tensor  # [P, d] in the model's dtype (P may be 0)
    deep: torch.Tensor | None  # [K, 2*layers, kv_dim] or None
    token_ids: torch.Tensor  # [B, T]
    token_embeds: torch.Tensor  # [B, T, d]
    token_mask: torch.Tensor  # [B, T]
    token_labels: torch.Tensor  # [B, T], -100 where no loss


@dataclass
class BaseModel:
    """A frozen Hugging Face model and its tokenizer. Wraps, never subclasses, the HF model."""

    model: Any
    tokenizer: Any
    source: str
    # Run what every row of a batch shares (its one prompt, the template's common leading tokens) once instead of
    # once per row in `sequence_nll` (same result). None = auto: on for CPU, where it pays; off on CUDA, where
    # the extra small launch measured slower (BENCHMARKS.md, GPU).
    shared_prefix: bool | None = None
    dtype_choice: DtypeChoice | None = None  # how the base's dtype was picked (load_model), for the record
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        head = self.model.get_output_embeddings()
        if head is not None and not getattr(head, "_softprompt_contiguous", False):
            head.register_forward_pre_hook(_contiguous_input)
            head._softprompt_contiguous = True

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @property
    def max_positions(self) -> int:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(self.config, key, None):
                return int(getattr(self.config, key))
        return 2048

    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # [V, d]

    @cached_property
    def _embedding_hash(self) -> str:
        # Hash the bf16-rounded table so fp32 and bf16 loads of one checkpoint agree.
        table = self.embedding_matrix().detach().to(torch.bfloat16).cpu().contiguous()
        return hashlib.sha256(table.view(torch.int16).numpy().tobytes()).hexdigest()[:16]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_type": getattr(self.config, "model_type", None),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "embedding_sha256": self._embedding_hash,
            "is_encoder_decoder": self.is_encoder_decoder,
        }

    def check_compatible(self, prompt: SoftPrompt, *, source: str = "prompt", strict: bool = True) -> None:
        """Refuse a prompt trained for another model: a clear message instead of silent garbage."""
        theirs = prompt.meta.get("base") or {}
        if prompt.is_deep:
            if self.is_encoder_decoder or tuple(prompt.embeddings.shape[1:]) != self.kv_shape:
                raise SoftPromptError(
                    f"{source}: deep prompt of shape {tuple(prompt.embeddings.shape)} does not fit model "
                    f"{self.source!r} (its layers take [n, {', '.join(map(str, self.kv_shape))}]); it was trained "
                    f"for {theirs.get('source', 'another model')!r}")
        elif prompt.dim != self.hidden_size:
            raise SoftPromptError(
                f"{source}: prompt width {prompt.dim} does not match model {self.source!r} hidden size "
                f"{self.hidden_size}; it was trained for {theirs.get('source', 'another model')!r}"
            )
        want = theirs.get("embedding_sha256")
        if strict and want and want != self._embedding_hash:
            raise SoftPromptError(
                f"{source}: prompt was trained for model {theirs.get('source')!r} (embedding hash {want}), "
                f"not {self.source!r} (hash {self._embedding_hash}); pass the matching --model"
            )

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block's activations in backward instead of storing them (memory for time)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # HF checkpoints only in training mode: flip just the checkpointing modules, never dropout layers.
        for module in self.model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.training = True
                if hasattr(type(module), "_can_checkpoint_with_cache"):
                    # HF drops a cache under checkpointing because a replay would update it twice; the deep
                    # prompts' prefix cache never stores (see `prefix_cache`), so it may stay.
                    module._can_checkpoint_with_cache = True

    # ---- the one place prompts meet the model -------------------------------------------------

    def prepend_prompts(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T]
        prompts: torch.Tensor | Sequence[torch.Tensor | SoftPrompt | None] | None,
        labels: torch.Tensor | None = None,  # [B, T]
    ) -> Prompted:
        """Prepend each row's soft prompt to its input embeddings (before BOS and any chat template).

        `prompts` is one tensor for every row, or a per-row list (a different prompt, or None, per row: the
        mixed batch the server uses). Rows are then left-aligned so padding sits first. A deep prompt
        ([P, 2*layers, kv_dim]) becomes `Prompted.prefix`, which `forward` / `sequence_nll` feed as a cache.
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        prompts, deep = split_prompts(prompts)
        if deep is not None and self.is_encoder_decoder:
            raise SoftPromptError("deep prompts (key/value prefixes) are for decoder-only models; "
                                  "text-to-text models take input-embedding prompts")
        decoder_labels = None
        if self.is_encoder_decoder:
            # Text-to-text: the prompt goes before the ENCODER input; the answer (the labelled tokens of a row
            # laid out input + answer) becomes the decoder's labels. Same rows, same callers as decoder-only.
            if labels is not None:
                labels = labels.to(self.device)
                answer = (labels != -100) & (attention_mask == 1)
                attention_mask = attention_mask * (~answer).long()
                decoder_labels = _left_align(labels, answer)  # [B, A], -100 padded at the end
                labels = None
        raw_labels = labels
        batch = input_ids.shape[0]
        token_embeds = self.model.get_input_embeddings()(input_ids)  # [B, T, d]
        virtual, virtual_mask = stack_prompts(prompts, batch, (self.hidden_size,), self.device)  # [B, P, d], [B, P]
        embeds = torch.cat([virtual.to(token_embeds.dtype), token_embeds], dim=1)
        mask = torch.cat([virtual_mask, attention_mask.long()], dim=1)
        if labels is not None:
            no_loss = torch.full(virtual_mask.shape, -100, dtype=labels.dtype, device=self.device)
            labels = torch.cat([no_loss, labels.to(self.device)], dim=1)
        # Move padding (mask 0) to the front of each row, keeping order otherwise: [pad | virtual | tokens].
        order = torch.argsort(mask, dim=1, stable=True)  # [B, L]
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        mask = mask.gather(1, order)
        if labels is not None:
            labels = labels.gather(1, order)
            # A token is scored only if a real position precedes it (never predicted from padding).
            real_before = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
            labels = labels.masked_fill(real_before == 0, -100)
        prefix = None
        if deep is not None:
            prefix, prefix_mask = stack_prompts(deep, batch, self.kv_shape, self.device)  # [B, K, 2l, kv], [B, K]
            prefix, mask = prefix.to(token_embeds.dtype), torch.cat([prefix_mask, mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, mask.shape[1] - embeds.shape[1]:]  # the prefix counts
        if self.is_encoder_decoder:
            return Prompted(embeds, mask, positions, decoder_labels)
        shared = None
        if raw_labels is not None and not isinstance(prompts, list) and not isinstance(deep, list):
            shared = SharedPrefix(virtual[0].to(token_embeds.dtype), deep,
                                  input_ids, token_embeds, attention_mask, raw_labels.to(self.device))
        return Prompted(embeds, mask, positions, labels, prefix=prefix, shared=shared)

    def forward(self, batch: Prompted, **kwargs):
        """Plain HF forward on injected inputs (full logits); used by generation and parity tests. With
        `use_cache=True` the returned cache holds the deep prefix (if any) and the row, ready to decode."""
        if batch.prefix is not None:
            kwargs[self.cache_kw] = self.prefix_cache(batch.prefix, storing=bool(kwargs.get("use_cache")))
        if self.is_encoder_decoder:  # relative position bias: no position ids; labels drive the decoder
            return self.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                              labels=batch.labels, **kwargs)
        return self.model(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            **kwargs,
        )

    def last_logits_kw(self) -> dict[str, int]:
        """`logits_to_keep=1` where the model takes it: decoding and label scoring read only the last position, and
        full [B, L, vocab] logits would be the largest tensor of the pass."""
        if "last_logits_kw" not in self._cache:
            import inspect

            self._cache["last_logits_kw"] = ({"logits_to_keep": 1} if "logits_to_keep" in
                                             inspect.signature(self.model.forward).parameters else {})
        return self._cache["last_logits_kw"]

    def extend(self, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, **kwargs):
        """Run tokens [B, W] behind `cache` (the keys/values of earlier positions): attention_mask [B, past + W],
        position_ids [B, W]. The HF output; its cache now holds the W new positions too."""
        return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                          position_ids=position_ids.to(self.device), use_cache=True,
                          **{self.cache_kw: cache}, **kwargs)

    def forward_in_place(self, kv: torch.Tensor, *blocks: NewTokens) -> list[torch.Tensor]:
        """Run each block's new tokens behind its rows' past in the buffer kv [2, layers, rows, H, cols, D]
        (`kv_layout`; see `NewTokens`), writing their keys/values into it; returns each block's rows' last-column
        logits [B, V]. Written out for Llama-family decoders (fast_forward.py: same maths, every block in ONE pass
        of the weights, padding skipped), HF's forward over a slot cache per block for the rest."""
        if "fast_forward" not in self._cache:
            self._cache["fast_forward"] = fast_forward(self.model)
        fast = self._cache["fast_forward"]
        blocks = [replace(x, ids=x.ids.to(self.device), mask=x.mask.to(self.device),
                          positions=x.positions.to(self.device)) for x in blocks]
        if fast is not None:
            return fast(kv, *blocks)
        return [self.extend(slot_cache(kv, x.rows, x.first_col, x.past), x.ids, x.mask, x.positions,
                            **self.last_logits_kw()).logits[:, -1] for x in blocks]

    @property
    def has_plain_kv_cache(self) -> bool:
        """Every layer keeps a plain full-attention key/value cache (what copying a cache per label needs)."""
        try:
            return not self.is_encoder_decoder and bool(self.kv_layout)
        except SoftPromptError:
            return False

    def sequence_nll(self, batch: Prompted) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL per row and labelled-token count per row: ([B] fp32, [B] int).

        The LM head runs only where there are labels: for short answers that skips almost all of the
        [B, L, vocab] logits, the largest tensor of the step.
        """
        assert batch.labels is not None, "sequence_nll needs labels"
        if self.is_encoder_decoder:
            logits = self.forward(batch).logits  # [B, A, V], aligned with the decoder labels
            nll = F.cross_entropy(logits.float().transpose(1, 2), batch.labels, reduction="none")  # [B, A]
            return nll.sum(1), (batch.labels != -100).sum(1)
        picked, targets, rows, is_logits = self._at_labels(batch)
        head = self.model.get_output_embeddings()
        if is_logits:
            nll = F.cross_entropy(picked.float(), targets, reduction="none")  # [N]
        elif type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
            nll = head_nll(picked, head.weight, targets)  # chunked: no [N, V] fp32 logits kept
        else:
            nll = F.cross_entropy(head(picked).float(), targets, reduction="none")
        n_rows = batch.inputs_embeds.shape[0]
        per_row = torch.zeros(n_rows, device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
        return per_row, torch.bincount(rows, minlength=n_rows)

    def logits_at_labels(self, batch: Prompted) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits [N, V] at every position that predicts a labelled token, and the row of each [N], row by
        row in sequence order. For scoring: the same fast paths as `sequence_nll`, the full vocabulary kept."""
        assert batch.labels is not None, "logits_at_labels needs labels"
        if self.is_encoder_decoder:
            selected = batch.labels != -100  # decoder logits are aligned with the decoder labels
            return self.forward(batch).logits[selected].float(), selected.nonzero()[:, 0]
        picked, _, rows, is_logits = self._at_labels(batch)
        return (picked if is_logits else self.model.get_output_embeddings()(picked)).float(), rows

    def _at_labels(self, batch: Prompted) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """What the LM head needs where a labelled token is predicted, decoder-only: final hidden states [N, d]
        (or logits [N, V] for models whose head is not a plain projection), the targets [N], the row of each
        [N] (row-major), and whether the first are logits."""
        backbone, head = self.model.base_model, self.model.get_output_embeddings()
        full_logits = backbone is self.model or head is None or getattr(self.config, "final_logit_softcapping", None)
        use_shared = self.shared_prefix if self.shared_prefix is not None else self.device.type == "cpu"
        shared = None if full_logits or batch.shared is None or not use_shared else self._shared_prefix_hidden(batch.shared)
        if shared is not None:
            hidden_or_logits, labels = shared
        elif full_logits:
            hidden_or_logits, labels = self.forward(batch).logits, batch.labels
        else:
            # The last position predicts nothing (its target would lie past the row) and, the attention being
            # causal, no other position depends on it: the backbone runs on the first L-1 only.
            width = max(batch.inputs_embeds.shape[1] - 1, 1)
            extra = {} if batch.prefix is None else {self.cache_kw: self.prefix_cache(batch.prefix)}
            hidden_or_logits = backbone(
                inputs_embeds=batch.inputs_embeds[:, :width],
                attention_mask=batch.attention_mask[:, :batch.attention_mask.shape[1] - batch.inputs_embeds.shape[1] + width],
                position_ids=batch.position_ids[:, :width],
                use_cache=False,
                **extra,
            ).last_hidden_state  # [B, L-1, d]
            labels = batch.labels
        targets = labels[:, 1:]  # position t predicts token t+1
        selected = targets != -100  # [B, L-1]
        picked = hidden_or_logits[:, :targets.shape[1]][selected]  # [N, d] or [N, V]
        return picked, targets[selected], selected.nonzero()[:, 0], bool(full_logits)


    # ---- deep prompts: key/value prefixes at every layer ---------------------------------------

    @cached_property
    def kv_layout(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the attention cache, read from one real forward (never guessed from
        the config: GQA, per-model head dims). Models whose layers do not all keep a plain full-attention
        cache (sliding windows, linear attention) cannot take deep prompts."""
        from transformers.cache_utils import DynamicLayer

        if self.is_encoder_decoder:
            raise SoftPromptError("deep prompts are for decoder-only models")
        with torch.no_grad():
            out = self.model.base_model(inputs_embeds=self.embedding_matrix()[:1][None], use_cache=True)
        layers = getattr(cache_of(out), "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            raise SoftPromptError(f"model {self.source!r} has attention layers without a plain key/value cache "
                                  "(sliding window or linear attention): deep prompts are not supported for it")
        shapes = {tuple(layer.keys.shape[1:]) + tuple(layer.values.shape[1:]) for layer in layers}
        if len(shapes) != 1 or layers[0].keys.shape != layers[0].values.shape:
            raise SoftPromptError(f"model {self.source!r} has layers with different key/value shapes: deep prompts "
                                  "are not supported for it")
        _, heads, _, head_dim = layers[0].keys.shape
        return len(layers), heads, head_dim

    @property
    def kv_shape(self) -> tuple[int, int]:
        """The trailing shape of a deep prompt: (2 * layers, kv_heads * head_dim), PEFT's prefix layout."""
        layers, heads, head_dim = self.kv_layout
        return 2 * layers, heads * head_dim

    def prompt_kv(self, prompt: torch.Tensor, *, first_position: int = 0) -> torch.Tensor:
        """The keys/values [P, 2*layers, kv_dim] that an input-embedding prompt [P, d] leaves in the cache
        (positions 0..P-1). A deep prompt initialised with them computes exactly what the prompt does.
        `first_position` shifts the positions. A rotary model sees only distances, so every state stays the same but
        with e.g. -(P - n) the last n keys are rotated for positions 0..n-1: a shorter prefix keeping only them."""
        layers, heads, head_dim = self.kv_layout
        n = prompt.shape[0]
        out = self.model.base_model(inputs_embeds=prompt.to(self.device, self.dtype)[None], use_cache=True,
                                    position_ids=torch.arange(first_position, first_position + n, device=self.device)[None])
        per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache_of(out).layers]  # [2, H, P, D] each
        kv = torch.stack(per_layer)  # [layers, 2, H, P, D]
        return kv.permute(3, 0, 1, 2, 4).reshape(n, 2 * layers, heads * head_dim)

    def prefix_layers(self, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[B, K, 2*layers, kv_dim] -> per layer (keys, values), each [B, kv_heads, K, head_dim]."""
        layers, heads, head_dim = self.kv_layout
        b, k = prefix.shape[:2]
        kv = prefix.reshape(b, k, layers, 2, heads, head_dim).permute(2, 3, 0, 4, 1, 5)  # [layers, 2, B, H, K, D]
        return [(kv[i, 0], kv[i, 1]) for i in range(layers)]

    def prefix_cache(self, prefix: torch.Tensor, *, storing: bool = False):
        """A cache holding the deep prefix. storing=False (training, scoring): layers hand back prefix + new
        states without keeping them, so activation checkpointing can replay a layer and see the same past."""
        from transformers.cache_utils import DynamicCache

        layers = self.prefix_layers(prefix)
        cache = DynamicCache()
        if storing:
            for i, (k, v) in enumerate(layers):
                cache.update(k, v, i)
            return cache
        checkpointed = [m for m in self.model.modules() if getattr(m, "gradient_checkpointing", False)]
        if checkpointed and not any(getattr(m, "_can_checkpoint_with_cache", False) for m in checkpointed):
            raise SoftPromptError("deep prompts with activation checkpointing need a transformers version whose "
                                  "layers can keep a cache when checkpointed (5.2x); upgrade, or train without it")
        cache.layers = [prefix_layer(k, v, k.shape[0]) for k, v in layers]
        cache.layer_class_to_replicate = None
        return cache

    # ---- shared prefix: what every row has in common runs once per batch ---------------------------

    def _shared_prefix_hidden(self, shared: SharedPrefix) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Final hidden states [B, P+T-1, d] and labels [B, P+T] for rows laid out [virtual | tokens | pad], with
        the virtual tokens AND the tokens every row starts with (a chat template's system turn, "Review:")
        computed ONCE (batch 1) and their keys/values broadcast to every row.

        With one prompt for all rows, that common prefix has the same states in every row (it comes first and,
        the attention being causal, sees only itself and the deep prefix), so running it B times is waste: for
        short classification rows in a chat template it is half the work. Same maths as the plain path (tests
        check it); autograd sums the rows' gradients through the broadcast. Returns None where it does not
        apply or there is nothing to share (the caller takes the plain path): a cache that is not plain full
        attention, activation checkpointing (it drops caches), FSDP.
        """
        backbone = self.model.base_model
        if not self._prefix_ok(backbone):
            return None
        from transformers.cache_utils import DynamicCache, DynamicLayer

        prompt, mask = shared.prompt, shared.token_mask.to(self.device).long()
        # Real tokens first, padding last: every row's tokens then start right after the prefix.
        order = torch.argsort(mask, dim=1, descending=True, stable=True)  # [B, T]
        mask, ids = mask.gather(1, order), shared.token_ids.gather(1, order)
        embeds = shared.token_embeds.gather(1, order[..., None].expand_as(shared.token_embeds))
        labels = shared.token_labels.gather(1, order).masked_fill(mask == 0, -100)
        batch, n_virtual = embeds.shape[0], prompt.shape[0]
        # Leading tokens common to every row, leaving each row at least its last token to run on its own.
        same = ((ids == ids[:1]) & (mask == 1)).all(0).long()  # [T]
        common = max(min(int(same.cumprod(0).sum()), int(mask.sum(1).min()) - 1), 0)
        n_pre = n_virtual + common
        if n_pre == 0:
            return None
        n_deep = 0 if shared.deep is None else shared.deep.shape[0]
        cache_kw = self.cache_kw
        extra = {} if shared.deep is None else {
            cache_kw: self.prefix_cache(shared.deep.to(prompt.dtype)[None], storing=True)}  # deep prefix at batch 1
        pre = backbone(inputs_embeds=torch.cat([prompt, embeds[0, :common]])[None], use_cache=True,
                       position_ids=torch.arange(n_deep, n_deep + n_pre, device=self.device)[None], **extra)
        layers = getattr(cache_of(pre), "layers", None)
        if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
            self._cache["prefix_ok"] = False  # e.g. sliding-window or linear-attention layers
            return None
        cache = DynamicCache()
        cache.layers = [prefix_layer(layer.keys, layer.values, batch) for layer in layers]  # [1, H, K+n_pre, D]
        cache.layer_class_to_replicate = None
        hidden = pre.last_hidden_state.expand(batch, -1, -1)  # [B, n_pre, d]
        rest, rest_mask = embeds[:, common:], mask[:, common:]
        positions = n_deep + n_pre + (rest_mask.cumsum(1) - 1).clamp(min=0)
        width = rest.shape[1] - 1  # the last position predicts nothing: leave it out (causal: nothing needs it)
        if width > 0:
            out = backbone(inputs_embeds=rest[:, :width], attention_mask=torch.cat(
                           [mask.new_ones(batch, n_deep + n_pre), rest_mask[:, :width]], 1),
                           position_ids=positions[:, :width], use_cache=True, **{cache_kw: cache}).last_hidden_state
            hidden = torch.cat([hidden, out], dim=1)  # [B, P+T-1, d]
        labels = torch.cat([labels.new_full((batch, n_virtual), -100), labels], dim=1)
        return hidden, labels

    def _prefix_ok(self, backbone) -> bool:
        if self._cache.get("prefix_ok") is False or self.is_encoder_decoder:
            return False
        if "prefix_ok" not in self._cache:
            import inspect

            params = inspect.signature(backbone.forward).parameters
            self._cache["prefix_ok"] = ("cache" in params or "past_key_values" in params) and "inputs_embeds" in params
            if not self._cache["prefix_ok"]:
                return False
        # Checked every call: both can be switched on after loading.
        for module in self.model.modules():
            if getattr(module, "gradient_checkpointing", False) or type(module).__name__.startswith("FSDP"):
                return False
        return True

    @property
    def cache_kw(self) -> str:
        """The forward's keyword for a KV cache: `cache` since transformers 5.2x, `past_key_values` before."""
        if "cache_kw" not in self._cache:
            import inspect

            params = inspect.signature(self.model.forward).parameters
            self._cache["cache_kw"] = "cache" if "cache" in params else "past_key_values"
        return self._cache["cache_kw"]


def _contiguous_input(module, args):
    """The LM head's input made contiguous. HF's `logits_to_keep=1` hands it a strided slice [B, 1, d] of the
    hidden states, and torch's CPU bf16 linear on a strided 3-D input took 1.4 s where the contiguous copy takes
    6 ms (SmolLM2's 49k x 576 head, batch 16): 70 % of a bf16 scoring pass, and every prefill of generate/serve.
    At batch 1 the slice [1, 1, d] already counts as contiguous (its sizes are 1) and `.contiguous()` keeps its
    strides, which still send torch down the slow path (111 ms vs 4.7 ms for one row): `view` sets plain strides."""
    x = args[0].contiguous()
    return (x.view(x.shape), *args[1:])


def _left_align(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The `keep` entries of each row moved to its front, -100 after: [B, T] -> [B, max kept]."""
    width = max(int(keep.sum(1).max()), 1)
    order = torch.argsort((~keep).long(), dim=1, stable=True)[:, :width]
    return values.gather(1, order).masked_fill(~keep.gather(1, order), -100)


def split_prompts(prompts):
    """Separate input-embedding prompts ([P, d]) from deep ones ([P, 2*layers, kv_dim]): (shallow, deep), each
    None, one tensor for all rows, or a per-row list with None where a row has no prompt of that kind."""
    if prompts is None:
        return None, None
    prompts = getattr(prompts, "embeddings", prompts)  # one SoftPrompt for every row
    if isinstance(prompts, torch.Tensor):
        return (prompts, None) if prompts.dim() == 2 else (None, prompts)
    tensors = [p.embeddings if hasattr(p, "embeddings") else p for p in prompts]
    shallow = [t if t is not None and t.dim() == 2 else None for t in tensors]
    deep = [t if t is not None and t.dim() != 2 else None for t in tensors]
    has = lambda rows: any(t is not None for t in rows)  # noqa: E731
    return (shallow if has(shallow) else None), (deep if has(deep) else None)


def stack_prompts(
    prompts: torch.Tensor | Sequence[torch.Tensor | None] | None,
    batch: int,
    shape: tuple[int, ...],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row prompts [P, *shape] (as `split_prompts` returns them) -> ([B, P, *shape], [B, P] mask), shorter
    prompts left-padded with zeros."""
    if prompts is None:
        return torch.zeros(batch, 0, *shape, device=device), torch.zeros(batch, 0, dtype=torch.long, device=device)
    tensors = [prompts] if isinstance(prompts, torch.Tensor) else list(prompts)
    for t in tensors:
        if t is not None and tuple(t.shape[1:]) != tuple(shape):
            raise SoftPromptError(f"prompt shape {tuple(t.shape)} does not fit this model (expects [n, "
                                  f"{', '.join(map(str, shape))}])")
    if isinstance(prompts, torch.Tensor):
        p = prompts.to(device)
        return p.unsqueeze(0).expand(batch, *p.shape), torch.ones(batch, p.shape[0], dtype=torch.long, device=device)
    if len(tensors) != batch:
        raise ValueError(f"{len(tensors)} prompts for {batch} rows")
    width = max((t.shape[0] for t in tensors if t is not None), default=0)
    ref = next((t for t in tensors if t is not None), None)
    dtype = ref.dtype if ref is not None else torch.float32
    rows, masks = [], []
    for t in tensors:
        n = 0 if t is None else t.shape[0]
        pad = torch.zeros(width - n, *shape, device=device, dtype=dtype)
        rows.append(pad if t is None else torch.cat([pad, t.to(device, dtype)]))
        masks.append(torch.cat([torch.zeros(width - n, dtype=torch.long), torch.ones(n, dtype=torch.long)]))
    return torch.stack(rows), torch.stack(masks).to(device)
