"""RunConfig: every choice of a run, checked before any work starts, hashed for identity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from fedbench import hparams
from fedbench.data.partition import PARTITIONERS, partitioner_for
from fedbench.data.sources import DATASETS, TEXT_DATASETS, dataset_info
from fedbench.data.transforms import AUGMENTATIONS
from fedbench.errors import ConfigError
from fedbench.hparams import hparam, late_defaults
from fedbench.models.cnn import MODEL_GROUPS
from fedbench.presets import PRESETS, apply_preset

AGG_WEIGHTS = ("all-splits", "train", "uniform")
DATA_ORDERS = ("reshuffle", "fixed")
# Evaluation protocols (docs/concepts/protocols.md; spec A.5): who is evaluated, when, with which model.
#   yi:        the round's participants right after their local training, the model as trained (pFedLoRA authors)
#   pfllib:    every client after the round's aggregation, as it stands after receiving the broadcast, before
#              local training (PFLlib/HtFLlib: the start of the next round)
#   round-end: every client after the round's aggregation and push, as it stands (fedbench before protocols)
EVAL_PROTOCOLS = ("yi", "pfllib", "round-end")
LEGACY_PROTOCOL = "round-end"  # the protocol of every run stored before protocols were named
# --eval-protocol auto: the family's published comparison (MHPFL: the pFedLoRA authors' yi; federated LoRA:
# round-end, the protocol of its reference report)
FAMILY_PROTOCOL = {"mhpfl": "yi", "federated-lora": "round-end"}


@dataclass(frozen=True)
class RunConfig:
    """The protocol of a run. Defaults follow the spec's protocol (A.4) unless noted."""

    method: str = hparam("fedlora", "federated method (see `fedbench list methods`)")
    dataset: str = hparam("cifar10", "dataset", choices=tuple(DATASETS))
    partition: str = hparam("pathological", "how data is split among clients", choices=PARTITIONERS)
    classes_per_client: int = hparam(0, "pathological: classes per client (0 = dataset default: 2 for CIFAR-10, "
                                        "10 for CIFAR-100)", low=0)
    share_low: float = hparam(0.4, "pathological: lower bound of the U(low, 0.6) class shares (LowProb)",
                              low=0.0, high=0.6, low_open=True, high_open=True)
    alpha: float = hparam(0.1, "dirichlet: concentration alpha", low=0.0, low_open=True)
    min_size: int = hparam(10, "dirichlet: minimum training samples per client (bounded redraws)", low=1)
    val_fraction: float = hparam(0.2, "fraction of the training set held out as validation (40k/10k on CIFAR)",
                                 low=0.0, high=1.0, high_open=True)
    clients: int = hparam(10, "number of clients N", low=1)
    fraction: float = hparam(1.0, "fraction C of clients sampled per round", low=0.0, high=1.0, low_open=True)
    rounds: int = hparam(500, "communication rounds T", low=1)
    epochs: int = hparam(1, "local epochs E per round", low=1)
    batch_size: int = hparam(64, "local batch size", low=1)
    optimizer: str = hparam("sgd", "local optimiser: sgd (momentum, weight decay below) or adamw (weight decay "
                                   "below, torch's betas)", choices=("sgd", "adamw"))
    lr: float = hparam(0.01, "local learning rate", low=0.0, low_open=True)
    lr_schedule: str = hparam("constant", "learning rate over rounds: constant, or cosine from --lr at round 1 "
                                          "to --lr-min at the last", choices=("constant", "cosine"))
    lr_min: float = hparam(0.0, "cosine schedule: learning rate of the last round", low=0.0)
    local_steps: int = hparam(0, "local batches per training pass instead of --epochs (0 = use epochs)", low=0)
    data_order: str = hparam("reshuffle", "order of a client's training samples: reshuffle (a new seeded permutation "
                                          "every epoch) or fixed (the partition's order, ascending dataset index, the "
                                          "same every epoch and round: HtFLlib's unshuffled client loaders, for "
                                          "cross-library checks)", choices=DATA_ORDERS)
    momentum: float = hparam(0.9, "SGD momentum", low=0.0, high=1.0, high_open=True)
    weight_decay: float = hparam(1e-3, "SGD weight decay", low=0.0)
    clip: float = hparam(50.0, "gradient-norm clip (0 = off)", low=0.0)
    models: str = hparam("hetero", "client models: hetero (client i gets CNN-(i mod 5 + 1)) or one CNN for all",
                         choices=MODEL_GROUPS)
    same_init: bool = hparam(False, "identical initial weights for clients of one architecture (HtFLlib habit)")
    augment: str = hparam("spec", "training augmentation: spec (flip, erase, crop as the authors' code), "
                                  "flip-crop, none", choices=AUGMENTATIONS)
    agg_weight: str = hparam("all-splits", "aggregation weight n_k: all-splits (train+val+test, the authors' "
                                           "code), train, uniform", choices=AGG_WEIGHTS)
    eval_every: int = hparam(1, "evaluate all clients every this many rounds (and at the last round)", low=1)
    eval_protocol: str = hparam("auto", "evaluation protocol: yi (participants right after local training), "
                                        "pfllib (all clients after the broadcast, before training), round-end "
                                        "(all clients after the round, as they stand), auto (MHPFL: yi; "
                                        "federated LoRA: round-end)", choices=("auto", *EVAL_PROTOCOLS))
    eval_val: bool = hparam(False, "also evaluate on each client's validation split, at the protocol's moment "
                                   "(the validation-selected round of `fedbench report --statistic val`)")
    eval_batch_size: int = hparam(2048, "evaluation batch size (does not change results)", low=1)
    precision: str = hparam("fp32", "client compute precision: fp32, or bf16 autocast (parameters stay fp32)",
                            choices=("fp32", "bf16"))
    channels_last: bool = hparam(False, "channels-last memory format for images and conv weights: the same "
                                        "math in another summation order")
    fused_sgd: bool = hparam(False, "SGD as one fused kernel per step (torch's fused=True): the same update to "
                                    "float rounding (a few values in a million differ by 1 ulp), 2-4x faster steps")
    seq_len: int = hparam(64, "language tier: tokens per training/evaluation window", low=2)
    test_fraction: float = hparam(0.2, "language tier: the last fraction of each role's lines held out as its test "
                                       "split", low=0.0, high=1.0, low_open=True, high_open=True)
    eval_initial: bool = hparam(False, "also evaluate every client and the global model before round 1's training "
                                       "(initial_* metrics of round 1: the starting point)")
    min_role_lines: int = hparam(40, "language tier: roles with fewer lines are no client", low=2)
    seed: int = hparam(42, "master seed: partition, initialisation, sampling, data order, augmentation")
    partition_digest: str = hparam("", "the imported partition a run uses, by its digest (set from --partition-file; "
                                       "the partition and validation options above then do not apply)")
    preset: str = hparam("common", "settings preset: common (the benchmark's one setting for all methods) or "
                                   "reference (each federated-LoRA method as its official code or paper sets it; "
                                   "options given beside it win; see `fedbench list methods`)", choices=PRESETS)
    method_params: dict = field(default_factory=dict)

    # -- identity --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data, ``method_params`` sorted by name."""
        d = dataclasses.asdict(self)
        d["method_params"] = dict(sorted(self.method_params.items()))
        return d

    def canonical_json(self) -> str:
        """The identity of a run. Fields added after results were first stored (LATE_FIELDS) are left out
        while at their default, so that every earlier run keeps its id."""
        d = self.to_dict()
        for k in LATE_FIELDS:
            if d[k] == CORE_FIELDS[k].default:
                del d[k]
        for k, default in late_defaults(self.method_class().Params).items():  # late method options, likewise
            if d["method_params"].get(k, default) == default:
                d["method_params"].pop(k, None)
        if d["eval_protocol"] == LEGACY_PROTOCOL:  # what every run stored before protocols had a name
            del d["eval_protocol"]
        revision = self.method_class().rule_revision
        if revision:  # the method's rule was fixed since runs of revision 0 were stored
            d["method_revision"] = revision
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def run_hash(self, data_digest: str) -> str:
        """The run id: sha256 of the canonical JSON and the data's digest, first 16 hex digits."""
        h = hashlib.sha256((self.canonical_json() + "|" + data_digest).encode())
        return h.hexdigest()[:16]

    @property
    def num_classes(self) -> int:
        """Classes of the run's dataset."""
        return dataset_info(self.dataset).num_classes

    @property
    def protocol(self) -> str:
        """The evaluation protocol, ``auto`` resolved by the method's family (make_config stores it resolved)."""
        if self.eval_protocol != "auto":
            return self.eval_protocol
        return FAMILY_PROTOCOL[self.method_class().family]

    @property
    def per_round(self) -> int:
        """Clients sampled per round: fraction x clients, at least 1."""
        return max(1, int(self.fraction * self.clients))

    def method_class(self):
        """The registered method class of ``method``."""
        from fedbench.registry import get_method
        return get_method(self.method)


