"""Run an EGRC arm: `python -m egrc_jax.main --config=configs/<file>.py:<overrides> --workdir=DIR`.

Overrides after the colon are `key=value` pairs separated by commas (tuples use `+`), e.g.
`--config=configs/tiny.py:arm=ee,compress.steps=5`; `--config.key=value` flags work too.
An unknown key is an error. Re-running the same command resumes from the latest checkpoint;
re-running a finished run trains nothing and leaves its `hf_final/` as it is.

The console shows progress and warnings; everything logged, library INFO included, goes to
<workdir>/log.txt.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from egrc_jax import cli

LOG_FILE = "log.txt"


def parser() -> cli.Parser:
  p = cli.Parser(prog="python -m egrc_jax.main", description=__doc__)
  p.add_argument("--config", required=True, help="configs/<file>.py[:key=value,...]")
  p.add_argument("--workdir", required=True, help="where checkpoints, metrics and exports go")
  return p


def split_config_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """(other args, ["key=value", ...]) from `--config.key=value` / `--config.key value`."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      item = a[len("--config.") :]
      if "=" not in item:
        if i + 1 >= len(argv):
          raise ValueError(f"{a} has no value; write {a}=VALUE")
        item, i = f"{item}={argv[i + 1]}", i + 1
      overrides.append(item)
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def load_config(spec: str, flag_overrides: list[str]):
  """The finalized config of `path[:overrides]` plus the `--config.key=value` flags."""
  from egrc_jax.trainer.config import load_config_file

  path, _, arg = spec.partition(":")
  arg = ",".join(x for x in (arg, *flag_overrides) if x)
  return load_config_file(path, arg or None)


def setup_logging(workdir: str | None) -> None:
  """Warnings (and our progress prints) on the console; every log record, libraries' INFO
  included, in <workdir>/log.txt. absl's own handler (orbax logs through absl) is dropped so
  nothing is printed twice."""
  from absl import logging as absl_logging

  root = logging.getLogger()
  for h in list(root.handlers):
    root.removeHandler(h)
  root.removeHandler(absl_logging.get_absl_handler())
  root.setLevel(logging.INFO)
  console = logging.StreamHandler(sys.stderr)
  console.setLevel(logging.WARNING)
  console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
  root.addHandler(console)
  if workdir and "://" not in workdir:
    f = logging.FileHandler(os.path.join(workdir, LOG_FILE))
    f.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(f)


def main(argv: list[str]) -> int:
  rest, flag_overrides = split_config_flags(argv)
  args = parser().parse_args(rest)
  setup_logging(None)
  from egrc_jax import distributed

  distributed.maybe_initialize()
  config = load_config(args.config, flag_overrides)
  from egrc_jax.trainer.loop import Trainer
  from egrc_jax.trainer.release import export_final

  trainer = Trainer(config, args.workdir)  # checks everything before writing anything
  setup_logging(args.workdir)
  results = trainer.run()
  hf_dir = os.path.join(args.workdir, "hf_final")
  if results.get("stopped_early") or not config.export.hf:
    pass
  elif results.get("already_finished") and os.path.isfile(os.path.join(hf_dir, "config.json")):
    print(f"the run had finished before: {hf_dir} is its final model, left as it is", flush=True)
    results["hf_export"] = os.path.abspath(hf_dir)
  else:
    results["hf_export"] = export_final(trainer, hf_dir)
  print(json.dumps(results, indent=1, default=str), flush=True)
  return 0


def run():
  sys.exit(cli.run(main))


if __name__ == "__main__":
  run()
