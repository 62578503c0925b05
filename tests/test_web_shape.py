"""The web client's shape (#20): no function over MAX_FUNCTION_LINES lines in
services/static/*.js, and both pages load the shared helpers (common.js) before their own script.

    python -m pytest tests/test_web_shape.py -q

No JavaScript toolchain is installed for this, so a small scanner does the work: it blanks
string, template and regex literals and comments (braces inside them do not count), then
matches each `function` declaration's braces. Arrow functions are not counted: the page
modules' IIFE wrapper `(() => { ... })()` is the module body, not a step to read in one screen.
A function's length counts from the line of `function` to the line of its closing brace.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import ROOT

STATIC = ROOT / "services" / "static"
MAX_FUNCTION_LINES = 60

ALLOWED_FUNCTIONS: dict[str, str] = {}
"""`script:function` → why it may be longer; meant to shrink."""

#: Before these, a `/` starts a regex literal rather than a division.
REGEX_AFTER_WORDS = {"return", "typeof", "case", "do", "else", "in", "of", "new", "delete", "void",
                     "throw", "instanceof", "yield", "await"}
REGEX_AFTER_PUNCT = set("(,=:[!&|?{};+-*%<>~^") | {""}
FUNCTION = re.compile(r"\b(?:async\s+)?function\b\s*\*?\s*([A-Za-z_$][\w$]*)?\s*\(")
WORD = re.compile(r"[A-Za-z_$][\w$]*")


def _skip_quoted(src: str, i: int) -> int:
    """Index just after the string literal that starts at src[i] (a quote)."""
    quote, i = src[i], i + 1
    while i < len(src) and src[i] != quote and src[i] != "\n":
        i += 2 if src[i] == "\\" else 1
    return i + 1


def _skip_regex(src: str, i: int) -> int:
    """Index just after the regex literal (flags included) that starts at src[i] (a slash)."""
    i += 1
    in_class = False
    while i < len(src) and src[i] != "\n":
        c = src[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        elif c == "/" and not in_class:
            i += 1
            break
        i += 1
    while i < len(src) and (src[i].isalnum() or src[i] == "_"):
        i += 1
    return i


def _skip_template(src: str, i: int) -> tuple[int, bool]:
    """From inside a template literal: (index after its closing backtick, False), or
    (index after a `${`, True) where an expression starts."""
    while i < len(src):
        if src[i] == "\\":
            i += 2
        elif src[i] == "`":
            return i + 1, False
        elif src.startswith("${", i):
            return i + 2, True
        else:
            i += 1
    return i, False


def blank(src: str) -> str:
    """`src` with every literal's and comment's characters turned to spaces (newlines kept),
    so only code braces and parentheses remain."""
    out = list(src)

    def wipe(a: int, b: int) -> None:
        for k in range(a, min(b, len(src))):
            if out[k] != "\n":
                out[k] = " "

    i, depth, prev = 0, 0, ""
    holes: list[int] = []  # brace depth at which each open `${` of a template closes
    while i < len(src):
        c = src[i]
        if c.isspace():
            i += 1
        elif src.startswith("//", i):
            end = src.find("\n", i)
            end = len(src) if end < 0 else end
            wipe(i, end)
            i = end
        elif src.startswith("/*", i):
            end = src.find("*/", i + 2)
            end = len(src) if end < 0 else end + 2
            wipe(i, end)
            i = end
        elif c in "'\"" or (c == "/" and (prev in REGEX_AFTER_PUNCT or prev in REGEX_AFTER_WORDS)):
            end = _skip_quoted(src, i) if c != "/" else _skip_regex(src, i)
            wipe(i, end)
            i, prev = end, "literal"
        elif c == "`" or (c == "}" and holes and holes[-1] == depth):
            if c == "}":
                holes.pop()
            end, opened = _skip_template(src, i + 1)
            wipe(i, end)
            if opened:
                holes.append(depth)
            i, prev = end, "(" if opened else "literal"
        elif (m := WORD.match(src, i)) is not None:
            i, prev = m.end(), m.group()
        else:
            depth += {"{": 1, "}": -1}.get(c, 0)
            i, prev = i + 1, c
    return "".join(out)


def _match(code: str, i: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at code[i]."""
    depth = 0
    for k in range(i, len(code)):
        if code[k] == open_:
            depth += 1
        elif code[k] == close:
            depth -= 1
            if depth == 0:
                return k
    raise ValueError(f"unbalanced {open_}{close} from offset {i}")


