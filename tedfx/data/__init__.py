"""The demo's data: a public-domain English corpus shipped with tedfx, read as bytes.

The corpus (`corpus.txt`, about 80 KB) is byte-level tokenised: one token per
byte, vocabulary 256, so no tokenizer has to be downloaded. It is cut into
1 KiB chunks; every tenth chunk goes to the validation split, so both splits
see every work in the corpus (holding out its last tenth would hold out one
author).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = get_batch("train", batch_size=8, block_size=64, generator=g)
    >>> x.shape, y.shape  # y is x shifted left by one byte
    (torch.Size([8, 64]), torch.Size([8, 64]))
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Literal

import torch

__all__ = ["VOCAB_SIZE", "Split", "load_corpus", "encode", "decode", "split_tokens", "get_batch"]

VOCAB_SIZE = 256
"""Byte-level vocabulary."""

Split = Literal["train", "val"]

_CHUNK_BYTES = 1024
_VAL_EVERY = 10


def load_corpus() -> str:
    """The corpus text, without its first line (the credits of the works it holds)."""
    text = resources.files(__name__).joinpath("corpus.txt").read_text(encoding="utf-8")
    _credits, _, body = text.partition("\n")
    return body.lstrip("\n")


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as an int64 tensor of token ids in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor | list[int]) -> str:
    """Token ids back to text; a byte sequence that is not valid UTF-8 shows as U+FFFD."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(ids).decode("utf-8", errors="replace")


def split_tokens(tokens: torch.Tensor, *, chunk: int = _CHUNK_BYTES, val_every: int = _VAL_EVERY
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D token tensor into (train, val): every `val_every`-th chunk of `chunk` tokens is val."""
    chunks = torch.split(tokens, chunk)
    train = [c for i, c in enumerate(chunks) if i % val_every != val_every - 1]
    val = [c for i, c in enumerate(chunks) if i % val_every == val_every - 1]
    return torch.cat(train), torch.cat(val)


@functools.cache
def _splits() -> dict[str, torch.Tensor]:
    train, val = split_tokens(encode(load_corpus()))
    return {"train": train, "val": val}


def get_batch(split: Split, batch_size: int, block_size: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of windows of the corpus for next-byte prediction.

    Args:
        split: "train" or "val".
        batch_size: B, windows per batch.
        block_size: S, tokens per window.
        generator: the only source of randomness, so a seeded generator gives
            the same batches on every run.

    Returns:
        (x, y), both int64 [B, S]: y[b, s] is the byte that follows x[b, s].
    """
    if split not in ("train", "val"):
        raise ValueError(f'split={split!r} is invalid: expected "train" or "val".')
    data = _splits()[split]
    if block_size + 1 > data.numel():
        raise ValueError(f"block_size={block_size} does not fit the {split} split of {data.numel()} tokens; "
                         f"choose a block_size below {data.numel()}.")
    starts = torch.randint(data.numel() - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    windows = data[starts[:, None] + offsets]  # [B, S + 1]
    return windows[:, :-1], windows[:, 1:]
