"""The textual pass pipeline, in MLIR's spelling: `inline-calls,fuse-moments{unpacked=true max-group=4},cleanup`.

Grammar (a subset of `mlir-opt --pass-pipeline`):

    pipeline := [ "builtin.module(" ] [ element ( "," element )* ] [ ")" ]
    element  := pass-name [ "{" [ option ( sep option )* ] "}" ]
    option   := option-name [ "=" value ]      # a bare option-name means "=true"
    sep      := whitespace | ","               # MLIR separates options by spaces; a comma is accepted too
    value    := bare-word | '"' chars '"'      # quotes keep spaces, commas and braces

Commas inside braces or quotes belong to the element, not the pipeline. This module only splits text; which
names and options exist is the registry's business (registry.py).
"""

from __future__ import annotations

from shardopt.passes.base import PassError

WRAPPER = "builtin.module("


def split_pipeline(text: str) -> tuple[str, ...]:
    """The elements of a textual pipeline, each `name` or `name{...}` with surrounding whitespace removed."""
    body = text.strip()
    if body.startswith(WRAPPER):
        if not body.endswith(")"):
            raise PassError(f"pipeline {text!r}: {WRAPPER!r} is not closed by ')'")
        body = body[len(WRAPPER):-1]
    elements: list[str] = []
    depth, quoted, start = 0, False, 0
    for i, c in enumerate(body):
        if quoted:
            if c == '"' and body[i - 1] != "\\":
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise PassError(f"pipeline {text!r}: '}}' without '{{' at character {i}")
        elif c == "," and depth == 0:
            elements.append(body[start:i])
            start = i + 1
    if quoted or depth:
        raise PassError(f"pipeline {text!r}: unclosed {'quote' if quoted else 'brace'}")
    elements.append(body[start:])
    elements = [e.strip() for e in elements]
    if elements == [""]:
        return ()
    if "" in elements:
        raise PassError(f"pipeline {text!r}: empty pass name (two commas in a row, or a trailing comma)")
    return tuple(elements)


def parse_element(text: str) -> tuple[str, dict[str, str]]:
    """`name{a=1 b}` -> ("name", {"a": "1", "b": "true"}); option names as written (dashes)."""
    text = text.strip()
    name, brace, rest = text.partition("{")
    name = name.strip()
    if not name or any(c.isspace() or c in '}=",()' for c in name):
        raise PassError(f"pass spec {text!r}: {name!r} is not a pass name")
    if not brace:
        return name, {}
    if not rest.endswith("}"):
        raise PassError(f"pass spec {text!r}: options must end with '}}'")
    options: dict[str, str] = {}
    for token in _tokens(rest[:-1], text):
        key, eq, value = token.partition("=")
        key = key.strip()
        if not key:
            raise PassError(f"pass spec {text!r}: option without a name in {token!r}")
        if key in options:
            raise PassError(f"pass {name!r}: option {key!r} given twice")
        options[key] = _unquote(value) if eq else "true"
    return name, options


def _tokens(body: str, whole: str) -> list[str]:
    """`body` split on whitespace and commas outside quotes."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = False
    for i, c in enumerate(body):
        if quoted:
            current.append(c)
            if c == '"' and body[i - 1] != "\\":
                quoted = False
        elif c == '"':
            quoted = True
            current.append(c)
        elif c.isspace() or c == ",":
            if current:
                tokens.append("".join(current))
                current = []
        elif c in "{}":
            raise PassError(f"pass spec {whole!r}: unexpected {c!r} inside the options")
        else:
            current.append(c)
    if quoted:
        raise PassError(f"pass spec {whole!r}: unclosed quote")
    if current:
        tokens.append("".join(current))
    return tokens


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value
