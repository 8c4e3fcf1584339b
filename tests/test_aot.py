"""Ahead-of-time compilation for a TPU slice (`egrc_jax.plan --compile`) on this CPU host.

The compiling tests need libtpu (the `[aot]` extra) and skip, saying why, without it. They
compile a 2-layer, real-width DeepSeek-R1-Distill-Qwen-1.5B run at 8192 new tokens for a
v4-8 (4 chips, one row per chip): its decode loop, prefill, reference pass and train step.
The slice names, the out-of-HBM parser and the HLO reader are checked without libtpu.
"""

import importlib.util
import pathlib
import sys
import time

import pytest

from egrc_jax.plan import hlo, topology
from egrc_jax.plan.topology import parse_oom, slice_spec

# One xdist worker runs this file and tests/test_multihost.py in turn (scripts/test.sh:
# --dist loadgroup): the libtpu compiles would starve the launched ranks of CPU.
pytestmark = pytest.mark.xdist_group("heavy")

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "r1_distill_1p5b.py")
# 2 layers at real width; 1 prompt x G=4 = 4 rows = 1 per chip of a v4-8 (fsdp 4); 256-token
# prompt bucket + 8192 new tokens; KL on so the run has a reference pass; one micro-batch.
SMALL = (
  "model.num_layers=2,data.prompts_per_step=1,rollout.num_samples=4,optim.micro_batch_rows=4,"
  "rollout.prompt_buckets=256,data.max_prompt_tokens=256,loss.kl_kind=k3,enhance.kl_coef=0.01,"
  "eval.num_prompts=0"
)
GIB = 2**30


# -- without libtpu ------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, chips, topo, config",
  [
    ("v4-32", 16, "v4:2x2x4", "megacore"),  # 32 TensorCores = 16 chips
    ("v4-8", 4, "v4:2x2x1", "megacore"),
    ("v5p-16", 8, "v5p:2x2x2", "megacore"),
    ("v5e-8", 8, "v5e:2x4", None),
    ("v5litepod-8", 8, "v5e:2x4", None),
    ("v6e-8", 8, "v6e:2x4", None),
    ("v5e-64", 64, "v5e:8x8", None),
  ],
)
def test_slice_names(name, chips, topo, config):
  s = slice_spec(name)
  assert (s.chips, s.topology, s.chip_config) == (chips, topo, config)


@pytest.mark.parametrize("name", ["v4-12", "v3-8", "tpu", "v5p-7"])
def test_unknown_slice_lists_the_known_ones(name):
  with pytest.raises(ValueError, match="known slices: .*v4-32.*v5p-16.*v5e-8.*v6e-8"):
    slice_spec(name)


def test_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
  topology.topology_devices.cache_clear()
  with pytest.raises(RuntimeError, match=r"needs libtpu.*\.\[aot\]"):
    topology.topology_devices(slice_spec("v5e-8"))
  topology.topology_devices.cache_clear()


def test_parse_oom():
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO"
    " temporaries (157.22G) exceeds available HBM (30.75G)."
  )
  assert parse_oom(msg) == (int(157.22 * GIB), int(30.75 * GIB))
  assert parse_oom("Used 40.5G of 15.48G hbm. Exceeded hbm capacity by 25G") == (
    int(40.5 * GIB),
    int(15.48 * GIB),
  )
  assert parse_oom("INVALID_ARGUMENT: something else") is None


HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner (p: f32[8,16]) -> f32[8,16] {
  %p = f32[8,16] parameter(0)
  ROOT %ar = f32[8,16]{1,0} all-reduce(%p), replica_groups={}, to_apply=%add
}

%body (t: (s32[], bf16[64,32], f32[8,16])) -> (s32[], bf16[64,32], f32[8,16]) {
  %t = (s32[], bf16[64,32], f32[8,16]) parameter(0)
  %w = bf16[64,32]{1,0} get-tuple-element(%t), index=1
  %x = f32[8,16]{1,0} get-tuple-element(%t), index=2
  %ag = (bf16[64,32]{1,0}, bf16[256,32]{1,0}) all-gather-start(%w), metadata={op_name="f/body/dot"}
  %agd = bf16[256,32]{1,0} all-gather-done(%ag)
  %f = f32[8,16]{1,0} fusion(%x), kind=kLoop, calls=%inner
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], bf16[64,32], f32[8,16]) tuple(%i, %w, %f)
}

