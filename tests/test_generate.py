import pytest
import torch

from softprompt import SoftPrompt, generate
from softprompt.errors import SoftPromptError
from softprompt.generate import generate_ids


def _naive_greedy(base, ids, prompt, n):
    """Reference: recompute the whole sequence every step, no cache, no padding."""
    ids = list(ids)
    out = []
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = base.forward(base.prepend_prompts(x, torch.ones_like(x), prompt)).logits
        t = int(logits[0, -1].argmax())
        if t == base.tokenizer.eos_token_id:
            break
        out.append(t)
        ids.append(t)
    return out


def test_cached_batched_greedy_equals_naive_loop(tiny_base):
    a = SoftPrompt.initialise(tiny_base, 3, "random", seed=5).embeddings
    b = SoftPrompt.initialise(tiny_base, 6, "vocab", seed=6).embeddings
    rows = [tiny_base.tokenizer(t)["input_ids"] for t in ["Review: the film was", "the meal", "Review: the hotel was awful .\nSentiment:"]]
    prompts = [a, None, b]
    got = generate_ids(tiny_base, rows, prompts, max_new_tokens=8)
    for r, p, g in zip(rows, prompts, got):
        assert g == _naive_greedy(tiny_base, r, p, 8)


def test_sampling_is_seeded(tiny_base):
    rows = [tiny_base.tokenizer("Review: the plot")["input_ids"]] * 2
    s1 = generate_ids(tiny_base, rows, None, max_new_tokens=10, temperature=1.0, seed=1)
    s2 = generate_ids(tiny_base, rows, None, max_new_tokens=10, temperature=1.0, seed=1)
    s3 = generate_ids(tiny_base, rows, None, max_new_tokens=10, temperature=1.0, seed=2)
    assert s1 == s2 and s1 != s3


def test_top_p_tiny_is_greedy(tiny_base):
    rows = [tiny_base.tokenizer("Review: the plot")["input_ids"]]
    assert generate_ids(tiny_base, rows, None, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3) == \
        generate_ids(tiny_base, rows, None, max_new_tokens=6)


def test_generate_applies_the_prompts_template_and_stop(tiny_base, tmp_path):
    p = SoftPrompt.initialise(tiny_base, 4, "vocab")
    p.meta["template"] = {"input": "Review: {sentence} .\nSentiment:", "output": " {label}"}
    p.save(tmp_path / "p")
    templated = generate("the film was great", str(tmp_path / "p"), base=tiny_base, max_new_tokens=6)
    by_hand = generate("Review: the film was great .\nSentiment:", p, base=tiny_base, max_new_tokens=6, raw=True)
    assert templated == by_hand
    full = generate("Review: the", None, base=tiny_base, max_new_tokens=12)
    if len(full) > 3:
        stop = full[1:3]
        cut = generate("Review: the", None, base=tiny_base, max_new_tokens=12, stop=[stop])
        assert cut == full[: full.index(stop)]


def test_a_stop_string_ends_an_answer_only_once_it_has_begun(tiny_base):
    from softprompt.sampling import cut_at_stop, find_stop

    assert cut_at_stop("\nThe answer.\nMore", ["\n"]) == "\nThe answer."
    assert cut_at_stop("answer\n\nmore", ["\n\n", "\n"]) == "answer"
    assert cut_at_stop(" \n ", ["\n"]) == " \n "  # only whitespace so far: nothing to cut yet
    assert cut_at_stop("no stop here", ["\n"]) == "no stop here"
    assert find_stop("\n", ["\n"], "answer") is None  # generation goes on past a leading newline ...
    assert find_stop("\nthe film\n", ["\n"], "answer") == 9  # ... and stops at the one after the answer
    assert find_stop("\nthe film\n", ["\n"], "literal") == 0  # the server's (OpenAI's) rule: wherever it is


def test_an_empty_input_continues_from_an_input_prompt_and_is_a_clear_error_otherwise(tiny_base):
    torch.manual_seed(0)
    flat = torch.randn(4, tiny_base.hidden_size) * 0.02
    deep = torch.randn(4, *tiny_base.kv_shape) * 0.1
    # From nothing, the first token is the input-embedding prompt's own prediction: the naive forward's argmax.
    first = tiny_base.forward(tiny_base.prepend_prompts(torch.zeros(1, 0, dtype=torch.long),
                                                        torch.zeros(1, 0, dtype=torch.long), flat)).logits[0, -1]
    top = int(first.argmax())
    assert generate_ids(tiny_base, [[]], flat, max_new_tokens=1) == ([[]] if top == tiny_base.tokenizer.eos_token_id else [[top]])
    for prompts in (None, deep, [flat, deep]):
        with pytest.raises(SoftPromptError, match="empty input"):
            generate_ids(tiny_base, [[5], []], prompts, max_new_tokens=2)
    assert len(generate_ids(tiny_base, [[5], []], [deep, flat], max_new_tokens=2)) == 2
