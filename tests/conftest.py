"""Shared fixtures: the real-data folder and tiny random-weight HF models built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole test session: the suite compiles the same
# tiny models' steps over and over (in-process and in the `python -m jaxrl_rm.main` subprocesses of
# the CLI, resume and pipeline tests), and a cache hit costs a file read instead of a compile
# (the SFT CLI on 20 steps: 23 s -> 11 s). Set here, before anything imports jax, by the first
# process (the xdist controller), so that workers and subprocesses inherit the same folder; a
# fresh folder per session, so a run never reuses another run's executables. A cache the caller
# names (JAX_COMPILATION_CACHE_DIR already set) is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_XLA_CACHE = tempfile.mkdtemp(prefix="jaxrl_rm_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
else:
    _SESSION_XLA_CACHE = None


#: The longest test files of a CI run (`--durations`, 2026-12-06), longest first. `pytest -n 2
#: --dist loadfile` hands files to the two workers in queue order, so a long file queued last runs
#: alone at the end while the other worker idles; queueing the longest files first (then every
#: other file with a slow test, then the rest) keeps both workers busy to the end. (xdist's own
#: order - files with the most tests first - queued the long end-to-end files, which hold few
#: tests, last: `pytest_configure` turns it off.)
LONGEST_FILES = ("test_polar.py", "test_judge_j1.py", "test_notebooks.py", "test_miniature.py", "test_smollm2.py",
                 "test_judge_aligned.py", "test_reliability.py", "test_multihost.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: queue files in collection order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Order the tests longest file first (a stable sort: a file's own order is kept)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        if name in LONGEST_FILES:
            return LONGEST_FILES.index(name)
        return len(LONGEST_FILES) + (item.path not in slow_files)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def _no_cache_writes_for_tpu_compiles(request):
    """The `tpu_aot` tests compile for TPU topologies without a TPU client: such an executable
    can be written to the compilation cache but never read back ("PjRtCompiler must be
    constructed with a Client"), so writing it only costs time. Raise the write threshold there."""
    if request.node.get_closest_marker("tpu_aot") is None:
        yield
        return
    import jax

    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def pytest_unconfigure(config):
    """Remove the session's compilation cache (only in the process that made it)."""
    if _SESSION_XLA_CACHE:
        import shutil

        shutil.rmtree(_SESSION_XLA_CACHE, ignore_errors=True)

# Property tests draw the same examples on every run (a failure in CI reproduces locally):
# derandomized, no example database, no wall-clock deadline or too-slow health check (the CI
# machine is shared). `pytest --hypothesis-profile=explore` draws fresh random examples.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=100,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


def require_tpu_aot() -> None:
    """Module-level guard of the TPU-compile tests: skip without libtpu, except where
    `JAXRL_RM_REQUIRE_TPU_AOT=1` (CI) makes a missing libtpu an error."""
    from jaxrl_rm.parallel import aot

    if aot.tpu_aot_available():
        return
    if os.environ.get("JAXRL_RM_REQUIRE_TPU_AOT"):
        raise RuntimeError('JAXRL_RM_REQUIRE_TPU_AOT is set but libtpu is missing: pip install -e ".[tpu-aot]"')
    pytest.skip('libtpu not installed (pip install -e ".[tpu-aot]")', allow_module_level=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real test data (`../shared/data`), named by JAXRL_RM_SHARED_DATA in CI.

    If the variable is set and the folder is missing, the test fails; if it is unset, the
    folder next to the checkout is used and the test is skipped only when it is absent.
    """
    env = os.environ.get("JAXRL_RM_SHARED_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            pytest.fail(f"JAXRL_RM_SHARED_DATA={env} is set but the folder does not exist")
        return path
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("shared data not found (set JAXRL_RM_SHARED_DATA)")
    return path


# --- tiny random-weight HF models (torch is the test-only oracle) -------------------------------
TINY_HF_FAMILIES = {
    # Llama: untied head, Llama-3 rope scaling, GQA.
    "llama": dict(cls="LlamaConfig", kwargs=dict(
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0)),
    # Qwen2: q/k/v bias, GQA, untied.
    "qwen2": dict(cls="Qwen2Config", kwargs=dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    # Qwen3: q/k norm, tied embeddings, explicit head_dim.
    "qwen3": dict(cls="Qwen3Config", kwargs=dict(tie_word_embeddings=True, head_dim=24)),
}


def make_tiny_hf_model(family: str, path, *, vocab_size=97, hidden_size=48, layers=2, heads=4,
                       kv_heads=2, intermediate_size=80, seed=0, **overrides):
    """Build a random-weight HF causal LM with torch, `save_pretrained` it to `path`, return it."""
    import torch
    import transformers

    spec = TINY_HF_FAMILIES[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=intermediate_size, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(spec["kwargs"])
    kwargs.update(overrides)
    config = getattr(transformers, spec["cls"])(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF's default init leaves biases and norms trivial: randomise them.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.fixture
def tiny_hf_model(tmp_path):
    """Factory: tiny_hf_model(family, **overrides) -> (torch_model, path)."""

    def make(family: str, **overrides):
        path = tmp_path / f"hf_{family}"
        return make_tiny_hf_model(family, path, **overrides), path

    return make


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Factory, built once per module: tiny_models(family, scan_layers=False) -> (torch model,
    the same weights loaded by `hf.load_model` in that layer layout, HF directory)."""
    from jaxrl_rm.models import hf

    cache = {}

    def get(family, scan_layers=False):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"hf_{family}")
            cache[family] = (make_tiny_hf_model(family, path), path)
        if (family, scan_layers) not in cache:
            tm, path = cache[family]
            cache[family, scan_layers] = (tm, hf.load_model(path, scan_layers=scan_layers), path)
        return cache[family, scan_layers]

    return get


def random_prompts(seed: int, lens, vocab_size: int = 97) -> list[list[int]]:
    """Token-id prompts of the given lengths, ids in [3, vocab_size) (clear of pad / bos / eos)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, n).tolist() for n in lens]


# --- a realistic tokenizer: byte-level BPE, ChatML, eos <|im_end|>, no pad token -----------------
@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory holding the byte-level BPE tokenizer of `tests/bpe_tokenizer.py` (trained once)."""
    from bpe_tokenizer import build_bpe_tokenizer

    path = tmp_path_factory.mktemp("bpe_tokenizer")
    build_bpe_tokenizer(path)
    return path


@pytest.fixture
def bpe_tokenizer(bpe_tokenizer_dir):
    """A fresh copy of that tokenizer, loaded as the library loads one (safe to add tokens to)."""
    from jaxrl_rm.data.tokenizer import load_tokenizer

    return load_tokenizer(bpe_tokenizer_dir)


class HiddenAndHead:
    """What the trainer's loss reads of a model (`completion_logprobs`): final hidden states
    `[N, P+T, D]` and the LM head `[D, V]`; gradients are taken with respect to the hidden states."""

    def __init__(self, hidden, head):
        self.hidden, self.head = hidden, head

    def hidden_states(self, input_ids, attention_mask=None):
        return self.hidden

    def lm_head_weight(self):
        return self.head
