"""The user documentation stays true to the code: docs/cli.md is the command line's own reference
(regenerated here, and machine-independent), every user-error message raised in slab_deploy/ is
in docs/troubleshooting.md, and the links of README.md and docs/ resolve."""

from __future__ import annotations

import ast
import inspect
import os
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import slab_deploy.errors as errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "slab_deploy"
TOOL = ROOT / "tools" / "cli_reference.py"
REGENERATE = "python tools/cli_reference.py --write"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"


def _reference() -> str:
    return str(runpy.run_path(str(TOOL))["reference"]())


def _first_difference(a: str, b: str, names: tuple[str, str] = ("docs/cli.md", "the command line")) -> str:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False), 1):
        if x != y:
            return f"line {i}: {x[:80]!r} in {names[0]}, {y[:80]!r} in {names[1]}"
    return "one of them has more lines"


# ------------------------------------------------------------------------------------------ docs/cli.md


def test_cli_reference_is_current() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    now = _reference()
    assert doc == now, (f"docs/cli.md differs from the command line ({_first_difference(doc, now)}); "
                        f"regenerate it: {REGENERATE}")


def test_cli_reference_covers_every_command_and_option() -> None:
    from typer.main import get_command

    from slab_deploy.cli import app

    text = _reference()
    group: Any = get_command(app)
    for name, cmd in group.commands.items():
        section = text.split(f"## `slab-deploy {name}`\n", 1)[1].split("\n## ", 1)[0]
        for p in cmd.params:
            for spelled in (p.opts + p.secondary_opts if p.param_type_name == "option" else [p.name.upper()]):
                assert f"`{spelled}`" in section, f"{name}: {spelled} missing from its section"


