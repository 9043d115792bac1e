"""The decoding engine against the naive oracle: recompute the whole row every step, no cache, no batch, no padding.

Whatever the engine does for speed (prefix cache, one batch for every prompt, rows joining while others decode,
retired rows and trimmed columns), each row's tokens must be what the naive loop gives for that row alone.
"""

import pytest
import torch

from softprompt import SoftPrompt
from softprompt.engine import Engine, Event, PromptEntry, Sequence
from softprompt.sampling import SamplingParams, eos_ids


def naive_decode(base, ids, prompt, n):
    ids, out, eos = list(ids), [], eos_ids(base.tokenizer, base.model)
    for _ in range(n):
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            logits = base.forward(base.prepend_prompts(x, torch.ones_like(x), prompt)).logits
        t = int(logits[0, -1].argmax())
        if t in eos:
            break
        out.append(t)
        ids.append(t)
    return out


def _rows(base):
    texts = ["Review: the film was", "the", "Review: the hotel was awful .\nSentiment:", "a b c d e f g h", "ok"]
    return [base.tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("forward", ["written-out", "hf"])
def test_continuous_batching_equals_the_naive_oracle_row_by_row(tiny_base, monkeypatch, forward):
    """Both forwards under the engine: the written-out one, and HF's over a slot cache (other architectures)."""
    if forward == "hf":
        monkeypatch.setitem(tiny_base._cache, "fast_forward", None)
    torch.manual_seed(0)
    shallow = SoftPrompt.initialise(tiny_base, 5, "random", seed=1).embeddings.detach()
    deep = torch.randn(3, *tiny_base.kv_shape) * 0.2
    entries = [PromptEntry("shallow", shallow), PromptEntry("deep", deep), None]
    rows = _rows(tiny_base) * 3  # 15 sequences through 4 slots: rows join while others are mid-way
    lengths = [3, 9, 6, 1, 12]  # the 1-token rows finish at their prefill, some at the end of the batch
    seqs = [Sequence(r, SamplingParams(max_tokens=lengths[i % 5], temperature=0.0), entries[i % 3])
            for i, r in enumerate(rows)]
    engine = Engine(tiny_base)
    step, forward, passes = engine.step, tiny_base.forward_in_place, []

    def checked_step(newcomers):  # the batch never holds a finished row, and its tensors always match its rows
        assert all(not s.finished for s in engine.rows)
        assert engine.batch.mask.shape == (len(engine.rows), engine.batch.width) == (len(engine.batch.next_pos), engine.batch.width)
        step(newcomers)

    def counted(kv, *blocks):
        passes.append(len(blocks))
        return forward(kv, *blocks)

    engine.step = checked_step
    monkeypatch.setattr(tiny_base, "forward_in_place", counted)
    engine.run(seqs, max_rows=4)
    assert engine.stats["max_batch_rows"] == 4 and engine.stats["prefills"] > 3  # really joined in flight
    assert passes.count(2) >= 3  # newcomers prefilled in the same pass as the running rows' decode step
    assert not engine.rows  # everything retired
    for s in seqs:
        prompt = s.prompt.embeddings if s.prompt else None
        assert s.generated == naive_decode(tiny_base, s.input_ids, prompt, s.params.max_tokens)
        assert s.finish_reason in ("stop", "length")


def test_the_prefix_cache_is_computed_once_per_prompt(tiny_base):
    e = PromptEntry("p", SoftPrompt.initialise(tiny_base, 4, "random", seed=2).embeddings.detach())
    engine = Engine(tiny_base)
    engine.run([Sequence(r, SamplingParams(max_tokens=2, temperature=0.0), e) for r in _rows(tiny_base)], max_rows=2)
    assert engine.stats["prefix_cache_misses"] == 1 and engine.stats["prefix_cache_hits"] == len(_rows(tiny_base)) - 1


def test_a_seeded_sample_does_not_depend_on_the_batch_around_it(tiny_base):
    rows = _rows(tiny_base)
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    alone = Sequence(rows[0], params)
    Engine(tiny_base).run([alone])
    crowd = [Sequence(r, SamplingParams(max_tokens=8, temperature=1.0, seed=i)) for i, r in enumerate(rows[1:])]
    again = Sequence(rows[0], params)
    Engine(tiny_base).run(crowd[:2] + [again] + crowd[2:], max_rows=3)
    assert again.generated == alone.generated


def test_events_stream_the_text_and_stop_rules_differ_by_caller(tiny_base):
    row = _rows(tiny_base)[2]
    full = Sequence(row, SamplingParams(max_tokens=12, temperature=0.0))
    Engine(tiny_base).run([full])
    text = tiny_base.tokenizer.decode(full.generated, skip_special_tokens=True)
    events: list[Event] = []
    streamed = Sequence(row, SamplingParams(max_tokens=12, temperature=0.0), sink=events.append)
    Engine(tiny_base).run([streamed])
    assert "".join(e.text for e in events if e.kind == "delta") == text and events[-1].kind == "finish"
    if len(text.strip()) > 2:
        lead = len(text) - len(text.lstrip())
        stop = text[lead + 1:lead + 2]  # a character inside the answer
        for rule, cut in (("literal", text.find(stop)), ("answer", text.find(stop, lead))):
            got: list[Event] = []
            s = Sequence(row, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,), stop_rule=rule),
                         sink=got.append)
            Engine(tiny_base).run([s])
            assert "".join(e.text for e in got if e.kind == "delta") == text[:cut]
            assert s.finish_reason == "stop"


