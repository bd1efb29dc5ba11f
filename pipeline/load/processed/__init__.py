"""The processed model and SAE tensors: what the `model` stage writes so later stages start fast.

TransformerLens converts Hugging Face weights (and folds layer norms, centres writing weights) on
every `from_pretrained`, and importing TransformerLens and SAE-Lens takes longer than the toy's
whole intervention work. So the `model` stage writes, once, the model as TransformerLens holds it
after weight processing (its full config + state dict, `data/<preset>/processed/`) and records
where each SAE's tensors are, and the `intervene` stage rebuilds them in a fraction of a second
with torch alone:

- `model.py`: `ProcessedTransformer`, TransformerLens 3.9's HookedTransformer forward pass for the
  configurations GPT-2 and the toy use, op for op, so its logits are bit-identical
  (tests/load/test_processed.py); any other configuration loads the processed state dict into a real
  HookedTransformer instead.
- `sae.py`: `ProcessedSAE`, SAE-Lens's StandardSAE / JumpReLUSAE encoder on the same tensors; other
  architectures (TopK, ...) are loaded with SAE-Lens.
- `store.py`: writing them (model stage) and reading them back (later stages).
"""
