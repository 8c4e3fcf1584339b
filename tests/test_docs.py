"""What the docs tell a user to run: every `--config=configs/<file>.py[:overrides]` written in
README.md, docs/, launch/, configs/ and the package's docstrings names a config file that
exists and override keys that exist."""

import os
import pathlib
import re

import pytest

from egrc_jax.trainer import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = sorted(
  [ROOT / "README.md"]
  + list((ROOT / "docs").rglob("*.md"))
  + list((ROOT / "launch").glob("*"))
  + list((ROOT / "configs").glob("*.py"))
  + list((ROOT / "egrc_jax").rglob("*.py"))
)
# `--config=configs/x.py[:k=v,...]` (also `CFG=configs/...` in shell examples); a line ending
# in a backslash continues on the next one (written commands wrap).
SPEC = re.compile(r"(?:--config[= ]|CFG=)(configs/[\w.]+\.py)(?::([^\s`'\"]*))?")
# Values a document leaves for the reader to fill in.
PLACEHOLDER = re.compile(r"[<$]|\.\.\.")


def documented_specs() -> list[tuple[str, str, str]]:
  """(where, config file, overrides) of every config spec written in the docs."""
  out = []
  for path in DOC_FILES:
    if not path.is_file():
      continue
    text = re.sub(r"\\\\?\n\s*", "", path.read_text(encoding="utf-8"))  # join continued lines
    for m in SPEC.finditer(text):
      out.append((str(path.relative_to(ROOT)), m.group(1), m.group(2) or ""))
  return out


def _has_key(c, key: str) -> bool:
  node = c
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def test_docs_name_some_config_specs():
  # The scan itself works: the launch docs and the configs hold specs (guards against a regex
  # that silently matches nothing).
  where = {w for w, _, _ in documented_specs()}
  assert {"launch/README.md", "launch/tpu.sh", "configs/toy.py", "docs/toy.md"} <= where


@pytest.mark.parametrize("where,path,overrides", documented_specs())
def test_documented_config_spec_is_real(where, path, overrides):
  assert (ROOT / path).is_file(), f"{where} names {path}, which does not exist"
  items = [x for x in overrides.split(",") if x]
  # Leading items without "=" name presets (configs/toy.py:quick): loading them checks them.
  presets = [x for x in items[: next((i for i, x in enumerate(items) if "=" in x), len(items))]]
  c = config_lib.load_config_file(str(ROOT / path), ",".join(presets) or None)
  for item in items[len(presets) :]:
    if PLACEHOLDER.search(item.split("=")[0]):
      continue
    key = item.split("=", 1)[0]
    assert "=" in item, f"{where}: override {item!r} of {path} is not key=value"
    assert _has_key(c, key), f"{where}: {path} has no config key {key!r}"


# -- code the project writes for users runs ------------------------------------------------
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks(text: str) -> list[str]:
  return PYTHON_BLOCK.findall(text)


def run_block(code: str, cwd: pathlib.Path) -> None:
  """Execute one code block as a user would paste it (fresh namespace, given cwd)."""
  here = os.getcwd()
  os.chdir(cwd)
  try:
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
  finally:
    os.chdir(here)


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize(
  "page,index",
  [(p.name, i) for p in DOC_PAGES for i in range(len(python_blocks(p.read_text())))],
)
def test_python_blocks_in_the_docs_run(page, index, capsys):
  path = next(p for p in DOC_PAGES if p.name == page)
  run_block(python_blocks(path.read_text())[index], ROOT)
