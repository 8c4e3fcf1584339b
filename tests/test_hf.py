"""egrc_jax.hf: parity with transformers, export round trips, config mapping, bad inputs.

Tiny random transformers models (hidden 64, 2 layers, vocab 128) are built on CPU and saved
with save_pretrained; nothing is downloaded.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from egrc_jax.hf import (
  CheckpointError,
  CorruptSafetensorsError,
  UnsupportedConfigError,
  config_from_hf,
  config_to_hf,
  export_model,
  load_model,
  load_native,
  model_from_state_dict,
  save_native,
)
from egrc_jax.hf.__main__ import main as cli_main
from egrc_jax.model import PRESETS, positions_from_mask
from egrc_jax.sharding import abstract_model, count_params

# float32 on both sides: differences are summation-order rounding (seen: ~3e-7).
LOGIT_TOL = 1e-4
SMALL = dict(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)
FAMILIES = {
  # Qwen2: q/k/v bias, untied embeddings.
  "qwen2": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),
  # Llama 3: llama3 RoPE scaling (theta 1e4 and original length 64 put two of the eight
  # frequencies in the smoothed band), tied embeddings, attention_bias on q/k/v/o.
  "llama": lambda: LlamaConfig(
    **SMALL,
    tie_word_embeddings=True,
    attention_bias=True,
    rope_parameters=dict(
      rope_type="llama3",
      rope_theta=10000.0,
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=64,
    ),
  ),
  # Qwen3: qk-norm, head_dim 32 != hidden / heads.
  "qwen3": lambda: Qwen3Config(**SMALL, head_dim=32),
}


def _build(family: str, path) -> torch.nn.Module:
  torch.manual_seed(len(family))
  model = AutoModelForCausalLM.from_config(FAMILIES[family]())
  with torch.no_grad():  # HF inits biases at 0 and norms at 1: perturb so every weight matters
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model.eval()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  out = {}
  for family in FAMILIES:
    path = tmp_path_factory.mktemp(family)
    out[family] = (str(path), _build(family, path))
  return out


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, SMALL["vocab_size"], (3, 9))
  mask = np.ones((3, 9), bool)
  mask[1, :3] = False  # left padding
  mask[2, :7] = False
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  return tokens, mask, positions


@nnx.jit
def _forward(model, tokens, positions, mask):
  return model(tokens, positions, mask)


def _ours(model):
  tokens, mask, positions = _batch()
  return np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask)))


def _theirs(torch_model):
  tokens, mask, positions = _batch()
  with torch.no_grad():
    return torch_model(
      input_ids=torch.tensor(tokens),
      attention_mask=torch.tensor(mask.astype(np.int64)),
      position_ids=torch.tensor(positions),
    ).logits.numpy()


def _params(model) -> dict:
  return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_on_left_padded_batch(hf_models, family):
  path, ref = hf_models[family]
  cfg, model = load_model(path)
  assert cfg.model_type == family and cfg.param_dtype == "float32"
  _, mask, _ = _batch()
  diff = np.abs(_ours(model) - _theirs(ref))[mask]  # pad rows are undefined in HF
  assert diff.max() < LOGIT_TOL, diff.max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_round_trip(hf_models, tmp_path, family):
  path, ref = hf_models[family]
  _, model = load_model(path)
  files = export_model(model, tmp_path, generation_config={"temperature": 0.6})
  assert "model.safetensors" in files and "model.safetensors.index.json" not in files
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  _, mask, _ = _batch()
  # Same float32 weights through the same torch code: identical up to thread scheduling.
  np.testing.assert_allclose(_theirs(reloaded)[mask], _theirs(ref)[mask], atol=1e-6)
  _, again = load_model(tmp_path)
  a, b = _params(model), _params(again)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  assert gen["temperature"] == 0.6


def test_sharded_safetensors_round_trip(hf_models, tmp_path):
  path, ref = hf_models["qwen2"]
  _, model = load_model(path)
  files = export_model(model, tmp_path, max_shard_bytes=60_000)
  shards = sorted(f for f in files if f.endswith(".safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  for f in shards:  # each shard within the limit unless a single tensor is larger
    assert os.path.getsize(tmp_path / f) < 60_000 + 8192 or f"{f} holds one big tensor"
  _, again = load_model(tmp_path)
  a, b = _params(model), _params(again)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  _, mask, _ = _batch()
  np.testing.assert_allclose(_theirs(reloaded)[mask], _theirs(ref)[mask], atol=1e-6)


def test_bfloat16_export_and_load(hf_models, tmp_path):
  path, _ = hf_models["qwen3"]
  _, model = load_model(path)
  export_model(model, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  cfg, again = load_model(tmp_path)
  assert cfg.param_dtype == "bfloat16"
  a, b = _params(model), _params(again)
  for k in a:
    assert b[k].dtype == jnp.bfloat16
    np.testing.assert_array_equal(b[k], a[k].astype(jnp.bfloat16))
  reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
  assert reloaded.dtype == torch.bfloat16
  # An fp32 load of the bf16 file upcasts exactly.
  _, up = load_model(tmp_path, param_dtype="float32")
  np.testing.assert_array_equal(_params(up)["embed_VD",], b["embed_VD",].astype(np.float32))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trip(hf_models, family):
  path, _ = hf_models[family]
  written = json.loads(open(os.path.join(path, "config.json")).read())
  cfg = config_from_hf(written)
  assert config_from_hf(config_to_hf(cfg)) == cfg
  # Our config.json builds the same transformers config as theirs.
  ours = type(FAMILIES[family]())(**config_to_hf(cfg))
  theirs = FAMILIES[family]()
  for key in ("rope_parameters", "tie_word_embeddings", "num_key_value_heads", "attention_bias"):
    assert getattr(ours, key, None) == getattr(theirs, key, None), key
  head_dim = lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  assert head_dim(ours) == head_dim(theirs) == cfg.head_dim


def test_old_style_rope_fields_read_like_new():
  new = config_to_hf(config_from_hf(FAMILIES["llama"]().to_dict()))
  old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
  rope = new["rope_parameters"]
  old["rope_theta"] = rope["rope_theta"]
  old["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
  old["rope_scaling"]["type"] = "llama3"
  old["torch_dtype"] = "bfloat16"
  got = config_from_hf(old)
  assert got == config_from_hf(new).replace(param_dtype="bfloat16", dtype="bfloat16")
  assert got.rope_scaling_factor == 8.0 and got.rope_original_max_position == 64


def test_eos_list_bias_flags_and_head_dim_defaults():
  q3 = config_from_hf(FAMILIES["qwen3"]().to_dict() | {"eos_token_id": [5, 7], "head_dim": None})
  assert q3.eos_token_ids == (5, 7) and config_to_hf(q3)["eos_token_id"] == [5, 7]
  assert q3.head_dim == 128  # transformers' Qwen3Config default, not hidden / heads
  assert (q3.qkv_bias, q3.o_bias, q3.qk_norm) == (False, False, True)
  q3b = config_from_hf(FAMILIES["qwen3"]().to_dict() | {"attention_bias": True})
  assert (q3b.qkv_bias, q3b.o_bias) == (True, True)
  q2 = config_from_hf(FAMILIES["qwen2"]().to_dict() | {"eos_token_id": 3})
  assert (q2.qkv_bias, q2.o_bias, q2.head_dim, q2.eos_token_ids) == (True, False, 16, (3,))


@pytest.mark.parametrize("name", ["r1_distill_1p5b", "r1_distill_7b"])
def test_preset_param_count_matches_transformers(name):
  cfg = PRESETS[name]
  d = config_to_hf(cfg)
  assert config_from_hf(d) == cfg
  _, abstract = abstract_model(cfg)  # eval_shape: nothing allocated
  with torch.device("meta"):
    ref = AutoModelForCausalLM.from_config(Qwen2Config(**d))
  assert count_params(abstract) == cfg.num_params() == ref.num_parameters()


def test_native_checkpoint_and_cli(hf_models, tmp_path):
  path, ref = hf_models["llama"]
  _, model = load_model(path)
  save_native(model, tmp_path / "native")
  cfg, again = load_native(tmp_path / "native")
  assert cfg == model.cfg and _params(again).keys() == _params(model).keys()
  assert all(np.array_equal(v, _params(again)[k]) for k, v in _params(model).items())
  # CLI: import the HF dir, export it with a tokenizer dir, reload with transformers.
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer_config.json").write_text("{}")
  assert cli_main(["import", "--hf", path, "--out", str(tmp_path / "ckpt")]) == 0
  out = tmp_path / "hf_out"
  args = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]
  assert cli_main([*args, "--tokenizer", str(tok)]) == 0
  assert (out / "tokenizer_config.json").exists()
  _, mask, _ = _batch()
  reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_theirs(reloaded)[mask], _theirs(ref)[mask], atol=1e-6)
  with pytest.raises(FileExistsError, match="--overwrite"):
    cli_main(args)


# -- bad inputs -------------------------------------------------------------------------------


@pytest.fixture
def qwen2_copy(hf_models, tmp_path):
  shutil.copytree(hf_models["qwen2"][0], tmp_path / "m")
  return tmp_path / "m"


def test_missing_shard_file_names_file_and_tensors(hf_models, tmp_path):
  _, model = load_model(hf_models["qwen2"][0])
  files = export_model(model, tmp_path, max_shard_bytes=60_000)
  second = sorted(f for f in files if f.endswith(".safetensors"))[1]
  (tmp_path / second).unlink()
  with pytest.raises(CheckpointError, match=rf"{second}.*not in.*model\.layers\.0"):
    load_model(tmp_path)


def test_truncated_safetensors_names_file(qwen2_copy):
  f = qwen2_copy / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-1000])
  with pytest.raises(CorruptSafetensorsError, match=r"model\.safetensors.*truncated"):
    load_model(qwen2_copy)


def test_wrong_shape_tensor():
  cfg = config_from_hf(FAMILIES["qwen2"]().to_dict())
  tensors = _state_dict_of(cfg)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 128), np.float32)
  with pytest.raises(CheckpointError, match=r"up_proj.weight.*\(64, 128\).*\(128, 64\)"):
    model_from_state_dict(cfg, tensors)


def test_missing_and_unexpected_tensors():
  cfg = config_from_hf(FAMILIES["qwen2"]().to_dict())
  tensors = _state_dict_of(cfg)
  del tensors["model.norm.weight"]
  with pytest.raises(CheckpointError, match="missing 1 tensor.*model.norm.weight"):
    model_from_state_dict(cfg, tensors)
  tensors = _state_dict_of(cfg) | {"model.layers.0.mlp.up_proj.bias": np.zeros(128, np.float32)}
  with pytest.raises(CheckpointError, match="does not use.*up_proj.bias"):
    model_from_state_dict(cfg, tensors)


def _state_dict_of(cfg):
  from egrc_jax.hf.layout import layout

  return {e.hf_name: np.zeros(e.hf_shape, np.float32) for e in layout(cfg)}


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(model_type="mistral"), r"model_type='mistral' is not supported.*qwen2"),
    (dict(use_sliding_window=True, sliding_window=64), r"use_sliding_window=True.*sliding"),
    (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types.*sliding"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu'.*silu"),
    (dict(mlp_bias=True), r"mlp_bias=True"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), r"rope_type='yarn'"),
    (dict(dtype="float16"), r"dtype='float16'.*param_dtype"),
  ],
)
def test_unsupported_config_fields(change, message):
  d = FAMILIES["qwen2"]().to_dict() | change
  with pytest.raises(ValueError, match=message):
    config_from_hf(d)


def test_unsupported_model_type_on_load_and_missing_config(qwen2_copy):
  d = json.loads((qwen2_copy / "config.json").read_text())
  (qwen2_copy / "config.json").write_text(json.dumps(d | {"model_type": "gemma"}))
  with pytest.raises(UnsupportedConfigError, match="gemma"):
    load_model(qwen2_copy)
  (qwen2_copy / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_model(qwen2_copy)


def test_sharded_load_reads_only_shards(hf_models):
  from egrc_jax.sharding import make_mesh

  mesh = make_mesh(1, 2, 4)
  _, model = load_model(hf_models["qwen2"][0], mesh)
  q = model.layers[0].attn.q_DNH.get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(32, 1, 16)}
