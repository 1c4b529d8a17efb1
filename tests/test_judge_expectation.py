"""Expected-score judge rewards (`options.score_expectation`): the judge's expected normalised score
at its verdict, from one teacher-forced pass, instead of the one score it decoded. Checked against
a direct computation: the model's own logits (`model(ids)`, log-softmax) over each full sequence,
with prompts of different lengths in one padded batch, several batches, a byte-level BPE tokenizer
whose merges cross the prefix / continuation boundary, and multi-token scores (0-10)."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_rm.data.pipeline import encode
from jaxrl_rm.data.records import PromptItem
from jaxrl_rm.models.config import ModelConfig
from jaxrl_rm.models.transformer import Transformer
from jaxrl_rm.rewards.judge_source import JudgeSource, TextJudge
from jaxrl_rm.rewards.sources import Rollouts


def tiny_model(vocab_size):
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    return Transformer(cfg, rngs=nnx.Rngs(3))


_logits = nnx.jit(lambda model, ids: model(ids))


def direct_logprob(model, tok, prefix, continuation, temperature=1.0):
    """log P(continuation | prefix) from the full logits of `prefix + continuation` encoded as one
    string, summed over the tokens that differ from the prefix's own encoding."""
    full, head = encode(tok, prefix + continuation), encode(tok, prefix)
    start = next((i for i, (a, b) in enumerate(zip(full, head)) if a != b), min(len(full), len(head)))
    ids = np.zeros((1, 128), np.int32)  # right padding: a causal model's real positions never see it
    ids[0, :len(full)] = full
    logp = jax.nn.log_softmax(_logits(model, ids)[0] / temperature, axis=-1)
    return float(sum(logp[t - 1, full[t]] for t in range(start, len(full))))


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_continuation_logprobs_match_the_full_forward(tokenizer, request):
    if tokenizer == "bpe":
        tok = request.getfixturevalue("bpe_tokenizer")
    else:
        from jaxrl_rm.data.tokenizer import build_char_tokenizer

        tok = build_char_tokenizer()
    model = tiny_model(len(tok))
    judge = TextJudge(lambda: model, tok, max_new_tokens=8, batch_size=5, temperature=0.7)
    prefixes = ["Is it right?\n<think>yes</think>\n<score>", "Q\n<score>", "a much longer judge prompt, with commas: "
                "then the reasoning\n\n<score> "]
    conts = [f"{v}</score>" for v in (0, 1, 7, 10)]  # "10" is two tokens in both tokenizers
    got = judge.continuation_logprobs(prefixes, conts)
    assert got.shape == (3, 4) and got.dtype == np.float32
    want = np.asarray([[direct_logprob(model, tok, p, c, 0.7) for c in conts] for p in prefixes])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_long_judgment_keeps_the_prompt_generation_saw():
    """The prompt budget cuts the judge's prompt, not prompt + judgment: a 10-token prompt under a
    12-token budget followed by a 24-token judgment is scored in full; a 20-token prompt loses its
    first 8 tokens, as generation's left truncation did (character tokenizer: one token a char)."""
    from jaxrl_rm.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = tiny_model(len(tok))
    judge = TextJudge(lambda: model, tok, max_prompt_length=12, max_new_tokens=32)
    short, long_, judgment = "is it ok? ", "the longer prompt. ", "<think>aa= bb= cdx</think><score>"
    assert [len(encode(tok, p)) for p in (short, long_)] == [10, 19]
    conts = ["0</score>", "1</score>"]
    got = judge.continuation_logprobs([short + judgment, long_ + judgment], conts,
                                      prompt_chars=[len(short), len(long_)])
    want = [[direct_logprob(model, tok, short + judgment, c) for c in conts],
            [direct_logprob(model, tok, long_[7:] + judgment, c) for c in conts]]
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
    cut = judge.continuation_logprobs([short + judgment], conts)  # all prompt: its last 12 tokens only
    np.testing.assert_allclose(cut[0], [direct_logprob(model, tok, (short + judgment)[-12:], c) for c in conts],
                               rtol=1e-4, atol=1e-4)


class FixedLogprobJudge:
    """Decodes fixed judgments; continuation log-probs from a table keyed by the judgment's number."""

    def __init__(self, outputs, table):
        self.outputs, self.table, self.calls = outputs, table, []

    def generate(self, texts, *, num_samples=1, seed=0):
        return [[self.outputs[t]] * num_samples for t in texts]

    def continuation_logprobs(self, prefixes, continuations, *, prompt_chars=None):
        assert prompt_chars == [len(p) - len(p.split("<think>")[-1]) - len("<think>") for p in prefixes]
        self.calls.append((list(prefixes), list(continuations)))
        return np.log(np.asarray([self.table[p.rsplit("\n", 1)[-1]] for p in prefixes], np.float32))


def test_pointwise_rewards_are_the_expected_score():
    item = PromptItem(task="t", prompt="2+2?", reference="4", id=0)
    completions = ["4", "5", "four"]
    src = JudgeSource(None, None, mode="pointwise", template="pointwise", template_options={"integer": True,
                      "max_score": 2}, score_expectation=True, guards=False, chat_template=False)
    prompts = {c: src.render(item, response=c) for c in completions}
    outputs = {prompts["4"]: "<think>right</think>\nA <score>2</score>",
               prompts["5"]: "<think>wrong</think>\nB <score> 1 </score>",
               prompts["four"]: "no verdict"}
    # P(0), P(1), P(2) at each verdict: the first judgment is 90 % sure of 2, the second split
    src.judge = FixedLogprobJudge(outputs, {"A <score>": [0.0, 0.1, 0.9], "B <score> ": [0.5, 0.5, 0.0]})
    ro = Rollouts(items=[item], prompt_texts=["2+2?"], completions=[completions],
                  completion_ids=np.zeros((1, 3, 2), np.int32), completion_mask=np.ones((1, 3, 2), bool),
                  lengths=np.full((1, 3), 2), truncated=np.zeros((1, 3), bool))
    rewards, metrics = src(ro)
    np.testing.assert_allclose(rewards, [[0.05 + 0.9, 0.25, 0.0]], rtol=1e-6)
    # decoded scores 1.0 and 0.5: |0.95 - 1| and |0.25 - 0.5|
    assert metrics["expectation_gap"] == pytest.approx((0.05 + 0.25) / 2)
    (prefixes, conts), (prefixes2, conts2) = sorted(src.judge.calls, key=lambda c: c[1][0])
    # the closing each judge wrote after its number is kept: "</score>" and " </score>"
    assert {tuple(conts), tuple(conts2)} == {("0</score>", "1</score>", "2</score>"),
                                             ("0 </score>", "1 </score>", "2 </score>")}
    assert sorted(prefixes + prefixes2) == sorted([prompts["4"] + "<think>right</think>\nA <score>",
                                                  prompts["5"] + "<think>wrong</think>\nB <score> "])


@pytest.mark.parametrize("options, message", [
    ({"mode": "pairwise"}, "needs mode pointwise"),
    ({"mode": "pointwise", "template": "pointwise"}, "needs integer scores"),
    ({"mode": "pointwise", "template": "pointwise", "template_options": {"integer": True, "max_score": 1000}},
     "at most 101 values"),
])
def test_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        JudgeSource(None, None, score_expectation=True, **options)


def test_correctness_template_is_accepted():
    src = JudgeSource(None, None, mode="pointwise", template="pointwise_correctness", score_expectation=True)
    assert src.score_expectation and src.template.integer
