"""Renderers of a report's blocks: markdown, and one self-contained HTML page.

A report (`run_report.blocks`, `experiments.report`) is a list of blocks,
tuples whose first item names the kind:

  ("h", level, text)              a heading
  ("p", text)                     a paragraph
  ("command", caption, command)   a command line to copy
  ("kv", [(key, value), ...])     a two-column table without a header
  ("table", head, rows)           a table
  ("figure", caption, path)       a PNG, relative to the report's folder
  ("details", summary, text)      folded JSON

`to_markdown` links figures; `to_html` embeds them as base64 data URIs with
the CSS inline, so the page is one file that opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from typing import Any


def _md_cell(text: Any) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |",
           "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def to_markdown(doc: Sequence[tuple]) -> str:
  """Markdown of blocks; figures are links relative to the workdir."""
  parts = []
  for kind, *args in doc:
    if kind == "h":
      parts.append("#" * args[0] + " " + args[1])
    elif kind == "p":
      parts.append(args[0])
    elif kind == "command":
      parts.append(f"{args[0]}: `{args[1]}`")
    elif kind == "kv":
      parts.append(markdown_table(("", ""), args[0]))
    elif kind == "table":
      parts.append(markdown_table(*args))
    elif kind == "figure":
      parts.append(f"![{args[0]}]({args[1]})")
    elif kind == "details":
      parts.append(f"<details><summary>{html.escape(args[0])}</summary>\n\n"
                   f"```json\n{args[1]}\n```\n\n</details>")
  return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;font-size:14px;color:#222;
max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #444}h2{font-size:1.25em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eee}tr:nth-child(even) td{background:#f8f8f8}
pre{background:#f4f4f4;border:1px solid #ddd;padding:.6em;white-space:pre-wrap;
word-break:break-all;font-size:12px}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}
@page{size:A4;margin:12mm}
"""


def data_uri(path: str) -> str:
  """A PNG file as a `data:image/png;base64,...` URI."""
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def html_table(head: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
  e = lambda x: html.escape(str(x))
  top = ("<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>") if head else ""
  body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table>{top}{body}</table>"


def html_page(title: str, body: str) -> str:
  """A complete HTML document with the inline stylesheet."""
  return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
          f"<body>\n{body}\n</body></html>\n")


def to_html(doc: Sequence[tuple], workdir: str) -> str:
  """One self-contained HTML page of blocks: images inline, no external links."""
  e = html.escape
  parts, title = [], "haqjax report"
  for kind, *args in doc:
    if kind == "h":
      title = args[1] if args[0] == 1 else title
      parts.append(f"<h{args[0]}>{e(args[1])}</h{args[0]}>")
    elif kind == "p":
      parts.append(f"<p>{e(args[0])}</p>")
    elif kind == "command":
      parts.append(f"<p>{e(args[0])}:</p><pre><code>{e(args[1])}</code></pre>")
    elif kind == "kv":
      parts.append(html_table(None, [(f"{k}", v) for k, v in args[0]]))
    elif kind == "table":
      parts.append(html_table(*args))
    elif kind == "figure":
      parts.append(f"<figure><img alt=\"{e(args[0])}\" "
                   f"src=\"{data_uri(os.path.join(workdir, args[1]))}\">"
                   f"<figcaption>{e(args[0])} ({e(args[1])})</figcaption></figure>")
    elif kind == "details":
      parts.append(f"<details><summary>{e(args[0])}</summary>"
                   f"<pre><code>{e(args[1])}</code></pre></details>")
  return html_page(title, "\n".join(parts))
