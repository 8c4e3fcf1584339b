"""Convert between Hugging Face directories and native egrc_jax checkpoints.

python -m egrc_jax.hf import --hf HF_DIR --out CKPT_DIR [--param-dtype float32]
python -m egrc_jax.hf export --checkpoint CKPT_DIR --out HF_DIR [--tokenizer TOK_DIR]
"""

from __future__ import annotations

import pathlib
import sys
import time

from egrc_jax import cli
from egrc_jax.hf.export import DEFAULT_MAX_SHARD_BYTES, export_model
from egrc_jax.hf.load import load_model
from egrc_jax.hf.native import load_native, save_native


def _log(msg: str) -> None:
  print(msg, flush=True)


def _parser() -> cli.Parser:
  p = cli.Parser(prog="python -m egrc_jax.hf", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser(
    "import", help="HF directory (config.json + *.safetensors) -> native checkpoint"
  )
  imp.add_argument("--hf", required=True, help="Hugging Face model directory to read")
  imp.add_argument("--out", required=True, help="new native checkpoint directory to write")
  imp.add_argument(
    "--param-dtype", choices=("float32", "bfloat16"), help="cast weights (default: checkpoint's)"
  )
  exp = sub.add_parser("export", help="native checkpoint -> HF directory for from_pretrained")
  exp.add_argument(
    "--checkpoint",
    required=True,
    help="native checkpoint (save_native), or a trainer workdir / checkpoint step to release",
  )
  exp.add_argument("--out", required=True, help="HF directory to write")
  exp.add_argument("--tokenizer", help="directory whose tokenizer files are copied into --out")
  exp.add_argument(
    "--dtype", choices=("float32", "bfloat16"), help="weight dtype to write (default: model's)"
  )
  exp.add_argument(
    "--max-shard-bytes",
    type=int,
    default=DEFAULT_MAX_SHARD_BYTES,
    help=f"split safetensors above this size (default {DEFAULT_MAX_SHARD_BYTES})",
  )
  exp.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
  return p


def _is_trainer_checkpoint(path: str) -> bool:
  """A trainer workdir (checkpoints/) or one of its step directories (state/ + meta/)."""
  p = pathlib.Path(path)
  return (p / "checkpoints").is_dir() or ((p / "state").is_dir() and (p / "meta").is_dir())


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  start = time.time()
  if args.command == "import":
    cfg, model = load_model(args.hf, param_dtype=args.param_dtype, progress=_log)
    save_native(model, args.out)
    _log(f"saved native checkpoint of {cfg.num_params():,} params to {args.out}")
  elif _is_trainer_checkpoint(args.checkpoint):
    # A trained run: the release packager (an entry point above this module's layer) ships
    # weights, tokenizer, chat template, generation config and a model card.
    from egrc_jax import release

    rel = ["--run", args.checkpoint, "--out", args.out]
    rel += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    return release.main(rel + (["--overwrite"] if args.overwrite else []))
  else:
    try:
      cfg, model = load_native(args.checkpoint)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e}; or pass a trainer workdir / checkpoint step") from None
    _log(f"read {args.checkpoint}: {cfg.model_type}, {cfg.num_params():,} params")
    export_model(
      model,
      args.out,
      tokenizer_dir=args.tokenizer,
      max_shard_bytes=args.max_shard_bytes,
      dtype=args.dtype,
      overwrite=args.overwrite,
      progress=_log,
    )
  _log(f"done in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
