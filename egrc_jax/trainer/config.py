"""The run configuration: every key declared once, with its meaning, and strict overrides.

A config file in configs/ calls `base_config()`, sets what differs, and calls `finalize`
to compute derived values. `parse_arg("a=1,b.c=x")` applies `key=value` overrides from the
`--config=configs/<file>.py:<overrides>` suffix; an unknown key is an error.

EGRC.md's [ours] choices are all fields here, so a researcher can set the paper's values.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from egrc_jax.data.chat import INSTRUCTION
from egrc_jax.trainer.plan import ARMS as ARMS  # the arm names, re-exported
from egrc_jax.trainer.plan import build_plan

CONNECTORS = ("wait", "but", "so", "therefore", "alternatively", "hmm", "verify")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.arm = "egrc"  # one of ARMS
  c.seed = 0  # seeds sampling, data order and (random-init) params
  c.run_steps = 0  # stop this invocation after N steps (checkpointed); 0 = run to the end

  # -- model --------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # egrc_jax.model.PRESETS name, used when hf_path is empty
  c.model.hf_path = ""  # HF checkpoint directory to start from (overrides preset)
  c.model.tokenizer_path = ""  # tokenizer directory (defaults to hf_path)
  c.model.dtype = "float32"  # compute dtype of activations: float32 | bfloat16
  c.model.param_dtype = "float32"  # parameter dtype (a checkpoint is cast to it on load)
  c.model.attention = "auto"  # auto (splash on TPU, blocked elsewhere) | dense | blocked | splash
  c.model.hidden_size = 0  # preset override (random init only); 0 keeps the preset's
  c.model.num_layers = 0  # preset override (random init only); 0 keeps the preset's

  # -- mesh -----------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data parallelism (rows); params replicated across it
  c.mesh.fsdp = -1  # -1: all remaining devices
  c.mesh.tensor = 1  # tensor parallelism: heads, MLP width and vocab split

  # -- data -----------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.data_root = "../shared/data"  # folder holding benchmarks/ and train/
  c.data.train_benchmark = "math_level5_train"  # named training file under data_root
  c.data.train_source = ""  # or any JSONL/Parquet/array_record dir/"hf:<name>" source
  c.data.train_gold_rule = "math_train"  # gold-answer rule of train_source
  c.data.eval_benchmark = "math500"  # held-out prompts for periodic / stage-end evaluation
  c.data.eval_source = ""  # or any source, as train_source
  c.data.eval_gold_rule = "math500"  # gold-answer rule of eval_source
  c.data.prompts_per_step = 8  # P: prompts per RL step (global, over all processes)
  c.data.max_prompt_tokens = 512  # longer prompts are filtered out (and counted)
  c.data.shuffle = True  # shuffle the training prompts (seeded by seed; reshuffled per epoch)
  c.data.on_bad_row = "skip"  # skip (reported with file and line) | error
  c.data.instruction = INSTRUCTION  # appended to each problem (the field's standard wording)
  c.data.system_prompt = ""  # optional system message of the chat template

  # -- rollout --------------------------------------------------------------------------
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_samples = 8  # G: responses per prompt
  c.rollout.max_new_tokens = 1024  # L: the length limit (length clipping at L)
  c.rollout.top_p = 1.0  # nucleus filter of training rollouts (1.0 keeps the PPO ratio exact)
  c.rollout.top_k = 0  # top-k filter of training rollouts (0 = off)
  # PPO's old logprobs: the sampler's log q ("never" recompute), or the learner's own log p_T
  # computed before the update ("always"); "auto": always when top_p < 1 or top_k > 0 (the
  # learner cannot reproduce a filtered q, so the ratio would start at the kept mass < 1).
  c.rollout.recompute_old_logprobs = "auto"  # auto | always | never
  c.rollout.prompt_buckets = (64, 128, 256, 512, 1024)  # compiled prompt lengths
  # The decode loop of rollouts and evaluation (docs/sampler.md): continuous (a fixed number
  # of slots, each refilled on device with the next (prompt, sample) as its row stops; one
  # prompt cache per group) | lockstep (every row until the longest stops).
  c.rollout.loop = "continuous"  # continuous | lockstep
  c.rollout.num_slots = 64  # continuous: rows decoded at once (at most P * G are used)
  c.rollout.shrink_levels = 3  # continuous: halvings of the slots when nothing is pending
  c.rollout.kv_layout = "auto"  # continuous: auto (TPU: paged, else dense) | dense | split | paged
  c.rollout.page_size = 16  # continuous, paged: tokens per KV page

  # -- grading --------------------------------------------------------------------------
  c.grading = ml_collections.ConfigDict()
  c.grading.mode = "math"  # math (math-verify in a process pool) | exact (integer answers, toy)
  c.grading.workers = 2  # grading processes (spawned; each answer has a hard timeout)
  c.grading.timeout_s = 5.0  # per-answer limit; a timed-out answer counts as wrong

  # -- stage 1: compression -------------------------------------------------------------
  c.compress = ml_collections.ConfigDict()
  c.compress.steps = 100  # stage1_steps (fixed switching)
  c.compress.temperature = 0.6  # T1 [ours]
  c.compress.r = 0.5  # f(L) = r [ours]
  c.compress.shaping = "exp"  # exp [paper] | linear (ablation)
  c.compress.beta = 1.0  # A = beta * R [ours]
  c.compress.advantage = "absolute"  # absolute [paper] | group (ablation)
  c.compress.excluded_in_denominator = False  # positive-only: do excluded tokens count?
  c.compress.clip_truncated = True  # length clipping: truncated -> c = 0 [paper]
  c.compress.kl_coef = 0.0  # this stage's KL weight (needs loss.kl_kind); 0: no KL term

  # -- stage 2: enhancement -------------------------------------------------------------
  c.enhance = ml_collections.ConfigDict()
  c.enhance.steps = 100  # stage2_steps
  c.enhance.temperature = 1.0  # T2 > T1 [ours]
  c.enhance.r = 0.5  # f(L) = r of R_len = c f(|y|)
  c.enhance.shaping = "exp"  # f of R_len: exp [paper] | linear
  c.enhance.w_len = 0.5  # weight of the length advantage [ours]
  c.enhance.decompose = True  # norm(R_acc) + w*norm(R_len); False: norm(R_acc + w*R_len)
  c.enhance.std_normalize = True  # False: Dr.GRPO (no std division)
  c.enhance.clip_truncated = True  # length clipping stays on in stage 2 [ours]
  c.enhance.kl_coef = 0.0  # this stage's KL weight (GRPO's beta; needs loss.kl_kind)

  # -- one-stage arms -------------------------------------------------------------------
  c.single = ml_collections.ConfigDict()
  c.single.steps = 200  # steps of ee / grpo / baseline arms
  c.single.temperature = 0.6  # sampling temperature of one-stage arms
  c.single.w_len = 0.5  # EE: R = c + w*c*f(|y|)
  c.single.r = 0.5  # f(L) = r of the EE length term
  c.single.shaping = "exp"  # f of the EE length term: exp | linear
  c.single.std_normalize = True  # False: Dr.GRPO (no std division)
  c.single.reward = "thinkprune"  # baseline arm: rewards.RewardConfig name
  c.single.l1_alpha = 0.0003  # L1-Exact / L1-Max alpha
  c.single.az_alpha = 0.1  # Arora & Zanette alpha
  c.single.n_target = 512  # L1 target length (tokens)
  c.single.buffer = 256  # DAPO overlong buffer (tokens)
  c.single.clip_truncated = True  # length clipping (thinkprune clips whatever this says)
  c.single.kimi_weight = 1.0  # Kimi k1.5: weight of the length term lambda
  c.single.sb_correct_weight = 2.0  # ShorterBetter: weight of c
  c.single.sb_beta = 0.001  # ShorterBetter: weight of ||y| - SOL|
  c.single.dapo_scale = 1.0  # DAPO: the overlong penalty reaches -dapo_scale at L
  c.single.dapo_signed = True  # DAPO's rule reward +1 / -1 (False: c in {0, 1})
  c.single.kl_coef = 0.0  # KL weight of one-stage arms (needs loss.kl_kind)

  # -- stage switching ------------------------------------------------------------------
  c.switch = ml_collections.ConfigDict()
  c.switch.mode = "fixed"  # fixed | entropy
  c.switch.window = 5  # entropy mode: steps in the smoothing window
  c.switch.min_drop = 0.02  # switch when the relative entropy drop over a window is below
  c.switch.min_steps = 10  # never switch before this many stage-1 steps

  # -- loss -----------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.eps_low = 0.2  # PPO clip: ratio floor 1 - eps_low [ours: 0.2]
  c.loss.eps_high = 0.2  # clip-higher when > eps_low
  c.loss.dual_clip_c = 0.0  # 0 = off; else the dual-clip constant (> 1)
  c.loss.kl_kind = "none"  # KL estimator to the reference: none | k1 | k2 | k3 (weights: per stage)
  c.loss.entropy_coef = 0.0  # entropy bonus weight
  c.loss.agg_mode = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
  c.loss.entropy_select = "off"  # off | restrict | reweight (top-rho entropy tokens)
  c.loss.rho = 0.2  # high-entropy quantile for selection and diagnostics
  c.loss.high_entropy_weight = 2.0  # entropy_select=reweight: factor on high-entropy tokens
  c.loss.vocab_chunk = 8192  # vocab chunk of the learner's logprob/entropy computation

  # -- optimisation ---------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6  # peak learning rate (AdamW)
  c.optim.warmup_steps = 10  # linear warmup steps at the start of each stage
  c.optim.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.optim.weight_decay = 0.01  # decoupled weight decay
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.999  # Adam beta2
  c.optim.clip_norm = 1.0  # global gradient-norm clip
  c.optim.ppo_epochs = 1  # passes over each rollout batch
  c.optim.micro_batch_rows = 0  # learner rows per gradient micro-batch; 0 = the whole batch
  # The learner's rows: packed (every rollout row's real tokens end to end, segment-aware
  # attention: no padding computed) | padded (one rollout row per learner row, Tp + L slots).
  c.optim.layout = "packed"  # packed | padded
  c.optim.remat = False  # recompute each block in the backward pass (long sequences)
  c.optim.max_bad_steps = 3  # consecutive non-finite steps before the run stops

  # -- checkpoint / logging / eval ------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 50  # steps; also saved at each stage end and on SIGTERM
  c.checkpoint.keep = 2  # checkpoints kept (older ones deleted)

  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = True  # also write TensorBoard events to <workdir>/tb
  c.log.connectors = CONNECTORS  # connector words for the entropy diagnostics

  c.export = ml_collections.ConfigDict()
  c.export.hf = True  # write <workdir>/hf_final (HF format + tokenizer) at the end of the run

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # steps; 0 = only at the end of each stage
  c.eval.num_prompts = 64  # held-out prompts per evaluation (0 = no evaluation)
  c.eval.num_samples = 1  # samples per evaluation prompt
  c.eval.batch_prompts = 0  # prompts per decode call (0 = all); the last one padded by repeats
  c.eval.temperature = 0.6  # evaluation sampling temperature
  c.eval.top_p = 0.95  # evaluation nucleus filter
  c.eval.max_new_tokens = 1024  # evaluation budget (also the exported generation_config's)
  return c


def r1_distill_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper-like settings shared by the real-model configs (DeepSeek-R1-Distill-Qwen
  on the MATH training file; EGRC.md's [ours] defaults otherwise)."""
  # float32 params are the master copy (an lr of 1e-6 would vanish in bf16 rounding);
  # the model computes in bfloat16 (weights are cast per matmul, the KV cache is bf16).
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.data.max_prompt_tokens = 1024
  c.data.eval_benchmark = "math500"
  c.rollout.num_samples = 8
  c.rollout.max_new_tokens = 8192  # L
  c.rollout.prompt_buckets = (256, 512, 1024)
  # With bfloat16 compute the sampler (cached decode) and the learner (full forward) round
  # differently (max |delta log p| ~5e-2 on a tiny model, docs/attention.md): the learner's own
  # old logprobs keep the PPO ratio exact, at the cost of one more forward pass per step.
  c.rollout.recompute_old_logprobs = "always"
  # The continuous loop on a pod: 256 slots (16 per chip on a v4-32 at fsdp 16, 64 per
  # fsdp group of 7B's fsdp 4 x tensor 4), pages of 64 tokens for the TPU paged-attention
  # kernel (docs/memory_plan.md has the compiled decode for both configs).
  c.rollout.num_slots = 256
  c.rollout.page_size = 64
  c.grading.workers = 8
  c.grading.timeout_s = 10.0
  c.compress.steps = 200
  c.enhance.steps = 200
  c.single.steps = 400  # EE / baselines get both stages' budget
  c.single.n_target = 4096
  c.single.buffer = 1024
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.optim.remat = True
  c.checkpoint.every = 20
  c.eval.every = 50
  c.eval.num_prompts = 500
  c.eval.num_samples = 4
  c.eval.batch_prompts = 128  # 4 batches of 500 (docs/memory_plan.md: 500 at once needs 114 GiB)
  c.eval.max_new_tokens = 8192  # the training limit L (the benchmark protocol's 32k: evaluate)
  return c


