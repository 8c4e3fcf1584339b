"""Memory plan: parameter and KV-cache bytes against hand arithmetic, verdicts, input errors.

Everything here is shape arithmetic (eval_shape, no allocation), so the full-size presets
cost about a second each.
"""

import json
import pathlib

import pytest

from egrc_jax.model import get_preset
from egrc_jax.plan import GIB, kv_cache_bytes, param_elements_per_device, plan_memory
from egrc_jax.plan.cli import main, parse_mesh

P15 = get_preset("r1_distill_1p5b")
FSDP16 = {"data": 1, "fsdp": 16, "tensor": 1}
EGRC_8K = dict(cache_len=1024 + 8192, seq_len=1024 + 8192)


def _plan(cfg=P15, mesh=FSDP16, chip="v4", rollout_rows=512, micro_batch_rows=16, **kw):
  kw = {**EGRC_8K, **kw}
  return plan_memory(
    cfg, mesh, chip, rollout_rows=rollout_rows, micro_batch_rows=micro_batch_rows, **kw
  )


def test_1p5b_params_fsdp16_hand_count():
  # Every matrix has a D=1536 dimension on "embed" -> split 16 ways; biases and norm scales
  # carry no "embed" dimension and are replicated on every device.
  V, D, F, L, N, K, H = 151936, 1536, 8960, 28, 12, 2, 128
  sharded = 2 * V * D + L * (2 * D * N * H + 2 * D * K * H + 3 * D * F)
  replicated = L * (N * H + 2 * K * H + 2 * D) + D
  assert sharded + replicated == P15.num_params()  # the split covers every parameter
  per_device = sharded // 16 + replicated
  assert param_elements_per_device(P15, FSDP16) == per_device
  plan = _plan()
  terms = {t.name: t.bytes for t in plan.terms}
  assert terms["params"] == per_device * 2  # bf16 preset
  assert terms["master params (float32)"] == per_device * 4
  assert terms["adamw moments (float32)"] == 2 * per_device * 4
  assert plan.phase_bytes("state") == per_device * (2 + 4 + 8)


