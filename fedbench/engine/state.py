"""Client and server state as tensors, bound on demand to one workspace module per (role, name, spec).

A party (a client or the server) declares a private module once (``create``); its parameters and
buffers live here as plain tensors. Asking for the module (``bound``) points the workspace module's
slots at that party's tensors, so no model is built per client per round and the resident state of N
clients is exactly N x their own tensors (plus one workspace per spec).
"""

from __future__ import annotations

import torch
from torch import nn

from fedbench.models.cnn import ModuleSpec
from fedbench.seeding import derive


class ModuleState:
    def __init__(self, device: torch.device, meter, *, seed: int, same_init: bool = False,
                 channels_last: bool = False) -> None:
        self.device = device
        self.meter = meter
        self.seed = seed
        self.same_init = same_init
        self.channels_last = channels_last
        self.workspace: dict[tuple, nn.Module] = {}
        self.tensors: dict[tuple, list[torch.Tensor]] = {}
        self.specs: dict[tuple, ModuleSpec] = {}
        self._bound: dict[int, tuple] = {}

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def create(self, key: tuple, name: str, spec: ModuleSpec) -> nn.Module:
        """Declare module ``name`` of party ``key`` (("client", k) or ("server",)), seeded by who owns it
        (or, with ``same_init``, by its role, name and spec only)."""
        role = key[0]
        ws_key = (role, name, spec)
        if ws_key not in self.workspace:
            ws = spec.build().to(self.device)
            self.meter.attach(ws)
            self.workspace[ws_key] = ws
        ident = (role, name, str(spec)) if self.same_init else (*key, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(self.seed, "init", *map(str, ident)))
            fresh = spec.build()
        owner = (*key, name)
        self.tensors[owner] = [self.layout(t.detach().to(self.device).clone())
                               for t in (*fresh.parameters(), *fresh.buffers())]
        self.specs[owner] = spec
        self._bound = {k: v for k, v in self._bound.items() if v != owner}
        return self.bound(key, name)

    def bound(self, key: tuple, name: str) -> nn.Module:
        owner = (*key, name)
        ws = self.workspace[(key[0], name, self.specs[owner])]
        if self._bound.get(id(ws)) != owner:
            for slot, t in zip((*ws.parameters(), *ws.buffers()), self.tensors[owner], strict=True):
                slot.data = t
                slot.grad = None
            self._bound[id(ws)] = owner
        return ws

    def snapshot(self, key: tuple) -> dict[tuple, list[torch.Tensor]]:
        """Copies of every tensor party ``key`` owns (for an evaluation that installs something and must
        leave no trace: ``restore``)."""
        return {o: [t.clone() for t in ts] for o, ts in self.tensors.items() if o[:len(key)] == key}

    @torch.no_grad()
    def restore(self, snap: dict[tuple, list[torch.Tensor]]) -> None:
        """Write a ``snapshot`` back into the same tensors (bindings stay valid)."""
        for o, ts in snap.items():
            for t, s in zip(self.tensors[o], ts, strict=True):
                t.copy_(s)

    def nbytes(self, role: str | None = None) -> int:
        """Bytes of all parties' own tensors (of one role, if given); workspaces not included."""
        return sum(t.numel() * t.element_size() for owner, ts in self.tensors.items()
                   if role is None or owner[0] == role for t in ts)
