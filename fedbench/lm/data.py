"""Shakespeare as token windows on the device, in the engine's ``FederatedData`` layout.

Each client role's train lines (and, separately, its test lines) are joined with newlines, tokenised by
the backbone's tokeniser and cut into windows of ``seq_len + 1`` tokens with stride ``seq_len`` (the last
one padded): the window's first ``seq_len`` tokens are the input, its last ``seq_len`` the targets
(padding: IGNORE). ``images`` holds the inputs (n, seq_len) and ``labels`` the targets (n, seq_len), so
the engine's batches, sampling and byte counting are unchanged; a batch's ``len(y)`` counts windows.
No validation split (``--val-fraction`` does not apply).
"""

from __future__ import annotations

import numpy as np
import torch

from fedbench.data.partition import SPLITS, Partition
from fedbench.data.shakespeare import Corpus, split_lines
from fedbench.engine.data import FederatedData
from fedbench.errors import ConfigError
from fedbench.lm import IGNORE


class CharTokenizer:
    """Characters of the corpus' alphabet; id 0 is padding/unknown."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet
        self.ids = {c: i + 1 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 1

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, 0) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i - 1] for i in ids if 0 < i <= len(self.alphabet))


class HFTokenizer:
    """A transformers tokenizer: no special tokens added."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def windows(ids: list[int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (n, seq_len): windows of seq_len + 1 tokens, stride seq_len, last padded."""
    n = max(1, -(-(len(ids) - 1) // seq_len))
    buf = np.full(n * seq_len + 1, IGNORE, dtype=np.int64)
    buf[:len(ids)] = ids
    starts = np.arange(n) * seq_len
    cols = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = buf[cols]
    x = np.where(w[:, :-1] == IGNORE, 0, w[:, :-1])
    return x, w[:, 1:]


def build_token_data(corpus: Corpus, tokenizer, cfg, device: torch.device) -> FederatedData:
    roles = corpus.clients(cfg.clients, cfg.min_role_lines)
    if len(roles) < cfg.clients:
        raise ConfigError(f"--clients {cfg.clients}: only {len(roles)} Shakespeare roles qualify")
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for r in roles:
        train, test = split_lines(r, cfg.test_fraction)
        for split, lines in (("train", train), ("test", test)):
            parts[split].append(windows(tokenizer.encode("\n".join(lines) + "\n"), cfg.seq_len))
    xs, ys, index, local = [], [], {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    offset = 0
    for split in ("train", "test"):
        pos = 0
        for x, y in parts[split]:
            local[split].append(np.arange(pos, pos + len(x), dtype=np.int64))
            index[split].append(torch.arange(offset + pos, offset + pos + len(x), device=device))
            xs.append(x)
            ys.append(y)
            pos += len(x)
        offset += pos
    for _ in roles:
        local["val"].append(np.empty(0, np.int64))
        index["val"].append(torch.empty(0, dtype=torch.int64, device=device))
    partition = Partition(local, 1)
    split_labels = {s: np.zeros(sum(len(ix) for ix in local[s]), dtype=np.int64) for s in SPLITS}
    data = FederatedData(torch.from_numpy(np.concatenate(xs)).to(device),
                         torch.from_numpy(np.concatenate(ys)).to(device), index, partition, split_labels,
                         TokenTransform(), 1)
    data.roles = [r.name for r in roles]
    return data


class TokenTransform:
    """The identity on token ids (the engine's BatchTransform interface)."""

    def train_gather(self, images: torch.Tensor, b: torch.Tensor, mode: str, g) -> torch.Tensor:
        return images[b]

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        return x
