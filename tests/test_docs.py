"""The documentation runs as written: every command in README.md and docs/*.md names a
module or script that exists, with flags it accepts; README.md stays a user's page.

Commands are collected from fenced shell blocks and from inline code spans: anything that
starts with `python -m drsformer_jax.X`, `python main.py`, `python -m pytest`,
`python tools/...`, `python tests/...` or `tools/....sh`. Each argparse CLI's parser is
captured once, by running the module as `__main__` until it parses its arguments (nothing
else runs); main.py's absl flags are read from its source, and `--config.a.b=v` overrides
are looked up in the config file the command names (configs/default.py when it names none).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import re
import runpy
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "data" / "README.md"]
README_LIMIT = 12 * 1024
CI_RUN = ROOT / ".ci" / "run"

START = re.compile(r"(?<![\w.-])(?:python -m drsformer_jax\.\w+|python -m pytest|python main\.py"
                   r"|python (?:tools|tests)/[\w/.-]+\.py|tools/[\w/.-]+\.sh)")
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE = re.compile(r"`([^`\n]+)`")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
LINK = re.compile(r"\]\(([^)\s]+)\)")
ABSL_BUILTINS = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok",
                 "only_check_args", "logtostderr", "alsologtostderr", "verbosity", "v"}


class _Parsed(BaseException):  # noqa: N818 -- not an error: carries the captured parser
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


# --- collecting the commands -----------------------------------------------------------------

def _candidates(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every shell line of a fenced block and every inline code span."""
    found, lang, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        fence = FENCE.match(line.strip())
        if fence or line.strip() == "```":
            lang = (fence.group(1) if fence else "") if lang is None else None
        elif lang is not None:
            if lang in SHELL_LANGS and not line.lstrip().startswith("#"):
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                found.append((number, line.strip().removeprefix("$ ")))
        else:
            found += [(number, span) for span in INLINE.findall(line)]
        i += 1
    return found


def _commands(text: str) -> list[tuple[int, str]]:
    """Every command in `text`, cut at `&&`, `;`, a spaced pipe or a closing quote."""
    out = []
    for number, line in _candidates(text):
        for match in START.finditer(line):
            rest = re.split(r" && | ; | \| |\"", line[match.start():])[0]
            out.append((number, rest.strip()))
    return out


def _all_commands() -> list[tuple[str, int, str]]:
    return [(page.relative_to(ROOT).as_posix(), number, command)
            for page in PAGES for number, command in _commands(page.read_text())]


def _tokens(command: str) -> list[str]:
    return [t.strip("[]()'\"`,") for t in command.split()]


# --- what each program accepts ---------------------------------------------------------------

