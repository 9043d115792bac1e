import torch

from softprompt import SoftPrompt
from softprompt.data import Template, read_rows
from softprompt.ensemble import combine, ensemble_label_scores, evaluate_ensemble
from softprompt.evaluate import label_scores, prepare


def test_mixed_batch_scores_equal_each_prompt_alone(tiny_base, sentiment_files):
    evalset = prepare(tiny_base, Template(), read_rows(sentiment_files[1]))
    prompts = [SoftPrompt.initialise(tiny_base, n, "random", seed=n) for n in (3, 5, 4)]
    together = ensemble_label_scores(tiny_base, prompts, evalset, batch_size=7)
    for k, p in enumerate(prompts):
        assert torch.allclose(together[k], label_scores(tiny_base, p, evalset), atol=1e-4)


def test_combination_rules():
    # 3 prompts, 2 rows, 2 labels: two prompts weakly prefer one label, the third strongly the other, so
    # the vote and the mean log-probability disagree on both rows.
    scores = torch.tensor([[[-1.0, -0.9], [-1.0, -1.2]],
                           [[-1.0, -0.9], [-1.0, -1.2]],
                           [[-0.1, -5.0], [-3.0, -0.1]]])
    assert combine(scores, "vote").tolist() == [1, 0]
    assert combine(scores, "mean").tolist() == [0, 1]  # means: row 0 (-0.70, -2.27), row 1 (-1.67, -0.83)
    tie = torch.tensor([[[-1.0, -2.0]], [[-3.0, -0.5]]])  # one vote each: the better mean wins
    assert combine(tie, "vote").tolist() == [1]


def test_evaluate_ensemble_reports_members_and_ensembles(tiny_base, sentiment_files):
    evalset = prepare(tiny_base, Template(), read_rows(sentiment_files[1]))
    prompts = [SoftPrompt.initialise(tiny_base, 4, "vocab", seed=s) for s in range(3)]
    report = evaluate_ensemble(tiny_base, prompts, ["a", "b", "c"], evalset)
    assert [m["system"] for m in report["members"]] == ["a", "b", "c"]
    for key in ("ensemble_mean", "ensemble_vote"):
        assert 0.0 <= report[key] <= 1.0
    single = label_scores(tiny_base, prompts[0], evalset).argmax(1)
    assert report["members"][0]["accuracy"] == float((single == torch.tensor(evalset.gold)).float().mean())


def test_eval_with_several_prompts_reports_each_and_the_ensembles(tiny_base, tiny_model_dir, sentiment_files, tmp_path, capsys):
    from softprompt.cli import main

    for s in range(3):
        p = SoftPrompt.initialise(tiny_base, 4, "vocab", seed=s)
        p.meta["template"] = Template().to_dict()
        p.save(tmp_path / f"p{s}")
    argv = ["eval", "--data", str(sentiment_files[1]), "--model", str(tiny_model_dir), "--json"]
    for s in range(3):
        argv += ["--prompt", str(tmp_path / f"p{s}")]
    assert main(argv) == 0
    import json

    systems = [s["system"] for s in json.loads(capsys.readouterr().out)["systems"]]
    assert systems[-2:] == ["ensemble (mean)", "ensemble (vote)"]
    assert sum(s.startswith("prompt ") for s in systems) == 3
