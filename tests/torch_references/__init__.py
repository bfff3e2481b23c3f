"""PyTorch oracles, owned by the tests (and the torch benchmarks, which put tests/ on sys.path): not
part of the shipped package. `dmfuse.py` is this project's PyTorch rewrite of DMFuse (the authors'
layers, checked against their golden vectors), `ddfm.py` the authors' DDFM sampling in PyTorch."""
