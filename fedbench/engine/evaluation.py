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

    @torch.no_grad()
    def stacked(self, params: dict[str, torch.Tensor], idxs: list[torch.Tensor], seen=None) -> list[dict]:
        """Same-CNN clients in one pass (fedbench/engine/stacked.py): client c's parameters at index c of the
        stacked ``params``, its test images ``idxs[c]``. Per client {"correct", "total", "batch_mean"}, as
        ``accuracy`` gives them (the batch mean over chunks of ``eval_batch_size``); the clients step through
        their images together, ``eval_batch_size // clients`` each at a time. ``seen(layer, inputs)`` as
        ``cnn_forward``'s (metering)."""
        from fedbench.engine.stacked import CONVS, cnn_forward
        data, n = self.data, len(idxs)
        step = max(1, self.cfg.eval_batch_size // n)
        hits = [[] for _ in range(n)]
        per = {k: (list(v) if k.split(".")[0] in CONVS else v) for k, v in params.items()}
        for s in range(0, max(len(i) for i in idxs), step):
            live = [c for c in range(n) if s < len(idxs[c])]  # a prefix: idxs are sorted by length, longest first
            assert live == list(range(len(live))), "stacked evaluation: clients must come longest first"
            bs = [idxs[c][s:s + step] for c in live]
            equal = all(len(b) == len(bs[0]) for b in bs)
            p = {k: (v[:len(live)] if isinstance(v, list) or equal else list(v[:len(live)])) for k, v in per.items()}
            logits = cnn_forward(p, [data.transform.eval(data.images[b]) for b in bs], equal, seen)
            for c, (lg, b) in enumerate(zip(logits, bs, strict=True)):
                hits[c].append(lg.argmax(1) == data.labels[b])
        out = []
        chunk = self.cfg.eval_batch_size
        for c in range(n):
            h = torch.cat(hits[c]) if hits[c] else torch.zeros(0, dtype=torch.bool, device=self.device)
            per_batch = [h[s:s + chunk].float().mean() for s in range(0, len(h), chunk)]
            out.append({"correct": int(h.sum().item()), "total": len(h),
                        "batch_mean": float(torch.stack(per_batch).mean()) if per_batch else None})
        return out

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
