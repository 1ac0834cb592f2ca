"""Every command describes itself and every option says what it does and its default; every training command
lists the settings it accepts with their defaults; `config show` prints a resolved run."""

import argparse
from pathlib import Path

import pytest
import yaml

from tangle_ray.cli import build_parser, main
from tangle_ray.methods import METHODS

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "runs" / "tiny-cpu-tanglenas.yaml"


@pytest.mark.parametrize("command", sorted(m.command for m in METHODS.values()))
def test_help_lists_settings_with_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for line in ("steps = 6000", "optimizer.lr = 0.0005", "scaling.num_workers = 1", "zero_stage = 2", "data.*"):
        assert f"  {line}" in out, line


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", str(RECIPE), "steps=7", "optimizer.lr=1e-3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["steps"] == 7 and shown["optimizer"]["lr"] == 1e-3 and shown["space"] == "gpt-nano"
    assert shown["run"]["name"].startswith("gpt-nano-drnas-s0-")
    assert main(["config", "show", str(RECIPE), "stepz=7"]) == 2
    assert "unknown setting(s) ['stepz']" in capsys.readouterr().err


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser, its one-line help in the parent's list) of ``parser`` and every sub-command in it."""
    yield words, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                for found in _commands(sub, (*words, name)):
                    yield found if found[0] != (*words, name) else (found[0], found[1], listed.get(name))


COMMANDS = {" ".join(words) or "tangle-ray": (parser, line) for words, parser, line in _commands(build_parser())}


def test_every_command_is_found():
    assert {"tangle-ray", "search", "retrain", "evaluate", "tune", "export", "data", "data prepare", "data images",
            "data synth", "spaces"} <= set(COMMANDS)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _bare(text: str) -> str:
    """Without any whitespace: argparse wraps lines at spaces and after hyphens."""
    return "".join(text.split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_describes_itself_and_every_option_its_use_and_default(command):
    parser, line = COMMANDS[command]
    text = _bare(parser.format_help())  # formats every help string: a stray % would fail here
    assert parser.description and parser.description.strip(), f"{command}: no description"
    assert _bare(parser.description) in text
    if line is not None:  # a sub-command: `tangle-ray --help` lists it with the line atop its own --help
        assert line.strip() and _flat(parser.description) == _flat(line)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name}: no help text"
        shown = _flat(formatter._expand_help(action))
        assert _bare(shown) in text, f"{command} {name}: help not shown"
        if action.option_strings and not action.required:
            assert "(default" in shown, f"{command} {name}: its default is not shown: {shown!r}"
            if action.default not in (None, False, ""):
                assert f"(default: {action.default})" in shown, f"{command} {name}: {shown!r}"


def test_the_settings_table_keeps_its_lines():
    help_text = COMMANDS["search"][0].format_help()
    assert "\n  steps = 6000\n" in help_text and "\n  optimizer.lr = 0.0005\n" in help_text


def test_evaluate_says_what_it_reports():
    line = _flat(COMMANDS["evaluate"][1])
    for metric in ("loss", "perplexity", "top-1", "top-5", "parameter"):
        assert metric in line, metric


def test_verbose_names_where_the_output_goes():
    def verbose(command: str) -> str:
        action = next(a for a in COMMANDS[command][0]._actions if a.option_strings == ["--verbose"])
        return _flat(action.help)

    assert "RUN/logs/" in verbose("search") and "RUN/logs/" in verbose("demo")
    assert "RUN/logs/" not in verbose("tune") and "session_latest/logs/" in verbose("tune")
    assert "verbose=1..3" in verbose("tune")  # Tune's tables are a search-file setting, not --verbose