def _capture(run) -> argparse.ArgumentParser | None:
    """The parser a program builds, stopped at its parse_args (None: it parses nothing)."""
    def stop(self, *args, **kwargs):
        raise _Parsed(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        try:
            run()
        except _Parsed as parsed:
            return parsed.parser
        except SystemExit:
            return None
    return None


@functools.cache
def _module_parser(module: str) -> argparse.ArgumentParser | None:
    with mock.patch.object(sys, "argv", [module]):
        return _capture(lambda: runpy.run_module(module, run_name="__main__"))


@functools.cache
def _script_parser(script: str) -> argparse.ArgumentParser | None:
    with mock.patch.object(sys, "argv", [script]):
        return _capture(lambda: runpy.run_path(str(ROOT / script), run_name="__main__"))


@functools.cache
def _main_py_flags() -> frozenset[str]:
    """The absl flags main.py defines (DEFINE_* and DEFINE_alias calls, first argument)."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "main.py").read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr.startswith("DEFINE") and node.args \
                and isinstance(node.args[0], ast.Constant):
            names.add(node.args[0].value)
    return frozenset(names)


@functools.cache
def _config(path: str):
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config()


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


# --- checking one command --------------------------------------------------------------------

def _check_argparse(parser: argparse.ArgumentParser | None, tokens: list[str],
                    where: str) -> list[str]:
    if parser is None:
        return [f"{where}: no argparse parser found"]
    problems, options = [], parser._option_string_actions
    for i, token in enumerate(tokens):
        if not token.startswith("-") or token in ("-", "--") or token[1:2].isdigit():
            continue
        name = token.split("=")[0]
        if name not in options:
            problems.append(f"{where}: unknown flag {name}")
            continue
        choices = options[name].choices
        value = token.split("=", 1)[1] if "=" in token else (
            tokens[i + 1] if i + 1 < len(tokens) else "")
        if choices and value and not value.startswith("-") and not value.isupper():
            bad = [v for v in value.split("|") if v not in choices]
            if bad:
                problems.append(f"{where}: {name} {'|'.join(bad)} not in {sorted(choices)}")
    return problems


def _check_main_py(tokens: list[str]) -> list[str]:
    problems, defined = [], _main_py_flags()
    config_file = "configs/default.py"
    for i, token in enumerate(tokens):
        if token == "--config" and i + 1 < len(tokens):
            config_file = tokens[i + 1].split(":")[0]
        elif token.startswith("--config="):
            config_file = token.split("=", 1)[1].split(":")[0]
    if not (ROOT / config_file).is_file():
        return [f"main.py: config file {config_file} does not exist"]
    for token in tokens:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=")[0]
        if name.startswith("config."):
            if not _has_field(_config(config_file), name.removeprefix("config.")):
                problems.append(f"main.py: {config_file} has no field {name[7:]}")
        elif name not in defined | ABSL_BUILTINS and name.removeprefix("no") not in defined:
            problems.append(f"main.py: unknown flag --{name}")
    return problems


def _check_pytest(tokens: list[str], pytestconfig) -> list[str]:
    problems = []
    for token in tokens[3:]:
        if token.startswith("-") and not token[1:2].isdigit():
            try:
                pytestconfig.getoption(token.split("=")[0])
            except ValueError:
                problems.append(f"pytest: unknown option {token}")
        elif token.startswith("tests/") and not (ROOT / token.split("::")[0]).exists():
            problems.append(f"pytest: {token} does not exist")
    return problems


def check_command(command: str, pytestconfig) -> list[str]:
    """What is wrong with `command` as written (empty: nothing)."""
    tokens = _tokens(command)
    if command.startswith("python -m pytest"):
        return _check_pytest(tokens, pytestconfig)
    if command.startswith("python main.py"):
        return _check_main_py(tokens[2:])
    if command.startswith("python -m "):
        module = tokens[2]
        if not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            return [f"{module}: no such module"]
        return _check_argparse(_module_parser(module), tokens[3:], module)
    script = tokens[1] if command.startswith("python ") else tokens[0]
    if not (ROOT / script).is_file():
        return [f"{script}: no such file"]
    if script.endswith(".sh"):
        text = (ROOT / script).read_text()
        return [f"{script}: {t} not in the script" for t in tokens[1:]
                if t.startswith("--") and t.split("=")[0] not in text]
    if script.startswith("tests/"):
        return []
    return _check_argparse(_script_parser(script), tokens[2:], script)


# --- the tests -------------------------------------------------------------------------------

COMMANDS = _all_commands()


@pytest.mark.parametrize("page,line,command", COMMANDS,
                         ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_command_runs_as_written(page, line, command, pytestconfig):
    assert not check_command(command, pytestconfig), (page, line, command)


def test_the_checker_finds_what_is_wrong(pytestconfig):
    def wrong(command):
        return bool(check_command(command, pytestconfig))

    assert not wrong("python -m drsformer_jax.derain --checkpoint C --input I --output O "
                     "[--tile-blend box|cosine]")
    assert wrong("python -m drsformer_jax.derain --checkpoint C --no-such-flag")
    assert wrong("python -m drsformer_jax.derain --checkpoint C --tile-blend diagonal")
    assert wrong("python -m drsformer_jax.no_such_tool --help")
    assert not wrong("python main.py --config configs/synthetic.py --workdir W "
                     "--config.dataset.synthetic.regime=light --mode evaluate")
    assert wrong("python main.py --config configs/synthetic.py --config.no_such_field=1")
    assert wrong("python main.py --config configs/synthetic.py --no_such_flag")
    assert wrong("python main.py --config configs/no_such_config.py --workdir W")
    assert wrong("python -m pytest -q --no-such-option")
    assert wrong("python tools/no_such_tool.py")
    assert wrong("tools/gpu_benchmark.sh --no-such-flag")
    assert len(COMMANDS) >= 20, "the collector found too few commands"
    assert "derain-and-the-compilation-cache" in _anchors(ROOT / "docs" / "performance.md")


def test_readme_is_a_page_a_user_reads():
    text = README.read_text()
    assert len(text.encode()) <= README_LIMIT, f"README.md is {len(text.encode())} bytes"
    ci_command = CI_RUN.read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in text, "README's test command is not .ci/run's"
    assert ("```bash\npip install -r requirements.txt && python main.py --config "
            "configs/synthetic.py --workdir /tmp/drsformer_synthetic\n```") in text


def test_no_paths_of_one_machine():
    found = [f"{page.relative_to(ROOT)}: {m}" for page in PAGES
             for m in re.findall(r"(?<![\w.])/(?:work|home|Users|root)/\S*", page.read_text())]
    assert not found, found


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces -."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path) if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
