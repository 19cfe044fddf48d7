"""A renderer for the subset of Helm's Go templates that deploy/helm/atelier uses, for tests without helm.

It is deliberately strict: an action, function or construct outside the subset
raises ``TemplateError`` instead of rendering something approximate, so a
template change that needs real Helm fails the tests loudly. Where ``helm`` is
installed, tests/test_deploy.py also runs ``helm lint`` and ``helm template``.

Supported: text with ``{{- ... -}}`` trimming; comments; ``define`` / ``include``
(also of a template file by path, for checksums); ``if`` / ``else if`` / ``else``;
``range`` over lists and maps (with ``$k, $v :=``); ``with``; fields of ``.``,
``$`` and variables; pipelines with parentheses; and the functions in ``FUNCTIONS``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import yaml


class TemplateError(Exception):
    pass


# -- values ------------------------------------------------------------------------------

def truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, str | list | dict | tuple):
        return len(value) > 0
    return True


def strval(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        raise TemplateError(f"printing a collection needs toYaml: {value!r}")
    return str(value)


def go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _indent(n: int, text: Any) -> str:
    pad = " " * int(n)
    return pad + strval(text).replace("\n", "\n" + pad)


def _to_yaml(value: Any) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")


def _printf(fmt: str, *args: Any) -> str:
    values = iter(args)

    def sub(match: re.Match[str]) -> str:
        verb = match.group(1)
        if verb == "%":
            return "%"
        value = next(values)
        return go_quote(strval(value)) if verb == "q" else strval(value)

    return re.sub(r"%([sdvq%])", sub, fmt)


def _default(fallback: Any, value: Any = None) -> Any:
    return value if truthy(value) else fallback


def _quote(*args: Any) -> str:
    return " ".join(go_quote(strval(a)) for a in args if a is not None)


def _eq(first: Any, *others: Any) -> bool:
    return any(first == other for other in others)


def _and(*args: Any) -> Any:
    for arg in args:
        if not truthy(arg):
            return arg
    return args[-1]


def _or(*args: Any) -> Any:
    for arg in args:
        if truthy(arg):
            return arg
    return args[-1]


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quote": _quote,
    "default": _default,
    "toYaml": _to_yaml,
    "nindent": lambda n, text: "\n" + _indent(n, text),
    "indent": _indent,
    "printf": _printf,
    "print": lambda *args: "".join(strval(a) for a in args),
    "trunc": lambda n, text: strval(text)[: int(n)],
    "trimSuffix": lambda suffix, text: strval(text).removesuffix(suffix),
    "contains": lambda sub, text: sub in strval(text),
    "join": lambda sep, items: sep.join(strval(i) for i in (items or [])),
    "urlquery": lambda *args: quote_plus("".join(strval(a) for a in args)),
    "sha256sum": lambda text: hashlib.sha256(strval(text).encode()).hexdigest(),
    "add": lambda *args: sum(int(a) for a in args),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "not": lambda value: not truthy(value),
    "and": _and,
    "or": _or,
}


# -- lexing ------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _lex(source: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        if text:
            tokens.append(("text", text))
        body = match.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            tokens.append(("action", body))
        trim_next = bool(match.group(3))
        pos = match.end()
    text = source[pos:]
    if trim_next:
        text = text.lstrip()
    if text:
        tokens.append(("text", text))
    return tokens


_EXPR_TOKEN = re.compile(r"""\s*(?:("(?:[^"\\]|\\.)*")|(`[^`]*`)|(-?\d+(?:\.\d+)?)|(\()|(\))|(\|)|(:=)|(,)|"""
                         r"""(\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|(\.(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?)|"""
                         r"""([A-Za-z_][A-Za-z0-9_]*))""")


def _expr_tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    kinds = ("str", "raw", "num", "(", ")", "|", ":=", ",", "var", "field", "ident")
    text = text.rstrip()
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise TemplateError(f"cannot parse {text[pos:]!r}")
        for kind, value in zip(kinds, match.groups(), strict=True):
            if value is not None:
                out.append((kind, value))
                break
        pos = match.end()
    return out


# -- parsing -----------------------------------------------------------------------------

