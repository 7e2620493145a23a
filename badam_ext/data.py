"""The embedded default dataset: deterministic arithmetic sentences, tokenized as bytes.

(Training on a file of your own: :mod:`badam_ext.finetune_data`.)

Generated, not downloaded: ``"17 + 25 = 42.\\n"`` and similar lines from a seeded generator. The
answers are a learnable function of the prompt, so the loss of a real finetuning run falls well below
the entropy of the digits, and a run is reproducible byte for byte.
"""
from __future__ import annotations

import torch

BYTE_VOCAB = 256


def arithmetic_text(num_lines: int, seed: int = 0) -> str:
    """``num_lines`` sentences of addition, subtraction and multiplication of small integers."""
    gen = torch.Generator().manual_seed(seed)
    ops = ["+", "-", "*"]
    lines = []
    values = torch.randint(0, 100, (num_lines, 2), generator=gen).tolist()
    op_idx = torch.randint(0, 3, (num_lines,), generator=gen).tolist()
    for (a, b), o in zip(values, op_idx):
        op = ops[o]
        result = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {result}.")
    return "\n".join(lines) + "\n"


def encode_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes as int64 token ids in [0, 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode_bytes(ids: torch.Tensor) -> str:
    return bytes(int(i) for i in ids.tolist()).decode("utf-8", errors="replace")


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length windows over a token stream (labels = inputs; the model shifts them)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        n = tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"{tokens.numel()} tokens cannot fill one window of {seq_len}")
        self.windows = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "labels": ids}

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The windows ``indices`` as model keyword arguments."""
        ids = self.windows[indices]
        return {"input_ids": ids, "labels": ids}


def arithmetic_dataset(seq_len: int, num_lines: int = 20_000, seed: int = 0) -> TokenBlocks:
    """The default training set: ``num_lines`` arithmetic sentences in windows of ``seq_len`` bytes."""
    return TokenBlocks(encode_bytes(arithmetic_text(num_lines, seed)), seq_len)
