"""bf16 above the kernels: a torch bf16 checkpoint loaded in bf16 gives torch's bf16 logits (within
bf16 tolerance); a bf16-compute train step keeps float32 parameters and moves them; a bf16 model
saves and reloads bit for bit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from conftest import make_tiny_hf_model
from jaxrl_rm.config import load_config
from jaxrl_rm.data.tokenizer import build_char_tokenizer
from jaxrl_rm.models import hf
from jaxrl_rm.models.factory import build_model
from jaxrl_rm.parallel.mesh import make_mesh
from jaxrl_rm.parallel.rules import shard_batch
from jaxrl_rm.train.sft import next_token_loss
from jaxrl_rm.train.state import Trainer, build_train_step, make_optimizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = len(build_char_tokenizer())  # the built-in tokenizer must fit the checkpoint (build_model checks)


def save_bf16(family: str, path):
    """A tiny random HF model of `family` converted to bf16 and saved that way -> (torch model, path)."""
    model = make_tiny_hf_model(family, path, vocab_size=VOCAB).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    return model, path


@pytest.fixture(scope="module")
def qwen2_bf16(tmp_path_factory):
    return save_bf16("qwen2", tmp_path_factory.mktemp("bf16") / "qwen2")


def tensor_dtypes(path) -> set[str]:
    dtypes = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="flax") as f:
            dtypes |= {str(f.get_tensor(k).dtype) for k in f.keys()}
    return dtypes


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bf16_checkpoint_loads_in_bf16_with_torch_bf16_logits(family, tmp_path):
    """`load_model(dtype=bfloat16)`: weights stored and computed in bf16, equal to torch's bf16
    tensors; logits within bf16 tolerance of torch's bf16 forward: no worse than torch's own bf16
    rounding error against float32 math on the same weights, and far below a wrong-weights error."""
    model_bf16, path = save_bf16(family, tmp_path / family)
    assert tensor_dtypes(path) == {"bfloat16"}
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(3, 40)).astype(np.int32)  # > rope original len
    expected = torch_logits(model_bf16, ids)
    exact = torch_logits(model_bf16.float(), ids)  # float32 math on the same bf16-rounded weights
    model_bf16.to(torch.bfloat16)

    model = hf.load_model(path, dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {str(p.dtype) for p in params} == {"bfloat16"}
    assert model.hidden_states(jnp.asarray(ids)).dtype == jnp.bfloat16
    embed = model_bf16.get_submodule("model.embed_tokens").weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed[...], np.float32), embed)

    logits = np.asarray(model(jnp.asarray(ids)))
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    scale = np.abs(exact).max()
    torch_err = np.abs(expected - exact).max()
    ours_vs_torch = np.abs(logits - expected).max()
    ours_vs_exact = np.abs(logits - exact).max()
    assert 0 < torch_err < 0.05 * scale  # bf16 rounding is visible but small
    assert ours_vs_exact <= 2 * torch_err, (ours_vs_exact, torch_err)
    assert ours_vs_torch <= 3 * torch_err, (ours_vs_torch, torch_err)
    # the ranking of the vocabulary survives bf16: top-1 agrees on almost every position
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_bf16_compute_train_step_keeps_float32_params(qwen2_bf16, tmp_path):
    """`model.dtype=bfloat16, model.param_dtype=float32` on a bf16 checkpoint: the jitted step runs
    bf16 matmuls, its loss is the bf16 model's and finite; parameters and Adam moments stay float32
    and every parameter tensor moves."""
    _, path = qwen2_bf16
    cfg = load_config(None, ["task=sft", f"run_dir={tmp_path}", f"model.path={path}", "model.dtype=bfloat16",
                             "model.param_dtype=float32", "optim.warmup_steps=0"])
    model = build_model(cfg.model, build_char_tokenizer())
    assert {str(p.dtype) for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {"float32"}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(4, 24)).astype(np.int32)
    mask = np.ones((4, 24), bool)
    mask[1, 18:] = False
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    assert model.hidden_states(jbatch["input_ids"], attention_mask=jbatch["attention_mask"]).dtype == jnp.bfloat16
    loss_sum, count, _ = next_token_loss(model, jbatch)
    expected = float(loss_sum / count)

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    trainer = Trainer(nnx.split(model)[0], make_optimizer(cfg.optim, 1), mesh)
    state = trainer.init_state(model, 0)
    before = jax.tree.map(np.array, state["params"])  # copies: the step donates (and reuses) these buffers
    step = build_train_step(trainer, next_token_loss)
    device_batch = shard_batch(batch, mesh)
    assert "bf16" in step.lower(state, device_batch).as_text()  # the compiled step computes in bf16
    state, metrics = step(state, device_batch)
    loss = float(metrics["loss"])
    assert np.isfinite(loss) and int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["grad_norm"]))
    assert loss == pytest.approx(expected, rel=1e-4)
    after = jax.device_get(state["params"])
    assert {str(x.dtype) for x in jax.tree.leaves(after)} == {"float32"}
    assert {str(x.dtype) for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)} \
        == {"float32"}
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        assert np.abs(np.asarray(b) - np.asarray(a)).max() > 0, jax.tree_util.keystr(kp)


def test_bf16_save_and_reload_round_trip_exactly(qwen2_bf16, tmp_path):
    """bf16 load -> `save_model` -> bf16 files (config says bfloat16) -> bf16 load: every weight
    bit-identical to the checkpoint's, and transformers reads the same bf16 tensors back."""
    torch_model, path = qwen2_bf16
    model = hf.load_model(path, dtype="bfloat16")
    out = tmp_path / "exported"
    hf.save_model(model, out)
    assert tensor_dtypes(out) == {"bfloat16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    again = hf.load_model(out, dtype="bfloat16")
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                          jax.tree.leaves(nnx.to_pure_dict(nnx.state(again, nnx.Param)))):
        assert a.dtype == b.dtype == jnp.bfloat16, jax.tree_util.keystr(kp)
        np.testing.assert_array_equal(np.asarray(b).view(np.uint16), np.asarray(a).view(np.uint16),
                                      err_msg=jax.tree_util.keystr(kp))

    reread = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    want = torch_model.state_dict()
    for name, value in reread.state_dict().items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, want[name]), name