def parse_value(raw: str, old):
  """`raw` parsed as the type of the value it replaces (bool, int, float, tuple, str)."""
  if isinstance(old, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {raw!r}")
  if isinstance(old, int):
    return int(raw)
  if isinstance(old, float):
    return float(raw)
  if isinstance(old, tuple):
    # Tuples are written with "+" between items (commas separate overrides): 64+128+256.
    items = [x for x in raw.split("+") if x]
    kind = type(old[0]) if old else str
    return tuple(kind(x) for x in items)
  return raw


def apply_overrides(config: ml_collections.ConfigDict, arg: str | None) -> None:
  """Apply "key=value,a.b=value" (big_vision style). Unknown keys are errors."""
  if not arg:
    return
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"config override {item!r} is not key=value (in {arg!r})")
    key, raw = item.split("=", 1)
    key = key.strip()
    parent = config
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in parent:
        raise KeyError(_unknown(key, parent, p))
      parent = parent[p]
    name = parts[-1]
    if name not in parent:
      raise KeyError(_unknown(key, parent, name))
    try:
      parent[name] = parse_value(raw.strip(), parent[name])
    except ValueError as e:
      raise ValueError(f"config override {key}={raw!r}: {e}") from None


def _unknown(key, parent, name) -> str:
  known = ", ".join(sorted(parent.keys()))
  return f"unknown config key {key!r} ({name!r} is not one of: {known}); see docs/config.md"