CORE_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "method_params"}
LATE_FIELDS = ("fused_sgd", "optimizer", "lr_schedule", "lr_min", "local_steps", "seq_len", "test_fraction",
               "min_role_lines", "eval_initial", "eval_val", "partition_digest", "preset", "data_order")

# Defaults that depend on the device a run is made on, applied when the user leaves the option unset
# and stored concretely in the config (so a run's identity never depends on where it is looked up).
# Each entry is decided by benchmarks/speed.py (gain) and an accuracy-parity sweep on real CIFAR-10
# (benchmarks/parity-cifar10.toml: within 1 point of the plain path); see benchmarks/README.md.
# CPU: channels_last trains the CNNs 1.2-1.4x and evaluates them ~2x faster in fp32; fused SGD steps
# 2-4x faster. CUDA: not measured yet, so the plain paths. bf16 is nowhere a default: no measured device
# has shown both gain and parity.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"channels_last": True, "fused_sgd": True},
    "cuda": {},
}
DEVICE_DEFAULT_FIELDS = sorted({k for d in DEVICE_DEFAULTS.values() for k in d})


def make_config(values: dict[str, Any], device_type: str | None = None) -> RunConfig:
    """Build and check a RunConfig from user values (core options and method options mixed).

    ``device_type`` ("cpu", "cuda"): fill options the user left unset from DEVICE_DEFAULTS; without it
    the dataclass defaults apply. Raises ConfigError (one line, naming the bad value and what is
    allowed) on anything wrong.
    """
    from fedbench.registry import get_method

    values = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
    values = apply_preset(values)
    if device_type is not None:
        values = {**DEVICE_DEFAULTS.get(device_type, {}), **values}
    core = {k: v for k, v in values.items() if k in CORE_FIELDS}
    rest = {k: v for k, v in values.items() if k not in CORE_FIELDS}
    method_name = core.get("method", CORE_FIELDS["method"].default)
    if not isinstance(method_name, str):
        raise ConfigError(f"--method must be a method name, got {method_name!r}")
    method_cls = get_method(method_name)
    clash = sorted({f.name for f in dataclasses.fields(method_cls.Params)} & set(CORE_FIELDS))
    if clash:
        raise ConfigError(f"method {method_name} declares option {hparams.option_name(clash[0])}, which is a run "
                          f"option; the plugin must rename it")
    if core.get("dataset") in TEXT_DATASETS:  # naturally partitioned: the data's own clients
        core.setdefault("partition", "natural")
    checked = {k: hparams.coerce(CORE_FIELDS[k], v, "run") for k, v in core.items()}
    mp = hparams.build(method_cls.Params, rest, f"method {method_name}")
    if checked.get("eval_protocol", "auto") == "auto":
        checked["eval_protocol"] = FAMILY_PROTOCOL[method_cls.family]
    cfg = RunConfig(**checked, method_params=dataclasses.asdict(mp))
    check_method = getattr(method_cls, "check_config", None)
    if check_method is not None:
        check_method(mp, cfg)
    info = dataset_info(cfg.dataset)
    K = info.num_classes
    if cfg.classes_per_client == 0:
        cfg = dataclasses.replace(cfg, classes_per_client=info.default_classes_per_client)
    partitioner_for(cfg).check(K, cfg.dataset)
    if (cfg.dataset in TEXT_DATASETS) != (cfg.partition == "natural"):
        raise ConfigError(f"--partition {cfg.partition} with --dataset {cfg.dataset}: the natural partition is "
                          f"that of the naturally partitioned datasets ({', '.join(TEXT_DATASETS)}), and theirs only")
    if cfg.eval_protocol == "pfllib" and method_cls.family != "mhpfl":
        raise ConfigError(f"--eval-protocol pfllib with method {method_name}: defined for the MHPFL family only (a "
                          f"federated-LoRA download may touch the shared backbone); use yi or round-end")
    if cfg.eval_val and (cfg.val_fraction == 0 or cfg.dataset in TEXT_DATASETS):
        raise ConfigError(f"--eval-val with --dataset {cfg.dataset} --val-fraction {cfg.val_fraction}: there is no "
                          f"validation split to evaluate (image datasets with --val-fraction > 0 have one)")
    if cfg.partition_digest and not re.fullmatch(r"[0-9a-f]{16}", cfg.partition_digest):
        raise ConfigError(f"--partition-digest {cfg.partition_digest!r} is no partition digest (16 lowercase hex digits; "
                          f"--partition-file FILE sets it)")
    if cfg.partition_digest and cfg.dataset in TEXT_DATASETS:
        raise ConfigError(f"--dataset {cfg.dataset} is partitioned by its own clients; a partition file is for the "
                          f"image datasets")
    if int(cfg.fraction * cfg.clients) < 1:
        raise ConfigError(f"--fraction {cfg.fraction} with --clients {cfg.clients} samples no client per round; "
                          f"need fraction x clients >= 1")
    if cfg.lr_schedule == "cosine" and cfg.lr_min > cfg.lr:
        raise ConfigError(f"--lr-min {cfg.lr_min} exceeds --lr {cfg.lr}; the cosine schedule decays from --lr")
    if method_cls.family == "mhpfl" and not method_cls.heterogeneous and cfg.models == "hetero":
        raise ConfigError(f"method {method_name} needs one architecture for all clients; "
                          f"use --models cnn1 (or cnn2..cnn5), not --models hetero")
    return cfg


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """The RunConfig of a stored ``to_dict()`` (as in the results store or a sweep worker's --config)."""
    d = dict(d)
    d.setdefault("eval_protocol", LEGACY_PROTOCOL)  # stored before protocols were named: today's round-end
    mp = d.pop("method_params", {})
    return make_config({**d, **mp})