def _hf_and_fast(base, mask, new_tokens=1):
    """`new_tokens` tokens for each of 3 rows (rows 1-3 of a random buffer, their span from column 1; `mask` [3, past
    + new_tokens]) by HF's forward over a slot cache and by the written-out forward. Returns both logits, the
    buffer before, after each, and where the written-out forward must have written (the real new tokens)."""
    from softprompt.model import NewTokens, slot_cache
    from softprompt.model.fast_forward import fast_forward

    layers, heads, head_dim = base.kv_layout
    b, w = mask.shape[0], new_tokens
    past = mask.shape[1] - w
    torch.manual_seed(0)
    kv = torch.randn(2, layers, b + 2, heads, mask.shape[1] + 3, head_dim, dtype=base.dtype)
    ids = torch.randint(3, base.vocab_size, (b, w))
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]  # positions count real tokens
    rows, first = slice(1, 1 + b), 1
    kv_hf, kv_fast = kv.clone(), kv.clone()
    with torch.inference_mode():
        hf = base.extend(slot_cache(kv_hf, rows, first, past), ids, mask, pos, logits_to_keep=1).logits[:, -1]
        forward = fast_forward(base.model)
        assert forward is not None, "an architecture the written-out forward supports"
        fast = forward(kv_fast, NewTokens(ids, mask, pos, rows, first, past))[0]
    written = torch.zeros_like(kv, dtype=torch.bool)
    for r in range(b):
        for j in range(w):
            if mask[r, past + j]:
                written[:, :, 1 + r, :, first + past + j] = True
    return hf, fast, kv, kv_hf, kv_fast, written


def _check_against_hf(base, mask, new_tokens=1, tol=1e-5):
    hf, fast, before, kv_hf, kv_fast, written = _hf_and_fast(base, mask, new_tokens)
    fed = mask[:, -1].bool()  # rows with a token in their last column (a prefill row may have no input at all)
    torch.testing.assert_close(fast[fed], hf[fed], rtol=tol, atol=tol)
    torch.testing.assert_close(kv_fast[written], kv_hf[written], rtol=tol, atol=tol)
    assert kv_fast[~written].equal(before[~written]), "only the real new tokens' columns are written"
    assert not kv_fast[written].equal(before[written])


def test_the_written_out_forward_equals_hf_forward(tiny_base):
    """Same logits and the same keys/values written (and nothing else touched): decode steps with padded rows or
    not, and prefills of several tokens behind a past (a prompt) or none, dense or left-padded."""
    padded = torch.ones(3, 6, dtype=torch.long)
    padded[0, :2] = 0
    padded[2, :1] = 0
    for mask in (torch.ones(3, 6, dtype=torch.long), padded):  # decode steps: past 5, one token
        _check_against_hf(tiny_base, mask)
    prefill = torch.tensor([[0, 1, 1, 0, 0, 1, 1],  # [pad | prompt (3 columns) | pad | input (4 columns)]
                            [1, 1, 1, 1, 1, 1, 1],
                            [0, 0, 0, 0, 1, 1, 1]])
    for mask, w in ((torch.ones(3, 7, dtype=torch.long), 4), (prefill, 4), (prefill[:, 3:], 4), (padded, 3)):
        _check_against_hf(tiny_base, mask, new_tokens=w)


