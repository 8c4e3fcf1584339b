"""egrc_jax.sampler: parity with transformers generate, statistics, determinism, compiles."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from egrc_jax.hf import config_from_hf, model_from_state_dict
from egrc_jax.model import ModelConfig, positions_from_mask
from egrc_jax.sampler import (
  SamplingConfig,
  completion_lists,
  decode_texts,
  generate,
  generate_state,
  policy_stats,
  sample_step,
  sampling_logits,
  token_stats,
  trace_counts,
)
from egrc_jax.sharding import init_model, make_mesh, shard_state

SMALL = dict(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
)
FAMILIES = {
  "qwen2": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),
  "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True, attention_bias=False),
}
PROMPTS = [[5, 17, 33, 2, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48], [9, 60, 61]]
BUCKETS = (4, 16)


def _torch_model(family: str):
  torch.manual_seed(7 + len(family))
  model = AutoModelForCausalLM.from_config(FAMILIES[family]())
  with torch.no_grad():  # HF inits biases at 0 and norms at 1: perturb so every weight matters
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def pairs():
  """family -> (torch model, our model with the same weights)."""
  out = {}
  for family in FAMILIES:
    tm = _torch_model(family)
    tensors = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    cfg = config_from_hf(tm.config.to_dict(), param_dtype="float32")
    out[family] = (tm, model_from_state_dict(cfg, tensors))
  return out


def _hf_greedy(tm, prompts, max_new, eos, pad):
  T = max(map(len, prompts))
  ids = np.full((len(prompts), T), pad, np.int64)
  mask = np.zeros((len(prompts), T), np.int64)
  for i, p in enumerate(prompts):
    ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
  with torch.no_grad():
    out = tm.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      do_sample=False,
      max_new_tokens=max_new,
      eos_token_id=eos,
      pad_token_id=pad,
    )
  return out[:, T:].numpy()


def _upto_stop(row, stops):
  row = list(row)
  for i, t in enumerate(row):
    if t in stops:
      return row[: i + 1]
  return row


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(pairs, family):
  tm, ours = pairs[family]
  C, pad = 12, 0
  # Stop tokens that the model does emit: two tokens of HF's unconstrained greedy rows.
  free = _hf_greedy(tm, PROMPTS, C, eos=None, pad=pad)
  stops = [int(free[0, 3]), int(free[1, 6])]
  theirs = _hf_greedy(tm, PROMPTS, C, eos=stops, pad=pad)
  cfg = SamplingConfig(
    greedy=True, max_new_tokens=C, stop_token_ids=tuple(stops), pad_id=pad, prompt_buckets=BUCKETS
  )
  r = generate(ours, PROMPTS, cfg)
  got = completion_lists(r)
  for b in range(len(PROMPTS)):
    want = _upto_stop(theirs[b], stops)
    assert got[b] == want, (b, got[b], want)
    assert bool(r.truncated_B[b]) == (want[-1] not in stops)
  assert np.asarray(r.lengths_B).tolist() == [len(g) for g in got]
  assert any(len(g) < C for g in got)  # a stop token did end some row early
  assert decode_texts(r, _Tok()) == [" ".join(map(str, g)) for g in got]


def test_long_greedy_rollout_matches_transformers(pairs):
  # 140 new tokens, no stop token: every row decodes to the end of a 156-slot cache.
  tm, ours = pairs["qwen2"]
  C = 140
  theirs = _hf_greedy(tm, PROMPTS, C, eos=None, pad=0)
  cfg = SamplingConfig(greedy=True, max_new_tokens=C, pad_id=0, prompt_buckets=BUCKETS)
  got = np.asarray(generate(ours, PROMPTS, cfg).completion_tokens_BC)
  np.testing.assert_array_equal(got, theirs)


class _Tok:
  def decode(self, ids, skip_special_tokens=True):
    return " ".join(map(str, ids))


@nnx.jit
def _forward(model, tokens, positions, mask):
  return model(tokens, positions, mask)


def test_logprobs_and_entropy_match_teacher_forcing(pairs):
  _, model = pairs["qwen2"]
  cfg = SamplingConfig(
    temperature=0.7,
    top_k=20,
    top_p=0.9,
    max_new_tokens=10,
    stop_token_ids=(3, 4),
    prompt_buckets=BUCKETS,
  )
  r = generate(model, PROMPTS, cfg, num_samples=3, seed=5)
  tokens, mask = r.full_sequence()
  logits = _forward(model, tokens, positions_from_mask(mask), mask)
  Tp, C = r.prompt_tokens_BTp.shape[1], cfg.max_new_tokens
  step_logits = logits[:, Tp - 1 : Tp - 1 + C]  # position Tp-1+t predicts completion token t
  B, V = step_logits.shape[0], step_logits.shape[-1]
  flat = lambda x: x.reshape(B * C, *x.shape[2:])
  st = token_stats(flat(step_logits), flat(r.completion_tokens_BC), cfg)
  m = np.asarray(r.completion_mask_BC)
  # float32 both ways; the cached path sums over S slots instead of T: rounding only.
  for name, ref in [
    ("logprobs", st.logprob),
    ("policy_logprobs", st.policy_logprob),
    ("entropy", st.entropy),
    ("tempered_logprobs", st.tempered_logprob),
    ("tempered_entropy", st.tempered_entropy),
  ]:
    got = np.asarray(getattr(r, name + "_BC"))
    np.testing.assert_array_less(np.abs(got - np.asarray(ref).reshape(B, C))[m], 1e-4)
    assert (got[~m] == 0).all(), name
  # the sampled tokens are always inside the filtered support
  q = np.asarray(sampling_logits(flat(step_logits), cfg)).reshape(B, C, V)
  picked = np.take_along_axis(q, np.asarray(r.completion_tokens_BC)[..., None], -1)[..., 0]
  assert np.isfinite(picked[m]).all()


def test_policy_stats_match_log_softmax():
  logits = 4.0 * jax.random.normal(jax.random.key(0), (5, 300))
  logits = logits.at[1, 7].set(-jnp.inf)  # a masked-out logit must not turn into NaN
  shifted, log_z, entropy = policy_stats(logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  want = -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)
  # float32 over 300 terms, two algebraically equal forms: rounding only.
  np.testing.assert_allclose(entropy, want, atol=1e-5)
  real = logits > -jnp.inf
  np.testing.assert_allclose((shifted - log_z[:, None])[real], logp[real], atol=1e-6)
  tokens, st = sample_step(logits, None, SamplingConfig(greedy=True))
  np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))
  np.testing.assert_allclose(st.policy_logprob, jnp.max(logp, axis=-1), atol=1e-6)
  np.testing.assert_allclose(st.entropy, want, atol=1e-5)


def test_step_stats_hand_values():
  # logits ln [1, 2, 5]: p = [1, 2, 5] / 8. At T = 0.5, p_T ~ p^2 = [1, 4, 25] / 30; top-k 2
  # keeps tokens 1 and 2, so q = [0, 4, 25] / 29. The chosen token is 2.
  logits = jnp.log(jnp.array([[1.0, 2.0, 5.0]]))
  xlogx = lambda p: sum(x * math.log(x) for x in p)
  cfg = SamplingConfig(temperature=0.5, top_k=2)
  st = token_stats(logits, jnp.array([2]), cfg)
  # float32 logs and sums of three terms: 1e-6.
  np.testing.assert_allclose(st.logprob, [math.log(25 / 29)], atol=1e-6)
  np.testing.assert_allclose(st.policy_logprob, [math.log(5 / 8)], atol=1e-6)
  np.testing.assert_allclose(st.entropy, [-xlogx([1 / 8, 2 / 8, 5 / 8])], atol=1e-6)
  np.testing.assert_allclose(st.tempered_logprob, [math.log(25 / 30)], atol=1e-6)
  np.testing.assert_allclose(st.tempered_entropy, [-xlogx([1 / 30, 4 / 30, 25 / 30])], atol=1e-6)
  # No filter: q = p_T, so the sampling and tempered log-probabilities are the same numbers.
  st = token_stats(logits, jnp.array([2]), SamplingConfig(temperature=0.5))
  np.testing.assert_array_equal(st.logprob, st.tempered_logprob)


@pytest.fixture(scope="module")
def peaked():
  """A tiny model with sharp next-token distributions (scaled-up lm head)."""
  cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1)
  model = init_model(cfg, seed=3)
  model.lm_head_DV.set_value(model.lm_head_DV[...] * 5.0)
  return model


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 0.9)])
def test_first_token_distribution(peaked, temperature, top_p):
  prompt = [1, 2, 3]
  cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=1, prompt_buckets=(4,))
  n = 4000
  r = generate(peaked, [prompt], cfg, num_samples=n, seed=11)
  logits = _forward(peaked, jnp.asarray([prompt]), jnp.asarray([[0, 1, 2]]), jnp.ones((1, 3), bool))
  q = np.asarray(jax.nn.softmax(sampling_logits(logits[:, -1], cfg), -1), np.float64)[0]
  counts = np.bincount(np.asarray(r.completion_tokens_BC)[:, 0], minlength=q.size)
  assert counts[q == 0].sum() == 0  # nothing outside the nucleus
  support = q > 0
  if top_p < 1:
    assert 1 < support.sum() < q.size  # the filter is active and non-trivial here
  # Pearson chi-square over categories with expected count >= 5 (others pooled). The seed is
  # fixed, so this is deterministic; p > 1e-3 would fail a wrong distribution (e.g. T
  # ignored: p ~ 0) while leaving room for a correct one at any seed 99.9% of the time.
  exp = n * q[support]
  obs = counts[support]
  big = exp >= 5
  exp = np.append(exp[big], exp[~big].sum())
  obs = np.append(obs[big], obs[~big].sum())
  if exp[-1] == 0:
    exp, obs = exp[:-1], obs[:-1]
  exp = exp * obs.sum() / exp.sum()  # q's float32 rounding: totals must agree exactly
  assert stats.chisquare(obs, exp).pvalue > 1e-3
  # and the returned logprob is log q(token)
  toks = np.asarray(r.completion_tokens_BC)[:, 0]
  np.testing.assert_allclose(np.asarray(r.logprobs_BC)[:, 0], np.log(q[toks]), atol=1e-5)


# One config, model and shape (P=2, G=4) for the next two tests: they share compiles.
SAMPLED = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=8, prompt_buckets=BUCKETS)


def test_group_rows_differ_and_seed_reproducible(pairs):
  _, model = pairs["qwen2"]
  a = generate(model, PROMPTS[:2], SAMPLED, num_samples=4, seed=3)
  rows = [tuple(x) for x in np.asarray(a.completion_tokens_BC)[:4]]
  assert len(set(rows)) > 1  # G samples of one prompt are not copies
  assert np.asarray(a.prompt_index_B).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  b = generate(model, PROMPTS[:2], SAMPLED, num_samples=4, seed=3)
  np.testing.assert_array_equal(a.completion_tokens_BC, b.completion_tokens_BC)
  c = generate(model, PROMPTS[:2], SAMPLED, num_samples=4, seed=4)
  assert not np.array_equal(a.completion_tokens_BC, c.completion_tokens_BC)
  # same seed on a (data=2, fsdp=4) mesh: same tokens, same numbers up to rounding
  mesh = make_mesh(2, 4, 1)
  graphdef, state = nnx.split(model)
  d = generate_state(graphdef, shard_state(state, mesh), PROMPTS[:2], SAMPLED, 4, 3, mesh)
  assert len(d.completion_tokens_BC.sharding.device_set) == 8
  np.testing.assert_array_equal(a.completion_tokens_BC, d.completion_tokens_BC)
  np.testing.assert_allclose(a.logprobs_BC, d.logprobs_BC, atol=1e-5)


def test_sampling_layout_gives_the_training_layout_rollout():
  # float32 params with bfloat16 compute, as the real configs run; fsdp=8 splits every
  # weight 8 ways. The sampling layout's one-off bf16 copy without fsdp must draw the same
  # tokens as decoding straight from the FSDP arrays (which gathers them every step).
  tm = _torch_model("qwen2")
  tensors = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  cfg = config_from_hf(tm.config.to_dict(), param_dtype="float32", dtype="bfloat16")
  mesh = make_mesh(1, 8, 1)
  graphdef, state = nnx.split(model_from_state_dict(cfg, tensors, mesh))
  run = lambda layout: generate_state(
    graphdef, state, PROMPTS[:2], SAMPLED, 4, 5, mesh, layout=layout
  )
  new, old = run("sampling"), run("training")
  np.testing.assert_array_equal(new.completion_tokens_BC, old.completion_tokens_BC)
  # bf16 matmuls summed in another order (one device vs partial sums over fsdp): ~1e-2.
  np.testing.assert_allclose(new.logprobs_BC, old.logprobs_BC, atol=3e-2)
  assert len(new.completion_tokens_BC.sharding.device_set) == 8
  with pytest.raises(ValueError, match="layout='fsdp'"):
    run("fsdp")


def test_samples_independent_of_batch_composition(pairs):
  _, model = pairs["qwen2"]
  a, b, c = PROMPTS
  one = generate(model, [a, b], SAMPLED, num_samples=4, seed=1, prompt_ids=[10, 11])
  two = generate(model, [c, a], SAMPLED, num_samples=4, seed=1, prompt_ids=[12, 10])
  np.testing.assert_array_equal(one.completion_tokens_BC[:4], two.completion_tokens_BC[4:])
  np.testing.assert_allclose(one.entropy_BC[:4], two.entropy_BC[4:], atol=1e-5)
  assert not np.array_equal(one.completion_tokens_BC[4:], two.completion_tokens_BC[:4])


def test_decode_loop_compiles_once_per_bucket(pairs):
  _, model = pairs["qwen2"]
  cfg = SamplingConfig(temperature=0.8, max_new_tokens=3, prompt_buckets=(4, 8))  # unique
  count = lambda: trace_counts().get("decode_loop", 0)
  start = count()
  generate(model, [[1, 2, 3]], cfg, seed=0)
  assert count() == start + 1
  generate(model, [[4, 5]], cfg, seed=9)  # same bucket, other prompt and seed
  generate(model, [[6, 7, 8, 9]], cfg, seed=1)
  assert count() == start + 1
  generate(model, [[1, 2, 3, 4, 5]], cfg)  # bucket 8: one more compile
  assert count() == start + 2


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(prompt_buckets=(8, 4)), "increasing"),
  ],
)
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**kw)


@pytest.mark.parametrize(
  "prompts,kw,match",
  [
    ([], {}, "prompts is empty"),
    ([[1], []], {}, "are empty"),
    ([list(range(17))], {}, "longer than the largest prompt bucket"),
    ([[1, 2]], dict(num_samples=0), "num_samples=0"),
    ([[1, 96]], {}, "outside the vocabulary"),
    ([[1, 2]], dict(stop=(96,)), "stop_token_ids"),
    ([[1, 2]], dict(new=300), "max_position_embeddings"),
  ],
)
def test_bad_inputs(pairs, prompts, kw, match):
  _, model = pairs["qwen2"]
  cfg = SamplingConfig(
    greedy=True,
    max_new_tokens=kw.pop("new", 4),
    stop_token_ids=kw.pop("stop", ()),
    prompt_buckets=BUCKETS,
  )
  with pytest.raises(ValueError, match=match):
    generate(model, prompts, cfg, **kw)


def test_benchmark_tiny_writes_all_keys(tmp_path):
  from egrc_jax.bench import sampler as bench

  out = tmp_path / "bench.json"
  bench.main(["--tiny", "--out", str(out)])
  result = json.loads(out.read_text())
  for key in bench.RESULT_KEYS:
    assert key in result, key
  assert result["ours"]["greedy"]["grouped"]["decode_tok_s"] > 0
