import json

import pytest

from softprompt import SoftPromptError
from softprompt.data import Encoder, Template, collate, epoch_batches, label_set, parse_label_map, read_rows


def test_read_all_formats(tmp_path):
    rows = [{"sentence": "good film", "label": 1}, {"sentence": "bad, sad film", "label": 0}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('sentence,label\ngood film,1\n"bad, sad film",0\n')
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood film\t1\nbad, sad film\t0\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for ext in ("jsonl", "json", "parquet"):
        assert read_rows(tmp_path / f"d.{ext}") == rows
    for ext in ("csv", "tsv"):
        assert read_rows(tmp_path / f"d.{ext}") == [{"sentence": "good film", "label": "1"}, {"sentence": "bad, sad film", "label": "0"}]


def test_csv_with_a_space_before_a_quoted_cell(tmp_path):
    """`"a", "b, c"` (a space after the comma, as in awesome-chatgpt-prompts' prompts.csv) is two cells."""
    (tmp_path / "p.csv").write_text('"act","prompt"\n"Planner", "I want you to act as a planner, with commas, here"\n')
    assert read_rows(tmp_path / "p.csv") == [{"act": "Planner", "prompt": "I want you to act as a planner, with commas, here"}]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "a", oops}\n')
    with pytest.raises(SoftPromptError, match=r"bad\.jsonl:3: invalid JSON"):
        read_rows(path)
    path.write_text('{"input": "a", "output": "b"}\n[1, 2]\n')
    with pytest.raises(SoftPromptError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_rows(path)


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "\n\n", "no rows"),
    ("x.xml", "<a/>", "unknown data format"),
    ("h.csv", "", "no header"),
    ("wide.csv", "a,b\n1,2,3\n", r"wide\.csv:2: more cells"),
])
def test_bad_files_are_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SoftPromptError, match=message):
        read_rows(tmp_path / name)
    with pytest.raises(SoftPromptError, match="data file not found"):
        read_rows(tmp_path / "missing.jsonl")


def test_template_with_label_map():
    t = Template(input="Review: {sentence}\nSentiment:", output=" {label}", label_map="0=negative,1=positive")
    row = {"sentence": "fine", "label": 1}
    assert t.render_input(row) == "Review: fine\nSentiment:"
    assert t.render_output(row) == " positive"
    assert label_set(t, [row]) == [" negative", " positive"]
    with pytest.raises(SoftPromptError, match=r"data: row 3: template field 'sentence' is missing"):
        t.render_input({"text": "x"}, "data: row 3")
    with pytest.raises(SoftPromptError, match="KEY=WORD"):
        parse_label_map("0:negative")


def test_loss_only_on_answer_tokens(tiny_base):
    enc = Encoder(tiny_base.tokenizer, Template())
    e = enc.encode_rows([{"input": "the film was", "output": "great"}])[0]
    answer = tiny_base.tokenizer(" great", add_special_tokens=False)["input_ids"] + [tiny_base.tokenizer.eos_token_id]
    assert e.labels[: e.n_input] == [-100] * e.n_input
    assert e.labels[e.n_input:] == answer == e.input_ids[e.n_input:]


def test_lm_mode_scores_the_whole_text_but_the_first_token(tiny_base):
    enc = Encoder(tiny_base.tokenizer, Template(input="", output="{text}"), append_eos=False)
    e = enc.encode_rows([{"text": "the plot was superb"}])[0]
    assert e.n_input == 0 and e.labels[0] == -100 and e.labels[1:] == e.input_ids[1:]


def test_empty_output_is_an_error(tiny_base):
    with pytest.raises(SoftPromptError, match="row 2: the output is empty"):
        Encoder(tiny_base.tokenizer, Template(output="{output}")).encode_rows([{"input": "a", "output": "b"}, {"input": "a", "output": ""}])


def test_long_rows_are_truncated_from_the_left_with_a_warning(tiny_base):
    enc = Encoder(tiny_base.tokenizer, Template(), max_length=8)
    with pytest.warns(UserWarning, match="1 rows longer than 8 tokens were truncated"):
        e = enc.encode_rows([{"input": "the film was great " * 10, "output": "positive"}])[0]
    answer = enc.output_ids(" positive")
    assert len(e.input_ids) == 8 and e.input_ids[-len(answer):] == answer


def test_an_over_long_lm_text_keeps_its_start_and_the_warning_says_so(tiny_base):
    enc = Encoder(tiny_base.tokenizer, Template(input="", output="{text}"), max_length=8)
    text = "one two three four five six seven eight nine ten eleven twelve"
    with pytest.warns(UserWarning, match="1 rows were cut at the end: their output alone is longer than 8 tokens") as caught:
        e = enc.encode_rows([{"text": text}, {"text": "short"}])[0]
    assert not any("from the left" in str(w.message) for w in caught)
    full = enc.input_ids("") + enc.output_ids(text)
    assert e.input_ids == full[:8]


def test_collate_pads_right():
    from softprompt.data import Encoded

    b = collate([Encoded([1, 2, 3], [-100, 2, 3], 1), Encoded([4], [4], 0)], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_epoch_batches_are_a_deterministic_permutation():
    lengths = [i % 17 for i in range(1000)]
    a = epoch_batches(lengths, 16, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 16, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 16, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(1000))
    # Batching by length cuts padding to a small fraction of what a plain shuffle needs.
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(a) < 0.1 * padding(epoch_batches(lengths, 16, seed=1, epoch=0, by_length=False))


def test_chat_mode_wraps_the_input_in_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    enc = Encoder(tok, Template(input="Review: {text}", chat=True, system="Be brief."))
    e = enc.encode_rows([{"text": "the film was great", "output": "positive"}])[0]
    rendered = tok.decode(e.input_ids[: e.n_input])
    assert rendered.startswith("<s>system: Be brief.</s><s>user: Review: the film was great</s><s>assistant:")
    # The answer follows the template directly (no leading space in chat mode) and ends with EOS.
    assert e.input_ids[e.n_input:] == tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_train_cli_passes_the_chat_system_message_to_the_template():
    from softprompt.cli import build_parser
    from softprompt.config import TrainConfig, config_from_args
    from softprompt.train import template_from

    args = build_parser().parse_args(["train", "--data", "d.jsonl", "--output", "o", "--chat", "--system", "Be brief."])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.system == "Be brief." and template_from(cfg) == Template(input="{input}", chat=True, system="Be brief.")


def test_command_line_templates_turn_backslash_n_into_a_newline():
    """A shell passes "Review: {x}\nSentiment:" as backslash + n; the user means a newline (train and eval)."""
    from softprompt.cli import build_parser
    from softprompt.config import TrainConfig, config_from_args

    typed = r"Review: {x}\nSentiment:\t[\\n]"  # the characters argparse receives
    args = build_parser().parse_args(["train", "--data", "d.jsonl", "--output", "o", "--input-template", typed,
                                      "--system", r"a\nb"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.input_template == "Review: {x}\nSentiment:\t[\\n]" and cfg.system == "a\nb"
    ev = build_parser().parse_args(["eval", "--data", "d.jsonl", "--input-template", typed, "--instruction", r"Say\n"])
    assert ev.input_template == cfg.input_template and ev.instruction == "Say\n"
