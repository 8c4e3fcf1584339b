"""egrc_jax.sampler.continuous: the slot loop draws exactly the lock-step loop's samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from egrc_jax.model import ModelConfig
from egrc_jax.sampler import SamplingConfig, generate, generate_state
from egrc_jax.sampler.continuous import continuous_rollout, shrink_plan
from egrc_jax.sampler.layouts import kv_layout_bytes
from egrc_jax.sampler.paged_kv import paged_reference
from egrc_jax.sampler.slot_kv import two_part_attention
from egrc_jax.sharding import init_model, make_mesh, shard_state

# Prompt lengths 5, 9, 3, 12: none a multiple of the paged layout's page size 4 but 12,
# so the copy-on-write of a partial last prompt page is exercised, and the full-page case.
PROMPTS = [
  [5, 17, 33, 2, 8],
  [40, 41, 42, 43, 44, 45, 46, 47, 48],
  [9, 60, 61],
  list(range(20, 32)),
]
BUCKETS = (4, 16)
STOPS = (3, 7)
G = 3  # 12 pairs over 4 slots: every slot is refilled at least twice


@pytest.fixture(scope="module")
def model():
  """A tiny float32 model with peaked next-token distributions (scaled lm head), so that
  rows stop at different steps on STOPS and some run to the budget."""
  cfg = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=128,
  )
  m = init_model(cfg, seed=1)
  m.lm_head_DV.set_value(m.lm_head_DV[...] * 8.0)
  return m


MODES = {
  "greedy": SamplingConfig(greedy=True),
  "sampled": SamplingConfig(temperature=1.0),
  "top_p_top_k": SamplingConfig(temperature=0.8, top_p=0.9, top_k=20),
}


def _cfg(mode: str, **kw) -> SamplingConfig:
  # One shrink level (4 -> 2 slots) keeps compiles short; the shrink tests go deeper.
  base = dict(max_new_tokens=20, stop_token_ids=STOPS, prompt_buckets=BUCKETS, page_size=4)
  base["shrink_levels"] = 1
  return MODES[mode].replace(**(base | kw))


def _continuous(model, cfg, prompts=PROMPTS, seed=2, **kw):
  graphdef, state = nnx.split(model)
  return continuous_rollout(graphdef, state, prompts, cfg.replace(loop="continuous"), G, seed, **kw)


def _assert_same(a, b):
  for f in ("completion_tokens_BC", "completion_mask_BC", "lengths_B", "truncated_B"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), f)
  # float32 on both sides; the split attention sums the same terms in another order:
  # differences are rounding (observed <= 5e-7), far below any real disagreement.
  for f in ("logprobs_BC", "policy_logprobs_BC", "entropy_BC", "tempered_logprobs_BC",
            "tempered_entropy_BC"):  # fmt: skip
    np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), atol=1e-5)
  for f in ("prompt_tokens_BTp", "prompt_mask_BTp", "prompt_index_B"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), f)
  assert a.num_samples == b.num_samples


@pytest.mark.parametrize(
  "mode,layout",
  [(m, "dense") for m in MODES] + [("top_p_top_k", "split"), ("top_p_top_k", "paged")],
)
def test_matches_lockstep(model, mode, layout):
  cfg = _cfg(mode, num_slots=4, kv_layout=layout)
  lock = generate(model, PROMPTS, cfg, num_samples=G, seed=2)
  cont, stats = _continuous(model, cfg)
  _assert_same(lock, cont)
  lengths = np.asarray(lock.lengths_B)
  truncated = np.asarray(lock.truncated_B)
  assert truncated.any() and (~truncated).any(), lengths  # rows stop early and run out
  assert cfg.greedy or len(set(lengths.tolist())) > 2
  # Every active slot-step draws one token after the prefill's token 0.
  assert stats["active_slot_steps"] == int((lengths - 1).sum())
  assert stats["num_slots"] == 4 and stats["pairs"] == len(PROMPTS) * G
  assert stats["steps"] < int((lengths - 1).sum())  # slots ran side by side
  assert 0 < stats["slot_utilisation"] <= 1


def test_independent_of_slot_count_and_shrinking(model):
  cfg = _cfg("top_p_top_k", kv_layout="dense")
  # num_slots beyond the pair count is capped at P * G = 12 (then no slot is ever refilled)
  ref, stats = _continuous(model, cfg.replace(num_slots=64, shrink_levels=0))
  assert stats["num_slots"] == len(PROMPTS) * G
  for slots, levels in [(1, 0), (5, 2)]:
    got, stats = _continuous(model, cfg.replace(num_slots=slots, shrink_levels=levels))
    _assert_same(ref, got)
    assert stats["num_slots"] == slots


def test_shrinking_raises_utilisation(model):
  cfg = _cfg("sampled", kv_layout="dense", num_slots=8)
  _, flat = _continuous(model, cfg.replace(shrink_levels=0))
  _, shrunk = _continuous(model, cfg.replace(shrink_levels=2))
  assert flat["slot_steps"] == 8 * flat["steps"]
  assert shrunk["slot_steps"] < flat["slot_steps"]  # the drain ran on fewer slots
  assert shrunk["active_slot_steps"] == flat["active_slot_steps"]
  assert shrunk["slot_utilisation"] > flat["slot_utilisation"]


def test_samples_independent_of_batch_composition(model):
  cfg = _cfg("sampled", num_slots=4, kv_layout="dense")
  a, b, c, _ = PROMPTS
  one, _ = _continuous(model, cfg, [a, b], prompt_ids=[10, 11])
  two, _ = _continuous(model, cfg, [c, a], prompt_ids=[12, 10])
  same = lambda x, rows: np.asarray(x.completion_tokens_BC)[rows]
  np.testing.assert_array_equal(same(one, slice(0, G)), same(two, slice(G, 2 * G)))
  assert not np.array_equal(same(one, slice(G, 2 * G)), same(two, slice(0, G)))


def test_generate_dispatches_on_loop(model):
  cfg = _cfg("sampled", num_slots=5)
  lock = generate(model, PROMPTS, cfg, num_samples=G, seed=4)
  cont = generate(model, PROMPTS, cfg.replace(loop="continuous"), num_samples=G, seed=4)
  _assert_same(lock, cont)


@pytest.mark.parametrize(
  "layout,mesh_shape",
  # (2, 2, 2): 4 batch shards split the 4 prompts, so each shard queues its own prompts'
  # pairs; (1, 8, 1): 8 shards do not, so one queue and the prompt cache replicated.
  [("dense", (2, 2, 2)), ("paged", (2, 2, 2)), ("paged", (1, 8, 1))],
)
def test_mesh_matches_single_device(model, layout, mesh_shape):
  cfg = _cfg("top_p_top_k", num_slots=8, kv_layout=layout, loop="continuous")
  mesh = make_mesh(*mesh_shape)
  graphdef, state = nnx.split(model)
  lock = generate(model, PROMPTS, cfg.replace(loop="lockstep"), num_samples=G, seed=2)
  got = generate_state(graphdef, shard_state(state, mesh), PROMPTS, cfg, G, 2, mesh)
  _assert_same(lock, got)


def test_stop_at_token_zero_and_budget_one(model):
  greedy = _cfg("greedy", stop_token_ids=())
  first = np.asarray(generate(model, PROMPTS, greedy, num_samples=1).completion_tokens_BC)[:, 0]
  # A stop set holding prompt 0's greedy first token: its pairs finish at token 0 and
  # never take a slot; the others still decode.
  cfg = greedy.replace(stop_token_ids=(int(first[0]),), num_slots=2)
  lock = generate(model, PROMPTS, cfg, num_samples=G)
  cont, stats = _continuous(model, cfg, seed=0)
  _assert_same(lock, cont)
  assert np.asarray(cont.lengths_B)[:G].tolist() == [1] * G
  assert stats["active_slot_steps"] == int((np.asarray(cont.lengths_B) - 1).sum())
  one = cfg.replace(max_new_tokens=1)
  lock1 = generate(model, PROMPTS, one, num_samples=G)
  cont1, stats1 = _continuous(model, one, seed=0)
  _assert_same(lock1, cont1)
  assert stats1["steps"] == 0  # everything came from the prefill logits


def test_two_part_attention_is_one_softmax():
  ks = jax.random.split(jax.random.key(0), 5)
  B, K, Gq, H, T, C = 3, 2, 2, 8, 5, 6
  q = jax.random.normal(ks[0], (B, K * Gq, H))
  kp, vp = jax.random.normal(ks[1], (B, K, H, T)), jax.random.normal(ks[2], (B, K, T, H))
  kc, vc = jax.random.normal(ks[3], (B, K, H, C)), jax.random.normal(ks[4], (B, K, C, H))
  validp = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
  validc = jnp.arange(C)[None] < jnp.array([[1], [6], [3]])
  got = jax.jit(two_part_attention)(q, kp, vp, validp, kc, vc, validc)
  # Reference: one softmax over the concatenated keys, invalid keys dropped.
  k = jnp.concatenate([kp, kc], -1)
  v = jnp.concatenate([vp, vc], -2)
  valid = jnp.concatenate([validp, validc], -1)
  logits = jnp.einsum("bkgh,bkhs->bkgs", q.reshape(B, K, Gq, H), k) / np.sqrt(H)
  logits = jnp.where(valid[:, None, None], logits, -jnp.inf)
  want = jnp.einsum("bkgs,bksh->bkgh", jax.nn.softmax(logits, -1), v).reshape(B, K * Gq, H)
  np.testing.assert_allclose(got, want, atol=1e-5)  # float32, ~11 terms: rounding only


def test_paged_reference_reads_the_table():
  # Two slots over a pool of 4 pages of 2 tokens; slot 0 reads pages [2, 0] (3 tokens),
  # slot 1 reads page [3] (1 token): the output is the softmax over exactly those keys.
  K, Q, Pg, H = 1, 4, 2, 4
  k = jax.random.normal(jax.random.key(1), (K, Q, Pg, H))
  v = jax.random.normal(jax.random.key(2), (K, Q, Pg, H))
  q = jax.random.normal(jax.random.key(3), (2, 1, H))
  lengths, table = jnp.array([3, 1], jnp.int32), jnp.array([[2, 0], [3, 1]])
  out = jax.jit(paged_reference)(q, k, v, lengths, table)
  keys0 = jnp.concatenate([k[0, 2], k[0, 0, :1]])  # [3, H]
  vals0 = jnp.concatenate([v[0, 2], v[0, 0, :1]])
  w = jax.nn.softmax(keys0 @ q[0, 0])
  np.testing.assert_allclose(out[0, 0], w @ vals0, atol=1e-6)
  np.testing.assert_allclose(out[1, 0], v[0, 3, 0], atol=1e-6)  # one key: weight 1


def test_shrink_plan():
  assert shrink_plan(64, 1, 3) == (64, 32, 16, 8)
  assert shrink_plan(64, 1, 0) == (64,)
  assert shrink_plan(12, 1, 5) == (12, 6, 3)  # 3 is odd: no further halving
  assert shrink_plan(16, 8, 3) == (16, 8)  # each of 8 shards keeps a whole slot
  assert shrink_plan(1, 1, 3) == (1,)


def test_kv_bytes_against_lockstep(model):
  # k and v of every layer, float32; P = 4 prompts of Tp = 16, B = 5 slots, C = 20.
  mcfg = model.cfg
  cfg = _cfg("greedy", max_new_tokens=20)
  per_token = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * 4
  bytes_of = lambda layout, shards=1: kv_layout_bytes(mcfg, cfg, 4, 16, 5, layout, shards)
  # dense: P*Tp prompt + B*(Tp + C) slot rows; split: P*Tp + B*C
  assert bytes_of("dense") == {"prompt": per_token * 4 * 16, "completion": per_token * 5 * 36}
  assert bytes_of("split") == {"prompt": per_token * 4 * 16, "completion": per_token * 5 * 20}
  # paged, Pg = 4: prompts ceil(16/4) = 4 pages each, replicated on 2 shards; slots
  # ceil((3 + 20)/4) = 6 pages each
  assert bytes_of("paged", 2) == {
    "prompt": per_token * 2 * 4 * 4 * 4,
    "completion": per_token * 5 * 6 * 4,
  }


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(loop="ragged"), "loop='ragged'"),
    (dict(num_slots=0), "num_slots=0"),
    (dict(kv_layout="flat"), "kv_layout='flat'"),
    (dict(page_size=0), "page_size=0"),
    (dict(shrink_levels=-1), "shrink_levels=-1"),
  ],
)
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**kw)


def test_slots_that_do_not_split_over_shards(model):
  cfg = _cfg("greedy", num_slots=6, kv_layout="paged", loop="continuous")
  mesh = make_mesh(2, 2, 2)  # 4 batch shards do not divide 6 slots
  graphdef, state = nnx.split(model)
  state = shard_state(state, mesh)
  with pytest.raises(ValueError, match="num_slots=6 must be a multiple"):
    generate_state(graphdef, state, PROMPTS, cfg, G, 0, mesh)
  # the dense layout replicates such slots instead
  dense = generate_state(graphdef, state, PROMPTS, cfg.replace(kv_layout="dense"), G, 0, mesh)
  _assert_same(generate(model, PROMPTS, cfg.replace(loop="lockstep"), num_samples=G), dense)


def test_benchmark_tiny_writes_all_keys(tmp_path):
  from egrc_jax.bench import continuous as bench

  out = tmp_path / "bench.json"
  argv = ["--tiny", "--skip-tunix", "--skip-paged", "--skip-fixed", "--slots", "8"]
  argv += ["--shrink-levels", "1"]
  r = bench.main([*argv, "--reps", "0", "--out", str(out)])
  for key in bench.RESULT_KEYS:
    assert key in r, key
  for row in r["long_tail"]["loops"].values():
    assert row["tokens_identical"], row
  assert r["long_tail"]["loops"]["continuous_8"]["kv_ratio_to_lockstep"] < 1
  # The reference on its last 2 prompts alone (8 rows, as many as the slots): at the tiny
  # model's widths XLA's CPU rows round alike for every batch size but 1, so all identical.
  alone = r["long_tail"]["lockstep_alone"]
  assert (alone["prompts"], alone["rows"], alone["identical_pairs_frac"]) == (2, 8, 1.0)


def test_programs_compile_from_abstract_shapes():
  # Both loops' programs from ShapeDtypeStructs alone (what the AOT command compiles for a
  # TPU topology), here on the 8 CPU devices: the one-step programs compile, and the
  # continuous step's arguments hold less KV than the lock-step one's.
  from egrc_jax.sampler.programs import abstract_state, continuous_programs, lockstep_programs

  mcfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2)
  mesh = make_mesh(1, 8, 1)
  graphdef, state = abstract_state(mcfg, mesh)
  cfg = SamplingConfig(max_new_tokens=64, prompt_buckets=(16,), num_slots=8, kv_layout="dense")
  size = dict(num_prompts=8, num_samples=4, prompt_len=16, mesh=mesh)
  cont = continuous_programs(graphdef, state, cfg, **size, platform="cpu")
  lock = lockstep_programs(graphdef, state, cfg, **size)
  assert set(cont) == set(lock) == {"prefill", "decode", "decode_step"}
  with jax.set_mesh(mesh):
    cont["decode"].lower()  # the whole loop lowers (compiling it is the AOT command's job)
    args = {}
    for name, progs in (("continuous", cont), ("lockstep", lock)):
      args[name] = progs["decode_step"].lower().compile().memory_analysis().argument_size_in_bytes
  # KV token slots per layer: continuous 8 prompts x 16 + 8 slots x 80 = 768, lock-step
  # 32 rows x 80 = 2560; the weights are the same on both sides.
  per_slot = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * 4 / 8  # per device
  assert args["lockstep"] - args["continuous"] >= 0.9 * (2560 - 768) * per_slot