def test_cli_reference_depends_on_the_code_alone(tmp_path: Path) -> None:
    """The tool, run from another directory with another home, cache, temporary directory, terminal
    width, colour setting and CPU count, prints exactly what it prints here, and no path of either."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "patched"
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import multiprocessing, os, pathlib
        os.cpu_count = multiprocessing.cpu_count = lambda: 977
        if hasattr(os, "sched_getaffinity"):
            os.sched_getaffinity = lambda pid: set(range(977))
        if hasattr(os, "process_cpu_count"):
            os.process_cpu_count = lambda: 977
        pathlib.Path({str(marker)!r}).write_text("ok")
    """))
    elsewhere = tmp_path / "elsewhere"
    for d in ("home", "cache", "tmp", "elsewhere"):
        (tmp_path / d).mkdir(exist_ok=True)
    dropped = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), HOME=str(tmp_path / "home"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), SLAB_DEPLOY_CACHE=str(tmp_path / "cache"),
               TMPDIR=str(tmp_path / "tmp"), COLUMNS="37", LINES="5", FORCE_COLOR="1", TERM="xterm-256color",
               TYPER_USE_RICH="0")
    run = subprocess.run([sys.executable, str(TOOL)], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert marker.read_text() == "ok", "the CPU count was not patched: this test judged nothing"
    here = _reference()
    where = _first_difference(here, run.stdout, ("this run", "the other environment"))
    assert run.stdout == here, f"the reference depends on the environment ({where})"
    for path in (str(tmp_path), str(ROOT), str(Path.home())):
        if len(path) > 1:
            assert path not in here, f"docs/cli.md would name a path of this machine: {path}"


# ------------------------------------------------------------------------------------ troubleshooting.md

# Messages whose text is not a literal at the raise site: the text the documentation must hold instead.
# Key: (file under slab_deploy/, error class, the message expression as ast.unparse writes it).
INDIRECT = {
    ("check/report.py", "ArtifactError", "report.verdict()"): ["ERROR at rung"],
    ("check/report.py", "ParityError", "report.verdict()"): ["FAIL at rung"],
    ("check/report.py", "ConfigError", "report.verdict()"): ["NOT JUDGED: no rung ran on the deployed graph"],
    ("bench/gate.py", "RegressionError", "' and '.join(parts)"): [
        "measured case(s) of the baseline not measured now",
        "case(s) slower than the baseline by more than",
    ],
    ("export/onnx_export.py", "ExportError", "f\"{(reason + '; ' if reason else '')}{why}{hint}\""): [
        "ONNX export failed:",
        "exporter failed (",
    ],
    ("runtime/engine.py", "ArtifactError", "str(exc)"): ["could not parse", "failed to build an engine from"],
    ("serve/server.py", "ConfigError", "f'{cfg_path}: {exc}'"): [
        "config.pbtxt: not a Triton model configuration:",
    ],
    # EngineMismatch(what, message): the first argument names what differs, the message is the second.
    ("runtime/engine_record.py", "EngineMismatch", "'record'"): [
        "engine.json (<why>); rebuild with",
        "MiB; rebuild with",
        "is not valid JSON; rebuild with",
        "is not an engine record slab-deploy writes",
        "is record version",
        "lacks <fields>; rebuild with",
        "is not an object; rebuild with",
    ],
    ("runtime/engine_record.py", "EngineMismatch", "'plan'"): [
        "is missing beside its record",
        "does not match its record engine.json",
    ],
    ("runtime/engine_record.py", "EngineMismatch", "'onnx'"): ["the graph there now is"],
    ("runtime/engine_record.py", "EngineMismatch", "'tensorrt'"): ["this host runs"],
    ("runtime/engine_record.py", "EngineMismatch", "'gpu'"): ["was built for compute capability"],
}
PREFIX_CHARS = 40  # literal characters of a message's beginning that the documentation must quote
MIN_LETTERS = 6  # a beginning with fewer letters than this is no stable text


def _name(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def error_classes(files: list[Path]) -> set[str]:
    """SlabDeployError and every subclass: those of slab_deploy.errors and any defined in `files`."""
    names = {n for n, o in vars(errors).items()
             if inspect.isclass(o) and issubclass(o, errors.SlabDeployError)}
    trees = [ast.parse(f.read_text(encoding="utf-8")) for f in files]
    grew = True
    while grew:
        grew = False
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names and any(
                    _name(b) in names for b in node.bases
                ):
                    names.add(node.name)
                    grew = True
    return names


def template(node: ast.expr) -> list[str | None]:
    """The message as literal pieces and placeholders (None) for what is computed at run time."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else None
                for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return template(node.left) + template(node.right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)):
        pieces: list[str | None] = []
        for i, text in enumerate(re.split(r"\{[^{}]*\}", node.func.value.value)):
            pieces += ([None] if i else []) + [text]
        return pieces
    return [None]


def stable_beginning(pieces: list[str | None]) -> list[str | None] | None:
    """The message's beginning, up to PREFIX_CHARS literal characters (cut at the end of a word),
    whitespace collapsed, with its placeholders; None when it has too few letters to be found reliably."""
    out: list[str | None] = []
    used = 0
    for piece in pieces:
        if piece is None:
            if not out or out[-1] is not None:
                out.append(None)
            continue
        text = re.sub(r"\s+", " ", piece)
        room = PREFIX_CHARS - used
        if room <= 0:
            break
        if len(text) > room:
            cut = text.rfind(" ", 1, room + 1)
            first_word = re.match(r"\s*\S+", text)
            out.append(text[:cut] if cut > 0 else first_word.group() if first_word else text)
            break
        out.append(text)
        used += len(text)
    while out and (out[-1] is None or not str(out[-1]).strip()):
        out.pop()
    if out:
        out[-1] = str(out[-1]).rstrip()
    letters = sum(ch.isalpha() for p in out if p for ch in p)
    return out if letters >= MIN_LETTERS else None


def pattern(beginning: list[str | None]) -> re.Pattern[str]:
    """Literal pieces verbatim, a placeholder any short text; a leading placeholder is left out
    (the search finds the literal wherever it starts)."""
    pieces = beginning[1:] if beginning and beginning[0] is None else beginning
    return re.compile("".join(r".{0,200}?" if p is None else re.escape(p) for p in pieces))


def raise_sites(files: list[Path], root: Path) -> list[tuple[str, int, str, ast.expr | None]]:
    """(file, line, error class, message expression) of every construction of a user error."""
    classes = error_classes(files)
    sites = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel == "errors.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = _name(node.func)
                if name in classes:
                    keyword = next((k.value for k in node.keywords if k.arg == "message"), None)
                    sites.append((rel, node.lineno, name, node.args[0] if node.args else keyword))
    return sites


def undocumented(files: list[Path], root: Path, doc: str,
                 indirect: dict[tuple[str, str, str], list[str]]) -> list[str]:
    """Problems: a message whose beginning is not in `doc`, or that has no literal beginning and no
    entry in `indirect`, and entries of `indirect` that match no site any more."""
    text = " ".join(doc.split())
    problems, used = [], set()
    for rel, line, cls, msg in raise_sites(files, root):
        where = f"slab_deploy/{rel}:{line} {cls}"
        expr = ast.unparse(msg) if msg is not None else ""
        if (rel, cls, expr) in indirect:
            used.add((rel, cls, expr))
            problems += [f"{where}: {t!r} is not in the documentation" for t in indirect[(rel, cls, expr)]
                         if " ".join(t.split()) not in text]
            continue
        beginning = stable_beginning(template(msg)) if msg is not None else None
        if beginning is None:
            problems.append(f"{where}: its message ({expr[:80]}) has no literal beginning to document; "
                            "start it with fixed text, or list the text to look for in INDIRECT "
                            "(tests/test_docs.py)")
        elif not pattern(beginning).search(text):
            shown = "".join("<...>" if p is None else p for p in beginning)
            problems.append(f"{where}: {shown!r} is not in the documentation")
    problems += [f"INDIRECT entry {k} matches no raise site any more" for k in indirect if k not in used]
    return problems


def test_every_error_message_is_in_troubleshooting() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    problems = undocumented(files, PACKAGE, TROUBLESHOOTING.read_text(encoding="utf-8"), INDIRECT)
    assert not problems, ("docs/troubleshooting.md lacks these error messages (quote each one's beginning, "
                          "with <placeholders> for what is computed, and say what it means and the fix):\n  "
                          + "\n  ".join(problems))


def test_the_troubleshooting_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text(textwrap.dedent('''
        from slab_deploy.errors import ConfigError, CheckpointError

        class LocalError(ConfigError):
            pass

        def f(path, n, parts):
            raise ConfigError(f"{path}: cannot read the profile ({n}) twice")
            raise CheckpointError(f"{path} was saved before PRepBN finished: {n} layers")
            raise LocalError("the quick brown fox " + str(n))
            raise ConfigError(f"{n}{path}")
            raise ConfigError("; ".join(parts))
    '''))
    files = [tmp_path / "mod.py"]
    doc = "`<p>: cannot read the profile (<why>) twice`, `<f> was saved before PRepBN finished: <n> layers`"
    indirect = {("mod.py", "ConfigError", "'; '.join(parts)"): ["quick brown"]}
    problems = undocumented(files, tmp_path, doc, indirect)
    assert len(problems) == 3, problems
    assert "the quick brown fox" in problems[0] and "LocalError" in problems[0]
    assert "no literal beginning" in problems[1]
    assert "'quick brown' is not in the documentation" in problems[2]
    doc += " `the quick brown fox <n>` `quick brown` "
    assert len(undocumented(files, tmp_path, doc, indirect)) == 1
    stale = {("mod.py", "ConfigError", "gone()"): ["x"]}
    assert any("matches no raise site" in p for p in undocumented(files, tmp_path, doc, stale))


# ------------------------------------------------------------------------------------------ links


def _links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _anchors(md: Path) -> set[str]:
    """The heading anchors GitHub gives `md`: lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    out: set[str] = set()
    for title in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = sum(1 for a in out if a == slug or re.fullmatch(re.escape(slug) + r"-\d+", a))
        out.add(f"{slug}-{n}" if n else slug)
    return out


MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: p.name)
def test_links_resolve(md: Path) -> None:
    for link in _links(md):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        target = (md.parent / path).resolve() if path else md
        assert target.exists(), f"{md.relative_to(ROOT)} links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{md.relative_to(ROOT)} links to {link}: no such heading"


def test_readme_lists_the_documentation() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    for doc in ("quickstart.md", "cli.md", "fold.md", "troubleshooting.md", "benchmarks.md"):
        assert f"(docs/{doc})" in section, f"README's Documentation list lacks docs/{doc}"
