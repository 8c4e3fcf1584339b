"""Data: benchmark loading, malformed rows, chat templates, the grain prompt pipeline."""

import functools
import json
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from egrc_jax.data import benchmarks, chat, sources
from egrc_jax.data.pipeline import DataConfig, PromptPipeline

EXPECTED_ROWS = {
  "aime24": 30,
  "amc23": 40,
  "math500": 500,
  "minerva_math": 272,
  "olympiadbench": 675,
  "gsm8k": 1319,
  "math_level5_train": 2304,
}
KNOWN_BAD_LINES = {"math_level5_train": {1575, 1734}}
TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
  "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["[UNK]", "[PAD]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def tokenizer():
  """A word-level tokenizer trained on a few strings, with a chat template: no downloads."""
  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  corpus = [
    "What is 2 + 2 ?",
    "Please reason step by step , and put your final answer",
    "within \\ boxed {} .",
    "w User : Assistant : System",
  ]
  tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
  )
  fast.chat_template = TEMPLATE
  return fast


def _examples(n, words=lambda i: 1 + i % 5):
  return [
    {"id": f"t/{i}", "problem": " ".join(["w"] * words(i)), "gold": str(i), "benchmark": "t"}
    for i in range(n)
  ]


def _cfg(**kw):
  base = dict(batch_size=4, max_prompt_tokens=64, seed=3, shard_index=0, shard_count=1)
  base.update(kw)
  return DataConfig(**base)


# ---- sources and benchmarks ----


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_benchmark_row_counts_and_gold(shared_data, name):
  loaded = benchmarks.load_benchmark(name, shared_data, on_bad_row="skip")
  assert len(loaded.examples) + loaded.num_bad == EXPECTED_ROWS[name]
  # Two training rows really have no gold: their solutions end in an empty "\boxed{}".
  bad_lines = {int(m.split(":line ")[1].split(":")[0]) for m in loaded.bad_rows}
  assert bad_lines == KNOWN_BAD_LINES.get(name, set())
  for ex in loaded.examples:
    assert set(ex) == {"id", "problem", "gold", "benchmark"}
    assert ex["gold"].strip() and ex["problem"].strip()
  assert len({ex["id"] for ex in loaded.examples}) == len(loaded.examples), "ids must be unique"


def test_unknown_benchmark(shared_data):
  with pytest.raises(ValueError, match="expected one of"):
    benchmarks.load_benchmark("aime25", shared_data)
  with pytest.raises(FileNotFoundError, match="data_root"):
    benchmarks.load_benchmark("aime24", shared_data / "nope")


BAD_LINES = [
  json.dumps({"id": 1, "problem": "p1", "answer": "3"}),
  '{"id": 2, "problem": "p2", "answer": ',  # line 2: bad JSON
  json.dumps({"id": 3, "answer": "5"}),  # line 3: no problem/question
  json.dumps({"id": 4, "question": "p4"}),  # line 4: no answer -> no gold
  "",  # line 5: blank, not a row
  json.dumps({"id": 6, "question": "p6", "answer": 7.0}),
]