def validate(c: ml_collections.ConfigDict) -> None:
  """The checks of keys that no plan dataclass validates itself."""
  if c.grading.mode not in ("math", "exact"):
    raise ValueError(f"grading.mode={c.grading.mode!r}: use math or exact")
  if c.compress.advantage not in ("absolute", "group"):
    raise ValueError(f"compress.advantage={c.compress.advantage!r}: use absolute or group")
  if c.model.hf_path and (c.model.hidden_size or c.model.num_layers):
    raise ValueError(
      f"model.hidden_size={c.model.hidden_size} / model.num_layers={c.model.num_layers} "
      f"reshape a random-init preset, but model.hf_path={c.model.hf_path!r} loads a "
      "checkpoint; drop one of them"
    )


def finalize(c: ml_collections.ConfigDict, arg: str | None = None) -> ml_collections.ConfigDict:
  """Apply overrides, resolve the derived keys, validate by building the run's plan (a bad
  combination fails here, naming the key), and lock the config (no new keys after this).

  Derived: model.tokenizer_path defaults to model.hf_path."""
  apply_overrides(c, arg)
  if not c.model.tokenizer_path:
    c.model.tokenizer_path = c.model.hf_path
  validate(c)
  build_plan(c)
  c.lock()
  return c


def dataclass_section(obj) -> ml_collections.ConfigDict:
  """A config section of a dataclass instance's fields (configs/toy.py's sft, task, cot and
  pipeline sections): the dataclass declares each key once, with its comment."""
  return ml_collections.ConfigDict({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})


