"""The toy reproduction's report: the paper-shaped table, the must-show verdicts, the ablation
comparison, entropy at the stage points, high-entropy tokens, the HF export check.

Every sentence is computed from the numbers. Per seed S and model m (evaluated on the same
N held-out problems): accuracy a_m, mean tokens l_m, length ratio l_m / l_SFT. Over seeds:
mean, sample std and [min, max].

An ablation arm X "does as well as EGRC" when
    a_X >= a_EGRC - 2 * sqrt(2 p (1 - p) / n)   (two binomial standard errors of a difference
                                                of accuracies; n = N * seeds, p = the mean of
                                                a_X and a_EGRC kept within [1/n, 1 - 1/n])
and ratio_X <= ratio_EGRC + 0.02             (2% of the SFT length),
and "better than EGRC" when it also clears one of the two margins the other way.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

MODELS = (
  ("sft", "SFT"),
  ("compress_only", "compress-only"),
  ("egrc", "EGRC"),
  ("ee", "EE"),
  ("ee_star", "EE*"),
  ("reverse", "reverse order"),
)
LABEL = dict(MODELS)
TARGET_RATIO = 0.35  # EGRC mean length <= 35% of SFT's (docs/toy.md, issue #6)
LENGTH_TOLERANCE = 0.02  # ratio slack of "does as well as" (see the module docstring)
ENTROPY_WINDOW = 3  # steps averaged at each entropy point
# The two entropy curves of EGRC.md, as logged in metrics.jsonl: field of a seed's report ->
# (metrics key, what it is).
ENTROPY_CURVES = {
  "entropy_points": (
    "entropy/mean",
    "the policy's entropy at T = 1 over the sampled response tokens (rollout)",
  ),
  "entropy_points_sampling": (
    "entropy/at_temperature",
    "the entropy at the stage's sampling temperature (logits / T, no filter) over the same "
    "tokens, a plain mean over every completion token (rollout)",
  ),
}
ENTROPY_POINTS = ("start", "switch", "after_switch", "end")


def spread(values) -> dict:
  """mean, sample std (0 for one value), min, max and the values themselves."""
  x = np.asarray(values, float)
  return {
    "mean": float(x.mean()),
    "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
    "min": float(x.min()),
    "max": float(x.max()),
    "values": x.tolist(),
  }


def present(seeds: dict) -> list[tuple[str, str]]:
  """The (name, label) of MODELS that every seed evaluated (pipeline.arms decides which)."""
  return [(n, label) for n, label in MODELS if all(n in s["eval"] for s in seeds.values())]


def table(seeds: dict) -> dict:
  """{model: {accuracy, mean_length, length_ratio: spread over seeds}} of `present` models."""
  out = {}
  for name, _ in present(seeds):
    per = [s["eval"][name] for s in seeds.values()]
    sft = [s["eval"]["sft"]["mean_length"] for s in seeds.values()]
    out[name] = {
      "accuracy": spread([m["accuracy"] for m in per]),
      "mean_length": spread([m["mean_length"] for m in per]),
      "length_ratio": spread([m["mean_length"] / b for m, b in zip(per, sft, strict=True)]),
    }
  return out


def _by_step(rows: list[dict], key: str) -> dict[int, float]:
  """{step: value of `key`} over the rows that carry it; a step logged twice (a resumed run
  repeats the steps after its last checkpoint) keeps its last value."""
  return {int(r["step"]): float(r[key]) for r in rows if isinstance(r.get(key), int | float)}


def entropy_points(
  rows: list[dict], switch: int, k: int = ENTROPY_WINDOW, key: str = "entropy/mean"
) -> dict:
  """Mean of the metric `key` (an entropy curve, ENTROPY_CURVES) over k steps at four points
  of a 2-stage run: start (steps 1..k), switch (the last k steps of stage 1, ending at
  `switch`), after the switch (the first k steps of stage 2) and end (the last k steps). A
  step logged twice counts once, its last value (`_by_step`)."""
  by_step = _by_step(rows, key)
  steps = sorted(by_step)
  first2 = [s for s in steps if s > switch]
  windows = {
    "start": [s for s in steps if s <= switch][:k],
    "switch": [s for s in steps if s <= switch][-k:],
    "after_switch": first2[:k],
    "end": steps[-k:],
  }
  return {
    name: {
      "entropy": float(np.mean([by_step[s] for s in w])) if w else float("nan"),
      "steps": [w[0], w[-1]] if w else [],
    }
    for name, w in windows.items()
  }


def stage2_trend(rows: list[dict], switch: int, key: str = "entropy/mean") -> dict:
  """Least-squares line through the metric `key` over the stage-2 steps (after `switch`;
  `_by_step`): slope per step, its standard error, t = slope / se, and the number of steps.
  With the per-step noise of a rollout batch, a few-step mean can move by chance; the
  slope's t says whether the stage-2 change exceeds that noise."""
  by_step = _by_step(rows, key)
  x = np.array([s for s in sorted(by_step) if s > switch], float)
  if x.size < 3:
    return {"slope": float("nan"), "se": float("nan"), "t": float("nan"), "steps": int(x.size)}
  y = np.array([by_step[int(s)] for s in x])
  xc = x - x.mean()
  slope = float(xc @ (y - y.mean()) / (xc @ xc))
  resid = y - y.mean() - slope * xc
  se = float(np.sqrt(resid @ resid / (x.size - 2) / (xc @ xc)))
  t = slope / se if se > 0 else float("inf") * np.sign(slope)
  return {"slope": slope, "se": se, "t": float(t), "steps": int(x.size)}


