"""RL tasks: ranking prompts shuffled per draw (with their gold scores), and one template per
ranking task that both renders the prompt and parses the answer."""

from types import SimpleNamespace

import numpy as np
import pytest

from jaxrl_rm.config import RewardSpec, TaskSpec
from jaxrl_rm.data.loaders import write_jsonl
from jaxrl_rm.rewards import sources
from jaxrl_rm.data.records import PromptItem
from jaxrl_rm.rewards.sources import Rollouts
from jaxrl_rm.rewards.judges import ranking_template
from jaxrl_rm.train.tasks import TaskMixer, demonstration, load_task_items, task_demonstrations, warmup_records

PRIME = PromptItem(task="pref", prompt="Name a prime number.", responses=("7", "8"), gold_scores=(1.0, 0.0))


def one_group(item, completions):
    g, t = len(completions), 2
    return Rollouts(items=[item], prompt_texts=[item.prompt], completions=[list(completions)],
                    completion_ids=np.zeros((1, g, t), np.int32), completion_mask=np.ones((1, g, t), bool),
                    lengths=np.full((1, g), t), truncated=np.zeros((1, g), bool))


def ranking_source(task):
    """`type: ranking` as a GRPO run builds it (the run's tasks in the source context)."""
    return sources.build_source(RewardSpec(type="ranking"), {"grpo": SimpleNamespace(tasks={task.name: task})})


def test_ranking_reward_parses_with_the_template_that_renders_the_prompt():
    # max_score 100: the prompt asks for 0-100 scores, and 0-100 scores are what the reward accepts
    task = TaskSpec(name="pref", kind="ranking", options={"template_options": {"max_score": 100}})
    template = ranking_template(task)
    assert "from 0 to 100" in template.render(None, prompt=PRIME.prompt, responses=list(PRIME.responses))
    src = ranking_source(task)
    assert src.template_for("pref") is template  # one object renders and parses
    r, m = src(one_group(PRIME, ["7 is prime, 8 is not. Scores: \\boxed{90, 20}",
                                 "8 looks better. Scores: \\boxed{20, 90}",
                                 "7 is prime. Scores: \\boxed{120, 20}"]))  # out of the 0-100 range
    np.testing.assert_array_equal(r, [[1.0, -1.0, -1.0]])
    assert m["invalid_rate"] == pytest.approx(1 / 3)
    assert (m["top1"], m["all_tied_rate"]) == (0.5, 0.0)  # of the two valid rankings
    # equal scores: tau 0 whatever the gold (where a judge that cannot rank settles under GRPO)
    r, m = src(one_group(PRIME, ["Both name a number. Scores: \\boxed{50, 50}", "7 is prime. Scores: \\boxed{90, 20}"]))
    np.testing.assert_array_equal(r, [[0.0, 1.0]])
    assert (m["top1"], m["all_tied_rate"], m["invalid_rate"]) == (0.5, 0.5, 0.0)

    # listwise_tags: <score_i> tags are the asked-for format; a \boxed{} list is not
    task = TaskSpec(name="pref", kind="ranking", options={"template": "listwise_tags"})
    assert "<score_1>" in ranking_template(task).render(None, prompt=PRIME.prompt, responses=list(PRIME.responses))
    r, m = ranking_source(task)(one_group(PRIME, [
        "<think>7 is prime, 8 is not.</think><score_1>9</score_1><score_2>2</score_2>",
        "<think>8 looks better.</think><score_1>2</score_1><score_2>9</score_2>",
        "7 is prime, 8 is not. Scores: \\boxed{9, 2}"]))
    np.testing.assert_array_equal(r, [[1.0, -1.0, -1.0]])

    with pytest.raises(ValueError, match=r"\['max_score'\] belong to the task's template"):
        sources.build_source(RewardSpec(type="ranking", options={"max_score": 100}), {})
    with pytest.raises(ValueError, match=r"grpo.tasks\[pref\].options.template: a ranking task needs a listwise"):
        ranking_template(TaskSpec(name="pref", kind="ranking", options={"template": "pairwise"}))


def test_warmup_demonstrations_answer_in_the_format_the_task_reward_parses():
    for options in ({}, {"template_options": {"max_score": 100}}, {"template": "listwise_tags"}):
        task = TaskSpec(name="pref", kind="ranking", options=options)
        demo = demonstration(PRIME, task)
        r, m = ranking_source(task)(one_group(PRIME, [demo.response]))
        assert r[0, 0] == 1.0 and m["invalid_rate"] == 0.0, (options, demo.response)


def chosen_first(num_items: int, n: int) -> list[PromptItem]:
    """Rankings as converted from preference data: the best response always listed first."""
    return [PromptItem(task="pref", prompt=f"prompt {i}", responses=tuple(f"answer {i}-{k}" for k in range(n)),
                       gold_scores=tuple(float(n - k) for k in range(n)), id=f"pref-{i}") for i in range(num_items)]


