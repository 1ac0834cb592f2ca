"""The docs' commands and snippets work as written (issue 22): README.md, docs/*.md and recipes/cluster/README.md.

**Marked blocks run.** A fenced block runs when the line above it closes a marker comment::

    <!-- test-snippet: what the test does with this block
    search retrain: steps=2 scaling.num_workers=1
    -->

(or one line, ``<!-- test-snippet: ... -->``, when nothing is appended). Each line after the first names
sub-commands and the words the test appends to every ``tangle-ray`` command of the block with that sub-command:
settings that shrink a run to seconds, or ``--dry-run``. So the text a reader sees is exactly the command the reader
runs; the test only adds tiny settings at its end.

- ```` ```python ```` blocks run in a fresh Python process in an empty folder of a plain clone (no
  ``TANGLE_RAY_GPT2_BPE``), offline.
- ```` ```bash ```` blocks run line by line as a reader types them (``\\`` continues a line, ``#`` starts a comment,
  ``&&`` chains commands): every ``tangle-ray`` command through the CLI's own ``main`` in this process, in an empty
  folder beside links to the repository's ``recipes/`` and ``spaces/`` (nothing is written into the clone),
  offline. A command of another program (``pip install``) must be in ``FOREIGN``, with why it does not run here.
  Blocks with a command that starts Ray run in one test marked ``ray`` (``test_ray_blocks_run``: one local Ray
  cluster of 2 CPUs for all of them), the others in ``test_blocks_without_ray_run``. In each, the blocks run in one
  folder in document order (README.md, then docs/*.md by name), as one reader who follows them: docs/tune.md's
  block uses the tokens of the README's.

**Everything else is checked without running.** A fenced block with ``tangle-ray`` commands and no marker must be in
``NOT_RUN`` with the reason it cannot run on a 2-core CPU machine without network. Its ``tangle-ray`` commands, and
every inline ``tangle-ray ...`` span of the docs, go through the CLI's parser and then its own checks without Ray:
``main`` runs the command with the functions that would start work (``run_training``, ``run_search``, Ray's
``connect``, the scaling and campaign runs) replaced by a stop, so the run file, settings, the method's checks and
the cluster check's run are read exactly as the command reads them; ``scale`` and ``campaign`` run as ``--dry-run``;
``config show`` and ``spaces`` run as they are. Commands that read what earlier runs wrote (``export``,
``evaluate``, ``data``, ``demo``) are parsed and their options checked; each of them runs in a marked block too.
Placeholders (``RUN.yaml``, ``DIR``, ``[--out DIR]``, ``a|b``) become tiny recipes and folders (``PLACEHOLDERS``); a
span elided with ``...`` must name a command and only options it has. ``EXCLUDED`` lists the spans that are no
command of tangle-ray, with why. Python blocks without a marker: what they import from tangle_ray exists.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tangle_ray.cli import build_parser, main
from tangle_ray.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "recipes" / "cluster" / "README.md"]
MARKER = "<!-- test-snippet"
# the Python blocks that must stay marked: a marker lost in an edit fails here instead of silently testing less
EXPECTED = {("docs/data.md", "Quick start (offline)"), ("docs/data.md", "Images > Quick start (offline)")}

# commands of other programs in the docs' blocks, and why they do not run here
FOREIGN = {
    ("pip", "install"): "installs packages (from the network) into the environment under test",
    ("python", "-m", "pytest"): "the whole suite, 35 minutes, of which this test is a part; tests/test_readme.py "
                                "checks that .ci/run runs this very line",
    ("sbatch",): "needs a SLURM cluster; tests/test_slurm.py runs the recipe under a real two-node SLURM where "
                 "slurm-wlm and munge are installed",
}
# fenced blocks with tangle-ray commands that do not run, by (file, first line), and why; their tangle-ray commands
# are checked as the inline spans are
NOT_RUN = {
    ("docs/cluster.md", "tangle-ray cluster check recipes/runs/tinystories-tanglenas.yaml --address auto"):
        "probes the nodes of a running multi-node cluster (--address auto) and the /shared storage of the "
        "paper-scale GPU recipe; tests/test_cluster_check.py runs the check on a local cluster",
    ("docs/cluster.md", "sbatch --nodes=2 --gpus-per-node=8 recipes/cluster/slurm/tangle-ray.sbatch \\"):
        "a SLURM job of two 8-GPU nodes running the paper-scale TinyStories search (GPU-only, hours)",
}
# inline spans that are no command of tangle-ray, and why
EXCLUDED = {
    "tangle-ray import autoformer": "docs/fidelity.md says that this converter does not exist",
    "tangle-ray COMMAND": "stands for any command (what the SLURM script runs)",
}
# placeholders of the docs' command templates, by sub-command where it matters
PLACEHOLDERS = {
    "RUN.yaml": {"search": "recipes/runs/tiny-cpu-tanglenas.yaml", "supernet": "recipes/runs/tiny-cpu-spos.yaml",
                 "retrain": "recipes/runs/tiny-cpu-retrain.yaml", "": "recipes/runs/tiny-cpu-tanglenas.yaml"},
    "SEARCH.yaml": {"": "recipes/tune/tiny-cpu-random.yaml"},
    "SCALING.yaml": {"": "recipes/scaling/tiny-cpu.yaml"},
    "CAMPAIGN.yaml": {"": "recipes/campaigns/tiny-cpu.yaml"},
    "DIR": {"": "out"}, "FILE": {"": "corpus/train.jsonl"}, "RUN_DIR": {"": "runs/RUN"}, "RUN": {"": "runs/RUN"},
    "ADDR": {"": "127.0.0.1:6379"},
}
TRAIN_COMMANDS = {m.command for m in METHODS.values()}
RAY_COMMANDS = {"demo", "tune", "cluster", *TRAIN_COMMANDS}  # and scale, campaign unless --dry-run
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "OMP_NUM_THREADS": "2"}


# ===================================================================== reading the docs


@dataclass
class Block:
    """A fenced block of the docs."""

    file: str
    line: int  # of the opening fence
    lang: str
    code: str
    heading: str
    marker: str | None  # the marker comment, or None
    appended: dict[str, list[str]] = field(default_factory=dict)  # the marker's words, by sub-command

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def commands(self) -> list[list[str]]:
        return shell_commands(self.code)

    def tangle_ray(self) -> list[list[str]]:
        """The block's tangle-ray commands (argv after ``tangle-ray``), with the marker's words appended."""
        found = []
        for words in self.commands():
            if "tangle-ray" in words:
                argv = words[words.index("tangle-ray") + 1:]
                found.append(argv + self.appended.get(argv[0], []) if argv else argv)
        return found

    def starts_ray(self) -> bool:
        return any(_starts_ray(argv) for argv in self.tangle_ray())


def _starts_ray(argv: list[str]) -> bool:
    return bool(argv) and (argv[0] in RAY_COMMANDS or (argv[0] in ("scale", "campaign") and "--dry-run" not in argv))


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block as word lists: ``\\`` continues a line, ``#`` starts a comment, ``&&`` and
    ``;`` separate commands."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        command: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word in ("&&", ";"):
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def _marker(before: list[str]) -> tuple[str | None, dict[str, list[str]]]:
    """The marker comment that ends on the last of ``before``, and its appended words by sub-command."""
    if not before or not before[-1].rstrip().endswith("-->"):
        return None, {}
    start = len(before) - 1
    while start > 0 and "<!--" not in before[start]:
        start -= 1
    if not before[start].startswith(MARKER):
        return None, {}
    lines = before[start:]
    appended = {}
    for line in lines[1:]:
        if line.strip() == "-->":
            continue
        names, sep, words = line.removesuffix("-->").partition(":")
        assert sep, f"a marker line without 'COMMAND: words': {line!r}"
        for name in names.split():
            appended[name] = shlex.split(words)
    return "\n".join(lines), appended


def _blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            before = text[: match.start()].splitlines()
            headings: dict[int, str] = {}
            for line in before:
                if m := re.match(r"(#{2,6}) (.+)", line):
                    level = len(m.group(1))
                    headings = {k: v for k, v in headings.items() if k < level} | {level: m.group(2).strip()}
            marker, appended = _marker(before)
            found.append(Block(str(path.relative_to(REPO)), len(before) + 1, match.group(1), match.group(2),
                               " > ".join(headings[k] for k in sorted(headings)), marker, appended))
    return found


def _spans() -> list[tuple[str, str]]:
    """(file:line, text) of every inline code span that holds a tangle-ray command, outside fenced blocks."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for hidden in (r"^```.*?^```", r"<!--.*?-->"):  # fenced blocks, and comments (the markers)
            text = re.sub(hidden, lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
        for match in re.finditer(r"`([^`]+)`", text):
            span = " ".join(match.group(1).replace("\\|", "|").split())
            if re.search(r"(^|\s)tangle-ray\s", span):
                found.append((f"{path.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}", span))
    return found


def _foreign(words: list[str]) -> str | None:
    """Why a command of another program does not run here (None: not listed)."""
    for prefix, reason in FOREIGN.items():
        if tuple(words[: len(prefix)]) == prefix:
            return reason
    return None


BLOCKS = _blocks()
PYTHON = [b for b in BLOCKS if b.lang == "python"]
# shell blocks, and plain ones that hold a tangle-ray command (not the diagram of docs/architecture.md)
SHELL = [b for b in BLOCKS if b.lang in ("bash", "sh") or not b.lang and re.search(r"(^|\s)tangle-ray\s", b.code)]
RUN = [b for b in SHELL if b.marker]
RAY_RUN, PLAIN_RUN = [b for b in RUN if b.starts_ray()], [b for b in RUN if not b.starts_ray()]


def _checked() -> dict[str, str]:
    """Every tangle-ray command that is checked, not run: of unmarked blocks and inline spans; text -> where."""
    found: dict[str, str] = {}
    for block in SHELL:
        if not block.marker:
            for argv in block.tangle_ray():
                found.setdefault(shlex.join(["tangle-ray", *argv]), block.where)
    for file, span in _spans():
        for part in re.split(r"&&|;", span):
            if "tangle-ray " in part:
                command = "tangle-ray " + part.split("tangle-ray ", 1)[1].strip()
                found.setdefault(command, file)
    return found


CHECKED = _checked()


# ===================================================================== what must hold of the docs themselves


def test_markers_sit_on_blocks_and_name_their_commands():
    """A marker not directly above a ```python or ```bash fence would test nothing; appended words must name a
    sub-command of its block; a marked Python block that was tested must stay marked."""
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith(MARKER):
                end = next(j for j in range(i, len(lines)) if lines[j].rstrip().endswith("-->"))
                assert end + 1 < len(lines) and lines[end + 1] in ("```python", "```bash"), f"{path.name}:{i + 1}"
    for block in RUN:
        used = {argv[0] for argv in block.tangle_ray() if argv}
        assert set(block.appended) <= used, f"{block.where}: the marker appends to {set(block.appended) - used}"
    assert EXPECTED <= {(b.file, b.heading) for b in PYTHON if b.marker}, "a snippet that was tested lost its marker"


def test_every_block_that_does_not_run_is_listed_with_why():
    """A shell block without a marker does not run: it must be in NOT_RUN (a marker lost in an edit fails here), and
    every command of another program in a block must be in FOREIGN."""
    unmarked = {(b.file, b.code.splitlines()[0]) for b in SHELL if not b.marker}
    assert unmarked == set(NOT_RUN), f"not listed: {unmarked - set(NOT_RUN)}; stale: {set(NOT_RUN) - unmarked}"
    assert set(EXCLUDED) <= set(CHECKED), f"stale: {set(EXCLUDED) - set(CHECKED)}"
    for block in SHELL:
        for words in block.commands():
            if words[0] != "tangle-ray":
                assert _foreign(words), f"{block.where}: `{shlex.join(words)}` is neither tangle-ray nor in FOREIGN"
    assert RAY_RUN and PLAIN_RUN


def test_the_blocks_cover_every_workflow_that_runs_on_ray():
    """Every command that starts Ray runs in a marked block: search, supernet, tune, export, evaluate, retrain
    (from scratch and fine-tuned), the demo."""
    run = [argv for b in RUN for argv in b.tangle_ray()]
    commands = {argv[0] for argv in run}
    assert {"demo", "search", "supernet", "tune", "export", "evaluate", "retrain"} <= commands, commands
    assert any(a[0] == "retrain" and "inherit" in a for a in run) and any(
        a[0] == "retrain" and "inherit" not in a for a in run)


# ===================================================================== Python blocks


@pytest.mark.parametrize("block", [b for b in PYTHON if b.marker], ids=lambda b: f"{b.file}:{b.heading}")
def test_marked_snippet_runs(block, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TANGLE_RAY_GPT2_BPE"}
    env.update(OFFLINE, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    folder = tmp_path / "reader"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", block.code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{block.where} failed:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in PYTHON if not b.marker], ids=lambda b: f"{b.file}:{b.heading}")
def test_every_other_snippet_imports_what_it_names(block):
    """Blocks too slow or too dependent (Ray, a trained supernet) to run: their tangle_ray imports resolve."""
    imports = [node for node in ast.parse(block.code).body
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tangle_ray")]
    for node in imports:
        module = __import__(node.module, fromlist=["_"])
        for alias in node.names:
            assert hasattr(module, alias.name), f"{block.where}: `from {node.module} import {alias.name}` fails"


# ===================================================================== shell blocks that run


@pytest.fixture
def reader(tmp_path, monkeypatch) -> Path:
    """An empty folder beside links to the repository's recipes/ and spaces/, the working directory; offline, no
    Ray address or BPE file from the environment."""
    folder = tmp_path / "reader"
    folder.mkdir()
    for name in ("recipes", "spaces"):
        (folder / name).symlink_to(REPO / name)
    monkeypatch.chdir(folder)
    for name in ("RAY_ADDRESS", "TANGLE_RAY_GPT2_BPE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    return folder


def _run_blocks(blocks: list[Block], capsys, before=None) -> list[tuple[list[str], str]]:
    """Every command of the blocks in order, through the CLI's main; (argv, stdout) of each tangle-ray command."""
    ran = []
    for block in blocks:
        for words in block.commands():
            if words[0] != "tangle-ray":
                assert _foreign(words), f"{block.where}: `{shlex.join(words)}`"
                continue
            argv = words[1:] + block.appended.get(words[1], [])
            if before is not None:
                before(argv)
            code = main(argv)
            out, err = capsys.readouterr()
            assert code == 0, f"{block.where}: `tangle-ray {shlex.join(argv)}` exited {code}:\n{err[-3000:]}"
            ran.append((argv, out))
    return ran


def test_blocks_without_ray_run(reader, capsys):
    import ray

    ran = _run_blocks(PLAIN_RUN, capsys)
    assert ran and not ray.is_initialized()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_blocks_run(reader, capsys, monkeypatch):
    """The marked blocks that start Ray, shrunk, on one local Ray cluster of 2 CPUs that the test starts: never the
    cluster Ray's cluster file names (another of the machine's). The demo, which starts a local cluster and ends it,
    finds this one and leaves it to the next command (one start less); then what the blocks' comments promise."""
    import ray

    shutdown = ray.shutdown
    monkeypatch.setattr(ray, "shutdown", lambda *args, **kwargs: None)

    def cluster(argv: list[str]) -> None:
        if _starts_ray(argv) and not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    try:
        ran = _run_blocks(RAY_RUN, capsys, cluster)
    finally:
        shutdown()
    for argv, out in ran:
        if argv[0] == "retrain":  # the test scores once (issue 22: they were printed twice)
            assert len([line for line in out.splitlines() if line.startswith("test:")]) == 1, out
    # docs/tune.md: evaluating the best architecture on the supernet gives the best trial's score
    evaluated = [json.loads(out) for argv, out in ran if argv[0] == "evaluate" and "--supernet" in argv]
    with open(reader / "runs" / "tune" / "tiny-cpu-evolution" / "leaderboard.csv") as f:
        best = next(csv.DictReader(f))
    assert evaluated and evaluated[-1]["loss"] == pytest.approx(float(best["loss"]), rel=1e-5)
    assert evaluated[-1]["samples"] == 16 and evaluated[-1]["tokens"] == int(best["tokens"])


# ===================================================================== commands checked without running


class Stop(Exception):
    """Raised where a checked command would start work: everything before it was checked."""


def _subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices.get(name)


def _template(command: str) -> tuple[list[str], bool]:
    """A command of the docs as argv (placeholders filled, optional parts kept, alternatives' first), and whether
    it was elided with ``...``."""
    words = [w for w in shlex.split(command)[1:] if w not in ("[key=value", "...]", "key=value")]  # settings: any
    elided = any("..." in w for w in words)
    words = [w for w in words if "..." not in w]
    words = [w if "=" in w else w.strip("[]").split("|")[0] for w in words]
    sub = words[0] if words else ""
    return [PLACEHOLDERS[w].get(sub, PLACEHOLDERS[w][""]) if w in PLACEHOLDERS else w for w in words if w], elided


@pytest.fixture(scope="module")
def checking(tmp_path_factory) -> Path:
    """The folder commands are checked in: links to recipes/ and spaces/, and an arch.json of gpt-nano."""
    from tangle_ray.models import load_space

    folder = tmp_path_factory.mktemp("checking")
    for name in ("recipes", "spaces"):
        (folder / name).symlink_to(REPO / name)
    (folder / "arch.json").write_text(json.dumps(load_space("gpt-nano").largest()))
    return folder


@pytest.mark.parametrize("command", sorted(CHECKED), ids=lambda c: c[:80])
def test_command_is_checked(command, checking, monkeypatch, capsys):
    import ray

    from tangle_ray import cluster
    from tangle_ray.campaign import run as campaign_run
    from tangle_ray.cli import _check_options
    from tangle_ray.scaling import run as scaling_run
    from tangle_ray.train import runner
    from tangle_ray.tune import tuner

    where = CHECKED[command]
    if command in EXCLUDED:
        assert _subparser(shlex.split(command)[1]) is None, f"{where}: `{command}` exists after all"
        return
    argv, elided = _template(command)
    names = argv[0].split("/") if len(argv) == 1 else [argv[0]]  # `tangle-ray search/supernet/retrain`
    assert all(_subparser(n) is not None for n in names), f"{where}: `{command}`: no such command"
    sub = _subparser(argv[0]) if len(names) == 1 else None
    if elided or (len(argv) == 1 and argv[0] != "spaces"):  # a command named in prose, or elided: its options
        options = sub._option_string_actions if sub else {}
        unknown = [w for w in argv[1:] if w.startswith("-") and w not in options]
        assert not unknown, f"{where}: `{command}`: {argv[0]} has no {unknown}"
        return
    for word in argv:
        if word.startswith("recipes/"):
            assert (REPO / word).is_file(), f"{where}: `{command}`: {word} does not exist"
    monkeypatch.chdir(checking)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit:  # required arguments missing: only a command named in prose (`tangle-ray data prepare`)
        assert all(re.fullmatch(r"[a-z]+", w) for w in argv), f"{where}: `{command}` does not parse"
        assert len(argv) == 2 and argv[1] in _subparser(argv[0])._subparsers._group_actions[0].choices, command
        return
    assert all("=" in e and not e.startswith("-") for e in extra), f"{where}: `{command}`: unknown {extra}"
    if args.command in ("demo", "export", "evaluate", "data"):  # they read or make data: they run in a block
        _check_options(args)
        return

    def stop(*a, **k):
        raise Stop

    for module, name in ((runner, "run_training"), (tuner, "run_search"), (cluster, "connect"),
                         (scaling_run, "run_scale"), (campaign_run, "run_campaign")):
        monkeypatch.setattr(module, name, stop)
    if args.command in ("scale", "campaign") and "--dry-run" not in argv:
        argv = [*argv, "--dry-run"]
    try:
        code = main(argv)
    except Stop:
        code = 0
    assert code == 0, f"{where}: `{command}` (as `tangle-ray {shlex.join(argv)}`):\n{capsys.readouterr().err[-2000:]}"
    assert not ray.is_initialized()
