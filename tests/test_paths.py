"""The miniature path task (`synthetic:paths`): its problems, its checker (any valid walk is right,
not only the planted one), the judge's written check, and the `path_check` verifier wherever a
verifier is named (reward type, judge teacher, held-out accuracy)."""

import itertools

import numpy as np
import pytest

from jaxrl_rm.data import synthetic
from jaxrl_rm.data.records import JudgmentExample
from jaxrl_rm.rewards.verifiers import VERIFIERS, PathVerifier, make_verifier

PROMPT = "path:a>c,3:a:bd b:c d:c="  # two valid walks: abc and adc


def test_path_problems_are_solvable_seeded_and_split():
    train = synthetic.path_problems(300, seed=0)
    again = synthetic.path_problems(300, seed=0)
    held_out = synthetic.path_problems(100, seed=0, split="eval")
    assert [p.prompt for p in train] == [p.prompt for p in again]
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    for p in train + held_out:
        start, end, length, succ = synthetic.parse_path_prompt(p.prompt)
        assert synthetic.path_violations(p.prompt, p.answer) == []  # the planted walk is valid
        assert (p.answer[0], p.answer[-1], len(p.answer)) == (start, end, length)
        assert 3 <= length <= 5
        assert sum(len(v) for v in succ.values()) == 6  # num_edges
        assert all(x not in v for x, v in succ.items())  # no letter followed by itself
        assert list(succ) == sorted(succ) and all(list(v) == sorted(v) for v in succ.values())


def test_any_valid_walk_is_right_and_each_broken_constraint_is_named():
    assert synthetic.path_violations(PROMPT, "abc") == []
    assert synthetic.path_violations(PROMPT, "adc") == []
    assert synthetic.path_violations(PROMPT, " adc\n") == []  # whitespace around the answer
    assert synthetic.path_violations(PROMPT, "acc") == ["edge ac", "edge cc"]
    assert synthetic.path_violations(PROMPT, "bc") == ["start", "length"]
    assert synthetic.path_violations(PROMPT, "abcd") == ["edge cd", "end", "length"]
    assert synthetic.path_violations(PROMPT, "") == ["start", "end", "length"]
    assert synthetic.path_violations("reverse:abc=", "cba") is None  # not a path problem
    # a chat-rendered or judge prompt wraps the problem: it is still found
    assert synthetic.path_violations(f"<|user|>{PROMPT}<|end|><|assistant|>", "abc") == []


def test_written_check_copies_successor_lists_and_agrees_with_the_checker():
    assert synthetic.path_written_check(PROMPT, "abc") == "ab:bd+ bc:c+ aa= cc= 33="
    assert synthetic.path_written_check(PROMPT, "acc") == "ac:bdx cc:x aa= cc= 33="
    assert synthetic.path_written_check(PROMPT, "") == "a_x c_x 30x"
    assert synthetic.path_written_check("reverse:abc=", "cba") == ""
    # on every short answer over the alphabet, the check has no failed item iff the answer is valid
    rng = np.random.default_rng(0)
    problems = synthetic.path_problems(20, seed=1)
    for p in problems:
        answers = {p.answer, *("".join(w) for w in itertools.islice(itertools.product("abcdef", repeat=3), 0, None, 7))}
        answers |= {synthetic.corrupt_answer(p.answer, rng, alphabet="abcdef") for _ in range(10)}
        for a in answers:
            check = synthetic.path_written_check(p.prompt, a)
            assert (not any(item.endswith("x") for item in check.split())) == (synthetic.path_violations(p.prompt, a) == [])


def test_path_verifier_by_name_everywhere():
    v = make_verifier("path_check")
    assert isinstance(v, PathVerifier) and set(VERIFIERS) == {"verifier", "exact_match", "path_check"}
    out = v(["abc", "adc", "acc", "", "abab"], [""] * 5, prompts=[PROMPT] * 4 + ["path:a>b,4:a:b b:a="])
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]  # a valid walk may repeat a unit
    assert [r.reason for r in out.results] == ["correct", "correct", "incorrect", "empty", "correct"]
    assert v(["abc"], [""], prompts=["2+2="]).results[0].reason == "no_gold"
    with pytest.raises(ValueError, match="needs the prompts"):
        v(["abc"], [""])
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        make_verifier("nope")
    # the reward type of the same name
    from jaxrl_rm.config import RewardSpec
    from jaxrl_rm.data.records import PromptItem
    from jaxrl_rm.rewards.sources import RULE_REWARDS, Rollouts, build_source

    assert "path_check" in RULE_REWARDS
    from jaxrl_rm.rewards.sources import VerifierSource

    assert set(VerifierSource.NAMES) == set(VERIFIERS)  # every verifier is a reward type, with a name
    src = build_source(RewardSpec(type="path_check"), {})
    item = PromptItem(task="paths", prompt=PROMPT, answer="abc", id="p0")
    z = np.zeros((1, 3, 1), np.int32)
    rewards, metrics = src(Rollouts(items=[item], prompt_texts=[PROMPT], completions=[["adc", "acc", "abc"]],
                                    completion_ids=z, completion_mask=z, lengths=np.ones((1, 3), np.int32),
                                    truncated=np.zeros((1, 3), bool)))
    assert src.name == "verifier_path" and rewards.tolist() == [[1.0, 0.0, 1.0]]
    assert metrics["correct"] == pytest.approx(2 / 3)
    # held-out accuracy of SFT on the task uses it too
    assert synthetic.TASK_VERIFIERS["paths"] == "path_check"


