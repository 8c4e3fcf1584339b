"""Package a trained model for release as a Hugging Face directory with a model card.

python -m egrc_jax.release --run=<trainer workdir | HF dir | checkpoint step dir> \\
    --results=<evaluation workdir> --out=<release dir> [--tokenizer=DIR] [--overwrite]

The release directory holds config.json, the safetensors weights, the tokenizer with its
chat template, generation_config.json carrying the evaluation's sampling settings
(do_sample, temperature, top_p, max_new_tokens; defaults 0.6 / 0.95 when no results are
given) and README.md: a model card with the run's config (<workdir>/config.json) and the
evaluation table (<results>/results.md). An HF directory's weights are copied byte for byte;
a trainer checkpoint's params are exported with `egrc_jax.hf.export_model`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

from egrc_jax import cli, hf
from egrc_jax.evaluate import model_io

WEIGHT_GLOBS = ("*.safetensors", "model.safetensors.index.json")
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}


def _read_results(results: str | None) -> tuple[dict, str]:
  """(results.json content, results.md text) of an evaluation workdir ({} and "" if none)."""
  if not results:
    return {}, ""
  d = pathlib.Path(results)
  if not (d / "results.json").is_file():
    raise FileNotFoundError(f"{d}/results.json not found: pass an evaluation --workdir")
  md = (d / "results.md").read_text() if (d / "results.md").is_file() else ""
  return json.loads((d / "results.json").read_text()), md


def generation_settings(results: dict) -> dict:
  """generation_config.json keys for the evaluation's sampling settings."""
  s = results.get("settings", {})
  gen = dict(DEFAULT_SAMPLING)
  if s:
    gen.update(temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=s["max_new_tokens"])
    gen["do_sample"] = not s.get("greedy", False)
    if s.get("top_k"):
      gen["top_k"] = s["top_k"]
  return gen


def model_card(name: str, run_config: dict | None, results: dict, table_md: str, gen: dict) -> str:
  lines = [
    "---", "library_name: transformers", "tags:", "- egrc", "- reasoning", "- math", "---", "",
    f"# {name}", "",
    "A reasoning model compressed with Entropy-Guided Reasoning Compression (EGRC: a "
    "compression stage in which entropy descends, then an enhancement stage in which it "
    "ascends), trained with egrc_jax.", "",
    "## Usage", "", "```python",
    "from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast",
    "# PreTrainedTokenizerFast reads tokenizer.json as saved (AutoTokenizer may substitute",
    "# the model family's tokenizer class).",
    f'tok = PreTrainedTokenizerFast.from_pretrained("{name}")',
    f'model = AutoModelForCausalLM.from_pretrained("{name}")',
    'msgs = [{"role": "user", "content": "What is 1 + 1?\\nPlease reason step by step, and put '
    'your final answer within \\\\boxed{}."}]',
    "inputs = tok.apply_chat_template(",
    "  msgs, add_generation_prompt=True, return_tensors='pt', return_dict=True",
    ")",
    "# Sampling settings come from generation_config.json.",
    "out = model.generate(**inputs, max_new_tokens=4096)",
    "print(tok.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
    "```", "",
    f"Sampling settings (generation_config.json): `{json.dumps(gen)}`.", "",
    "## Evaluation", "",
  ]  # fmt: skip
  if table_md:
    lines += [table_md.strip(), ""]
  else:
    lines += ["Not evaluated (no --results given).", ""]
  if results.get("model"):
    lines += [f"Evaluated checkpoint: `{results['model']}`.", ""]
  lines += ["## Training configuration", ""]
  if run_config:
    lines += ["```json", json.dumps(run_config, indent=1), "```", ""]
  else:
    lines += ["No trainer config.json was found next to the weights.", ""]
  return "\n".join(lines)


def release(run: str, out: str, results: str | None = None, tokenizer: str = "",
            overwrite: bool = False) -> pathlib.Path:  # fmt: skip
  """Write the release directory `out` (see the module docstring); returns its path."""
  # Every input is read and checked before --out is created.
  src = model_io.resolve(run)
  dst = pathlib.Path(out)
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
    raise FileExistsError(f"--out={str(dst)!r} exists and is not empty; choose a new --out or "
                          "pass --overwrite")  # fmt: skip
  res, table = _read_results(results)
  gen = generation_settings(res)
  tok = model_io.load_tokenizer(src, tokenizer or None)
  if not getattr(tok, "chat_template", None):
    raise ValueError(f"the tokenizer of {run} has no chat template; pass --tokenizer=<dir>")
  dst.mkdir(parents=True, exist_ok=True)
  if src.kind == "hf":
    for pattern in (*WEIGHT_GLOBS, "config.json", "generation_config.json"):
      for f in src.path.glob(pattern):
        shutil.copyfile(f, dst / f.name)
  else:
    _, model = model_io.restore_params(src.path)
    hf.export_model(model, dst, overwrite=True)
  tok.save_pretrained(dst)
  gen_path = dst / "generation_config.json"
  existing = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
  if "eos_token_id" not in existing and tok.eos_token_id is not None:
    existing["eos_token_id"] = tok.eos_token_id
  gen_path.write_text(json.dumps({**existing, **gen}, indent=2) + "\n")
  card = model_card(dst.name, src.run_config, res, table, gen)
  (dst / "README.md").write_text(card)
  return dst


def main(argv: list[str] | None = None) -> int:
  p = cli.Parser(prog="python -m egrc_jax.release", description=__doc__)
  p.add_argument("--run", required=True, help="trainer workdir, HF dir or checkpoint step dir")
  p.add_argument("--results", default="", help="evaluation workdir (results.json, results.md)")
  p.add_argument("--out", required=True, help="release directory to write")
  p.add_argument("--tokenizer", default="", help="tokenizer directory (default: the run's)")
  p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
  a = p.parse_args(argv)
  path = release(a.run, a.out, a.results or None, a.tokenizer, a.overwrite)
  print(f"release written to {path}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
