"""cartlib: CART (Compositional AutoRegressive Transformer) — next-detail image generation.

The numbered notebooks under ``notebooks/`` import this package; each concept lives in one module:
``data`` (datasets), ``decompose`` (Mumford-Shah base/detail), ``schedule`` (TokenSchedule),
``tokenizer`` (VQ-VAE, Algorithms 1-2), ``model`` (next-detail transformer), ``train``, ``sample``,
``metrics``, ``viz``, ``runs`` and ``config``.
"""

__version__ = "0.1.0"
