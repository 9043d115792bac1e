"""The vLLM hand-off: a /v1/completions body whose prompt_embeds, decoded exactly as vLLM's server decodes them,
give the base model the same logits as softprompt's own prompted forward. (No live vLLM here: it cannot be
installed on these machines; docs/vllm.md says so.)"""

import base64
import io
import json

import httpx
import pytest
import torch

from softprompt import SoftPrompt, SoftPromptError
from softprompt.cli import main
from softprompt.vllm_client import completion_request

TEMPLATE = {"input": "Review: {sentence}\nSentiment:", "output": " {label}", "label_map": None, "chat": False,
            "system": None}
TEXTS = ["the film was great .", "the plot was awful ."]


def vllm_decode(embed: str, hidden_size: int, model_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One `prompt_embeds` entry as vLLM's OpenAI server turns it into the engine's input, step for step:
    vllm/renderers/embed_utils.py, `safe_load_prompt_embeds` (vLLM main, late 2025 on; in 0.11 the same steps
    are `CompletionRenderer.load_prompt_embeds` in vllm/entrypoints/renderer.py). vLLM uses pybase64, whose
    b64decode is base64's."""
    with torch.sparse.check_sparse_tensor_invariants():
        tensor = torch.load(io.BytesIO(base64.b64decode(embed, validate=True)), weights_only=True,
                            map_location=torch.device("cpu"))
        assert isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)
        tensor = tensor.to_dense()
    if tensor.dim() > 2:
        tensor = tensor.squeeze(0)
    assert tensor.dim() == 2 and tensor.shape[1] == hidden_size  # [num_tokens, hidden_size]
    return tensor.to(model_dtype)  # the server casts to its --dtype


@pytest.fixture
def prompt(tiny_base):
    torch.manual_seed(0)
    embeddings = torch.randn(5, tiny_base.hidden_size) * 0.5  # [P, d]
    return SoftPrompt(embeddings, {"template": dict(TEMPLATE), "base": tiny_base.fingerprint()})


def _softprompt_logits(base, prompt, ids):
    """softprompt's own path: prepend_prompts + forward on one row -> [P + T, V]."""
    prompted = base.prepend_prompts(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), prompt.embeddings)
    with torch.no_grad():
        return base.forward(prompted).logits[0]


def _vllm_logits(base, embeds):
    """The engine side: the decoded tensor as inputs_embeds, positions 0..L-1 (vLLM adds no BOS or template)."""
    with torch.no_grad():
        return base.model(inputs_embeds=embeds[None], position_ids=torch.arange(len(embeds))[None]).logits[0]


def test_decoded_payload_gives_the_same_logits_as_softprompt(tiny_base, prompt):
    body = completion_request(TEXTS, prompt, base=tiny_base, served_model_name="tiny", max_tokens=8, stop=["\n"])
    assert body["model"] == "tiny" and body["max_tokens"] == 8 and body["stop"] == ["\n"] and "prompt" not in body
    assert len(body["prompt_embeds"]) == len(TEXTS)  # one entry per text: one choice each, in order
    json.dumps(body)  # a plain JSON body
    for text, embed in zip(TEXTS, body["prompt_embeds"]):
        # The template applied as `generate` does: "Review: {sentence}\nSentiment:" with BOS, after the prompt.
        ids = tiny_base.tokenizer(TEMPLATE["input"].format(sentence=text))["input_ids"]
        embeds = vllm_decode(embed, tiny_base.hidden_size)
        assert embeds.shape == (prompt.n_virtual_tokens + len(ids), tiny_base.hidden_size)
        assert torch.equal(embeds[:5], prompt.embeddings)
        ours, theirs = _softprompt_logits(tiny_base, prompt, ids), _vllm_logits(tiny_base, embeds)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        # A single text gives a single string, not a list.
    single = completion_request(TEXTS[0], prompt, base=tiny_base)
    assert isinstance(single["prompt_embeds"], str) and single["model"] == tiny_base.source


def test_chat_template_is_applied_as_generate_does(tiny_base, prompt):
    tok = tiny_base.tokenizer
    old = tok.chat_template
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    try:
        prompt.meta["template"] = {**TEMPLATE, "chat": True, "system": "Be brief.", "output": "{label}"}
        embeds = vllm_decode(completion_request(TEXTS[0], prompt, base=tiny_base)["prompt_embeds"], tiny_base.hidden_size)
        rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Review: " + TEXTS[0] + "\nSentiment:"}],
                                           tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert embeds.shape[0] == 5 + len(ids)
        torch.testing.assert_close(_vllm_logits(tiny_base, embeds), _softprompt_logits(tiny_base, prompt, ids),
                                   rtol=1e-5, atol=1e-5)
    finally:
        tok.chat_template = old


def test_half_precision_payloads_and_deep_prompts(tiny_base, prompt):
    body = completion_request(TEXTS[0], prompt, base=tiny_base, embeds_dtype="bfloat16")
    tensor = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
    assert tensor.dtype == torch.bfloat16 and torch.equal(tensor[:5], prompt.embeddings.to(torch.bfloat16))
    full = completion_request(TEXTS[0], prompt, base=tiny_base)["prompt_embeds"]
    assert len(body["prompt_embeds"]) < 0.75 * len(full)
    deep = SoftPrompt(torch.zeros(4, 2 * tiny_base.model.config.num_hidden_layers, tiny_base.kv_shape[-1]),
                      {"template": dict(TEMPLATE)})
    with pytest.raises(SoftPromptError, match="deep prompt .* cannot be sent as prompt_embeds"):
        completion_request(TEXTS[0], deep, base=tiny_base)


def test_cli_writes_the_body_and_the_openai_client_sends_the_same(tiny_base, tiny_model_dir, prompt, tmp_path, capsys):
    prompt.save(tmp_path / "p")
    out = tmp_path / "body.json"
    assert main(["vllm-request", "--prompt", str(tmp_path / "p"), "--model", str(tiny_model_dir), "--dtype",
                 "float32", "--served-model-name", "tiny", "--max-tokens", "4", "--output", str(out), TEXTS[0]]) == 0
    body = json.loads(out.read_text())
    assert body["model"] == "tiny" and body["max_tokens"] == 4
    ids = tiny_base.tokenizer(TEMPLATE["input"].format(sentence=TEXTS[0]))["input_ids"]
    torch.testing.assert_close(_vllm_logits(tiny_base, vllm_decode(body["prompt_embeds"], tiny_base.hidden_size)),
                               _softprompt_logits(tiny_base, prompt, ids), rtol=1e-5, atol=1e-5)
    # docs/vllm.md's Python example: the openai client puts prompt_embeds into the body through extra_body.
    openai = pytest.importorskip("openai")
    sent = {}

    def server(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "created": 0, "model": "tiny",
                                         "choices": [{"index": 0, "text": " positive", "finish_reason": "stop",
                                                      "logprobs": None}]})

    client = openai.OpenAI(base_url="http://vllm.test/v1", api_key="EMPTY",
                           http_client=httpx.Client(transport=httpx.MockTransport(server)))
    completion = client.completions.create(model=body["model"], prompt="", max_tokens=body["max_tokens"],
                                           extra_body={"prompt_embeds": body["prompt_embeds"]})
    assert completion.choices[0].text == " positive"
    assert sent["prompt_embeds"] == body["prompt_embeds"] and sent["prompt"] == ""