def test_the_written_out_forward_matches_qwen2_and_mistral_layers(tiny_base):
    """The other layer classes it writes out: Qwen2 (q/k/v biases) and Mistral, random tiny models, 8 heads over 2."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from softprompt.model import BaseModel

    shape = dict(vocab_size=tiny_base.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    padded = torch.ones(3, 6, dtype=torch.long)
    padded[1, :3] = 0
    for cls, config in ((Qwen2ForCausalLM, Qwen2Config(**shape)),
                        (MistralForCausalLM, MistralConfig(**shape, sliding_window=None))):
        torch.manual_seed(0)
        model = cls(config).eval()
        if cls is Qwen2ForCausalLM:
            assert model.model.layers[0].self_attn.q_proj.bias is not None
        base = BaseModel(model, tiny_base.tokenizer, cls.__name__)
        _check_against_hf(base, padded)
        _check_against_hf(base, padded, new_tokens=3)
    from softprompt.model.fast_forward import fast_forward

    assert fast_forward(MistralForCausalLM(MistralConfig(**shape, sliding_window=4))) is None  # not written out


def test_the_written_out_forward_shares_the_weights_and_steps_aside(tiny_base, monkeypatch):
    """Fused q/k/v and gate/up are the HF modules' own storage (no second copy of the weights); models it does not
    write out, and SOFTPROMPT_FAST_DECODE=0, get None (the engine then runs HF's forward)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from softprompt.model.fast_forward import fast_forward

    with torch.inference_mode():  # where the engine first makes it: the fused weights must still serve training
        step = fast_forward(tiny_base.model)
    attn = tiny_base.model.model.layers[0].self_attn
    assert step.qkv[0][0].data_ptr() == attn.q_proj.weight.data_ptr()
    assert step.qkv[0][0][-attn.v_proj.out_features:].data_ptr() == attn.v_proj.weight.data_ptr()
    assert not attn.q_proj.weight.requires_grad and not attn.q_proj.weight.is_inference()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert fast_forward(gpt2) is None
    monkeypatch.setenv("SOFTPROMPT_FAST_DECODE", "0")
    assert fast_forward(tiny_base.model) is None



def test_a_joint_pass_equals_its_blocks_run_apart(tiny_base):
    """A decode step of some rows and a padded prefill of others in ONE written-out pass: the same logits and the
    same buffer as the two passes one after the other."""
    from softprompt.model import NewTokens
    from softprompt.model.fast_forward import fast_forward

    layers, heads, head_dim = tiny_base.kv_layout
    torch.manual_seed(0)
    kv = torch.randn(2, layers, 6, heads, 10, head_dim)
    decode_mask = torch.ones(3, 6, dtype=torch.long)
    decode_mask[1, :2] = 0
    decode = NewTokens(torch.tensor([[5], [17], [40]]), decode_mask, torch.tensor([[5], [3], [5]]), slice(0, 3), 0, 5)
    prefill_mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    ids = torch.randint(3, tiny_base.vocab_size, (3, 4))
    prefill = NewTokens(ids, prefill_mask, (prefill_mask.cumsum(1) - 1).clamp(min=0)[:, 3:], slice(3, 6), 2, 3)
    forward = fast_forward(tiny_base.model)
    joint_kv, apart_kv = kv.clone(), kv.clone()
    with torch.inference_mode():
        joint = forward(joint_kv, decode, prefill)
        apart = forward(apart_kv, decode) + forward(apart_kv, prefill)
    for a, b in zip(joint, apart):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint_kv, apart_kv, rtol=1e-5, atol=1e-5)
    assert not joint_kv.equal(kv)


def test_a_failing_joint_pass_is_retried_apart(tiny_base, monkeypatch):
    """If the pass that joins newcomers to a decode step fails, prefill and decode run apart (an error then stays
    with whoever caused it); here both succeed apart, so every row still gets the oracle's tokens."""
    rows = _rows(tiny_base)
    lengths = [2, 5, 3, 6, 4]  # rows finish at different steps: newcomers join running rows
    seqs = [Sequence(r, SamplingParams(max_tokens=n, temperature=0.0)) for r, n in zip(rows, lengths)]
    forward, joint = tiny_base.forward_in_place, []

    def no_joint(kv, *blocks):
        if len(blocks) > 1:
            joint.append(1)
            raise RuntimeError("joint pass failed")
        return forward(kv, *blocks)

    monkeypatch.setattr(tiny_base, "forward_in_place", no_joint)
    Engine(tiny_base).run(seqs, max_rows=2)
    assert joint, "newcomers joined running rows"
    for s in seqs:
        assert s.error is None and s.generated == naive_decode(tiny_base, s.input_ids, None, s.params.max_tokens)
