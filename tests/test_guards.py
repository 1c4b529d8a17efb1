"""Reward-hacking guards: master keys, repetition, prompt echo, counters, reward capping."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_rm.rewards import (
    GUARD_NAMES,
    GuardConfig,
    GuardCounter,
    check_text,
    count_reasons,
    guard_rewards,
    is_master_key,
    is_prompt_echo,
    is_repetition,
)

# "One Token to Fool LLM-as-a-Judge" master keys, plus variants. Kept here on purpose: every
# parser / verifier test imports this list.
MASTER_KEYS = [
    ":",
    ".",
    ",",
    " ",
    "...",
    " : ",
    "Thought process:",
    "thought process",
    "Let's solve this problem step by step.",
    "Let\u2019s solve this problem step by step",
    "Let's think step by step.",
    "Solution",
    "Solution:",
    "**Solution**",
    "SOLUTION.",
    "解",
    "かいせつ",
    "Respuesta",
    "Answer:",
]
EMPTY_OUTPUTS = ["", "   ", "\n\t"]


@pytest.mark.parametrize("text", [t for t in MASTER_KEYS if t.strip()])
def test_master_keys_detected(text):
    assert is_master_key(text)
    assert check_text(text) == "master_key"


@pytest.mark.parametrize("text", EMPTY_OUTPUTS + [None, 3])
def test_empty_and_non_text(text):
    assert not is_master_key(text)
    assert check_text(text) == "empty"


@pytest.mark.parametrize(
    "text",
    [
        "18",
        "#### 18",
        "Solution: 9 eggs * $2 = $18\n#### 18",
        "Thought process: 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.",
        "The answer is 18.",
        "Paris",
        "<think>A is right.</think><answer>[[A]]</answer>",
    ],
)
def test_normal_text_passes(text):
    assert not is_master_key(text)
    assert check_text(text, prompt="How much does Janet make per day at the market?") is None


def test_extra_master_keys():
    assert not is_master_key("Here we go")
    assert is_master_key("here we go!", extra_phrases=["Here we go"])
    assert check_text("Here we go", config=GuardConfig(extra_master_keys=("here we go",))) == "master_key"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("18 18 18 18", True),
        ("the the the the the the", True),
        ("yes no yes no yes no yes no", True),
        ("!!!!!!!!!!!!!!!!!!!!", True),
        ("abababababababababab", True),
        ("3333333333333333333333", True),
        ("18 18 18", False),  # too few repeats
        ("The answer is 18. #### 18", False),
        ("1000000", False),
        ("She eats 3 and bakes 4, so 16 - 7 = 9 are sold; 9 * 2 = 18.\n#### 18", False),
    ],
)
def test_repetition(text, expected):
    assert is_repetition(text) is expected


def test_prompt_echo():
    prompt = "Janet's ducks lay 16 eggs per day. How much does she make every day?"
    assert is_prompt_echo(prompt, prompt)
    assert is_prompt_echo("  JANET'S DUCKS lay 16 eggs per day. ", prompt)
    assert is_prompt_echo("How much does she make every day?", prompt)
    assert not is_prompt_echo("16", prompt)  # a short answer that appears in the prompt is not an echo
    assert not is_prompt_echo(prompt + " She makes 9 * 2 = 18. #### 18", prompt)
    assert not is_prompt_echo("She makes $18 every day.", prompt)
    assert check_text(prompt, prompt=prompt) == "prompt_echo"
    assert check_text(prompt) is None  # no prompt given: echo guard skipped
    assert check_text(prompt, prompt=prompt, config=GuardConfig(prompt_echo=False)) is None


def test_guards_can_be_turned_off():
    off = GuardConfig.off()
    for t in [":", "", "Solution", "18 18 18 18"]:
        assert check_text(t, config=off) is None


def test_guard_counter_report():
    c = GuardCounter()
    c.update(["master_key", None, "out_of_range", "master_key", "empty"])

    class R:  # any object with .reason counts too
        reason = "repetition"

    c.update([R()])
    c.add("custom_guard", 2)
    rep = c.report()
    assert list(rep)[: len(GUARD_NAMES)] == list(GUARD_NAMES)
    assert rep["master_key"] == 2 and rep["empty"] == 1 and rep["repetition"] == 1
    assert rep["no_answer"] == 0 and "out_of_range" not in rep and rep["custom_guard"] == 2
    other = GuardCounter()
    other.add("empty", 3)
    c.merge(other)
    c.merge({"empty": 1})
    assert c.report()["empty"] == 5
    assert count_reasons(["ok", "ok", "empty"]) == {"ok": 2, "empty": 1}
    c.reset()
    assert c.total() == 0


def test_guard_rewards_caps_master_key_responses():
    responses = ["The answer is 18 because 9 * 2 = 18.", ":", "Thought process:", "", "18 18 18 18", "Q: what?"]
    prompts = ["What?"] * 5 + ["Q: what?"]
    counter = GuardCounter()
    r, reasons = guard_rewards(np.ones(6), responses, prompts, counter=counter)
    assert r.dtype == np.float32
    assert r.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert reasons == [None, "master_key", "master_key", "empty", "repetition", "prompt_echo"]
    assert counter.report()["master_key"] == 2
    # negative rewards stay negative (min with the guarded value)
    r2, _ = guard_rewards([-0.5, 0.7], [":", "ok fine"])
    assert r2.tolist() == [-0.5, pytest.approx(0.7)]
    with pytest.raises(ValueError):
        guard_rewards([1.0], ["a", "b"])
