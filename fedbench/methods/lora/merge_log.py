"""The merges a method folds into the shared backbone, and which of them each client already has.

In simulation the backbone is one tensor shared by every client, so a merge reaches everyone at once;
in a deployment a client only learns of it from its next download. ``MergeLog`` keeps the merges not
yet received by every client and builds each client's share of them, so that the bytes counted are the
bytes a real client would need (the pattern of FLoRA's stacks, methods/lora/flora.py).

A merge of round t is stored per adapted matrix either as factors ``{"B": d_out x k, "A": k x d_in}``
(delta = B @ A, scaling folded into A) or as ``{"dense": d_out x d_in}``. Downloads carry, per missed
round, exactly those tensors (``merges``), or their sum as one dense matrix per target (``merged``).
``client_view`` evaluates a client on the backbone as that client knows it: the shared backbone less the
merges it has not downloaded yet (after a round, a participant's model is the backbone it trained on plus
its trained adapters, not the backbone the server has merged into since).
Not a method: the registry imports it with the other modules here and finds nothing to register.
"""

from __future__ import annotations

import contextlib

import torch


def entry_delta(part: dict, key: str) -> torch.Tensor:
    """The d_out x d_in update one stored merge adds to target ``key`` (float64)."""
    if "dense" in part:
        return part["dense"][key].double()
    return part["B"][key].double() @ part["A"][key].double()


class MergeLog:
    def __init__(self, clients: int, method: str) -> None:
        self.method = method
        self.entries: list[tuple[int, dict]] = []  # (round, {"A"/"B" or "dense": {key: tensor}})
        self.latest = 0                             # the last round that merged anything
        self.synced = [0] * clients                 # the last merge each client has received

    def record(self, t: int, part: dict) -> None:
        self.entries.append((t, part))
        self.latest = t

    def missed(self, cid: int) -> list[tuple[int, dict]]:
        return [(t, p) for t, p in self.entries if t > self.synced[cid]]

    def payload(self, cid: int, dense: bool = False) -> dict:
        """What ``cid`` must download to catch up: per missed round its tensors, or (dense) their sum."""
        missed = self.missed(cid)
        if not missed:
            return {}
        if dense:
            keys = next(iter(missed[0][1].values())).keys()
            return {"merged": {k: sum(entry_delta(p, k) for _, p in missed).float() for k in keys}}
        return {"merges": {str(t): p for t, p in missed}}

    def settle(self, cid: int, payload: dict) -> dict:
        """Take the merge parts out of a download, check that they are exactly the missed ones, and
        mark the client synced (the shared backbone already holds them). Returns the rest."""
        payload = dict(payload)
        merges, merged = payload.pop("merges", None), payload.pop("merged", None)
        expected = [t for t, _ in self.missed(cid)]
        got = sorted(int(t) for t in merges) if merges is not None else None
        if (got is not None and got != expected) or (got is None and (merged is None) == bool(expected)):
            have = "merges of rounds " + str(got) if got is not None else (
                "a dense merge" if merged is not None else "no merge")
            raise ValueError(f"{self.method}: client {cid} synced at round {self.synced[cid]} got {have}, "
                             f"needs rounds {expected}")
        self.synced[cid] = self.latest
        oldest = min(self.synced)
        self.entries = [(t, p) for t, p in self.entries if t > oldest]  # everyone has the older ones
        return payload

    @staticmethod
    def delta(payload: dict, key: str) -> torch.Tensor | int:
        """The total update a download's merge parts add to target ``key`` (0 when it carries none)."""
        if "merged" in payload:
            return payload["merged"][key].double()
        return sum((entry_delta(p, key) for p in payload.get("merges", {}).values()), 0)

    def client_view(self, layers: dict, cid: int):
        """Within the block, the shared backbone's adapted layers are as client ``cid`` last received
        them (restored bit for bit afterwards)."""
        missed = self.missed(cid)
        return backbone_less(layers, {k: sum(entry_delta(p, k) for _, p in missed) for k in layers} if missed else {})


@contextlib.contextmanager
def backbone_less(layers: dict, deltas: dict):
    """Within the block, each adapted layer ``layers[k]`` of the shared backbone less ``deltas[k]`` (the
    merges a client has not downloaded: its view of the backbone); restored bit for bit afterwards.
    Nothing to subtract (empty ``deltas``): the backbone as it is."""
    if not deltas:
        yield
        return
    saved = {k: layers[k].base.weight.detach().clone() for k in deltas}
    try:
        for k, d in deltas.items():
            layers[k].merge(-d)
        yield
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                layers[k].base.weight.copy_(w)


class MissedMerges:
    """Mixin (before FederatedLoRA in the bases) for methods that merge into the shared backbone: a
    ``log`` of the merges, downloads settled against it, clients evaluated on their own view."""

    def setup(self, server, clients):
        super().setup(server, clients)
        self.log = MergeLog(len(clients), self.name)

    def install(self, party, payload):
        super().install(party, self.log.settle(party.id, payload))

    def predict(self, client, x):
        """The client's own model: its adapters on the backbone as it last downloaded it."""
        with self.log.client_view(self.layers, client.id):
            return super().predict(client, x)
