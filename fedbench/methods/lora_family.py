"""The federated-LoRA family's common frame (spec §0): every client fine-tunes the one frozen
pretrained backbone through LoRA adapters; a method is the choice of (a) which factors a client trains,
(b) which it sends, (c) how the server turns received factors into the next starting point, (d) what
happens to the backbone. A method file declares exactly those and its aggregation rule; this module
holds what they share: the adapters and head of each client, per-client ranks, strict installation of
downloads, local training with the run's optimiser, and the aggregation-error metrics of every round.

Head (``--head``): ``shared`` (trained and averaged like the shared factors), ``local`` (trained, never
sent), ``frozen`` (one seeded random head for all, never trained). The head is a new linear layer on the
backbone's features for the fine-tuning task's classes. Each method's default follows its official code
(FedSA-LoRA's keeps the classifier local); a method whose official code passes every trainable parameter
through its own server rule (FLASC, FSLoRA: ``routes_head``) routes a shared head that way instead of
averaging it beside.

Scaling under heterogeneous ranks (``--rank-scaling``, the methods whose ``Params`` derive from
``RankScalingParams``): the server keeps the global LoRA at rank r_max with s = alpha / r_max; a client
of rank r_k applies
* ``constant`` (default): s_k = alpha / r_max, the global model's scaling, so a client's starting
  effective weight s_k B[:, :r_k] A[:r_k] is exactly the global model's rank-r_k truncation (FederatedLLM
  keeps s constant across ranks: lora_alpha = 2 r_k, s = 2 for every client);
* ``per-rank``: s_k = alpha / r_k (PEFT's convention per client; what fedbench did before: a truncation
  then starts r_max / r_k times the global model's matching part; FlexLoRA's FederatedScope code merges
  at 16 / r_k);
* ``sqrt``: s_k = (alpha / r_max) sqrt(r_max / r_k), the corrective sqrt(r_max / r_k) of FederatedScope's
  HetLoRA re-implementation (as the spec read it; alpha 16 hard-coded there).
With rsLoRA, alpha / sqrt(r) replaces alpha / r throughout. With one rank for all the three agree.

Metrics every round (spec §5), reported as named metrics:
* ``agg_deviation`` D_t = ||W_glob^{t+1} - sum_i p_i W_i^{t,end}||_F / ||sum_i p_i (W_i^{t,end} - W_glob^t)||_F
  over all adapted matrices together (one Frobenius norm of their concatenation), W the effective
  weights (backbone, merges included, + s B A) of the shared part; not defined for personalised methods;
* ``agg_deviation_abs``: its numerator.
A personalised method with a shared part reports the same ratio on that part alone as
``agg_deviation_shared`` (FedSA-LoRA: A; CE-LoRA: the FedAvg of C), in the shared tensors' own space.
Methods add their own (FedIT's factor error, truncation error per rank, energy ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fedbench.errors import ConfigError
from fedbench.hparams import hparam
from fedbench.lm import LM_BACKBONES
from fedbench.lora import algebra
from fedbench.lora.batched import JointTrainer, Member, OptimSettings
from fedbench.lora.layers import TARGET_PRESETS, Target, activate, adapter_spec, find_targets, inject, scaling
from fedbench.methods.base import Client, Method, Server, Upload, credit_macs, joint_pass
from fedbench.models.backbones import BACKBONE_REGISTRY
from fedbench.models.cnn import ModuleSpec, linear_spec
from fedbench.plugins import Names

BACKBONES = Names(BACKBONE_REGISTRY, extra=lambda: LM_BACKBONES)  # registered image backbones, language tier
HEADS = ("shared", "local", "frozen")
EVALUATIONS = ("personalised", "global")  # the evaluation kinds a method may have (FederatedLoRA.evaluations)
RANK_SCALINGS = ("constant", "per-rank", "sqrt")


@dataclass
class LoRAParams:
    backbone: str = hparam("vit", "frozen pretrained backbone (`fedbench pretrain`)", choices=BACKBONES)
    backbone_init: str = hparam("pretrained", "backbone weights: pretrained (the cache of `fedbench pretrain` or "
                                              "--model-path) or random (a seeded random backbone: reference, tests)",
                                choices=("pretrained", "random"))
    model_path: str = hparam("", "a local checkpoint of the backbone's architecture instead of the cache")
    targets: str = hparam("attn", "adapted layers: a preset (" + ", ".join(TARGET_PRESETS) + ") or a comma list "
                                  "of layer names (q_proj,v_proj,fc1,...)")
    rank: int = hparam(8, "LoRA rank r of every client (unless --ranks)", low=1)
    ranks: str = hparam("", "heterogeneous ranks: N comma-separated ranks (one per client), or cycle:2,4,8,16 "
                            "(client k gets the (k mod 4)-th)")
    lora_alpha: float = hparam(16.0, "LoRA alpha: scaling s = alpha / r", low=0.0, low_open=True)
    rslora: bool = hparam(False, "rsLoRA scaling s = alpha / sqrt(r)")
    head: str = hparam("shared", "classifier head: shared (averaged), local (never sent) or frozen (random, "
                                 "never trained)", choices=HEADS)
    reference_quirks: bool = hparam(False, "reproduce the reference code's known defects (spec §6) instead of "
                                           "the paper rule")


@dataclass
class RankScalingParams(LoRAParams):
    """The options of the methods for heterogeneous ranks that truncate or pad one global LoRA."""

    rank_scaling: str = hparam("constant", "scaling of a client of rank r_k under heterogeneous ranks: constant "
                                           "(alpha / r_max for all: a client starts at the global model's "
                                           "truncation, FederatedLLM's rule), per-rank (alpha / r_k) or sqrt "
                                           "((alpha / r_max) sqrt(r_max / r_k), FederatedScope's)",
                               choices=RANK_SCALINGS, late=True)


def rank_scaling(p, r: int, r_max: int) -> float:
    """The scaling s_k of a rank-r client when the global LoRA has rank r_max, under ``p.rank_scaling``
    (``per-rank`` for a method without the option)."""
    rule = getattr(p, "rank_scaling", "per-rank")
    if rule == "per-rank" or r == r_max:
        return scaling(p.lora_alpha, r, p.rslora)
    s_g = scaling(p.lora_alpha, r_max, p.rslora)
    return s_g if rule == "constant" else s_g * math.sqrt(r_max / r)


def parse_ranks(p: LoRAParams, clients: int) -> list[int]:
    """Rank of each client from --rank / --ranks; a list that does not fit the clients is refused."""
    text = p.ranks.strip()
    if not text:
        return [p.rank] * clients
    cyclic = text.startswith("cycle:")
    body = text[len("cycle:"):] if cyclic else text
    try:
        values = [int(v) for v in body.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--ranks {p.ranks!r}: expected integers like 2,4,8,16 or cycle:2,4,8,16") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--ranks {p.ranks!r}: ranks must be integers >= 1")
    if cyclic:
        return [values[k % len(values)] for k in range(clients)]
    if len(values) != clients:
        raise ConfigError(f"--ranks gives {len(values)} ranks for --clients {clients}; give one per client, "
                          f"or cycle:{body} to repeat them over the clients")
    return values


@torch.no_grad()
def copy_strict(method: str, part: str, slots: dict, tensors: dict) -> None:
    """Copy downloaded ``tensors`` into the parameters ``slots`` of the same keys; a tensor with no slot,
    or of another shape, is an error (never silently dropped)."""
    for key, t in tensors.items():
        if key not in slots:
            raise KeyError(f"{method}: downloaded {part}[{key}] has no parameter on the client")
        if slots[key].shape != t.shape:
            raise ValueError(f"{method}: downloaded {part}[{key}] has shape {tuple(t.shape)}, the client's is "
                             f"{tuple(slots[key].shape)}")
        slots[key].copy_(t)


def report_deviation_parts(server: Server, name: str, num: float, den: float) -> None:
    """Report D_t from its summed squared parts (``algebra.deviation_parts``): ``name`` the relative value,
    ``name + "_abs"`` the numerator."""
    server.report(f"{name}_abs", num ** 0.5)
    server.report(name, (num / den) ** 0.5 if den > 0 else 0.0)


class FederatedLoRA(Method):
    """Base of the federated-LoRA methods. Subclasses set the class attributes and ``aggregate``."""

    family = "federated-lora"
    heterogeneous = False             # one backbone for all clients (ranks may still differ)
    heterogeneous_ranks: ClassVar[bool] = False
    trains: ClassVar[tuple[str, ...]] = ("A", "B")   # factors a client trains
    sends: ClassVar[tuple[str, ...]] = ("A", "B")    # factors that travel (up and down)
    personalised: ClassVar[bool] = False              # no global model (D_t and global accuracy undefined)
    evaluations: ClassVar[tuple[str, ...]] = EVALUATIONS
    """The evaluation kinds the method has (shown by ``fedbench list methods`` and in the report):
    * ``"personalised"``: each client is scored on its own test split with the model it holds: its adapters
      (and head) as its last local training left them, on the backbone as it last downloaded it (merges
      made since are not counted: ``merge_log.client_view``); a client that never took part, its start;
    * ``"global"``: the server's model is scored on the union of the clients' test splits (undefined with
      ``--head local``: no global head).
    Default: both. A method without a global model (``personalised = True``) declares ``("personalised",)``;
    one without ``"personalised"`` would score its clients with the global model, which the report's
    personalised table marks."""
    routes_head: ClassVar[bool] = False               # a shared head travels inside the method's own payload

    Params = LoRAParams

    @classmethod
    def backbone_request(cls, p) -> dict:
        return {"name": p.backbone, "init": p.backbone_init, "model_path": p.model_path}

    @classmethod
    def check_config(cls, p, cfg) -> None:
        from fedbench.data.sources import TEXT_DATASETS
        from fedbench.lm import LM_BACKBONES
        if (p.backbone in LM_BACKBONES) != (cfg.dataset in TEXT_DATASETS):
            raise ConfigError(f"--backbone {p.backbone} with --dataset {cfg.dataset}: language backbones "
                              f"({', '.join(LM_BACKBONES)}) go with text datasets ({', '.join(TEXT_DATASETS)}), "
                              f"vision backbones with image datasets")
        ranks = parse_ranks(p, cfg.clients)
        if len(set(ranks)) > 1 and not cls.heterogeneous_ranks:
            from fedbench.registry import methods
            het = [n for n, m in methods().items() if getattr(m, "heterogeneous_ranks", False)]
            raise ConfigError(f"method {cls.name} needs one rank for all clients, --ranks {p.ranks!r} gives "
                              f"{min(ranks)}..{max(ranks)}; methods for heterogeneous ranks: {', '.join(het)}")

    @classmethod
    def check_backbone(cls, p, cfg, backbone) -> list[Target]:
        """Targets exist and every client's rank fits every target (before anything is stored)."""
        targets = find_targets(backbone, p.targets)
        r_max = max(parse_ranks(p, cfg.clients))
        bound = min(targets, key=lambda t: t.max_rank)
        if r_max > bound.max_rank:
            raise ConfigError(f"--rank {r_max} exceeds what layer {bound.name} allows: min(d_in, d_out) = "
                              f"{bound.max_rank}")
        return targets

    @classmethod
    def label(cls, p) -> str:
        ranks = f"r={p.rank}" if not p.ranks else f"ranks={p.ranks}"
        if p.ranks and hasattr(p, "rank_scaling"):
            ranks += f", scaling={p.rank_scaling}"
        return (f"{cls.display_name()} ({p.backbone}, {ranks}, alpha={p.lora_alpha}{', rsLoRA' if p.rslora else ''}, "
                f"targets={p.targets}, head={p.head}{', reference quirks' if p.reference_quirks else ''})")

    @classmethod
    def display_name(cls) -> str:
        return cls.name

    # --- set-up ----------------------------------------------------------------------------------
    def setup(self, server: Server, clients: list[Client]) -> None:
        hp = self.hp
        self.targets = self.check_backbone(hp, self.run, server.backbone)
        self.layers = inject(server.backbone, self.targets)
        self.ranks = parse_ranks(hp, len(clients))
        self.r_global = max(self.ranks)
        self.feature_dim = server.backbone.feature_dim
        self.server = server
        self.clients = clients
        self._ends: dict[int, dict[str, torch.Tensor]] = {}  # this round's client effective updates (D_t)
        self._merged: dict[str, torch.Tensor] = {}

    def spec(self, r: int):
        """The adapters of a rank-r party: PEFT's alpha / r at the global rank, else ``client_scaling``."""
        hp = self.hp
        s = self.client_scaling(r)
        if s == scaling(hp.lora_alpha, r, hp.rslora):
            return adapter_spec(self.targets, r, hp.lora_alpha, hp.rslora)
        return adapter_spec(self.targets, r, s * r, False)

    def client_scaling(self, r: int) -> float:
        """The scaling a rank-r client applies (``--rank-scaling``; alpha / r for the methods without it)."""
        return rank_scaling(self.hp, r, self.r_global)

    def head_spec(self):
        if getattr(self.server.backbone, "own_head", False):  # an LM's tied head: nothing to add, train or send
            return ModuleSpec.of("identity-head")
        return linear_spec(self.feature_dim, self.run.num_classes)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or the backbone's own (an LM's: mean over non-padding tokens)."""
        own = getattr(self.server.backbone, "task_loss", None)
        return own(logits, y) if own is not None else F.cross_entropy(logits, y)

    def client_init(self, client: Client) -> None:
        client.own("lora", self.spec(self.ranks[client.id]))
        if self.hp.head != "frozen":
            client.own("head", self.head_spec())

    def server_init(self, server: Server):
        server.own("lora", self.spec(self.r_global))
        server.own("head", self.head_spec())
        return {}

    # --- what travels ----------------------------------------------------------------------------
    def factors_of(self, party, which: tuple[str, ...], r: int | None = None) -> dict:
        """{"A": {key: r x d_in}, "B": {key: d_out x r}} of a party's adapters (truncated to rank r)."""
        ad = party.module("lora")
        out = {}
        for f in which:
            mods = ad.lora_A if f == "A" else ad.lora_B
            out[f] = {}
            for key, m in mods.items():
                w = m.weight.detach()
                if r is not None:
                    w = w[:r] if f == "A" else w[:, :r]
                out[f][key] = w.clone()
        return out

    def head_of(self, party) -> dict:
        return {k: v.detach().clone() for k, v in party.module("head").named_parameters()}

    def with_head(self, payload: dict, party) -> dict:
        """``payload`` plus the party's head when the head is shared (what every download/upload adds),
        unless the method routes it inside its own payload."""
        if self.hp.head == "shared" and not self.routes_head:
            payload["head"] = self.head_of(party)
        return payload

    def download(self, server: Server, client: Client, state):
        """The global factors this method sends, at the client's rank, and the head if it is shared."""
        payload = self.factors_of(server, self.sends, self.ranks[client.id])
        if self.hp.head == "shared":
            payload["head"] = self.head_of(server)
        return payload

    def upload(self, client: Client) -> dict:
        payload = self.factors_of(client, self.sends)
        if self.hp.head == "shared":
            payload["head"] = self.head_of(client)
        return payload

    @torch.no_grad()
    def install(self, party, payload: dict) -> None:
        """Copy a download into a party's modules. Strict: every tensor must land in a parameter of the
        same shape (a download that does not fit is an error, never silently dropped)."""
        for part, tensors in payload.items():
            if part in ("A", "B"):
                ad = party.module("lora")
                mods = ad.lora_A if part == "A" else ad.lora_B
                targets = {k: m.weight for k, m in mods.items()}
            elif part == "head":
                targets = dict(party.module("head").named_parameters())
            else:
                raise KeyError(f"{self.name}: download part {part!r} has no place on the client")
            copy_strict(self.name, part, targets, tensors)

    # --- local training --------------------------------------------------------------------------
    def head(self, party):
        return party.module("head") if self.hp.head != "frozen" else self.server.module("head")

    def forward(self, party, x: torch.Tensor) -> torch.Tensor:
        activate(self.layers, party.module("lora"))
        return self.head(party)(party.backbone.features(x))

    def trainable(self, client: Client) -> list[torch.nn.Parameter]:
        ad = client.module("lora")
        params = []
        if "A" in self.trains:
            params += list(ad.lora_A.parameters())
        if "B" in self.trains:
            params += list(ad.lora_B.parameters())
        if self.hp.head != "frozen":
            params += list(client.module("head").parameters())
        return params

    def correct_gradients(self, client: Client, opt: torch.optim.Optimizer) -> None:
        """Called before every optimiser step of local training (after backward and clipping): a method
        may change the gradients of the trainable parameters (ILoRA's control variates). Default: nothing
        (and no hook is registered)."""

    def train(self, client: Client) -> None:
        params = self.trainable(client)
        ad = client.module("lora")
        frozen = [p for p in ad.parameters() if all(p is not q for q in params)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            opt = client.optimizer(params)
            if type(self).correct_gradients is not FederatedLoRA.correct_gradients:
                opt.register_step_pre_hook(lambda o, args, kwargs: self.correct_gradients(client, o))
            for x, y in client.batches(self.run.epochs):
                client.step(opt, self.task_loss(self.forward(client, x), y))
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def client_update(self, client: Client, payload):
        self.install(client, payload)
        self.train(client)
        self._record_end(client)
        return self.upload(client)

    # --- all participants in one batched pass (engine option --client-batching) -------------------
    _STANDARD = ("train", "forward", "trainable", "client_update", "head", "correct_gradients")

    def batchable(self) -> bool:
        """Whether ``client_update_many`` trains jointly: only a method that keeps the family's standard
        local training (none of train, forward, trainable, client_update, head, correct_gradients
        overridden, by its class or on the instance) opts in; ILoRA's control variates, for one, act
        in a gradient hook the joint step does not run."""
        return all(getattr(getattr(self, n), "__func__", None) is getattr(FederatedLoRA, n) for n in self._STANDARD)

    @property
    def batching_pays(self) -> bool:
        """``--client-batching auto`` uses the joint pass: linear adapters only (batched matmuls); convolution
        adapters run one convolution per client segment, which was not faster on the CPU; and not where the
        backbone says it does not pay (``joint_pass_pays``: SmolLM2, whose tied 49,152-word head makes the
        joint pass memory-bound) (benchmarks/batched_round.py on
        the 2-core CPU: ViT 1.30x / 1.19x and char-lm 1.24x / 1.08x faster at 10 / 50 participants, SmolLM2
        0.61x at 10)."""
        return all(t.kind == "linear" for t in self.targets) and getattr(self.server.backbone, "joint_pass_pays", True)

    def client_update_many(self, clients: list[Client], payloads: list) -> list:
        """``client_update`` of every participant, trained jointly (fedbench/lora/batched.py): install each
        download, run all local trainings in one batched pass per step, then record and upload each.
        The same training as one by one; a method that is not ``batchable`` (or an optimiser the joint
        step does not implement) runs client by client, its MACs credited to each client."""
        settings = None
        if self.batchable() and clients:
            probe = torch.zeros(1, device=clients[0].device, requires_grad=True)
            settings = OptimSettings.of(clients[0].optimizer([probe]), self.run.clip)
        if settings is None:
            ups = []
            for c, p in zip(clients, payloads, strict=True):
                with joint_pass([(c, 1)]):
                    ups.append(self.client_update(c, p))
            return ups
        for c, p in zip(clients, payloads, strict=True):
            self.install(c, p)
        members = []
        own_head = getattr(self.server.backbone, "own_head", False)  # an LM's tied head: nothing trained
        for c in clients:
            ad = c.module("lora")
            factors = {k: (ad.lora_A[k].weight.detach(), ad.lora_B[k].weight.detach()) for k in ad.lora_A}
            head = None
            if self.hp.head != "frozen" and not own_head:
                h = c.module("head")
                head = (h.weight.detach(), h.bias.detach())
            members.append(Member(factors, ad.scaling, c.batches(self.run.epochs), self.local_steps_of(c),
                                  head, tag=c))
        JointTrainer(self.layers, clients[0].backbone.features, members, settings, trains=self.trains,
                     shared_head=self.server.module("head") if self.hp.head == "frozen" or own_head else None,
                     loss=self.task_loss, joint=joint_pass, credit=credit_macs).run()
        ups = []
        for c in clients:
            self._record_end(c)
            ups.append(self.upload(c))
        return ups

    # --- server ----------------------------------------------------------------------------------
    def aggregate(self, server: Server, uploads: list[Upload]) -> None:
        raise NotImplementedError

    def server_update(self, server: Server, uploads: list[Upload]):
        start = None if self.personalised else self.global_deltas(server)
        self._merged: dict[str, torch.Tensor] = {}
        self.aggregate(server, uploads)
        if self.hp.head == "shared" and uploads and not self.routes_head:
            self.average_heads(server, uploads)
        if not self.personalised:
            self.report_deviation(server, uploads, start)
        self._ends = {}
        return {}

    @torch.no_grad()
    def average_heads(self, server: Server, uploads: list[Upload]) -> None:
        head = dict(server.module("head").named_parameters())
        for k, p in head.items():
            p.copy_(algebra.weighted_sum([u.weight for u in uploads], [u.payload["head"][k] for u in uploads]))

    @torch.no_grad()
    def merge(self, key: str, delta: torch.Tensor) -> None:
        """Fold an update into the shared backbone's layer ``key`` (methods that merge: FLoRA, FedEx-LoRA)."""
        self.layers[key].merge(delta)
        self._merged[key] = self._merged.get(key, 0) + delta.detach().double()

    @torch.no_grad()
    def set_global(self, server: Server, A: dict | None = None, B: dict | None = None) -> None:
        ad = server.module("lora")
        for part, tensors in (("A", A), ("B", B)):
            if tensors is None:
                continue
            mods = ad.lora_A if part == "A" else ad.lora_B
            for key, t in tensors.items():
                w = mods[key].weight
                w.copy_(t.reshape(w.shape) if t.numel() == w.numel() else algebra.zero_pad(
                    t, w.shape[0 if part == "A" else 1], 0 if part == "A" else 1).reshape(w.shape))

    # --- metrics ---------------------------------------------------------------------------------
    @torch.no_grad()
    def global_deltas(self, server: Server) -> dict[str, torch.Tensor]:
        """s B A of the server's global adapters per target (float64)."""
        ad = server.module("lora")
        return {t.key: ad.delta(t.key).double() for t in self.targets}

    @torch.no_grad()
    def _record_end(self, client: Client) -> None:
        if self.personalised:
            return
        ad = client.module("lora")
        self._ends[client.id] = {t.key: ad.delta(t.key).double() for t in self.targets}

    @torch.no_grad()
    def report_deviation(self, server: Server, uploads: list[Upload], start: dict) -> None:
        ends = self._ends
        nxt = self.global_deltas(server)
        num = den = 0.0
        for t in self.targets:
            k = t.key
            ideal = sum(u.weight * ends[u.client][k] for u in uploads)
            glob = nxt[k] + self._merged.get(k, 0)
            num += algebra.frob2(glob - ideal)
            den += algebra.frob2(ideal - start[k])
        report_deviation_parts(server, "agg_deviation", num, den)

    # --- evaluation ------------------------------------------------------------------------------
    def predict(self, client: Client, x: torch.Tensor) -> torch.Tensor:
        return self.forward(client, x)

    def global_predict(self, server: Server, x: torch.Tensor) -> torch.Tensor | None:
        if self.personalised or self.hp.head == "local":
            return None
        activate(self.layers, server.module("lora"))
        return server.module("head")(server.backbone.features(x))

