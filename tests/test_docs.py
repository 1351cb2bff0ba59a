"""The documentation site's generated parts (docs/hooks.py): a page for every registered method, the
facts a method class declares, and a docstring for everything the API reference documents. The strict
build itself is `nox -s docs` (and .ci/run)."""

import dataclasses
import importlib.util
from pathlib import Path
from typing import ClassVar

import pytest

from fedbench import hparams
from fedbench.methods.lora_family import FederatedLoRA
from fedbench.registry import methods

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("fedbench_docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_registered_method_has_a_generated_page(hooks):
    pages = hooks.method_pages()
    registered = methods()
    assert set(pages) == {"methods/index.md"} | {f"methods/{n}.md" for n in registered}
    for name, cls in registered.items():
        page = pages[f"methods/{name}.md"]
        assert f"(`{name}`)" in page.splitlines()[0]
        assert hooks._cell(cls.paper) in page and f"fedbench run --method {name} --help" in page
        for f in dataclasses.fields(cls.Params):  # every hyper-parameter with its default
            assert f"| `{hparams.option_name(f.name)}` | {hparams.field_type(f).__name__} | `{f.default!r}` |" in page
        assert f"[`{name}`]({name}.md)" in pages["methods/index.md"]


def test_the_nav_lists_every_method_page(hooks):
    config = hooks.on_config({"nav": [{"Home": "index.md"}, {"Methods": "methods/index.md"}]})
    listed = config["nav"][1]["Methods"]
    assert listed[0] == "methods/index.md" and sorted(listed[1:]) == sorted(f"methods/{n}.md" for n in methods())


class _Probe(FederatedLoRA):
    """A method class declaring two facts that the base classes do not."""

    evaluations = ("personalised",)
    aggregation_rule: ClassVar[str] = "weighted mean"


def test_a_newly_declared_fact_appears_on_the_page(hooks):
    facts = hooks.declared_facts(_Probe)
    assert list(facts)[:3] == ["family", "paper", "code"]  # the titled facts first, in FACT_TITLES order
    assert facts["evaluations"] == ("personalised",) and facts["sends"] == ("A", "B")
    page = hooks.method_page("probe", _Probe)
    assert "| Evaluation kinds | personalised |" in page  # titled in FACT_TITLES
    assert "| aggregation\\_rule | weighted mean |" in page  # not titled yet: under its own name
    assert "| Travels (up and down) | A, B |" in page


def test_the_api_reference_modules_have_docstrings(hooks):
    modules = hooks.api_modules()
    assert {"fedbench.store", "fedbench.config", "fedbench.registry"} <= set(modules)
    for m in modules:
        assert hooks.undocumented(m) == [], m


def test_undocumented_finds_a_missing_docstring(hooks, monkeypatch):
    import fedbench.registry as registry

    def get_method(name):  # the real one, its docstring gone
        return None

    get_method.__module__ = "fedbench.registry"
    monkeypatch.setattr(registry, "get_method", get_method)
    assert hooks.undocumented("fedbench.registry") == ["fedbench.registry.get_method"]


def test_readme_links_resolve_and_reach_the_docs():
    import re

    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert "docs/index.md" in local and "docs/concepts/store.md" in local
    assert [link for link in local if not (ROOT / link).exists()] == []


def test_a_method_page_shows_its_reference_preset(hooks):
    from fedbench.presets import REFERENCES
    from fedbench.registry import get_method

    page = hooks.method_page("flasc", get_method("flasc"))
    assert "## Reference preset" in page and f"--rank {REFERENCES['flasc'].values['rank']}" in page
    assert "## Reference preset" not in hooks.method_page("fedavg", get_method("fedavg"))