def function_lengths(src: str) -> list[tuple[str, int, int]]:
    """(name, first line, length in lines) of each `function` declaration or expression."""
    code = blank(src)
    found = []
    for m in FUNCTION.finditer(code):
        params_end = _match(code, m.end() - 1, "(", ")")
        body = code.index("{", params_end)
        end = _match(code, body, "{", "}")
        first = code.count("\n", 0, m.start()) + 1
        found.append((m.group(1) or "(anonymous)", first, code.count("\n", m.start(), end) + 1))
    return found


# -- the scanner can fail ----------------------------------------------------------------------


SAMPLE = (
    "\"use strict\";\n"
    "(() => {\n"
    "  function small(a) {\n"
    "    return a + \"}\";  // a brace in a string and in a comment: }\n"
    "  }\n"
    "  async function big() {\n"
    + "".join("    const x%d = `${ { a: %d }.a }}`; /* { */\n" % (n, n) for n in range(60))
    + "  }\n"
    "  const re = /[{}]\\/{2,}/g;\n"
    "  function* after() { yield re.source.length / 2; }\n"
    "})();\n"
)


def test_scanner_measures_functions_and_ignores_braces_in_literals() -> None:
    found = {name: (line, length) for name, line, length in function_lengths(SAMPLE)}
    assert found == {"small": (3, 3), "big": (6, 62), "after": (69, 1)}
    assert "{" not in blank('const s = "{"; const t = `a{${"}"}b`; // {').replace("${", "")


def test_scanner_sees_a_function_over_the_limit() -> None:
    too_long = [(name, length) for name, _, length in function_lengths(SAMPLE) if length > MAX_FUNCTION_LINES]
    assert too_long == [("big", 62)]


# -- the web client ----------------------------------------------------------------------------


def test_no_web_function_over_the_limit() -> None:
    scripts = sorted(STATIC.glob("*.js"))
    assert {p.name for p in scripts} >= {"app.js", "admin.js", "common.js", "markdown.js"}
    over = []
    for path in scripts:
        found = function_lengths(path.read_text(encoding="utf-8"))
        assert found, path  # the scanner saw this script's functions
        over += [f"{path.name}:{line} {name} ({length} lines)" for name, line, length in found
                 if length > MAX_FUNCTION_LINES and f"{path.name}:{name}" not in ALLOWED_FUNCTIONS]
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_both_pages_load_the_shared_helpers_first() -> None:
    for page, own in (("index.html", "/static/app.js"), ("admin.html", "/static/admin.js")):
        html = (STATIC / page).read_text(encoding="utf-8")
        scripts = re.findall(r'<script src="([^"]+)"( defer)?></script>', html)
        names = [src for src, _ in scripts]
        assert "/static/common.js" in names and own in names, (page, names)
        assert names.index("/static/common.js") < names.index(own), (page, names)
        # `defer` runs scripts in document order; a script without it would run before common.js
        assert all(defer for _, defer in scripts), (page, scripts)


def test_common_js_exposes_one_namespace() -> None:
    src = (STATIC / "common.js").read_text(encoding="utf-8")
    assert '"use strict";' in src
    assert re.findall(r"\bwindow\.(\w+)\s*=", src) == ["Kaizen"]
    for page in ("app.js", "admin.js"):
        assert "window.Kaizen" in (STATIC / page).read_text(encoding="utf-8"), page