def verdicts(tab: dict, num_seeds: int, num_test: int) -> list[dict]:
  ratio = tab["egrc"]["length_ratio"]["mean"]
  acc, sft_acc = tab["egrc"]["accuracy"]["mean"], tab["sft"]["accuracy"]["mean"]
  full = num_seeds >= 3 and num_test >= 500
  return [
    {
      "target": f"EGRC mean length <= {TARGET_RATIO:.0%} of SFT's",
      "met": ratio <= TARGET_RATIO,
      "text": f"EGRC length ratio {ratio:.3f} <= {TARGET_RATIO}",
    },
    {
      "target": "EGRC accuracy >= SFT accuracy",
      "met": acc >= sft_acc,
      "text": f"EGRC accuracy {acc:.3f} >= SFT accuracy {sft_acc:.3f}",
    },
    {
      # Not a claim about the method but about the measurement: a run with fewer seeds
      # (the one-seed main command) does not check it at all rather than fail it.
      "target": "3 seeds on >= 500 held-out problems",
      "met": full if num_seeds >= 3 else None,
      "text": f"{num_seeds} seed(s) x {num_test} held-out problems"
      + ("" if num_seeds >= 3 else " (the 3-seed check: --seeds=0,1,2)"),
    },
  ]


def status(verdict: dict) -> str:
  """met / not met / not checked (None: the run is too small to check this target)."""
  return {True: "met", False: "not met", None: "not checked"}[verdict["met"]]


def accuracy_tolerance(p: float, n: int) -> float:
  """Two standard errors of the difference of two accuracies near p, each over n samples;
  p is kept off 0 and 1 so that a band never collapses to nothing."""
  n = max(n, 2)
  p = min(max(p, 1 / n), 1 - 1 / n)
  return 2 * math.sqrt(2 * p * (1 - p) / n)


def comparisons(tab: dict, num_seeds: int, num_test: int) -> list[dict]:
  """EE and reverse order against EGRC, by the rule of the module docstring."""
  e_acc, e_ratio = tab["egrc"]["accuracy"]["mean"], tab["egrc"]["length_ratio"]["mean"]
  out = []
  for name in [n for n in ("ee", "ee_star", "reverse") if n in tab]:
    acc, ratio = tab[name]["accuracy"]["mean"], tab[name]["length_ratio"]["mean"]
    tol = accuracy_tolerance((acc + e_acc) / 2, num_test * num_seeds)
    as_accurate = acc >= e_acc - tol
    as_short = ratio <= e_ratio + LENGTH_TOLERANCE
    numbers = (
      f"accuracy {acc:.3f} vs EGRC {e_acc:.3f} ({acc - e_acc:+.3f}; noise band "
      f"+-{tol:.3f}), length ratio {ratio:.3f} vs {e_ratio:.3f}"
    )
    if as_accurate and as_short:
      better = acc > e_acc + tol or ratio < e_ratio - LENGTH_TOLERANCE
      verdict = (
        f"{LABEL[name]} does {'better than' if better else 'as well as'} EGRC ({numbers}): on "
        "this task the ablation does not show an advantage of EGRC"
      )
    else:
      worse = [
        w for w, bad in (("less accurate", not as_accurate), ("longer", not as_short)) if bad
      ]
      better = acc > e_acc + tol and not as_short
      verdict = f"{LABEL[name]} is {' and '.join(worse)} than EGRC ({numbers})"
      if better:
        verdict += ": it trades length for accuracy"
    out.append({"arm": name, "as_accurate": as_accurate, "as_short": as_short, "text": verdict})
  return out


