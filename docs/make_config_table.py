"""Writes the settings tables of docs/configuration.md from the settings classes' own docstrings.

Each table lists a dataclass's fields with their defaults, their allowed values (from the ``Literal`` of the
field's type, the one declaration validation and the CLI use as well) and the text of its ``Parameters``
docstring section, so the page never drifts from the code (``tests/test_readme.py`` checks that the page holds what this script
writes). Run it after changing a setting or its docstring:

    .venv/bin/python docs/make_config_table.py
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path

from dualclip.config import AdaptationConfig, ExecutionSettings, MethodSettings

PAGE = Path(__file__).resolve().parent / "configuration.md"
START, END = "<!-- settings -->", "<!-- /settings -->"
CLASSES = (MethodSettings, ExecutionSettings, AdaptationConfig)


def parameter_docs(cls: type) -> dict[str, str]:
    """``{field name: its description}`` from the numpydoc ``Parameters`` section of ``cls``'s docstring; a
    heading such as ``use_text, use_visual:`` gives its description to each name it lists."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    section = doc.split("Parameters\n----------\n", 1)[1] if "Parameters\n----------\n" in doc else ""
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in section.splitlines():
        if line and not line[0].isspace():
            names = [n.strip() for n in line.rstrip(":").split(",")]
            for name in names:
                docs[name] = ""
        elif names:
            for name in names:
                docs[name] = (docs[name] + " " + line.strip()).strip()
    return docs


def markdown(text: str) -> str:
    """Docstring markup as Markdown inside a table cell."""
    text = re.sub(r":(?:class|meth|mod|func|attr):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|")


def default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory.__name__}()`"
    return f"`{f.default!r}`"


def allowed(hint: object) -> str:
    """The values a ``Literal`` type (or a union holding Literals) allows, e.g. ```"zero"`, `"reflect"`, `None```;
    empty for other types."""
    parts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    values = [v for p in parts if typing.get_origin(p) is typing.Literal for v in typing.get_args(p)]
    if not values:
        return ""
    others = [p for p in parts if typing.get_origin(p) is not typing.Literal]
    names = [f"`{v!r}`" for v in values] + [("`None`" if p is type(None) else f"any `{p.__name__}`") for p in others]
    return ", ".join(names).replace("'", '"')


def table(cls: type) -> str:
    docs = parameter_docs(cls)
    hints = typing.get_type_hints(cls)
    rows = [
        f"**`{cls.__name__}`** (`{cls.__module__}`)",
        "",
        "| setting | default | values | meaning |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        values = markdown(allowed(hints[f.name]))
        rows.append(f"| `{f.name}` | {markdown(default(f))} | {values} | {markdown(docs.get(f.name, ''))} |")
    return "\n".join(rows)


def render() -> str:
    """The block between the page's markers, markers included."""
    made = "Made by `python docs/make_config_table.py` from the docstrings of the settings classes."
    return "\n\n".join([START, made, *(table(cls) for cls in CLASSES), END])


def main() -> None:
    from dualclip.atomic import write_text

    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text(PAGE, head + render() + tail)
    print(f"rewrote the settings tables of {PAGE}")


if __name__ == "__main__":
    main()