def test_1p5b_params_fsdp4_tensor4_hand_count():
  # tensor=4 splits N=12 heads, F=8960 and V=151936, but not K=2 kv heads (replicated).
  V, D, F, L, N, K, H = 151936, 1536, 8960, 28, 12, 2, 128
  embed_and_head = 2 * (V // 4) * (D // 4)
  attn = 2 * (D // 4) * (N // 4) * H + 2 * (D // 4) * K * H + (N // 4) * H + 2 * K * H
  mlp = 3 * (D // 4) * (F // 4)
  per_device = embed_and_head + L * (attn + mlp + 2 * D) + D
  assert param_elements_per_device(P15, {"data": 1, "fsdp": 4, "tensor": 4}) == per_device


def test_reference_and_no_master_terms():
  n = param_elements_per_device(P15, FSDP16)
  with_ref = _plan(reference=True, master_dtype=None)
  names = {t.name: t.bytes for t in with_ref.terms}
  assert "master params (float32)" not in names
  assert names["reference params (KL on)"] == n * 2
  assert with_ref.phase_bytes("state") == n * (2 + 2 + 8)


@pytest.mark.parametrize(
  "mesh, kv_heads_per_device",
  [
    ({"data": 1, "fsdp": 16, "tensor": 1}, 2),
    ({"data": 1, "fsdp": 8, "tensor": 2}, 1),  # K=2 split over tensor=2
    ({"data": 1, "fsdp": 4, "tensor": 4}, 2),  # 4 does not divide K=2: replicated
  ],
)
def test_kv_cache_bytes_hand_count(mesh, kv_heads_per_device):
  rows, S, L, H = 512, 9216, 28, 128
  r = rows // (mesh["data"] * mesh["fsdp"])
  expected = 2 * L * r * S * kv_heads_per_device * H * 2 + r * S  # k and v in bf16 + bool mask
  plan = _plan(mesh=mesh, rollout_rows=rows)
  assert kv_cache_bytes(P15, plan.settings, rows) == expected
  assert {t.name: t.bytes for t in plan.terms}["KV cache (rollout rows)"] == expected


def test_verdict_flips_with_rollout_rows():
  small, big = _plan(rollout_rows=1024), _plan(rollout_rows=2048)
  assert small.fits and small.headroom_bytes > 0
  # 2048 rows = 128 per device: the KV cache alone (hand count) exceeds the usable HBM.
  kv_big = 2 * 28 * 128 * 9216 * 2 * 128 * 2
  assert kv_big > 0.9 * 32 * GIB
  assert not big.fits and big.headroom_bytes < 0
  assert big.peak_bytes > small.peak_bytes


def test_verdict_flips_with_chip_and_remat():
  assert _plan(chip="H200").fits and not _plan(chip="v5e", micro_batch_rows=64).fits
  full, none = _plan(remat="full"), _plan(remat="none")
  assert full.fits and not none.fits
  # Flash attention drops the f32 + bf16 [N, T, T] scores of each of the L + 1 blocks the
  # no-remat formula counts (b = 1 row per device), keeping 2 f32 statistics per (head, t).
  flash = _plan(remat="none", attention="flash")
  T, N = 9216, 12
  dropped = 29 * (N * T * T * (4 + 2) - N * T * 4 * 2)
  assert none.phase_bytes("train") - flash.phase_bytes("train") == dropped


def test_reserve_sets_usable_bytes():
  plan = _plan(chip="v5p", reserve=0.25)
  assert plan.usable_bytes == int(95 * GIB * 0.75)
  assert plan.headroom_bytes == plan.usable_bytes - plan.peak_bytes


@pytest.mark.parametrize(
  "kw, match",
  [
    ({"chip": "v9"}, "unknown chip 'v9'"),
    ({"rollout_rows": 100}, "rollout_rows=100 must be a positive multiple of data x fsdp = 16"),
    ({"micro_batch_rows": 8}, "micro_batch_rows=8"),
    ({"remat": "some"}, "remat='some'"),
    ({"mesh": {"data": 1, "fsdp": 16, "model": 1}}, "unknown"),
  ],
)
def test_bad_inputs(kw, match):
  with pytest.raises(ValueError, match=match):
    _plan(**kw)


def test_parse_mesh():
  assert parse_mesh("data:2,fsdp:8", 16) == {"data": 2, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="has 8 devices but --num_chips=16"):
    parse_mesh("data:1,fsdp:8,tensor:1", 16)
  with pytest.raises(ValueError, match="bad mesh entry 'pipe:2'"):
    parse_mesh("pipe:2,fsdp:8", 16)


CLI = [
  "--chip=v4",
  "--num_chips=16",
  "--mesh=data:1,fsdp:16,tensor:1",
  "--rollout_batch=512",
  "--max_prompt=1024",
  "--max_new_tokens=8192",
  "--micro_batch=16",
]


def test_cli_table_and_json(tmp_path, capsys):
  out = tmp_path / "plan.json"
  assert main(["--preset=r1_distill_1p5b", *CLI, f"--json={out}"]) == 0
  text = capsys.readouterr().out
  assert "FITS" in text and "KV cache (rollout rows)" in text
  data = json.loads(out.read_text())
  plan = _plan(prefill_rows=64, prompt_len=1024)
  assert data["peak_bytes"] == plan.peak_bytes and data["fits"] is True
  assert data["settings"]["mesh_shape"] == FSDP16


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--preset=r1_distill_3b", *CLI], "unknown model preset 'r1_distill_3b'"),
    (["--preset=tiny", *CLI[:1], "--num_chips=8", *CLI[2:]], "has 16 devices but --num_chips=8"),
    (["--preset=tiny", "--chip=tpu", *CLI[1:]], "unknown chip 'tpu'"),
    (["--chip=v4", "--num_chips=16"], "set --preset, --mesh, --rollout_batch"),
  ],
)
def test_cli_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["r1_distill_1p5b", "r1_distill_7b"])
def test_cli_reads_a_run_config(name, capsys):
  # The config's mesh (fsdp -1 over 16 chips; 7B tensor 4), rows, lengths, float32 params,
  # memory-efficient attention and the continuous decode loop (256 slots, paged KV on TPU)
  # reach the plan, and both shipped configs fit a v4-32 (docs/memory_plan.md has the
  # compiler's figures for the same programs).
  root = pathlib.Path(__file__).resolve().parents[1]
  assert main([f"--config={root}/configs/{name}.py", "--topology=v4-32"]) == 0
  out = capsys.readouterr().out
  assert (name == "r1_distill_7b") == ("tensor:4" in out)
  assert "params/device" in out and "x 4 B" in out  # float32 params, their own master
  assert "KV: 256 completion slots" in out and "(paged)" in out
  assert "activations (remat=full, flash)" in out
  assert "DOES NOT FIT" not in out and "FITS" in out
  programs = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
              if "= state +" in line}  # fmt: skip
  # rollout.recompute_old_logprobs=always: the learner's forward-only pass is a program too
  assert set(programs) == {"prefill", "reshard", "decode", "train", "reference"}
  assert programs["reference"] < programs["train"]  # a forward of the same micro-batches


def test_sampling_copy_term_hand_count():
  # 1.5B in the sampling layout on fsdp 16: every weight whole on each chip, in bf16; the
  # norm scales (2 per layer + the final one) in the float32 param dtype.
  D, L = 1536, 28
  norms = (2 * L + 1) * D
  others = P15.num_params() - norms
  plan = _plan(param_dtype="float32", master_dtype=None)
  terms = {t.name: t.bytes for t in plan.terms}
  assert terms["sampling params (no fsdp)"] == others * 2 + norms * 4
  # decode = state + KV + sampling copy + one step's working set
  progs = plan.program_bytes()
  state = plan.phase_bytes("state")
  assert (
    progs["decode"]
    == state
    + terms["KV cache (rollout rows)"]
    + terms["sampling params (no fsdp)"]
    + terms["decode step working set"]
  )
  without = _plan(param_dtype="float32", master_dtype=None, sampling_layout=False)
  assert "sampling params (no fsdp)" not in {t.name for t in without.terms}
  assert progs["decode"] - without.program_bytes()["decode"] == others * 2 + norms * 4


