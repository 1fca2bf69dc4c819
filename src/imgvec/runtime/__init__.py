"""Where a model runs: the engine base (``engine``), one module per engine (OpenVINO, TensorFlow, Keras'
JAX and PyTorch backends), the compiled-model cache (``model_cache``) and the loader table (``loader``).

May import: ``backbones``, ``files`` (for the cache's files), ``checks``, ``versions``, ``errors``.
"""