# -- Markdown ----------------------------------------------------------------------------


def _cell(s: dict, fmt: str, n: int) -> str:
  text = format(s["mean"], fmt)
  if n > 1:
    text += f" +- {format(s['std'], fmt)} [{format(s['min'], fmt)}, {format(s['max'], fmt)}]"
  return text


def _main_table(tab: dict, n: int) -> list[str]:
  lines = ["| model | accuracy | mean tokens | length ratio to SFT |", "| --- | --- | --- | --- |"]
  for name, label in MODELS:
    if name not in tab:
      continue
    t = tab[name]
    lines.append(
      f"| {label} | {_cell(t['accuracy'], '.3f', n)} | "
      f"{_cell(t['mean_length'], '.1f', n)} | {_cell(t['length_ratio'], '.3f', n)} |"
    )
  return lines


def _seed_table(seeds: dict) -> list[str]:
  lines = [
    "| seed | model | accuracy | mean tokens | ratio to SFT | truncated | connector share "
    "| entropy at connectors / elsewhere |",
    "| --- " * 8 + "|",
  ]
  for s in seeds.values():
    base = s["eval"]["sft"]["mean_length"]
    for name, label in present(seeds):
      m = s["eval"][name]
      lines.append(
        f"| {s['seed']} | {label} | {m['accuracy']:.3f} | {m['mean_length']:.1f} | "
        f"{m['mean_length'] / base:.3f} | {m['truncated']:.3f} | "
        f"{m['connector_share']:.3f} | {m['entropy_at_connectors']:.3f} / "
        f"{m['entropy_elsewhere']:.3f} |"
      )
  return lines


def _entropy_table(seeds: dict, field: str, directions: list[dict]) -> list[str]:
  names = ENTROPY_POINTS
  lines = ["| seed | " + " | ".join(names) + " |", "| --- " * 5 + "|"]
  for s in seeds.values():
    p = s[field]
    cells = [
      f"{p[n]['entropy']:.3f} (steps {p[n]['steps'][0]}-{p[n]['steps'][1]})"
      if p[n]["steps"]
      else "n/a"
      for n in names
    ]
    lines.append(f"| {s['seed']} | " + " | ".join(cells) + " |")
  return [*lines, "", *[f"- {d['text']}." for d in directions]]


# (name, (from point, to point), the paper's claim or None for a plain measurement)
_ENTROPY_SPANS = (
  ("compression stage (start -> switch)", ("start", "switch"), "descends"),
  ("at the switch (switch -> after_switch)", ("switch", "after_switch"), None),
  ("enhancement stage (after_switch -> end)", ("after_switch", "end"), "rises"),
)


def entropy_directions(seeds: dict, field: str) -> list[dict]:
  """Per span of the run, the mean change of one entropy curve over seeds and, where the paper
  makes a claim (descends in stage 1, rises in stage 2), whether the numbers agree. The
  enhancement span starts after the switch, so a jump that only follows the temperature
  change (sampling-temperature curve) does not count as a rise during the stage."""
  out = []
  for name, (a, b), claim in _ENTROPY_SPANS:
    deltas = [s[field][b]["entropy"] - s[field][a]["entropy"] for s in seeds.values()
              if s[field][a]["steps"] and s[field][b]["steps"]]  # fmt: skip
    if not deltas:
      continue
    mean = sum(deltas) / len(deltas)
    went = "rises" if mean > 0 else "descends"
    changes = ", ".join(f"{d:+.3f}" for d in deltas)
    text = f"{name}: entropy {went} on average (per seed {changes})"
    met = None if claim is None else went == claim
    if claim is not None:
      text += "; as the paper says" if met else f"; the paper says it {claim}: not reproduced"
    out.append({"span": name, "claim": claim, "mean_change": mean, "per_seed": deltas,
                "met": met, "text": text})  # fmt: skip
  return out


def _tokens_table(tokens: dict) -> list[str]:
  sft, egrc = tokens["sft"], tokens["egrc"]
  lines = [
    f"Connector share of the top-{sft['rho']:.0%} tokens: SFT {sft['connector_share']:.3f}"
    f" (connectors are {sft['connector_share_all_tokens']:.3f} of all its tokens), EGRC "
    f"{egrc['connector_share']:.3f} ({egrc['connector_share_all_tokens']:.3f} of all).",
    "",
    "| rank | SFT string | count | EGRC string | count |",
    "| --- " * 5 + "|",
  ]
  for i in range(max(len(sft["top"]), len(egrc["top"]))):
    a = sft["top"][i] if i < len(sft["top"]) else ("", "")
    b = egrc["top"][i] if i < len(egrc["top"]) else ("", "")
    lines.append(f"| {i + 1} | `{a[0]}` | {a[1]} | `{b[0]}` | {b[1]} |")
  return lines


