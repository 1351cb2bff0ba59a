"""Evaluation: each client on its own test split with the method's ``predict``; the global model
(methods that have one: ``global_predict``) on the union of all clients' test splits."""

from __future__ import annotations

import torch


class Evaluator:
    def __init__(self, data, cfg, device: torch.device) -> None:
        self.data, self.cfg, self.device = data, cfg, device
        self._union: torch.Tensor | None = None

    @torch.no_grad()
    def accuracy(self, idx: torch.Tensor, predict) -> tuple[int | None, int]:
        """(correct, total) of ``predict(x)`` over images ``idx``; correct None if any prediction is undefined."""
        data, bs = self.data, self.cfg.eval_batch_size
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for s in range(0, len(idx), bs):
            b = idx[s:s + bs]
            logits = predict(data.transform.eval(data.images[b]))
            if logits is None:
                return None, len(idx)
            correct += (logits.argmax(1) == data.labels[b]).sum()
        return int(correct.item()), len(idx)

    def client(self, method, client) -> tuple[int | None, int]:
        return self.accuracy(self.data.index["test"][client.id], lambda x: method.predict(client, x))

    def union_test(self) -> torch.Tensor:
        if self._union is None:
            self._union = torch.cat(list(self.data.index["test"]))
        return self._union

    def global_model(self, method, server) -> tuple[int | None, int]:
        return self.accuracy(self.union_test(), lambda x: method.global_predict(server, x))
