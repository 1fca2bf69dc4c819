"""imgvec benchmarks: `python -m benchmarks.run` (see benchmarks/README section in the top README)."""