def _hf_lines(check: dict) -> list[str]:
  n_match = sum(r["match"] for r in check["records"])
  lines = [
    f"`transformers.AutoModelForCausalLM` on `{check['hf_dir']}` vs our sampler on the "
    f"final checkpoint, greedy: **{n_match}/{check['num_prompts']} token sequences "
    f"match**; max |logit difference| {check['max_abs_logit_diff']:.2e}.",
    "",
  ]
  for r in check["records"]:
    lines += [
      f"- `{r['problem']}` ({'match' if r['match'] else 'MISMATCH'})",
      f"  - transformers: `{r['text_transformers']}`",
      f"  - sampler: `{r['text_ours']}`",
    ]
  return lines


def _conflict_lines(seeds: dict) -> list[str]:
  """The entropy-conflict diagnostics of each seed's SFT model (toy/conflict.py)."""
  with_diag = [s for s in seeds.values() if "conflict" in s]
  if not with_diag:
    return []
  d0 = with_diag[0]["conflict"]
  lines = [
    "## Entropy conflict at the SFT model (Fig. 3a / Fig. 3d analogues)",
    "",
    f"{d0['num_problems']} test problems x G {d0['group_size']} samples at the stage-1 "
    f"settings (T = {d0['temperature']}, L = {d0['max_new_tokens']}, r = {d0['r']}); "
    "`egrc_jax/toy/conflict.py` defines every number. Selected samples: compression R > 0 "
    "(R-weighted), accuracy c = 1. s = mean signed logit gradient on the connector words per "
    "response token (> 0 raises them), / mean |A| to compare the objectives' scales.",
    "",
    "| seed | sample accuracy | r(length, correct) within groups | accuracy shorter / longer "
    "half | objective | selected | mean tokens | mean entropy | re-checks | r(H, g) | r(H, g) "
    "active | s | s / mean abs A |",
    "| --- " * 13 + "|",
  ]
  for s in with_diag:
    d = s["conflict"]
    for name, o in d["objectives"].items():
      lines.append(
        f"| {s['seed']} | {d['accuracy']:.3f} | {d['length_correct_r']:+.3f} | "
        f"{d['accuracy_shorter_half']:.3f} / {d['accuracy_longer_half']:.3f} | {name} | "
        f"{o['selected']} | {o['mean_tokens']:.1f} | {o['mean_entropy']:.3f} | "
        f"{o['mean_rechecks']:.2f} | {o['pearson_r']:.3f} | {o['pearson_r_active']:.3f} | "
        f"{o['connector_grad_mean']:+.5f} | {o['connector_grad_per_abs_adv']:+.4f} |"
      )
  lines.append("")
  for s in with_diag:
    p = s["conflict"].get("plots")
    if p:
      lines += [f"![seed {s['seed']} selected samples]({p}/selected_samples.png)",
                f"![seed {s['seed']} compression]({p}/entropy_grad_compression.png)",
                f"![seed {s['seed']} accuracy]({p}/entropy_grad_accuracy.png)", ""]  # fmt: skip
  return lines


