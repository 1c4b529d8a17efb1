"""A realistic tokenizer through the library's text <-> ids paths: a byte-level BPE (Qwen2's
pre-tokenizer, merges that cross piece boundaries), ChatML, eos `<|im_end|>`, no pad token
(`tests/bpe_tokenizer.py`, fixtures in `conftest.py`).

Every test compares with encoding the whole text: with the character tokenizer of the rest of the
suite, encode(a + b) == encode(a) + encode(b), so it cannot tell that apart from concatenating
separately encoded pieces; with this tokenizer a chat prompt (ending "assistant\\n") followed by an
answer starting with "\\n" encodes to a "\\n\\n" token that neither piece has.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_rm.config import load_config
from jaxrl_rm.data.pipeline import encode, encode_pieces, render_prompt, tokenize_sft
from jaxrl_rm.data.records import PolarQuad, PreferencePair, SFTRecord
from jaxrl_rm.data.tokenizer import build_char_tokenizer
from jaxrl_rm.models.resize import add_special_tokens
from jaxrl_rm.rewards.scalar_rm import POLAR_SPECIAL_TOKENS
from jaxrl_rm.train.reward_model import STAGES, make_builder, pair_rows, pair_sequences

PROMPTS = ["What is 7 + 5?",
           [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Ada has 3 apples and buys 4 more. How many apples does Ada have now?"}]]
# answers as models write them: some start with a newline, which merges with the prompt's last "\n"
RESPONSES = ["The answer is 12.", "\n\nSo Ada has 7 apples.", "\n12", " 12", "<think>\n3 plus 4 makes 7.\n</think>\n7"]


def messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def response_token_mask(tok, prompt_text: str, response: str) -> list[bool]:
    """Per token of `prompt_text + response` encoded as one text: does it hold a response character?"""
    enc = tok(prompt_text + response, add_special_tokens=False, return_offsets_mapping=True)
    return [end > len(prompt_text) for _, end in enc["offset_mapping"]]


def test_the_tokenizer_is_byte_level_bpe_with_chatml_and_no_pad(bpe_tokenizer, bpe_tokenizer_dir):
    tok = bpe_tokenizer
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.eos_token == "<|im_end|>" and tok.convert_ids_to_tokens(0) == "!"  # id 0 is a real token
    assert tok.apply_chat_template(messages("hi"), tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (bpe_tokenizer_dir / "tokenizer.json").exists()
    text = "Ada has 12 apples.\n\n<score>1</score> café ☕"
    ids = encode(tok, text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # lossless, and merges happen
    # the property the character tokenizer has and this one does not
    prompt = render_prompt("What is 7 + 5?", tok)
    assert encode(tok, prompt) + encode(tok, "\n12") != encode(tok, prompt + "\n12")
    char = build_char_tokenizer()
    assert encode(char, "ab\n") + encode(char, "\ncd") == encode(char, "ab\n\ncd")


def test_encode_pieces_splits_the_whole_text_at_the_response(bpe_tokenizer):
    tok = bpe_tokenizer
    prompt = render_prompt("What is 7 + 5?", tok)
    head, tails = encode_pieces(tok, prompt, ["\n12", "12", ""])
    for cont, tail in zip(["\n12", "12", ""], tails):
        assert head + tail == encode(tok, prompt + cont)
    assert tok.decode(tails[0]) == "\n\n12"  # the straddling "\n\n" belongs to the response
    assert tok.decode(tails[2]) == "\n"  # the head is what all share: the prompt's last "\n" is not in it
    assert encode_pieces(tok, prompt, [""]) == (encode(tok, prompt), [[]])
    # a prompt ending in two spaces re-merges its own last token: that token stays with the prompt
    head, (tail,) = encode_pieces(tok, "Ada has  ", ["apples"])
    assert head + tail == encode(tok, "Ada has  apples") and tok.decode(tail) == " apples"
    # the character tokenizer: exactly the pieces
    char = build_char_tokenizer()
    assert encode_pieces(char, "ab\n", ["\ncd", "x"]) == (encode(char, "ab\n"),
                                                          [encode(char, "\ncd"), encode(char, "x")])


def test_sft_example_is_the_chat_text_with_the_loss_on_every_response_token(bpe_tokenizer):
    tok = bpe_tokenizer
    straddled = 0
    for prompt in PROMPTS:
        prompt_text = render_prompt(prompt, tok)
        for response in RESPONSES:
            ids, mask = tokenize_sft(SFTRecord(prompt=prompt, response=response), tok, 512)
            chat = tok.apply_chat_template(messages(prompt) + [{"role": "assistant", "content": response}],
                                           tokenize=False)
            assert chat.startswith(prompt_text + response + "<|im_end|>")
            whole = encode(tok, chat)
            assert ids.tolist() == whole[:len(ids)] and ids[-1] == tok.eos_token_id
            assert mask.tolist() == response_token_mask(tok, prompt_text, response) + [True]  # + the eos
            straddled += encode(tok, prompt_text) + encode(tok, response) != whole[:len(ids) - 1]
    assert straddled == 2 * 2  # the two answers starting with "\n" merged across the boundary


def test_bt_rows_are_the_chat_text_and_the_head_reads_the_eos(bpe_tokenizer):
    tok = bpe_tokenizer
    cfg = load_config(None, ["task=rm_bt", "data.max_length=96"])
    records = [PreferencePair(prompt=p, chosen=RESPONSES[i], rejected=RESPONSES[-1 - i])
               for p in PROMPTS for i in range(len(RESPONSES))]
    rows = pair_rows(*pair_sequences(records, make_builder(STAGES["rm_bt"], tok, cfg)), length=96, pad_id=0)
    for i, r in enumerate(records):
        for side, response in (("chosen", r.chosen), ("rejected", r.rejected)):
            idx = int(rows[f"{side}_score_index"][i])
            expected = encode(tok, render_prompt(r.prompt, tok) + response) + [tok.eos_token_id]
            assert rows[f"{side}_input_ids"][i, :idx + 1].tolist() == expected
            assert rows[f"{side}_attention_mask"][i].sum() == idx + 1 == len(expected)


def test_polar_rows_are_the_text_of_both_copies_and_the_head_reads_the_reward_token(bpe_tokenizer):
    tok = bpe_tokenizer
    split, reward = add_special_tokens(tok, POLAR_SPECIAL_TOKENS)
    eos = tok.eos_token_id
    cfg = load_config(None, ["task=polar_pretrain", "data.max_length=160"])
    builder = make_builder(STAGES["polar_pretrain"], tok, cfg)
    quads = [PolarQuad(prompt=p, a1=RESPONSES[i], a2=RESPONSES[(i + 1) % 5], b1=RESPONSES[(i + 2) % 5],
                       policy_a="a", policy_b="b", id=f"q{i}") for p in PROMPTS for i in range(len(RESPONSES))]
    rows = pair_rows(*pair_sequences(quads, builder), length=160, pad_id=0)
    for i, q in enumerate(quads):
        prompt_text = render_prompt(q.prompt, tok)
        for side, cand in (("chosen", q.a2), ("rejected", q.b1)):
            idx = int(rows[f"{side}_score_index"][i])
            got = rows[f"{side}_input_ids"][i, :idx + 1].tolist()
            text = prompt_text + q.a1 + "<|im_end|><|split|>" + prompt_text + cand + "<|im_end|><|reward|>"
            assert got == encode(tok, text)  # specials split the text: the whole is its parts' whole encodings
            assert got[-1] == reward and got.count(split) == 1 and got[got.index(split) - 1] == eos
    # cut to a short length: still one split, the reward token last, and the same prompt tail in both copies
    short = make_builder(STAGES["polar_pretrain"], tok, load_config(None, ["task=polar_pretrain",
                                                                          "data.max_length=24"]))
    p, r, c = short.pieces(render_prompt(PROMPTS[1], tok), RESPONSES[1], RESPONSES[4])
    ids, idx = short.build(PROMPTS[1], RESPONSES[1], RESPONSES[4])
    ids = ids.tolist()
    assert len(ids) == 24 and idx == 23 and ids[-1] == reward and ids.count(split) == 1
    first, second = ids[:ids.index(split)], ids[ids.index(split) + 1:-1]
    assert any(first[:k] == second[:k] == p[len(p) - k:] and first[k:] == r[:len(first) - k]
               and second[k:] == c[:len(second) - k] for k in range(1, min(len(first), len(second)) + 1))


def test_polar_prefix_prompts_are_prefixes_of_their_documents(bpe_tokenizer, tmp_path):
    """Prefix prompts are cut at a token count; a byte-level token can end inside a character."""
    from jaxrl_rm.train.polar_data import load_prompts

    docs = ["Ada a vu un café ☕ près de la gare, puis elle a bu un thé 🍵 très chaud.",
            "日本語のテキストです。Bo has 3 coins.", "Straße, naïve, résumé — 12 items."]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    cfg = load_config(None, ["task=polar_data", f"polar_data.prompts={tmp_path / 'docs.txt'}",
                             "polar_data.prompt_kind=prefix", "polar_data.min_prefix_tokens=1",
                             "polar_data.max_prefix_tokens=40", "polar_data.num_prompts=0"])
    for seed in range(8):
        cfg.seed = seed
        prompts = load_prompts(cfg, bpe_tokenizer)
        assert len(prompts) == len(docs)
        for doc, p in zip(docs, prompts):
            assert p and doc.startswith(p) and "\ufffd" not in p


def test_judge_renders_the_decoded_answer_and_parses_its_decoded_output(bpe_tokenizer, monkeypatch):
    """Policy answer ids -> text -> judge prompt (ChatML) -> judge ids -> text -> verdict."""
    import jaxrl_rm.rollout.collect
    from jaxrl_rm.rewards.judge_source import JudgeSource, TextJudge
    from jaxrl_rm.data.records import PromptItem
    from jaxrl_rm.rewards.sources import Rollouts

    tok = bpe_tokenizer
    byte_id = {t: i for t, i in tok.get_vocab().items() if len(t) == 1}

    def byte_ids(text):  # ids a model may sample: one byte token each (not what encode gives)
        return [byte_id[ch] for t in tok.convert_ids_to_tokens(encode(tok, text)) for ch in t]

    answers = ["The answer is 12.", "\n13", "12"]
    completions = [tok.decode(byte_ids(a) + [tok.eos_token_id], skip_special_tokens=True) for a in answers]
    assert completions == answers
    seen = []

    def fake_generate(model, prompts, *, num_samples, max_new_tokens, pad_id, **kw):
        """A judge that reads the answer out of its decoded prompt: `<score>1</score>` iff it is "12"."""
        rows = []
        for ids in prompts:
            text = tok.decode(ids)
            seen.append(text)
            answer = text.split("[The Start of the Assistant's Answer]\n")[1].split(
                "\n[The End of the Assistant's Answer]")[0]
            out = f"<think>\nThe reference is 12; the answer is {answer.strip()}.\n</think>\n" \
                  f"<score>{int(answer == '12')}</score>"
            row = byte_ids(out) + [tok.eos_token_id]
            rows += [row] * num_samples
        tokens = np.full((len(rows), max(map(len, rows)) + 3), pad_id, np.int32)  # filler after the end
        mask = np.zeros(tokens.shape, bool)
        for r, row in enumerate(rows):
            tokens[r, :len(row)], mask[r, :len(row)] = row, True
        return types.SimpleNamespace(tokens=tokens, mask=mask, lengths=mask.sum(1))

    monkeypatch.setattr(jaxrl_rm.rollout.collect, "generate", fake_generate)
    judge = TextJudge(lambda: None, tok, max_prompt_length=1024, max_new_tokens=64)
    assert judge.pad == 0  # no pad token: the filler is id 0 ("!"), a real token, masked out on decode
    source = JudgeSource(judge, tok, mode="pointwise", template="pointwise_correctness", use_reference=True,
                         guards=False)
    item = PromptItem(task="math", prompt="What is 7 + 5?", answer="12", reference="12", id=0)
    g = len(completions)
    rollouts = Rollouts(items=[item], prompt_texts=[render_prompt(item.prompt, tok)], completions=[completions],
                        completion_ids=np.zeros((1, g, 4), np.int32), completion_mask=np.ones((1, g, 4), bool),
                        lengths=np.full((1, g), 4), truncated=np.zeros((1, g), bool))
    rewards, metrics = source(rollouts)
    np.testing.assert_array_equal(rewards, [[0.0, 0.0, 1.0]])
    assert metrics["invalid_rate"] == 0
    for text, answer in zip(seen, answers):  # the judge saw the ChatML prompt with the answer verbatim
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert f"[The Start of the Assistant's Answer]\n{answer}\n[The End" in text
    outputs = judge.generate(seen[-1:])
    assert outputs == [["<think>\nThe reference is 12; the answer is 12.\n</think>\n<score>1</score>"]]
    # and the decoded output, encoded again (canonical merges) and decoded, parses the same
    text = outputs[0][0]
    assert tok.decode(encode(tok, text)) == text
    assert source.template.parse(tok.decode(encode(tok, text))).value == 1


def test_one_grpo_step_without_a_pad_token_and_no_filler_reaches_the_loss(bpe_tokenizer_dir, tmp_path):
    """The tokenizer has no pad token: GRPO fills left padding and ended answers with id 0 (a real
    token here). The fill must never matter: one GRPO update (loss, gradient norm, new weights) is
    the same whatever ids fill the positions the attention mask leaves out."""
    from jaxrl_rm.train.grpo import GRPO

    cfg = load_config(None, ["task=grpo", f"run_dir={tmp_path}", f"model.tokenizer={bpe_tokenizer_dir}",
                             "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
                             "grpo.prompts_per_step=2", "grpo.num_samples=4", "grpo.max_new_tokens=6",
                             "grpo.max_prompt_length=32", "grpo.eval_size=4", "data.synthetic_size=16",
                             "optim.warmup_steps=0", "logging.progress=false",
                             "grpo.tasks=[{name: math, rewards: [{type: exact_match}]}]"])
    rl = GRPO(cfg)
    tok = rl.tokenizer
    assert tok.pad_token_id is None and rl.pad == 0 and rl.trainer.model(rl.state).config.vocab_size == len(tok)
    # a policy whose answers end early: every third id also stops a row (so rows end at different lengths)
    rl.eos = rl.rollout.stop_token_ids = sorted({tok.eos_token_id, *range(1, len(tok), 3)})
    parts, kept, _ = rl.collect(rl.state["params"], step=0)
    batch, _ = rl.build_batch(parts, kept)
    P = rl.P
    rollouts, _, prompts, _, _ = parts[0]
    for i, text in enumerate(rollouts.prompt_texts):  # the prompt ids are the ChatML prompt text's encoding
        assert prompts[i] == encode(tok, text)[-P:] and text.endswith("<|im_start|>assistant\n")
    fill = ~batch["attention_mask"]
    assert fill[:, :P].any() and fill[:, P:].any()  # both left padding and ended answers occur
    assert (batch["input_ids"][fill] == 0).all() and not (batch["loss_mask"] & fill[:, P:]).any()

    rng = np.random.default_rng(0)
    n = batch["input_ids"].shape[0]
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["advantages"] = jnp.asarray(rng.normal(size=n), jnp.float32)  # a random policy's rewards are all 0
    batch["old_logp"] = batch["sampler_logp"] + jnp.asarray(rng.normal(0, 0.3, size=batch["sampler_logp"].shape),
                                                            jnp.float32)
    other = dict(batch)
    other_ids = jnp.asarray(rng.integers(1, len(tok), size=batch["input_ids"].shape), jnp.int32)
    other["input_ids"] = jnp.where(fill, other_ids, batch["input_ids"])
    other["completion"] = jnp.where(fill[:, P:], other_ids[:, P:], batch["completion"])

    # one GRPO update from the same state on each batch (the state is donated: a copy each)
    (s1, m1), (s2, m2) = (rl.update(jax.tree.map(jnp.copy, rl.state), b) for b in (batch, other))
    assert int(m1["skipped"]) == 0 and np.isfinite(float(m1["loss"])) and float(m1["loss"]) != 0.0
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-9)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1["params"]),
                                                        jax.tree.leaves(rl.state["params"])))  # it updated
