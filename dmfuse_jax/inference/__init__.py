"""Inference: fuse image pairs with a trained model (`Fuser`, `load`), inference bundles, exports.

Modules: `fuser` (Python API), `checkpoints` (what `--checkpoint` may name), `bundle` (config + params,
orbax), `export` (`jax.export` artefact; `standalone_loader` runs it without the model code),
`colour` (grey / YCbCr / medical routing), `buckets` (shape buckets). The commands are in `dmfuse_jax/commands/`.
Nothing heavy is imported here.
"""
