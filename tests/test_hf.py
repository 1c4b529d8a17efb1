"""HF parity: load_model reproduces transformers' logits; save_model round-trips through torch.
Both layer layouts (unrolled, and scanned with stacked `[L, ...]` weights) map to the HF names."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_rm.models import hf
from jaxrl_rm.models.reward import RewardModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_load_matches_torch_and_round_trips(family, scan_layers, tiny_hf_model, tmp_path):
    torch_model, path = tiny_hf_model(family, layers=3)
    ids = np.random.default_rng(0).integers(0, 97, size=(3, 40)).astype(np.int32)  # > rope original len
    expected = _torch_logits(torch_model, ids)

    model = hf.load_model(path, scan_layers=scan_layers)
    assert model.scan_layers == scan_layers
    logits = np.asarray(model(jnp.asarray(ids)))
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 1e-4

    out = tmp_path / "exported"
    hf.save_model(model, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    np.testing.assert_allclose(_torch_logits(reloaded, ids), expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_and_padding(tiny_hf_model, tmp_path):
    torch_model, path = tiny_hf_model("qwen2")
    model = hf.load_model(path)
    out = tmp_path / "sharded"
    hf.save_model(model, out, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = hf.load_model(out)
    ids = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) % 97)
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))

    # Left padding with an attention mask gives the unpadded logits on the real tokens.
    mask = np.ones((2, 12), bool)
    mask[1, :5] = False
    padded = np.asarray(model(ids, attention_mask=jnp.asarray(mask)))
    alone = np.asarray(model(ids[1:, 5:]))
    np.testing.assert_allclose(padded[1, 5:], alone[0], atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_reward_model_round_trip(scan_layers, tiny_hf_model, tmp_path):
    _, path = tiny_hf_model("llama")
    lm = hf.load_model(path)
    rm = RewardModel(lm.config, scan_layers=scan_layers)
    ids = jnp.asarray(np.arange(20, dtype=np.int32).reshape(2, 10))
    mask = jnp.asarray(np.array([[1] * 10, [0] * 3 + [1] * 7], bool))
    out = tmp_path / "rm"
    hf.save_model(rm, out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    again = hf.load_model(out, scan_layers=scan_layers)
    assert isinstance(again, RewardModel) and again.backbone.scan_layers == scan_layers
    np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(rm(ids, mask)))
    # transformers reads the head too: same score on an unpadded row.
    torch_rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        t = torch_rm(torch.tensor(np.asarray(ids[:1]))).logits.float().numpy()[0, 0]
    assert abs(t - float(rm(ids[:1])[0])) < 1e-4


def test_clear_errors(tmp_path, tiny_hf_model):
    with pytest.raises(hf.HFConversionError, match="config.json"):
        hf.load_model(tmp_path)
    _, path = tiny_hf_model("qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.HFConversionError, match="unsupported model_type 'gpt2'"):
        hf.load_model(path)
    cfg["model_type"] = "qwen2"
    (path / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(hf.HFConversionError, match="model.layers.1.mlp.up_proj.weight"):
        hf.load_model(path)
