"""Base-detail tokenizer: VQ-VAE (``vqvae``), the three quantizers (``quantize``, Alg. 1 and 2),
the compound loss (``losses``), all behind :class:`Tokenizer`."""

from cartlib.tokenizer.quantize import QUANTIZERS, ScheduleQuantizer
from cartlib.tokenizer.tokenizer import Tokenizer, TokenizerOutput

__all__ = ["QUANTIZERS", "ScheduleQuantizer", "Tokenizer", "TokenizerOutput"]