@dataclass
class Node:
    kind: str                       # text | output | if | range | with
    text: str = ""
    expr: list[tuple[str, str]] = field(default_factory=list)
    branches: list[tuple[list[tuple[str, str]] | None, list[Node]]] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)


class Template:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.defines: dict[str, list[Node]] = {}
        self.tokens = _lex(source)
        self.pos = 0
        self.body, end = self._block(top=True)
        if end is not None:
            raise TemplateError(f"{name}: unexpected {{{{ {end} }}}}")

    def _block(self, top: bool = False) -> tuple[list[Node], str | None]:
        nodes: list[Node] = []
        while self.pos < len(self.tokens):
            kind, body = self.tokens[self.pos]
            self.pos += 1
            if kind == "text":
                nodes.append(Node("text", text=body))
                continue
            word = body.split(None, 1)[0] if body else ""
            rest = body[len(word):].strip()
            if word in ("end", "else"):
                if top:
                    raise TemplateError(f"{self.name}: {{{{ {body} }}}} outside a block")
                return nodes, body
            if word == "define":
                name = json.loads(rest)
                inner, end = self._block()
                if end != "end":
                    raise TemplateError(f"{self.name}: define {name} must end with end")
                self.defines[name] = inner
            elif word in ("if", "with"):
                node = Node(word)
                condition: list[tuple[str, str]] | None = _expr_tokens(rest)
                while True:
                    inner, end = self._block()
                    node.branches.append((condition, inner))
                    if end == "end":
                        break
                    if end == "else":
                        condition = None
                    elif end is not None and end.startswith("else if ") and word == "if":
                        condition = _expr_tokens(end[len("else if "):])
                    else:
                        raise TemplateError(f"{self.name}: unsupported {{{{ {end} }}}} in {word}")
                nodes.append(node)
            elif word == "range":
                node = Node("range")
                tokens = _expr_tokens(rest)
                if any(k == ":=" for k, _ in tokens):
                    split = next(i for i, (k, _) in enumerate(tokens) if k == ":=")
                    node.variables = [v for k, v in tokens[:split] if k == "var"]
                    tokens = tokens[split + 1:]
                inner, end = self._block()
                node.branches.append((tokens, inner))
                if end == "else":
                    inner, end = self._block()
                    node.branches.append((None, inner))
                if end != "end":
                    raise TemplateError(f"{self.name}: range must end with end")
                nodes.append(node)
            elif word in ("template", "block", "break", "continue", "tpl"):
                raise TemplateError(f"{self.name}: {word} is outside the supported subset")
            else:
                nodes.append(Node("output", expr=_expr_tokens(body)))
        if not top:
            raise TemplateError(f"{self.name}: missing {{{{ end }}}}")
        return nodes, None


# -- evaluation --------------------------------------------------------------------------