def test_prefill_and_decode_working_sets_hand_count():
  # 1024 rows = 128 prompts x 8, 64 rows / 8 prompts per chip of fsdp 16, P 1024, S 9216.
  V, D, F, L, N, K, H, P, S, p, r = 151936, 1536, 8960, 28, 12, 2, 128, 1024, 9216, 8, 64
  plan = _plan(rollout_rows=1024, prefill_rows=128, prompt_len=P)
  terms = {t.name: t.bytes for t in plan.terms}
  kv_p = 2 * L * p * S * K * H * 2 + p * S
  linear = p * P * (2 * (4 * D + 2 * N * H + 2 * K * H + 3 * F) + 8 * D)
  assert terms["prefill working set"] == kv_p + p * N * P * P * (8 + 2) + linear  # dense
  flash = _plan(rollout_rows=1024, prefill_rows=128, prompt_len=P, attention="flash")
  flash_terms = {t.name: t.bytes for t in flash.terms}
  assert flash_terms["prefill working set"] == kv_p + 8 * p * N * P + linear  # row stats only
  assert terms["decode step working set"] == 14 * r * V * 4 + r * N * S * 6 + 17 * r * (S - P)


def test_continuous_loop_kv_hand_count():
  # rollout.loop=continuous: one prompt cache per group (128 prompts over 16 chips) plus 64
  # completion slots (4 per chip), paged in pages of 16 tokens: a slot holds
  # ceil((16 - 1 + 8192) / 16) = 513 pages (a prompt's last page may be shared).
  L, K, H = 28, 2, 128
  plan = _plan(
    rollout_rows=1024, prefill_rows=128, prompt_len=1024, loop="continuous", num_slots=64,
    kv_layout="paged", page_size=16,
  )  # fmt: skip
  terms = {t.name: t.bytes for t in plan.terms}
  per_token = 2 * L * K * H * 2  # k and v, bf16
  assert terms["KV: prompt caches (one per group)"] == per_token * (128 // 16) * 64 * 16
  assert terms["KV: 64 completion slots"] == per_token * (64 // 16) * 513 * 16
  # 100 prompts do not split over 16 chips: every chip holds all their caches; a dense slot
  # holds its prompt's copy and the budget (1024 + 8192 tokens)
  odd = _plan(
    rollout_rows=800, prefill_rows=100, prompt_len=1024, loop="continuous", num_slots=64,
    kv_layout="dense",
  )  # fmt: skip
  terms = {t.name: t.bytes for t in odd.terms}
  assert terms["KV: prompt caches (one per group)"] == per_token * 100 * 1024
  assert terms["KV: 64 completion slots"] == per_token * 4 * (1024 + 8192)


def test_reference_pass_hand_count():
  # KL on, flash attention: one micro-batch of 16 rows = 1 row per chip of fsdp 16, T 9216;
  # the MLP's gate and up (2 T F bf16 = 330 MB) outweigh a vocab chunk's f32 logits (302 MB);
  # plus one f32 vocab matrix gathered whole.
  V, D, F, N, T = 151936, 1536, 8960, 12, 1024 + 8192
  plan = _plan(reference=True, attention="flash")
  terms = {t.name: t.bytes for t in plan.terms}
  expected = 2 * T * D * 2 + max(2 * T * F * 2, T * 8192 * 4) + 8 * N * T + V * D * 4
  assert terms["reference forward (one micro-batch)"] == expected
  assert plan.program_bytes()["reference"] == plan.phase_bytes("state") + expected


def test_continuous_loop_needs_slots():
  with pytest.raises(ValueError, match="num_slots=0: the continuous loop needs >= 1 slot"):
    _plan(loop="continuous", num_slots=0)


def test_the_packed_train_program_has_the_trainers_shape_and_counts_what_it_computes():
  # The AOT programs (run_programs: abstract shapes, nothing compiled): with micro-batches a
  # packed batch keeps the rollout's 8 rows (as trainer/batch.py builds it) and the step
  # computes the micro-batches the planner's 50% fill fills (4 rows: 2 of 4); without, the
  # batch is the bucket of those rows (one row per data shard: 8 here).
  from test_trainer import tiny

  from egrc_jax.plan.programs import run_programs
  from egrc_jax.sharding import make_mesh

  def train(micro, name="train"):
    c = tiny(f"optim.micro_batch_rows={micro},rollout.loop=lockstep")
    p = run_programs(c, make_mesh(1, -1, 1))[name]
    return p.args({})[1].tokens_BS.shape[0], p.trips

  assert train(2) == (8, 2) and train(2, "train_padded") == (8, 4)
  assert train(0) == (8, 1)
