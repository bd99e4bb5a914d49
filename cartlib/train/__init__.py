"""Training on accelerate: one loop (``loop``) for the tokenizer (``tokenizer``) and the
next-detail transformer (``ar``). ``from cartlib import train`` gives all of them."""

from cartlib.train.ar import ar_dir, ar_loss, extract_tokens, load_ar, token_rows, train_ar
from cartlib.train.checkpoints import load_latest, read_history, stage_state
from cartlib.train.loop import (
    CKPT_NAME,
    build_optimizer,
    load_checkpoint,
    load_stage,
    lr_lambda,
    make_accelerator,
    rng_state,
    run_loop,
    set_rng_state,
)
from cartlib.train.tokenizer import (
    default_device,
    load_tokenizer,
    tokenizer_dir,
    tokenizer_training_data,
    train_tokenizer,
)

__all__ = [
    "CKPT_NAME",
    "ar_dir",
    "ar_loss",
    "build_optimizer",
    "default_device",
    "extract_tokens",
    "load_ar",
    "load_checkpoint",
    "load_latest",
    "load_stage",
    "load_tokenizer",
    "read_history",
    "stage_state",
    "lr_lambda",
    "make_accelerator",
    "rng_state",
    "run_loop",
    "set_rng_state",
    "tokenizer_dir",
    "token_rows",
    "tokenizer_training_data",
    "train_ar",
    "train_tokenizer",
]