%cond (t: (s32[], bf16[64,32], f32[8,16])) -> pred[] {
  %t = (s32[], bf16[64,32], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (w: bf16[64,32], x: f32[8,16]) -> f32[8,16] {
  %w = bf16[64,32]{1,0} parameter(0)
  %x = f32[8,16]{1,0} parameter(1)
  %z = s32[] constant(0)
  %t = (s32[], bf16[64,32], f32[8,16]) tuple(%z, %w, %x)
  %loop = (s32[], bf16[64,32], f32[8,16]) while(%t), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_hlo_loop_collectives_hand_count():
  loop = hlo.main_loop_collectives(HLO, param_sizes={256 * 32})
  assert loop.body == "body"
  # the async all-gather counts its result bf16[256,32]; the all-reduce inside the fusion
  # the body calls counts its operand f32[8,16]; the -done half is not a second collective
  assert loop.by_opcode() == {"all-gather": (1, 256 * 32 * 2), "all-reduce": (1, 8 * 16 * 4)}
  assert [c.op_name for c in loop.param_gathers] == ["f/body/dot"]
  assert hlo.main_loop_collectives(HLO, param_sizes={7}).param_gathers == ()


# -- with libtpu ---------------------------------------------------------------------------


def _needs_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip(f"libtpu is not installed: {topology.AOT_EXTRA}")
  try:
    return topology.topology_devices(slice_spec("v4-8"))
  except RuntimeError as e:
    pytest.skip(f"libtpu's topology API failed on this host: {e}")


@pytest.fixture(scope="module")
def compiled():
  """{program: (ProgramReport, seconds)} for the SMALL run on a v4-8, compiled once."""
  _needs_libtpu()
  from egrc_jax.plan.aot import compile_run
  from egrc_jax.trainer.config import load_config_file

  c = load_config_file(CONFIG, SMALL)
  spec = slice_spec("v4-8")
  out = {}
  # the config's programs (the padded train step, its second learner layout, is left out:
  # another minute of compiling for the same check)
  run = ("prefill", "reshard", "decode", "reference", "train")
  for layout, names in (("sampling", run), ("training", ("decode",))):
    t0 = time.perf_counter()
    report = compile_run(c, spec, names, layout=layout, log=lambda _: None)
    out[layout] = (report, time.perf_counter() - t0)
  return out


def _program(compiled, name, layout="sampling"):
  return next(p for p in compiled[layout][0].programs if p.name == name)


def test_offline_environment(compiled):
  import os

  assert os.environ["TPU_SKIP_MDS_QUERY"] == "1"  # libtpu never asks a metadata server
  import jax

  assert jax.default_backend() == "cpu"  # the TPU devices are compile-only


def test_every_program_of_the_run_is_compiled(compiled):
  report, _ = compiled["sampling"]
  assert [p.name for p in report.programs] == ["prefill", "reshard", "decode", "reference", "train"]
  assert report.available == int(30.75 * GIB)  # what the compiler allows a v4 program
  for p in report.programs:
    assert p.argument > 0 and p.flops >= 0 and p.roofline_s > 0, p.name


def test_decode_loop_fits_and_gathers_no_parameters(compiled):
  p = _program(compiled, "decode")
  assert p.fits, p
  assert p.loop is not None and p.loop.param_gathers == ()
  # tensor = 1: nothing of a weight's size is gathered; the continuous loop's only gather
  # is its slot bookkeeping (a few int32 per shard)
  count, nbytes = p.loop.by_opcode().get("all-gather", (0, 0))
  assert nbytes < 1024, p.loop.by_opcode()
  # The learner's FSDP layout gathers every weight matrix again at every step.
  before = _program(compiled, "decode", "training")
  assert len(before.loop.param_gathers) >= 2 * 7  # 7 matrices per layer, 2 layers
  assert sum(c.bytes for c in before.loop.param_gathers) > 0.5 * GIB


def test_prefill_and_reference_fit(compiled):
  for name in ("reshard", "prefill", "reference"):
    p = _program(compiled, name)
    assert p.fits, (name, p.required / GIB, p.error)


def test_train_step_fits_at_8192_tokens(compiled):
  p = _program(compiled, "train")
  assert p.fits, (p.required / GIB, p.error)


def test_report_table(compiled):
  text = compiled["sampling"][0].table()
  assert "decode while body" in text and "parameter all-gathers: 0 " in text
  assert "MFU upper bound" in text and "DOES NOT FIT" not in text
  before = compiled["training"][0].table()
  assert "parameter all-gathers: 0 " not in before


def test_cli_exit_code_and_message(capsys, tmp_path):
  _needs_libtpu()
  import json

  from egrc_jax.plan.cli import main

  # 2000 prompts x G=4 in 8000 continuous slots, 2000 per chip: the slots' KV alone is
  # 2 (k, v) x 2 layers x 2000 slots x 8208 paged slots x 2 kv heads x 128 x 2 B = 31.3 GiB
  out = tmp_path / "aot.json"
  argv = [
    f"--config={CONFIG}:{SMALL}",
    "--set=data.prompts_per_step=2000,rollout.num_slots=8000",
    "--topology=v4-8",
    "--compile",
    "--programs=decode",
    "--compare",
    f"--json={out}",
  ]
  assert main(argv) == 1
  err = capsys.readouterr().err
  assert "decode does not fit on v4-8" in err and "rollout.num_slots (now 8000)" in err
  data = json.loads(out.read_text())
  assert data["fits"] is False and [p["name"] for p in data["programs"]] == ["decode"]
  assert data["programs"][0]["required"] > data["available_bytes"]
  # The formula (KV cache + sampling copy + one step) agrees with the compiler's refusal.
  (row,) = data["compare"]
  assert row["program"] == "decode" and abs(row["diff"]) < 0.15, row
