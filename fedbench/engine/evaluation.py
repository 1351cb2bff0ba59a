"""Evaluation: each client on its own test split with the method's ``predict``; the global model
(methods that have one: ``global_predict``) on the union of all clients' test splits.

Token data (the language tier: ``labels`` of shape (n, T), padding IGNORE): (correct, total) count
next-token predictions over the non-padding targets, and the mean token loss and perplexity
exp(mean loss) of each evaluation are kept for ``take_metrics`` (``test_loss``, ``test_ppl``; the
global model's under the key "global")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


class Evaluator:
    def __init__(self, data, cfg, device: torch.device) -> None:
        self.data, self.cfg, self.device = data, cfg, device
        self._union: torch.Tensor | None = None
        self.token_level = data.labels.dim() == 2
        self.metrics: dict = {}
        self.batch_mean: float | None = None  # batch-mean accuracy of the last image evaluation

    def take_metrics(self) -> dict:
        """Named metrics of the evaluations since the last call: {client id or "global": {name: value}}."""
        out, self.metrics = self.metrics, {}
        return out

    @torch.no_grad()
    def tokens(self, idx: torch.Tensor, predict, key) -> tuple[int | None, int]:
        """Next-token (correct, total) over ``idx``'s windows; loss and perplexity kept under ``key``."""
        data = self.data
        bs = max(1, min(self.cfg.eval_batch_size, 2048 // data.labels.shape[1]))  # ~2048 tokens of logits
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        total = 0
        for s in range(0, len(idx), bs):
            b = idx[s:s + bs]
            logits = predict(data.transform.eval(data.images[b]))
            if logits is None:
                return None, len(idx)
            y = data.labels[b]
            keep = y != IGNORE
            loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                    ignore_index=IGNORE, reduction="sum").double()
            correct += ((logits.argmax(-1) == y) & keep).sum()
            total += int(keep.sum())
        mean = float(loss) / max(total, 1)
        self.metrics[key] = {"test_loss": mean, "test_ppl": math.exp(min(mean, 700.0))}
        return int(correct.item()), total

    @torch.no_grad()
    def accuracy(self, idx: torch.Tensor, predict) -> tuple[int | None, int]:
        """(correct, total) of ``predict(x)`` over images ``idx``; correct None if any prediction is undefined."""
        data, bs = self.data, self.cfg.eval_batch_size
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        per_batch = []
        for s in range(0, len(idx), bs):
            b = idx[s:s + bs]
            logits = predict(data.transform.eval(data.images[b]))
            if logits is None:
                self.batch_mean = None
                return None, len(idx)
            hits = (logits.argmax(1) == data.labels[b]).sum()
            correct += hits
            per_batch.append(hits / len(b))
        # the pFedLoRA authors' per-client accuracy: the mean over test batches of the batch accuracy (a
        # short last batch weighs as much as a full one); kept for the yi protocol's batch-mean option
        self.batch_mean = float(torch.stack(per_batch).mean()) if per_batch else None
        return int(correct.item()), len(idx)

    def client(self, method, client, split: str = "test") -> tuple[int | None, int]:
        """(correct, total) of the client's predictions on its ``split`` ("test" or "val")."""
        idx = self.data.index[split][client.id]
        if self.token_level:
            return self.tokens(idx, lambda x: method.predict(client, x), client.id)
        return self.accuracy(idx, lambda x: method.predict(client, x))

    def union_test(self) -> torch.Tensor:
        if self._union is None:
            self._union = torch.cat(list(self.data.index["test"]))
        return self._union

    def global_model(self, method, server) -> tuple[int | None, int]:
        if self.token_level:
            return self.tokens(self.union_test(), lambda x: method.global_predict(server, x), "global")
        return self.accuracy(self.union_test(), lambda x: method.global_predict(server, x))