def from_section(cls, section: ml_collections.ConfigDict, **fixed):
  """The dataclass `cls` built from its config section (`dataclass_section`), plus `fixed`."""
  values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name not in fixed}
  return cls(**values, **fixed)


def split_presets(arg: str | None, presets) -> tuple[list[str], str]:
  """("quick", ...) presets and the key=value overrides of a `get_config` arg: the leading
  items without "=" name presets (big_vision style), e.g. "quick,compress.steps=3"."""
  names, rest = [], []
  for item in (x.strip() for x in (arg or "").split(",")):
    if not item:
      continue
    if "=" in item or rest:
      rest.append(item)
    elif item in presets:
      names.append(item)
    else:
      raise ValueError(f"config preset {item!r} is unknown; presets: {sorted(presets)}")
  return names, ",".join(rest)


def load_config_spec(spec: str) -> ml_collections.ConfigDict:
  """The config of `configs/<file>.py[:<arg>]`, as the --config flag of every command reads it."""
  path, _, arg = spec.partition(":")
  return load_config_file(path, arg or None)


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a configs/<file>.py (what `--config=<path>:<arg>` does)."""
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def doc_table() -> str:
  """docs/config.md's key table, from the `c.key = value  # comment` lines above."""
  import inspect
  import re

  rows = ["| key | default | meaning |", "| --- | --- | --- |"]
  section = ""
  for line in inspect.getsource(base_config).splitlines():
    if m := re.match(r"\s*# -- (.*?) -+$", line):
      section = m.group(1)
      rows.append(f"| **{section}** | | |")
    m = re.match(r"\s*c\.([\w.]+) = (.*?)(?:\s+# (.*))?$", line)
    if m and "ConfigDict()" not in m.group(2):
      key, default, meaning = m.group(1), m.group(2), m.group(3) or ""
      rows.append(f"| `{key}` | `{default}` | {meaning.replace('|', '/')} |")
  return "\n".join(rows)


def update_doc(path: str) -> None:
  """Replace the key table in the markdown file `path` (docs/config.md) by `doc_table()`."""
  import pathlib

  p = pathlib.Path(path)
  lines = p.read_text().splitlines()
  start = lines.index("| key | default | meaning |")
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  p.write_text("\n".join(lines[:start] + doc_table().splitlines() + lines[end:]) + "\n")


if __name__ == "__main__":
  import sys

  # `python -m egrc_jax.trainer.config` prints the table; `... docs/config.md` rewrites it there.
  if len(sys.argv) > 1:
    update_doc(sys.argv[1])
  else:
    print(doc_table())
