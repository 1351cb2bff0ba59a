"""`fedbench run --help`: options in panels, one method's options with --method, shell completion."""

import dataclasses
import re

import pytest

from fedbench.cli import FIRST_PANEL_OPTIONS, RUN_ONLY, RUN_PANELS, main
from fedbench.config import CORE_FIELDS
from fedbench.registry import methods


def _help(capsys, monkeypatch, *args) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # wide enough that no option name is cut short
    with pytest.raises(SystemExit) as e:
        main(["run", *args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def _panels(text: str) -> list[str]:
    return re.findall(r"╭─ (.+?) ─", text)


def test_every_run_option_is_in_one_panel():
    listed = [n for names in RUN_PANELS.values() for n in names]
    assert len(listed) == len(set(listed)), "an option in two panels"
    assert set(listed) | set(FIRST_PANEL_OPTIONS) == set(CORE_FIELDS) | set(RUN_ONLY)
    assert not set(listed) & set(FIRST_PANEL_OPTIONS)


def test_run_help_groups_options_in_panels(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    panels = _panels(text)
    assert panels[:6] == ["Options", "Data and partition", "Federation", "Local training", "Evaluation",
                          "Execution"]
    assert "Backbone and adapters (every federated-LoRA method)" in panels
    assert "Method fedkd" in panels and "Methods fd, fedproto" in panels  # --lam: both declare it
    every = {"--" + f.name.replace("_", "-") for cls in methods().values() for f in dataclasses.fields(cls.Params)}
    assert every <= _options(text)  # without --method: every method's options
    # one option declared by 20 methods with one default: its default once, not 20 times
    backbone = text[text.index("--backbone "):text.index("--backbone-init")]
    assert "(default: vit)" in " ".join(backbone.split()).replace("│", "")


@pytest.mark.parametrize("form", [["--method", "fedkd"], ["--method=fedkd"]])
def test_run_help_of_one_method_shows_its_options_only(capsys, monkeypatch, form):
    full = _help(capsys, monkeypatch)
    text = _help(capsys, monkeypatch, *form)
    fedkd = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(methods()["fedkd"].Params)}
    core = {"--" + n.replace("_", "-") for n in CORE_FIELDS}
    shown = _options(text)
    assert fedkd <= shown and core <= shown
    others = {"--" + f.name.replace("_", "-") for name, cls in methods().items() if name != "fedkd"
              for f in dataclasses.fields(cls.Params)} - fedkd
    assert others and not (others & shown), sorted(others & shown)
    assert _panels(text)[-1] == "Method fedkd"
    assert len(text.splitlines()) < len(full.splitlines()) / 2


def test_run_help_of_a_lora_method_puts_the_family_options_in_their_panel(capsys, monkeypatch):
    text = _help(capsys, monkeypatch, "--method", "flasc")
    panels = _panels(text)
    assert panels[-2:] == ["Backbone and adapters (every federated-LoRA method)", "Method flasc"]
    flasc_panel = text[text.index("╭─ Method flasc"):]
    assert {"--flasc-down", "--flasc-up", "--server-opt", "--server-lr"} <= _options(flasc_panel)
    assert "--rank" not in _options(flasc_panel) and "--rank" in _options(text)
    assert "--energy-start" not in _options(text)


def test_run_help_of_an_unknown_method_is_one_line_exit2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--method", "fedkdd", "--help"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedbench: error: unknown method 'fedkdd'")


@pytest.mark.parametrize("words,cword,expected", [
    ("fedbench ru", 1, {"run"}),
    ("fedbench run --method fedk", 3, {"fedkd"}),
    ("fedbench run --dataset cifar", 3, {"cifar10", "cifar100"}),
    ("fedbench run --energy-s", 2, {"--energy-start"}),
])
def test_shell_completion(capsys, monkeypatch, words, cword, expected):
    monkeypatch.setenv("_FEDBENCH_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(cword))
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 0
    assert set(capsys.readouterr().out.split()) == expected
