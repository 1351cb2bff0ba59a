"""MkDocs hooks of fedbench's documentation site (docs/mkdocs.yml, `nox -s docs`).

* One page per registered method, generated at build time from the registry (so it cannot drift):
  its declared facts (every ``ClassVar`` a method class declares: paper, official code, family, what
  travels...), its module and class docstrings, and its hyper-parameters with defaults, ranges and
  source markers. They join the nav under "Methods".
* The API reference (docs/api.md, ``::: module`` lines for mkdocstrings) must document every public
  function, class and method: each one without a docstring is a warning, which fails a strict build.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
METHODS_DIR = "methods"
log = logging.getLogger("mkdocs.plugins.fedbench")

# How a method's declared facts are titled on its page, in this order. This is the one place to name a
# new fact: a ClassVar added to a method base class (a reference preset, an evaluation kind...) appears
# on every page by itself, under its attribute name until it is given a title here.
FACT_TITLES = {
    "family": "Family",
    "paper": "Paper",
    "code": "Official code",
    "heterogeneous": "Heterogeneous client models",
    "heterogeneous_ranks": "Heterogeneous ranks",
    "push": "Server sends to",
    "trains": "Client trains",
    "sends": "Travels (up and down)",
    "personalised": "Personalised only (no global model)",
    "evaluations": "Evaluation kinds",
    "rule_revision": "Rule revision (fidelity fixes since the first stored runs)",
}
NOT_FACTS = ("name",)  # ClassVars that are not facts about the method (the name is the page's title)


def declared_facts(cls) -> dict[str, object]:
    """Every ClassVar declared on the method's classes (base classes first), with the method's value."""
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        for attr, ann in vars(klass).get("__annotations__", {}).items():
            if "ClassVar" in str(ann) and attr not in NOT_FACTS:
                names[attr] = None
    ordered = [a for a in FACT_TITLES if a in names] + [a for a in names if a not in FACT_TITLES]
    return {a: getattr(cls, a) for a in ordered}


def _fact_text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value)) if value else "nothing"
    if value in ("", None):
        return "not recorded"
    return str(value)


def _cell(text) -> str:
    """Plain text in a Markdown table cell: pipes and brackets (``[a, b]`` ranges, factor stacks) escaped."""
    text = str(text).replace("\\", "\\\\")
    for ch in "|[]*_<":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def page_name(method: str) -> str:
    return f"{METHODS_DIR}/{method}.md"


def method_page(name: str, cls) -> str:
    """The Markdown page of one registered method."""
    from fedbench import hparams

    title = cls.display_name() if hasattr(cls, "display_name") else name
    lines = [f"# {title} (`{name}`)", "", "| fact | as declared by the method class |", "| --- | --- |"]
    for attr, value in declared_facts(cls).items():
        lines.append(f"| {_cell(FACT_TITLES.get(attr, attr))} | {_cell(_fact_text(value))} |")
    lines += ["", f"Run it: `fedbench run --method {name}`; its options: `fedbench run --method {name} --help`.", ""]
    from fedbench.presets import describe as describe_preset

    preset = describe_preset(name)
    if preset:  # the method as published: `--preset reference`
        lines += ["## Reference preset", "", "`fedbench run --method " + name + " --preset reference` sets:", "",
                  "```text", *(line.strip() for line in preset), "```", ""]
    module_doc = inspect.getdoc(sys.modules[cls.__module__])
    class_doc = cls.__doc__ and inspect.cleandoc(cls.__doc__)
    docs = [d for d in (module_doc, class_doc) if d]
    if docs:  # as written in the source: algorithm boxes and formulas ([B, B0]...) are plain text
        lines += ["## From the source", "", f"`{cls.__module__}`:", "", '<div class="method-source" markdown>', "",
                  "```text", *"\n\n".join(docs).splitlines(), "```", "", "</div>", ""]
    from fedbench.methods.lora_family import FederatedLoRA

    fields = dataclasses.fields(cls.Params)
    family = {f.name for f in dataclasses.fields(FederatedLoRA.Params)} if issubclass(cls, FederatedLoRA) else set()
    lines += ["## Hyper-parameters", ""]
    if not fields:
        lines += ["None beyond the run options.", ""]
    for heading, group in (("Shared by every federated-LoRA method (backbone and adapters)",
                            [f for f in fields if f.name in family]),
                           (f"Of {name} itself" if family else "", [f for f in fields if f.name not in family])):
        if not group:
            continue
        if heading:
            lines += [f"### {heading}", ""]
        lines += ["| option | type | default | allowed | source | meaning |", "| --- | --- | --- | --- | --- | --- |"]
        for f in group:
            lines.append(f"| `{hparams.option_name(f.name)}` | {hparams.field_type(f).__name__} | `{f.default!r}` | "
                         f"{_cell(hparams.describe_range(f))} | {_cell(f.metadata.get('marker', ''))} | "
                         f"{_cell(f.metadata['help'])} |")
        lines.append("")
    return "\n".join(lines)


def methods_index(methods: dict) -> str:
    """The Methods section's first page: every registered method by family, linked to its page."""
    lines = ["# Methods", "", "Generated from the method registry when the site is built (`docs/hooks.py`): every "
             "registered method, the plugins of `baselines/` included. See [families](../concepts/families.md).", ""]
    for family in sorted({c.family for c in methods.values()}):
        lines += [f"## {family}", "", "| method | paper | official code |", "| --- | --- | --- |"]
        for name, cls in methods.items():
            if cls.family == family:
                lines.append(f"| [`{name}`]({name}.md) | {_cell(cls.paper)} | {_cell(_fact_text(cls.code))} |")
        lines.append("")
    return "\n".join(lines)


def method_pages() -> dict[str, str]:
    """Every generated page: path under the docs dir -> Markdown."""
    sys.path.insert(0, str(ROOT))
    from fedbench.registry import methods

    registered = methods()
    pages = {f"{METHODS_DIR}/index.md": methods_index(registered)}
    pages.update({page_name(n): method_page(n, cls) for n, cls in registered.items()})
    return pages


# --- the API reference's docstrings -------------------------------------------------------------
def api_modules(api_page: Path = DOCS / "api.md") -> list[str]:
    """The modules docs/api.md documents (its ``::: module`` lines)."""
    return re.findall(r"^:::\s*([\w.]+)\s*$", api_page.read_text(), flags=re.M)


def undocumented(module_name: str) -> list[str]:
    """Public functions, classes, methods and properties defined in the module without a docstring."""
    sys.path.insert(0, str(ROOT))
    mod = importlib.import_module(module_name)
    missing = []
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if not obj.__doc__:
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if not attr.startswith("_") and inspect.isfunction(fn) and not fn.__doc__:
                    missing.append(f"{module_name}.{name}.{attr}")
    return missing


# --- MkDocs events ------------------------------------------------------------------------------
def on_config(config):
    """Put the generated method pages in the nav's "Methods" section."""
    pages = [p for p in method_pages() if not p.endswith("index.md")]
    for i, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and "Methods" in entry:
            config["nav"][i] = {"Methods": [f"{METHODS_DIR}/index.md", *pages]}
    return config


def on_files(files, config):
    """Add the generated method pages to the site, and check the API reference's docstrings."""
    from mkdocs.structure.files import File

    for path, text in method_pages().items():
        files.append(File.generated(config, path, content=text))
    for module in api_modules():
        for name in undocumented(module):
            log.warning(f"API reference: {name} has no docstring")
    return files
