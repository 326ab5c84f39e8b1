"""Model loading and the pieces the decoder is built from."""
import pytest
import torch

from helpers import run_to_completion
from punica_core import Engine, EngineConfig, SamplingParams
from punica_core.model.config import ModelConfig
from punica_core.model.loader import load_model
from punica_core.model.rope import inv_frequencies


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_scaling_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=512, num_attention_heads=8, rope_theta=500000.0,
                     rope_scaling=dict(scaling), max_position_embeddings=131072)
    ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    ours = inv_frequencies(ModelConfig.from_hf(hf.to_dict()))
    assert torch.allclose(ours.float(), ref.float(), rtol=1e-5)


def test_unsupported_rope_scaling_is_named():
    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4,
                      rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(NotImplementedError, match="yarn"):
        inv_frequencies(cfg)


def test_non_llama_model_refused():
    with pytest.raises(ValueError, match="not a Llama-family"):
        ModelConfig.from_hf({"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8,
                             "intermediate_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 2})


def test_bad_model_spec_explains(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 'default', 'random:NAME'"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown random shape"):
        load_model("random:llama-9")


def test_gguf_file_loads_same_weights_as_default(default_loaded, tmp_path, monkeypatch):
    from punica_core.model.default_model import default_gguf_path
    monkeypatch.setenv("PUNICA_CACHE", str(tmp_path))
    loaded = load_model(str(default_gguf_path()))
    assert loaded.model.cfg.num_layers == 30
    assert torch.equal(loaded.model.layers[3].qkv, default_loaded.model.layers[3].qkv)
    assert any(p.name.startswith("gguf-") for p in tmp_path.iterdir())


def test_random_tiny_model_generates_with_adapters_free_batch():
    e = Engine(EngineConfig(model="random:tiny", kv_cache_gb=0.01, max_adapters_on_gpu=1))
    reqs = [e.add_request([1, 2, 3, i], SamplingParams(max_tokens=5, temperature=0,
                                                       ignore_eos=True)) for i in range(3)]
    run_to_completion(e)
    assert all(len(r.output_ids) == 5 for r in reqs)
    assert e.tokenizer is not None      # tiny shares the default tokenizer
