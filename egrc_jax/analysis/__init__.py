"""Entropy-conflict diagnostics and the paper's figures, as `python -m egrc_jax.analysis <kind>`
(docs/analysis.md): transitions (Fig. 4), entropy_grad (Fig. 3d), high_entropy_tokens
(Fig. 3e), selected_samples (Fig. 3a), curves (training curves). Each writes a PNG plus the
numbers as CSV and JSON."""