def stored_config_dict(config_json: str) -> dict[str, Any]:
    """A stored config (``runs.config_json``) with every option: the store leaves options added later out
    while at their default. As stored where the config no longer builds (its method is not registered)."""
    raw = json.loads(config_json)
    try:
        return config_from_dict(raw).to_dict()
    except ConfigError:
        return raw


def training_key(cfg: RunConfig) -> str:
    """What a run trains, its evaluation protocol left out: runs with one key train identically (evaluation
    consumes no random stream), so one training can be evaluated under each of their protocols."""
    d = json.loads(cfg.canonical_json())
    d.pop("eval_protocol", None)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def sibling_config(cfg: RunConfig, protocol: str) -> RunConfig:
    """``cfg`` evaluated under ``protocol`` instead (checked as the user's own would be)."""
    return config_from_dict({**cfg.to_dict(), "eval_protocol": protocol})


def config_to_cli(cfg: RunConfig) -> str:
    """The `fedbench run` command that reproduces ``cfg`` exactly, on any device: non-default options,
    and the device-dependent ones (DEVICE_DEFAULT_FIELDS) always."""
    defaults = RunConfig()
    parts = ["fedbench", "run"]
    method_defaults = dataclasses.asdict(cfg.method_class().Params())
    items = [(k, getattr(cfg, k), getattr(defaults, k)) for k in CORE_FIELDS]
    items += [(k, v, method_defaults.get(k)) for k, v in sorted(cfg.method_params.items())]
    for k, v, d in items:
        if k == "method" or v != d or k in DEVICE_DEFAULT_FIELDS:
            opt = hparams.option_name(k)
            if isinstance(v, bool):
                parts.append(opt if v else f"--no-{opt[2:]}")
            else:
                parts += [opt, str(v)]
    return " ".join(parts)


def method_params_obj(cfg: RunConfig):
    """The method's ``Params`` instance of the config's ``method_params``."""
    cls = cfg.method_class()
    return cls.Params(**cfg.method_params)