def test_judge_data_warmup_and_rule_made_answers_use_the_path_check():
    from jaxrl_rm.train.judge import label_answers, warmup_records, with_corrupted_answers

    problems = [synthetic.VerifiableProblem(prompt=PROMPT, answer="abc", id="p")]
    examples, stats = label_answers(problems, [["adc", "acc", "abc"]], teacher="path_check")
    assert [(e.response, e.label) for e in examples] == [("adc", True), ("acc", False), ("abc", True)]
    assert stats["sampler_accuracy"] == pytest.approx(2 / 3)
    recs = warmup_records(examples, "pointwise_correctness", label_noise=0.0, think="path")
    assert [r.response for r in recs] == ["<think>ad:bd+ dc:c+ aa= cc= 33=</think><score>1</score>",
                                          "<think>ac:bdx cc:x aa= cc= 33=</think><score>0</score>",
                                          "<think>ab:bd+ bc:c+ aa= cc= 33=</think><score>1</score>"]
    # rule-made answers of the warm-up / refresh are labelled by the check, not by exact match
    exs = [JudgmentExample(prompt=p.prompt, response="zz", label=False, reference=p.answer, id=str(i))
           for i, p in enumerate(synthetic.path_problems(200, seed=3))]
    mixed = with_corrupted_answers(exs, 1.0, p_correct=0.3, seed=0)
    assert all(e.label == (synthetic.path_violations(e.prompt, e.response) == []) for e in mixed)
    assert any(e.label for e in mixed) and not all(e.label for e in mixed)


def test_path_configs_load():
    from conftest import REPO
    from jaxrl_rm.config import load_config
    from jaxrl_rm.train.pipeline import stage_config

    judge = load_config(REPO / "configs" / "judge_paths_tiny.yaml")
    assert (judge.judge.teacher, judge.judge.warmup_think, judge.judge.problems) == ("path_check", "path", "synthetic:paths")
    cfg = load_config(REPO / "configs" / "miniature" / "gap.yaml")
    stages = {s.name: stage_config(cfg, s) for s in cfg.stages}
    assert stages["rlvr"].grpo.tasks[0].rewards[0].type == "path_check"
    for name in ("rl_weak", "rl_strong"):
        task = stages[name].grpo.tasks[0]
        assert task.options["eval_verifier"] == "path_check" and task.rewards[0].type == "judge"
        assert task.rewards[0].options["refresh"]["think"] == "path"
    assert stages["judge_strong"].model.num_hidden_layers == 4 > stages["judge_weak"].model.num_hidden_layers


def test_gold_monitor_labels_path_rollouts_with_their_prompts():
    """A judge-rewarded path task's gold labels (the hacking monitor, the refresh's teacher) come
    from the path check, which reads the constraints in each rollout's prompt."""
    import types

    from jaxrl_rm.config import RewardSpec, TaskSpec
    from jaxrl_rm.data.records import PromptItem
    from jaxrl_rm.rewards.sources import Rollouts
    from jaxrl_rm.train.grpo import GRPO

    task = TaskSpec(name="paths", kind="verifiable", data="synthetic:paths", options={"eval_verifier": "path_check"},
                    rewards=[RewardSpec(type="judge", path="unused")])
    fake = types.SimpleNamespace(verifier_for=lambda t: GRPO.verifier_for(fake, t), _verifiers={})
    other = "path:b>a,2:b:a="
    items = [PromptItem(task="paths", prompt=PROMPT, answer="abc", id="0"),
             PromptItem(task="paths", prompt=other, answer="ba", id="1")]
    z = np.zeros((2, 2, 1), np.int32)
    rollouts = Rollouts(items=items, prompt_texts=[PROMPT, other], completions=[["adc", "acc"], ["ba", "bb"]],
                        completion_ids=z, completion_mask=z, lengths=np.ones((2, 2), np.int32),
                        truncated=np.zeros((2, 2), bool))
    assert GRPO.gold_labels(fake, task, rollouts).tolist() == [[True, False], [True, False]]


def test_near_misses_of_a_path_answer_are_wrong_walks():
    """The judge's gold-vs-near-miss AUC on the path task: a one-edit miss that is still a valid
    walk is drawn again, so every miss is wrong by the check (on reversal nothing is redrawn)."""
    from jaxrl_rm.eval.judge import near_miss_answers

    problems = synthetic.path_problems(40, seed=2, split="eval")
    misses = near_miss_answers(problems, 4, seed=0)
    assert all(synthetic.path_violations(p.prompt, m) for p, row in zip(problems, misses) for m in row)
    # without the redraw some edits would have been right: the filter is doing work
    rng = np.random.default_rng(0)
    assert any(synthetic.path_violations(p.prompt, synthetic.corrupt_answer(p.answer, rng, alphabet="abcdef")) == []
               for p in problems for _ in range(20))