def test_ranking_prompts_are_shuffled_per_draw_with_their_gold_scores():
    n = 4
    task = TaskSpec(name="pref", kind="ranking")
    items = {"pref": chosen_first(50, n)}
    mixer = TaskMixer([task], items, seed=0)
    drawn = [it for step in range(100) for it in mixer.draw(step, 16)]  # each item drawn 32 times
    first_best = np.mean([int(np.argmax(it.gold_scores)) == 0 for it in drawn])
    assert abs(first_best - 1 / n) < 0.04, first_best
    for it in drawn:  # each response keeps its own gold score
        assert all(r == f"answer {it.id[5:]}-{n - int(s)}" for r, s in zip(it.responses, it.gold_scores))
    assert len({it.responses for it in drawn if it.id == "pref-0"}) > 10  # a fresh order at every draw
    # resumable: a fresh mixer with the saved counters shows the same items in the same orders
    again = TaskMixer([task], items, seed=0)
    again.load_state(mixer.state())
    assert again.draw(100, 16) == mixer.draw(100, 16)
    # the data's order when asked for
    plain = TaskMixer([TaskSpec(name="pref", kind="ranking", options={"shuffle_responses": False})], items, seed=0)
    assert all(it.gold_scores == (4.0, 3.0, 2.0, 1.0) for it in plain.draw(0, 16))


def test_loaded_rankings_have_a_fixed_seeded_order(tmp_path):
    """Held-out rankings (and the warm-up demonstrations) carry no position shortcut either, and
    every evaluation shows them in the same order."""
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [{"prompt": f"prompt {i}", "responses": [f"chosen {i}", f"rejected {i}"],
                        "gold_scores": [1, 0], "id": i} for i in range(400)])
    task = TaskSpec(name="pref", kind="ranking", data=str(path), eval_data=str(path))
    held_out = load_task_items(task, split="eval", seed=0, size=0)
    assert held_out == load_task_items(task, split="eval", seed=0, size=0)
    assert abs(np.mean([it.gold_scores[0] == 1 for it in held_out]) - 0.5) < 0.08
    assert all(r.startswith("chosen" if s == 1 else "rejected") for it in held_out
               for r, s in zip(it.responses, it.gold_scores))
    demos = warmup_records(task_demonstrations([task], seed=0, size=400), seed=0)
    # the demonstration's scores follow the shown order: the best first about half the time
    firsts = [d.response.rsplit("\\boxed{", 1)[1].startswith("10") for d in demos]
    assert abs(np.mean(firsts) - 0.5) < 0.08


def test_a_warmup_whose_demonstrations_outgrow_the_rl_budget_is_a_config_error(tmp_path, monkeypatch):
    """URPO's ranking answers (`<best> \\boxed{10, 3, 7, 0}`) took 26 tokens where the policy could
    write 24: three quarters of its rollouts were cut before the scores, silently. The warm-up now
    refuses such a budget before training, naming the key and the length needed."""
    import jaxrl_rm.train.sft as sft
    from jaxrl_rm.config import load_config
    from jaxrl_rm.data.pipeline import check_demonstrations_fit
    from jaxrl_rm.data.records import SFTRecord
    from jaxrl_rm.data.tokenizer import build_char_tokenizer
    from jaxrl_rm.train.grpo import warm_start

    tok = build_char_tokenizer()
    long = SFTRecord(prompt="rank 4:reverse:aehcd=dchea;dca;dchaa;dcehbd;=", response="dchea \\boxed{10, 3, 7, 0}")
    short = SFTRecord(prompt="reverse:ab=", response="ba")
    need = len(tok.encode(long.response, add_special_tokens=False)) + 1  # the end token
    check_demonstrations_fit([long] * 9 + [short], tok, max_new_tokens=need, where="x")  # fits exactly
    with pytest.raises(ValueError, match=rf"^grpo.max_new_tokens \(task 'preference'\): max_new_tokens={need - 1}, "
                                         rf"but 9 of the 10 warm-up demonstrations \(90.0%\) need more \(up to {need} tokens"):
        check_demonstrations_fit([long] * 9 + [short], tok, max_new_tokens=need - 1,
                                 where="grpo.max_new_tokens (task 'preference')")
    # a tail within the tolerance is a warning, not an error
    with pytest.warns(UserWarning, match=r"1 of the 20 warm-up demonstrations \(5.0%\)"):
        check_demonstrations_fit([long] + [short] * 19, tok, max_new_tokens=need - 1, where="x")
    with pytest.raises(ValueError, match=r"\(10.0%\)"):
        check_demonstrations_fit([long] + [short] * 9, tok, max_new_tokens=need - 1, where="x")

    # the GRPO warm-up runs the check on every task before any SFT step
    ran = []
    monkeypatch.setattr(sft, "run_sft", lambda cfg: ran.append(cfg) or {"preempted": False})
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "urpo_tiny.yaml", [f"run_dir={tmp_path}", "data.synthetic_size=200",
                                                            "grpo.max_new_tokens=24"])
    with pytest.raises(ValueError, match=r"grpo.max_new_tokens \(task 'preference'\)"):
        warm_start(cfg)
    assert not ran
    warm_start(load_config(repo / "configs" / "urpo_tiny.yaml", [f"run_dir={tmp_path}", "data.synthetic_size=200"]))
    assert len(ran) == 1