def markdown(rep: dict) -> str:
  st, seeds, n = rep["settings"], rep["seeds"], len(rep["seeds"])
  directions = rep["entropy_directions"]
  rl = st["rl_config_values"]
  first = next(iter(seeds.values()))
  lines = [
    "# EGRC on the toy task: a miniature reproduction",
    "",
    f"Seeds {list(seeds)}; SFT {st['sft']['steps']} steps; config `{st['config']}` "
    f"(compress {rl['compress']['steps']} steps at T={rl['compress']['temperature']}, enhance "
    f"{rl['enhance']['steps']} at T={rl['enhance']['temperature']}, EE {rl['single']['steps']}; "
    f"{rl['data']['prompts_per_step']} prompts x {rl['rollout']['num_samples']} samples, "
    f"L={rl['rollout']['max_new_tokens']}). "
    f"Every model answers the same {st['num_test']} held-out problems per seed, one sample "
    f"each at T={st['eval_temperature']} (max {st['eval_max_new_tokens']} new tokens).",
    "",
    "**Compress-only is EGRC's first stage**: the same computation (same seed, data order and "
    "steps), so it is evaluated from the EGRC run's stage-1 end checkpoint (step "
    f"{first['switch_step']} for seed {first['seed']}), not from a separate run.",
    "",
    f"## Results (mean over {n} seed(s){'; +- std [min, max]' if n > 1 else ''})",
    "",
    *_main_table(rep["table"], n),
    "",
    "## Must-show targets",
    "",
    *[f"- {v['text']}: **{status(v)}**" for v in rep["verdicts"]],
    *[
      f"- {d['text']} (`{ENTROPY_CURVES[f][0]}`): **{'met' if d['met'] else 'not met'}**"
      for f in ENTROPY_CURVES
      for d in directions[f]
      if d["claim"]
    ],
    "",
    "## Ablations against EGRC",
    "",
    *[f"- {c['text']}." for c in rep["comparisons"]],
    "",
    "## Per seed",
    "",
    *_seed_table(seeds),
    "",
    *_conflict_lines(seeds),
    "## Policy entropy of the EGRC run",
    "",
    f"Each point is the mean over {ENTROPY_WINDOW} steps: the first steps, the last steps of "
    "stage 1, the first of stage 2, the last steps. Two curves (EGRC.md measures both):",
    "",
  ]
  for field, (key, what) in ENTROPY_CURVES.items():
    lines += [f"**`{key}`**: {what}.", "", *_entropy_table(seeds, field, directions[field]), ""]
  trends = [(s["seed"], s["entropy_trend"]) for s in seeds.values() if "entropy_trend" in s]
  if trends:
    per = "; ".join(
      f"seed {seed}: {t['slope']:+.5f} +- {t['se']:.5f} per step (t = {t['t']:.1f}, "
      f"{t['steps']} steps)"
      for seed, t in trends
    )
    lines += [
      "Stage-2 trend of `entropy/mean` (least-squares slope over the stage-2 steps, with its "
      f"standard error): {per}. |t| > 2 means the change is larger than the step-to-step "
      "noise.",
      "",
    ]
  lines += [
    "The sampling-temperature curve jumps at the switch because T rises from "
    f"{rl['compress']['temperature']} to {rl['enhance']['temperature']}: the same policy is "
    "more random when sampled hotter. That jump is not learning; whether the entropy rises "
    "*during* the enhancement stage is the after_switch -> end change.",
    "",
    "## Training curves",
    "",
    *[f"![seed {s['seed']}]({s['curves']})" for s in seeds.values()],
    "",
  ]
  for s in seeds.values():
    lines += [
      f"## High-entropy tokens, seed {s['seed']}",
      "",
      *_tokens_table(s["high_entropy"]),
      "",
      f"## HF export check, seed {s['seed']}",
      "",
      *_hf_lines(s["hf_check"]),
      "",
    ]
  lines += [
    "## Time per phase",
    "",
    "Of this invocation (a re-run skips finished phases: they show about 0 s).",
    "",
    "| phase | seconds |",
    "| --- | --- |",
    *[f"| {k} | {v:.1f} |" for k, v in rep["phases_seconds"].items()],
    "",
  ]
  return "\n".join(lines)


def headline(rep: dict) -> str:
  """The table and verdicts as plain console lines."""
  out = [f"{'model':15s} {'accuracy':>9s} {'tokens':>8s} {'ratio':>7s}"]
  for name, label in MODELS:
    if name not in rep["table"]:
      continue
    t = rep["table"][name]
    out.append(
      f"{label:15s} {t['accuracy']['mean']:9.3f} {t['mean_length']['mean']:8.1f} "
      f"{t['length_ratio']['mean']:7.3f}"
    )
  out += [f"{v['text']}: {status(v)}" for v in rep["verdicts"]]
  out += [c["text"] for c in rep["comparisons"]]
  return "\n".join(out)


def write_report(workdir, settings: dict, seeds: dict, phases: dict) -> dict:
  """DIR/report.json (every number) and DIR/report.md."""
  workdir = pathlib.Path(workdir)
  seeds = {str(k): v for k, v in seeds.items()}
  tab = table(seeds)
  n, num_test = len(seeds), settings["num_test"]
  rep = {
    "settings": settings,
    "table": tab,
    "verdicts": verdicts(tab, n, num_test),
    "comparisons": comparisons(tab, n, num_test),
    **{
      field: {p: spread([s[field][p]["entropy"] for s in seeds.values()]) for p in ENTROPY_POINTS}
      for field in ENTROPY_CURVES
    },
    "entropy_directions": {field: entropy_directions(seeds, field) for field in ENTROPY_CURVES},
    "seeds": seeds,
    "phases_seconds": phases,
  }
  (workdir / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
  (workdir / "report.md").write_text(markdown(rep))
  return {"md": workdir / "report.md", "json": workdir / "report.json", "report": rep}
