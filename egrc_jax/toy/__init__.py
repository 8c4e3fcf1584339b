"""The toy reasoning task (chained integer arithmetic), its tokenizer and the SFT warm start
that produces a verbose, imperfect starting policy for the RL stages. See docs/toy.md.

  task        problems, train/test split, verbose and concise chains of thought
  tokenizer   build_tokenizer(out_dir) -> PreTrainedTokenizerFast (HF format, chat template)
  data        python -m egrc_jax.toy.data --out DIR   (train/test JSONL prompt sets)
  sft         python -m egrc_jax.toy.sft --workdir DIR (warm start + held-out evaluation)
  evaluate    accuracy / length / connector figures through egrc_jax.sampler
  checkpoint  save_sft / load_sft (HF directory through egrc_jax.hf)
  pipeline    python -m egrc_jax.toy.pipeline --workdir DIR --seeds 0,1,2 (SFT, arms, report)
  report      report.md / report.json from the pipeline's results
  hf_check    the exported final model in transformers vs our sampler
"""
