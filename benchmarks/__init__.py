"""CPU (and, with `--gpu`, GPU) benchmarks of sae_lightning; `python -m benchmarks.run` writes BENCHMARKS.md."""
