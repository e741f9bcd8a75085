"""docs/cli.md: the Markdown reference of the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


def cli_reference(group: Any, prog: str = "slab-deploy") -> str:
    """A Markdown reference of the command line (docs/cli.md), from its parsed form: the click group
    the CLI's typer app builds, read by attribute (this module imports neither), and the type hints
    of each command's function. Per command: its help, usage, and every argument and option with its
    type, default and help.

    The text depends on the code alone: no terminal width, colour or markup is involved, and a
    default that would name this machine (an absolute path, or one under the home, temporary or
    working directory) is never printed: it reads "machine-dependent". Give such an option
    `show_default="a description"`, as for any environment-dependent value (a CPU count, a cache
    directory); that text is printed instead. A default computed when the command runs
    (`default_factory`) reads "computed at run time" unless it is described so."""
    import collections.abc
    import enum
    import inspect
    import os
    import tempfile
    import typing

    def md(text: str, cell: bool = True) -> str:
        """One line of Markdown: special characters escaped outside `code spans`; in a table cell
        every | escaped (GFM wants that inside code spans too)."""
        parts = " ".join(str(text).replace("\b", "").split()).split("`")
        for j in range(0, len(parts), 2):
            for ch in "\\*<>" + ("" if cell else "|"):
                parts[j] = parts[j].replace(ch, "\\" + ch)
        out = "`".join(parts)
        return out.replace("|", "\\|") if cell else out

    def paragraphs(text: str | None, cell: bool = False) -> list[str]:
        blocks = inspect.cleandoc(text or "").split("\n\n")
        return [md(b, cell) for b in blocks if b.replace("\b", "").strip()]

    def type_name(hint: Any) -> str:
        origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
        if origin in (list, tuple, set, collections.abc.Sequence):
            return f"{type_name(args[0]) if args else 'text'}, repeatable"
        if origin is typing.Literal:
            return "one of " + ", ".join(f"`{a}`" for a in args)
        if origin is not None and len(args) == 1:  # X | None
            return type_name(args[0])
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return "one of " + ", ".join(f"`{m.value}`" for m in hint)
        names = {bool: "flag", int: "integer", float: "number", str: "text", Path: "path"}
        return names.get(hint, "text") if isinstance(hint, type) else "text"

    places = (Path.home(), Path(tempfile.gettempdir()), Path.cwd(), Path(sys.prefix))
    here = {str(d) for d in places if len(str(d)) > 1}

    def default(p: Any) -> str:
        shown, d = getattr(p, "show_default", None), p.default
        if getattr(p, "required", False):
            return "required"
        if isinstance(shown, str):
            return md(shown)
        if shown is False:
            return ""
        if callable(d):
            return "computed at run time"
        if getattr(p, "is_flag", False) and isinstance(d, bool):
            if p.secondary_opts:
                return f"`{(p.opts if d else p.secondary_opts)[0]}`"
            return "on" if d else "off"
        if d is None or (isinstance(d, (list, tuple)) and not d):
            return ""
        values = d if isinstance(d, (list, tuple)) else [d]
        text = ",".join(str(v.value if isinstance(v, enum.Enum) else v) for v in values)
        if os.path.isabs(text) or text.startswith("~") or any(h in text for h in here):
            return "machine-dependent"
        return md(f"`{text}`")

    def spelling(p: Any) -> str:
        if p.param_type_name == "argument":
            return f"`{(p.metavar or p.name).upper()}`"
        spelled = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        return spelled + (f" `{p.metavar}`" if p.metavar else "")

    def usage(name: str, cmd: Any) -> str:
        pieces = [f"{prog} {name}".strip(), "[OPTIONS]"]
        for p in cmd.params:
            if p.param_type_name == "argument" and not getattr(p, "hidden", False):
                arg = (p.metavar or p.name).upper() + ("..." if p.nargs != 1 else "")
                pieces.append(arg if p.required else f"[{arg}]")
        if hasattr(cmd, "commands"):
            pieces.append("COMMAND [ARGS]...")
        return " ".join(pieces)

    def table(cmd: Any) -> list[str]:
        params = [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]
        if not params:
            return []
        try:
            hints = typing.get_type_hints(inspect.unwrap(cmd.callback)) if cmd.callback else {}
        except (NameError, TypeError):  # an annotation that names what the CLI module cannot see
            hints = {}
        rows = ["| argument / option | default | type | meaning |", "|---|---|---|---|"]
        for p in params:
            click_type = str(getattr(getattr(p, "type", None), "name", "text")).lower()
            kind = type_name(hints[p.name]) if p.name in hints else click_type
            rows.append(f"| {spelling(p)} | {default(p)} | {kind} | {md(getattr(p, 'help', None) or '')} |")
        return [*rows, ""]

    def section(title: str, cmd: Any, name: str) -> list[str]:
        helps = (f"{b}\n" for b in paragraphs(cmd.help))
        return [title, "", *helps, f"    {usage(name, cmd)}", "", *table(cmd)]

    commands = [(n, c) for n, c in group.commands.items() if not getattr(c, "hidden", False)]
    lines = [
        f"# `{prog}` command line", "",
        "<!-- Generated from the command line by `python tools/cli_reference.py --write`: do not edit by "
        "hand (tests/test_docs.py fails when this file and the command line differ). -->", "",
        *(f"{b}\n" for b in paragraphs(group.help)), f"    {usage('', group)}", "",
        "| command | what it does |", "|---|---|",
        *(f"| [`{n}`](#{prog}-{n}) | {(paragraphs(c.help, cell=True) or [''])[0]} |" for n, c in commands),
        "",
        "Every command takes `--help`. Exit codes and error messages: [ci.md](ci.md), "
        "[troubleshooting.md](troubleshooting.md).", "",
    ]
    if table(group):
        lines += [f"Options of `{prog}` itself, before the command:", "", *table(group)]
    for name, cmd in commands:
        lines += section(f"## `{prog} {name}`", cmd, name)
        # A command group (`llm`): each of its commands, one level down.
        for sub, sc in getattr(cmd, "commands", {}).items():
            if not getattr(sc, "hidden", False):
                lines += section(f"### `{prog} {name} {sub}`", sc, f"{name} {sub}")
    return "\n".join(lines).rstrip("\n") + "\n"


