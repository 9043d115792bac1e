"""The decoding engine against the naive oracle: recompute the whole row every step, no cache, no batch, no padding.

Whatever the engine does for speed (prefix cache, one batch for every prompt, rows joining while others decode,
retired rows and trimmed columns), each row's tokens must be what the naive loop gives for that row alone.
"""

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


def test_continuous_batching_equals_the_naive_oracle_row_by_row(tiny_base):
    torch.manual_seed(0)
    shallow = SoftPrompt.initialise(tiny_base, 5, "random", seed=1).embeddings.detach()
    deep = torch.randn(3, *tiny_base.kv_shape) * 0.2
    entries = [PromptEntry("shallow", shallow), PromptEntry("deep", deep), None]
    rows = _rows(tiny_base) * 3  # 15 sequences through 4 slots: rows join while others are mid-way
    lengths = [3, 9, 6, 1, 12]  # the 1-token rows finish at their prefill, some at the end of the batch
    seqs = [Sequence(r, SamplingParams(max_tokens=lengths[i % 5], temperature=0.0), entries[i % 3])
            for i, r in enumerate(rows)]
    engine = Engine(tiny_base)
    decode = engine.decode

    def checked_decode():  # the batch never holds a finished row, and its tensors always match its rows
        assert all(not s.finished for s in engine.rows)
        assert engine.batch.mask.shape == (len(engine.rows), engine.batch.width) == (len(engine.batch.next_pos), engine.batch.width)
        decode()

    engine.decode = checked_decode
    engine.run(seqs, max_rows=4)
    assert engine.stats["max_batch_rows"] == 4 and engine.stats["prefills"] > 3  # really joined in flight
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