def test_malformed_rows_jsonl(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text("\n".join(BAD_LINES) + "\n")
  loaded = sources.read_examples(path, "aime24", on_bad_row="skip")
  assert [ex["id"] for ex in loaded.examples] == ["aime24/1", "aime24/6"]
  assert [ex["gold"] for ex in loaded.examples] == ["3", "7"]
  assert loaded.num_bad == 3
  for lineno, reason in ((2, "bad JSON"), (3, "missing field"), (4, "answer")):
    assert any(f"{path}:line {lineno}:" in m and reason in m for m in loaded.bad_rows), lineno
  with pytest.raises(sources.BadRowError, match=rf"{path}:line 2: bad JSON"):
    sources.read_examples(path, "aime24", on_bad_row="error")


def test_parquet_source(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = tmp_path / "rows.parquet"
  table = pa.table({"question": ["q1", "q2"], "answer": ["a #### 1,000", "no marker"]})
  pq.write_table(table, path)
  loaded = sources.read_examples(path, "gsm8k")
  assert [ex["gold"] for ex in loaded.examples] == ["1000"]
  assert loaded.num_bad == 1 and f"{path}:row 2:" in loaded.bad_rows[0]


def test_array_record_source(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  path = tmp_path / "mydata-train.array_record-00000-of-00001"
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for rec in (b'{"problem": "p", "solution": "so \\\\boxed{42}"}', b"{not json", b'{"x": 1}'):
    writer.write(rec)
  writer.close()
  loaded = sources.read_examples(tmp_path, "math_train", split="train")
  assert [(ex["id"], ex["gold"]) for ex in loaded.examples] == [("math_train/1", "42")]
  assert loaded.num_bad == 2
  assert f"{path}:record 2: bad JSON" in loaded.bad_rows[0]
  assert f"{path}:record 3: missing field" in loaded.bad_rows[1]
  with pytest.raises(FileNotFoundError, match="split 'test'"):
    sources.read_examples(tmp_path, "math_train", split="test")


@functools.cache
def _tiny_tfds_class():
  """A TFDS GeneratorBasedBuilder defined here (once: TFDS registers builder names)."""
  import tensorflow_datasets as tfds

  class TinyMathProblems(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({
        "problem": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "idx": tfds.features.Scalar(dtype=np.int64),
      })  # fmt: skip
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 3), "test": self._generate_examples(10, 12)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {"problem": f"What is {i} + 1? (café)", "answer": str(i + 1), "idx": i}

  return TinyMathProblems


def _tiny_tfds_builder(data_dir):
  """The tiny builder prepared as array_record under data_dir: 3 train, 2 test examples."""
  builder = _tiny_tfds_class()(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder


def test_tfds_source_reads_tfds_encoded_examples(tmp_path, monkeypatch):
  builder = _tiny_tfds_builder(tmp_path / "tfds")
  ds_dir = str(builder.data_dir)  # <data_dir>/tiny_math_problems/1.0.0
  assert sources.detect_kind(ds_dir) == "tfds"
  train = sources.read_examples(ds_dir, "answer", split="train", on_bad_row="error")
  # TFDS shuffles records by key hash: compare as a set, by hand from _generate_examples.
  got = {(ex["id"], ex["problem"], ex["gold"]) for ex in train.examples}
  assert got == {(f"answer/{i}", f"What is {i} + 1? (café)", str(i + 1)) for i in range(3)}
  test = sources.read_examples(ds_dir, "answer", split="test")
  assert sorted(ex["gold"] for ex in test.examples) == ["11", "12"] and test.num_bad == 0
  assert len(sources.read_examples(ds_dir, "answer").examples) == 3  # split "" reads "train"
  # By name, through tfds.data_source with TFDS_DATA_DIR (download=False: nothing fetched).
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  by_name = sources.read_examples("tfds:tiny_math_problems", "answer", split="test")
  assert sorted(ex["gold"] for ex in by_name.examples) == ["11", "12"]
  with pytest.raises(ValueError, match=r"no split 'valid'.*\['test', 'train'\]"):
    sources.read_examples(ds_dir, "answer", split="valid")
  with pytest.raises(ValueError, match="kind='tfds'"):
    sources.read_examples(ds_dir, "answer", kind="array_record")


def test_tfds_source_reports_an_undecodable_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

  builder = _tiny_tfds_builder(tmp_path / "tfds")
  (shard,) = pathlib.Path(builder.data_dir).glob("*-train.array_record-*")
  reader = ArrayRecordReader(str(shard))
  records = [reader.read() for _ in range(reader.num_records())]
  reader.close()
  records[1] = b"not a tf.train.Example"
  writer = ArrayRecordWriter(str(shard), "group_size:1")
  for rec in records:
    writer.write(rec)
  writer.close()
  loaded = sources.read_examples(builder.data_dir, "answer", split="train")
  assert len(loaded.examples) == 2 and loaded.num_bad == 1
  assert f"{builder.data_dir}[train]:record 2: undecodable TFDS example" in loaded.bad_rows[0]


def test_hf_without_datasets_is_a_clear_error():
  try:
    import datasets  # noqa: F401

    pytest.skip("datasets is installed; the hub is never called in tests")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="needs the `datasets` package"):
    sources.read_examples("hf:some/dataset", "math_train")
  with pytest.raises(FileNotFoundError, match="hf:<name>"):
    sources.read_examples("some/dataset", "math_train")


# ---- chat template ----


def test_chat_template_applied(tokenizer):
  ids = chat.encode_prompt(tokenizer, "What is 2 + 2 ?")
  text = "<s><|user|>What is 2 + 2 ?\n" + chat.INSTRUCTION + "<|assistant|>"
  assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
  assert ids[0] == tokenizer.bos_token_id  # once: the template writes it, encode adds none
  assert ids.count(tokenizer.bos_token_id) == 1
  assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
  sys_ids = chat.encode_prompt(tokenizer, "What", instruction="", system_prompt="System")
  sys_text = "<s><|system|>System<|user|>What<|assistant|>"
  assert sys_ids == tokenizer(sys_text, add_special_tokens=False)["input_ids"]


def test_chat_fallback_without_template(tokenizer):
  plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
  assert not chat.has_chat_template(plain)
  want = "User: What is 2 + 2 ?\n" + chat.INSTRUCTION + "\nAssistant:"
  assert chat.render_prompt(plain, "What is 2 + 2 ?") == want
  assert chat.encode_prompt(plain, "What is 2 + 2 ?") == plain(want)["input_ids"]


# ---- pipeline ----


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a["id"] == b["id"]
  np.testing.assert_array_equal(a["tokens_BT"], b["tokens_BT"])
  np.testing.assert_array_equal(a["mask_BT"], b["mask_BT"])


def test_state_save_restore_gives_same_batches(tokenizer):
  examples = _examples(10)  # 10 prompts, batch 4: batches cross epoch boundaries
  pipe = PromptPipeline(_cfg(), tokenizer, examples)
  it = iter(pipe)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  want = _take(it, 6)
  resumed = iter(PromptPipeline(_cfg(), tokenizer, examples))
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 6), want, strict=True):
    _same(a, b)
  with pytest.raises(ValueError, match="different pipeline"):
    iter(PromptPipeline(_cfg(seed=4), tokenizer, examples)).set_state(state)


def test_epochs_cover_data_and_reshuffle(tokenizer):
  examples = _examples(12)
  pipe = PromptPipeline(_cfg(num_epochs=2), tokenizer, examples)
  ids = [i for batch in pipe_iter(pipe) for i in batch["id"]]
  assert len(ids) == 24 and pipe.steps_per_epoch == 3
  first, second = ids[:12], ids[12:]
  assert sorted(first) == sorted(second) == sorted(ex["id"] for ex in examples)
  assert first != second, "each epoch gets its own permutation"
  ordered = PromptPipeline(_cfg(num_epochs=1, shuffle=False), tokenizer, examples)
  assert [i for b in pipe_iter(ordered) for i in b["id"]] == [ex["id"] for ex in examples]


def pipe_iter(pipe):
  return list(iter(pipe))


def test_process_shards_disjoint_and_covering(tokenizer):
  examples = _examples(23)
  seen = []
  for k in range(3):
    cfg = _cfg(batch_size=3, shard_index=k, shard_count=3, num_epochs=1, drop_remainder=False)
    pipe = PromptPipeline(cfg, tokenizer, examples)
    assert pipe.batch_size == 1
    seen.append({i for b in pipe_iter(pipe) for i in b["id"]})
  assert sum(len(s) for s in seen) == 23
  assert set().union(*seen) == {ex["id"] for ex in examples}
  with pytest.raises(ValueError, match="divisible"):
    PromptPipeline(_cfg(batch_size=4, shard_index=0, shard_count=3), tokenizer, examples)


def test_length_filter_counts_and_padding(tokenizer):
  # Problem i has i words; a prompt is a fixed overhead plus one token per word.
  examples = _examples(20, words=lambda i: i + 1)
  overhead = len(chat.encode_prompt(tokenizer, "w")) - 1
  limit = overhead + 10  # keeps problems of 1..10 words, drops the 10 longer ones
  pipe = PromptPipeline(_cfg(max_prompt_tokens=limit, num_epochs=1), tokenizer, examples)
  assert (pipe.num_filtered, pipe.num_examples) == (10, 10)
  batches = pipe_iter(pipe)
  assert len(batches) == 2  # 10 prompts, batch 4, drop_remainder
  for b in batches:
    assert b["tokens_BT"].shape == (4, limit) and b["tokens_BT"].dtype == np.int32
    np.testing.assert_array_equal(b["mask_BT"].sum(1), b["lengths_B"])
    assert b["mask_BT"][:, -1].all(), "left padding: every prompt ends in the last slot"
    assert (b["tokens_BT"][~b["mask_BT"]] == tokenizer.pad_token_id).all()
    for row, i in zip(b["tokens_BT"], b["id"], strict=True):
      n_words = int(i.split("/")[1]) + 1
      assert (row == tokenizer.convert_tokens_to_ids("w")).sum() == n_words
  right = PromptPipeline(_cfg(padding_side="right", num_epochs=1), tokenizer, examples[:4])
  assert next(iter(right))["mask_BT"][:, 0].all()


def test_pipeline_on_training_file(tokenizer, shared_data):
  cfg = _cfg(data_root=str(shared_data), batch_size=8, max_prompt_tokens=512)
  pipe = PromptPipeline(cfg, tokenizer)
  n_rows = pipe.num_examples + pipe.num_filtered + pipe.num_bad_rows
  assert n_rows == EXPECTED_ROWS["math_level5_train"]
  assert pipe.num_bad_rows == 2 and pipe.num_examples > 0
  batch = next(iter(pipe))
  assert batch["tokens_BT"].shape == (8, 512) and all(g for g in batch["gold"])


def test_data_config_validation():
  with pytest.raises(ValueError, match="unknown benchmark"):
    DataConfig(benchmark="aime25")
  with pytest.raises(ValueError, match="gold_rule"):
    DataConfig(source="x.jsonl", gold_rule="nope")
  with pytest.raises(ValueError, match="on_bad_row"):
    DataConfig(on_bad_row="ignore")
  with pytest.raises(ValueError, match="batch_size"):
    DataConfig(batch_size=0)
  with pytest.raises(ValueError, match="shard_index and shard_count"):
    DataConfig(shard_index=1)
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    DataConfig(shard_index=2, shard_count=2)
  assert DataConfig().shard() == (0, 1)  # one JAX process in tests
