"""Judge templates (rendering, placeholders, chat templates) and judgment rewards."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_rm.rewards import (
    PLACEHOLDERS,
    TEMPLATE_NAMES,
    GuardCounter,
    JudgeTemplate,
    apply_format_penalty,
    format_reward,
    get_template,
    judge_template,
    parse_pairwise,
    parse_pairwise_scores,
    parse_pointwise,
    position_consistency_reward,
    score_match_reward,
    scores_to_rewards,
    verdict_reward,
)
from jaxrl_rm.rewards.parsers import ParseResult
from test_guards import EMPTY_OUTPUTS, MASTER_KEYS

Q = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2 each. How much does she make?"
RESPONSES = ["16 - 3 - 4 = 9; 9 * 2 = 18.\n#### 18", "16 * 2 = 32.\n#### 32", "She makes $18."]
REF = "She sells 16 - 3 - 4 = 9 eggs for 9 * 2 = $18.\n#### 18"
THINK = "<think>Response is checked against the numbers in the question: 9 eggs, $18.</think>\n"

# A valid judge output for each template name, and its parsed value.
VALID_OUTPUTS = {
    "pointwise": (THINK + "<score>8.5</score>", 8.5),
    "pointwise_correctness": (THINK + "<score>1</score>", 1.0),
    "pairwise": (THINK + "<answer> [[A]] </answer>", "A"),
    "pairwise_scores": (THINK + "<score_A>9</score_A> <score_B>2</score_B>", (9.0, 2.0)),
    "listwise": ("Response 1 and 3 are right, 2 is wrong. Scores: \\boxed{9, 1, 8}", (9.0, 1.0, 8.0)),
    "listwise_tags": (THINK + "<score_1>9</score_1> <score_2>1</score_2> <score_3>8</score_3>", (9.0, 1.0, 8.0)),
}


def _fields(tpl: JudgeTemplate) -> dict:
    f: dict = {"prompt": Q}
    if tpl.format == "pointwise":
        f["response"] = RESPONSES[0]
    elif tpl.format in ("pairwise", "pairwise_scores"):
        f["response_a"], f["response_b"] = RESPONSES[0], RESPONSES[1]
    else:
        f["responses"] = RESPONSES
    if tpl.uses_reference:
        f["reference"] = REF
    return f


class TinyChatTokenizer:
    """Stands in for an HF tokenizer: a Jinja-free chat template with the same call signature."""

    chat_template = "tiny"

    def __init__(self, reject_system: bool = False):
        self.reject_system = reject_system
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False, **kw):
        assert tokenize is False and add_generation_prompt is True
        self.calls.append((messages, kw))
        if self.reject_system and any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_builtin_templates_render_and_parse(name):
    tpl = get_template(name)
    assert tpl.uses_reference == name.endswith("_ref")
    text = tpl.render(**_fields(tpl))
    assert Q in text
    assert "{" + "prompt}" not in text and "{response" not in text and "{reference}" not in text
    assert "{min_score}" not in text and "{max_score}" not in text and "{n}" not in text
    if tpl.format == "pointwise":
        assert RESPONSES[0] in text
    elif tpl.format.startswith("pairwise"):
        assert text.index(RESPONSES[0]) < text.index(RESPONSES[1])
    else:
        assert all(r in text for r in RESPONSES)
        assert "Response 3" in text and "Response 4" not in text
    assert (REF in text) == tpl.uses_reference
    out, value = VALID_OUTPUTS[name.removesuffix("_ref")]
    r = tpl.parse(out, n=3)
    assert r.valid and r.value == value, r
    for bad in MASTER_KEYS + EMPTY_OUTPUTS:
        assert not tpl.parse(bad, n=3).valid


def test_template_wording():
    urpo = get_template("listwise").render(prompt=Q, responses=RESPONSES[:2])
    assert urpo.startswith("You are a skilled expert at scoring responses.")
    assert "[The Begin of Question]" + Q + "[The End of Question]" in urpo
    assert "[The Begin of Response 2]" + RESPONSES[1] + "[The End of Response 2]" in urpo
    assert "#### Output Format Requirements ####" in urpo
    assert "\\boxed{x, x} if there exists 2 responses" in urpo  # literal braces survive
    pw = get_template("pointwise").render(prompt=Q, response="r")
    assert "<think>" in pw and "<score>" in pw and "from 0 to 10" in pw
    pc = get_template("pointwise_correctness").render(prompt=Q, response="r")
    assert "output 1 if the response is correct and 0 if it is incorrect" in pc
    assert get_template("pointwise_correctness").parse(THINK + "<score>0.5</score>").reason == "not_integer"
    pair = get_template("pairwise").render(prompt=Q, response_a="a", response_b="b")
    assert "<answer> [[A]] </answer>" in pair and "position biases" in pair
    custom_range = get_template("pointwise", min_score=1, max_score=5, integer=True)
    assert "from 1 to 5 (an integer)" in custom_range.render(prompt=Q, response="r")
    assert custom_range.parse(THINK + "<score>0</score>").reason == "out_of_range"


def test_chat_template_rendering():
    tok = TinyChatTokenizer()
    tpl = get_template("pointwise", system="You are a careful grader.")
    text = tpl.render(tok, prompt=Q, response="x", chat_template_kwargs={"enable_thinking": True})
    assert text.startswith("<|system|>You are a careful grader.<|end|><|user|>You are given")
    assert text.endswith("<|end|><|assistant|>")
    assert tok.calls[-1][1] == {"enable_thinking": True}
    # a chat template without a system role: system text is folded into the user message
    tok2 = TinyChatTokenizer(reject_system=True)
    text2 = tpl.render(tok2, prompt=Q, response="x")
    assert text2.startswith("<|user|>You are a careful grader.\n\nYou are given")
    # no tokenizer, or a tokenizer without a chat template: plain text
    plain = tpl.render(None, prompt=Q, response="x")
    assert plain.startswith("You are a careful grader.\n\nYou are given")

    class NoTemplate:
        chat_template = None

    assert tpl.render(NoTemplate(), prompt=Q, response="x") == plain


def test_hf_tokenizer_chat_template():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    text = get_template("pairwise_ref").render(tok, prompt=Q, response_a="a", response_b="b", reference=REF)
    assert text.startswith("<|user|>\nYou are given a user question, a reference answer and two responses")
    assert text.endswith("<|assistant|>\n") and REF in text


def test_placeholders_single_pass_and_literal_braces():
    tpl = JudgeTemplate(
        name="mine",
        format="pointwise",
        user="Q: {prompt}\nA: {response}\nScore {min_score}-{max_score} ({n}); keep {this} and \\boxed{x}.",
    )
    # user content that looks like placeholders is not substituted again
    text = tpl.render(prompt="what is {response}?", response="it is {prompt} {reference}")
    assert text == "Q: what is {response}?\nA: it is {prompt} {reference}\nScore 0-10 (1); keep {this} and \\boxed{x}."
    assert set(PLACEHOLDERS) >= {"prompt", "response", "response_a", "response_b", "responses", "reference",
                                 "min_score", "max_score", "n"}


def test_custom_template_validation():
    with pytest.raises(ValueError, match=r"\{response_b\}"):
        JudgeTemplate(name="bad", format="pairwise", user="{prompt} {response_a}")
    with pytest.raises(ValueError, match="unknown format"):
        JudgeTemplate(name="bad", format="triplewise", user="{prompt} {response}")
    with pytest.raises(ValueError, match="min_score"):
        JudgeTemplate(name="bad", format="pointwise", user="{prompt} {response}", min_score=5, max_score=1)
    with pytest.raises(ValueError, match="unknown judge template"):
        get_template("pointwise_reference")
    tpl = get_template("pointwise_ref")
    with pytest.raises(ValueError, match="reference"):
        tpl.render(prompt=Q, response="x")  # reference missing
    with pytest.raises(ValueError, match="_ref"):
        get_template("pointwise").render(prompt=Q, response="x", reference=REF)
    with pytest.raises(ValueError, match="responses"):
        get_template("listwise").render(prompt=Q, responses="one string")
    with pytest.raises(ValueError, match="response_a"):
        get_template("pairwise").render(prompt=Q, response_a="a")


def test_custom_template_listwise_block_and_parse_options():
    tpl = JudgeTemplate(
        name="rank",
        format="listwise",
        user="Rank {n} answers to {prompt}:\n{responses}\nReply \\boxed{s1, ..., s{n}} with scores in [{min_score}, {max_score}].",
        response_block="({i}) {response}",
        response_separator="\n",
        min_score=1,
        max_score=7,
        think_tags=None,
        max_trailing_chars=0,
    )
    text = tpl.render(prompt="Q?", responses=["a", "b"])
    assert text == "Rank 2 answers to Q?:\n(1) a\n(2) b\nReply \\boxed{s1, ..., s2} with scores in [1, 7]."
    assert tpl.parse("Answer 2 is better. \\boxed{3, 6}", n=2).value == (3.0, 6.0)
    assert tpl.parse("Answer 2 is better. \\boxed{3, 8}", n=2).reason == "out_of_range"
    assert tpl.parse("Answer 2 is better. \\boxed{3, 6} ok", n=2).reason == "trailing_text"
    assert get_template("listwise_tags").parse(VALID_OUTPUTS["listwise_tags"][0]).reason == "wrong_count"  # n needed
    changed = get_template("pointwise").replace(max_trailing_chars=1000)
    assert changed.parse(THINK + "<score>3</score>" + "x" * 500).valid


# ----------------------------------------------------------------------------- judgment rewards


def test_score_match_reward():
    outs = [THINK + "<score>1</score>", THINK + "<score>0</score>", THINK + "<score>7.4</score>", ":", ""]
    results = [parse_pointwise(o) for o in outs]
    counter = GuardCounter()
    r = score_match_reward(results, [1, 1, 7, 1, 0], counter=counter)
    assert r.dtype == np.float32 and r.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert score_match_reward(results, [1, 1, 7, 1, 0], tolerance=0.5).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert score_match_reward(results, [1, 1, 7, 1, 0], invalid_reward=-1).tolist()[3:] == [-1.0, -1.0]
    assert counter.report()["master_key"] == 1 and counter.report()["empty"] == 1
    with pytest.raises(ValueError):
        score_match_reward(results, [1, 2])


def test_verdict_reward():
    results = [
        parse_pairwise(THINK + "<answer>[[A]]</answer>"),
        parse_pairwise(THINK + "<answer>[[B]]</answer>"),
        parse_pairwise_scores(THINK + "<score_A>3</score_A><score_B>8</score_B>"),
        parse_pairwise_scores(THINK + "<score_A>5</score_A><score_B>5</score_B>"),  # tie
        parse_pairwise("Solution"),
    ]
    r = verdict_reward(results, ["A", "A", "B", "A", "A"])
    assert r.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert verdict_reward(results, ["A"] * 5, invalid_reward=-1.0).tolist() == [1.0, 0.0, 0.0, 0.0, -1.0]


def test_position_consistency_reward():
    # pair p: right in both orders; pair q: right only when x is shown first
    correct = [1, 1, 1, 0]
    pair_ids = ["p", "p", "q", "q"]
    swapped = [False, True, False, True]
    assert position_consistency_reward(correct, pair_ids, swapped).tolist() == [1.0, 1.0, 0.0, 0.0]
    # G = 2 rollouts per order: "mean" = probability of a consistent pairing; "all"/"any"
    correct = [1, 1, 1, 0]
    pair_ids = ["p"] * 4
    swapped = [False, False, True, True]
    assert position_consistency_reward(correct, pair_ids, swapped).tolist() == [0.5, 0.5, 1.0, 0.0]
    assert position_consistency_reward(correct, pair_ids, swapped, reduce="all").tolist() == [0.0, 0.0, 1.0, 0.0]
    assert position_consistency_reward(correct, pair_ids, swapped, reduce="any").tolist() == [1.0, 1.0, 1.0, 0.0]
    # end to end with parsed verdicts: gold flips with the order
    outs = [THINK + "<answer>[[A]]</answer>", THINK + "<answer>[[B]]</answer>"]
    c = verdict_reward([parse_pairwise(o) for o in outs], ["A", "B"])
    assert position_consistency_reward(c, [0, 0], [False, True]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="other order"):
        position_consistency_reward([1, 1], ["p", "q"], [False, True])
    with pytest.raises(ValueError, match="reduce"):
        position_consistency_reward([1, 1], ["p", "p"], [False, True], reduce="max")


def test_format_reward_and_penalty():
    results = [parse_pointwise(THINK + "<score>3</score>"), parse_pointwise("."), parse_pointwise(THINK)]
    assert format_reward(results).tolist() == [0.0, -1.0, -1.0]
    assert format_reward(results, valid_reward=0.1, invalid_reward=0.0).tolist() == [pytest.approx(0.1), 0.0, 0.0]
    assert apply_format_penalty([0.7, 0.7, 0.7], results, penalty=-0.5).tolist() == [pytest.approx(0.7), -0.5, -0.5]


def test_scores_to_rewards():
    good = ParseResult(True, (9.0, 1.0), "ok")
    assert scores_to_rewards([good], 2).tolist() == [9.0, 1.0]
    assert scores_to_rewards([good, ParseResult(True, (7.0, 3.0), "ok")], 2).tolist() == [8.0, 2.0]
    assert scores_to_rewards([ParseResult.invalid("master_key")], 2).tolist() == [0.0, 0.0]


def test_judge_template_builder_kinds():
    with pytest.raises(ValueError, match="unknown judge template kind"):
        judge_template("pivot")