class Renderer:
    def __init__(self, chart_dir: Path, values: dict[str, Any], *, release: str = "atl",
                 namespace: str = "media") -> None:
        chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
        self.root: dict[str, Any] = {
            "Values": values,
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True},
            "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart.get("appVersion")},
            "Template": {"BasePath": f"{chart['name']}/templates"},
        }
        self.files: dict[str, Template] = {}
        self.defines: dict[str, list[Node]] = {}
        for path in sorted((chart_dir / "templates").iterdir()):
            name = f"{chart['name']}/templates/{path.name}"
            template = Template(name, path.read_text())
            self.files[name] = template
            self.defines.update(template.defines)

    def render_all(self) -> dict[str, str]:
        """Every template file except partials (``_*.tpl``), as Helm would render them."""
        out = {}
        for name, template in self.files.items():
            if Path(name).name.startswith("_"):
                continue
            out[name] = self._nodes(template.body, self.root, {"$": self.root})
        return out

    def _nodes(self, nodes: list[Node], dot: Any, variables: dict[str, Any]) -> str:
        parts: list[str] = []
        for node in nodes:
            if node.kind == "text":
                parts.append(node.text)
            elif node.kind == "output":
                parts.append(strval(self._pipeline(node.expr, dot, variables)))
            elif node.kind == "if":
                for condition, body in node.branches:
                    if condition is None or truthy(self._pipeline(condition, dot, variables)):
                        parts.append(self._nodes(body, dot, dict(variables)))
                        break
            elif node.kind == "with":
                condition, body = node.branches[0]
                value = self._pipeline(condition or [], dot, variables)
                if truthy(value):
                    parts.append(self._nodes(body, value, dict(variables)))
                elif len(node.branches) > 1:
                    parts.append(self._nodes(node.branches[1][1], dot, dict(variables)))
            elif node.kind == "range":
                expr, body = node.branches[0]
                items = self._pipeline(expr or [], dot, variables)
                pairs = (sorted(items.items()) if isinstance(items, dict)
                         else list(enumerate(items or [])))
                if not pairs and len(node.branches) > 1:
                    parts.append(self._nodes(node.branches[1][1], dot, dict(variables)))
                for key, value in pairs:
                    scope = dict(variables)
                    if len(node.variables) == 2:
                        scope[node.variables[0]], scope[node.variables[1]] = key, value
                    elif len(node.variables) == 1:
                        scope[node.variables[0]] = value
                    parts.append(self._nodes(body, value, scope))
        return "".join(parts)

    def _pipeline(self, tokens: list[tuple[str, str]], dot: Any, variables: dict[str, Any]) -> Any:
        commands: list[list[tuple[str, str]]] = [[]]
        depth = 0
        for token in tokens:
            if token[0] == "|" and depth == 0:
                commands.append([])
                continue
            depth += token[0] == "("
            depth -= token[0] == ")"
            commands[-1].append(token)
        value: Any = None
        for i, command in enumerate(commands):
            value = self._command(command, dot, variables, piped=(value,) if i else ())
        return value

    def _command(self, tokens: list[tuple[str, str]], dot: Any, variables: dict[str, Any],
                 piped: tuple[Any, ...]) -> Any:
        if not tokens:
            raise TemplateError("empty command")
        args: list[Any] = []
        i = 1 if tokens[0][0] == "ident" else 0
        while i < len(tokens):
            kind, text = tokens[i]
            if kind == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += tokens[j][0] == "("
                    depth -= tokens[j][0] == ")"
                    j += 1
                args.append(self._pipeline(tokens[i + 1:j - 1], dot, variables))
                i = j
                continue
            args.append(self._operand(kind, text, dot, variables))
            i += 1
        if tokens[0][0] != "ident":
            if len(args) != 1 or piped:
                raise TemplateError(f"not a function call: {tokens}")
            return args[0]
        name = tokens[0][1]
        if name in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[name]
        if name == "include":
            return self._include(*args, *piped)
        if name not in FUNCTIONS:
            raise TemplateError(f"function {name!r} is outside the supported subset")
        return FUNCTIONS[name](*args, *piped)

    def _operand(self, kind: str, text: str, dot: Any, variables: dict[str, Any]) -> Any:
        if kind == "str":
            return json.loads(text)
        if kind == "raw":
            return text[1:-1]
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind == "field":
            return _walk(dot, text[1:].split(".") if text != "." else [])
        if kind == "var":
            name, _, path = text.partition(".")
            if name not in variables:
                raise TemplateError(f"undefined variable {name}")
            return _walk(variables[name], path.split(".") if path else [])
        if kind == "ident" and text in ("true", "false", "nil"):
            return {"true": True, "false": False, "nil": None}[text]
        raise TemplateError(f"unexpected {text!r}")

    def _include(self, name: str, dot: Any) -> str:
        if name in self.defines:
            return self._nodes(self.defines[name], dot, {"$": self.root})
        if name in self.files:
            return self._nodes(self.files[name].body, dot, {"$": self.root})
        raise TemplateError(f"no template named {name!r}")


def _walk(value: Any, path: list[str]) -> Any:
    for key in path:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise TemplateError(f"cannot read .{key} of {value!r}")
        value = value.get(key)
    return value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge recursively, everything else replaces."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render_chart(chart_dir: Path, overrides: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Render every template with values.yaml (+ ``overrides``); returns the YAML documents per file."""
    values = merge(yaml.safe_load((chart_dir / "values.yaml").read_text()), overrides or {})
    rendered = Renderer(chart_dir, values).render_all()
    out: dict[str, list[dict[str, Any]]] = {}
    for name, text in rendered.items():
        if name.endswith("NOTES.txt"):
            continue
        out[name] = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    return out
