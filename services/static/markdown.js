// Kaizen chat page: the Markdown a model writes, drawn as DOM nodes.
//
//   KaizenMarkdown.render(container, text)   replaces container's children
//
// Safe by construction: every piece of model text becomes a Text node (createTextNode /
// textContent); no string is ever parsed as HTML, so a `<script>` in an answer is shown as
// the characters "<script>". Links are shown as text too (no href to click).
//
// The subset chat models write: paragraphs (a single newline is a line break), headings
// (# to ######), bullet and numbered lists (one level; indented lines continue an item),
// fenced code blocks (``` or ~~~, with a language name and a Copy button; an unclosed fence,
// as while an answer streams, runs to the end), and inline `code`, **bold** and *italic*.
// Anything else stays as the text it is. Small on purpose: a full CommonMark parser
// (marked, markdown-it) returns HTML, which would have to go through innerHTML and a sanitizer.
"use strict";

(() => {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const INDENTED = /^(\s{2,}|\t)\S/;
  // inline: `code` | **bold** | __bold__ | *italic* | _italic_
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([\s\S]*?[^\s*])\*|\b_(?=\S)([\s\S]*?\S)_\b/g;
  const COPIED_MS = 1500;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** Inline spans of `text` as nodes appended to `parent`. */
  function inline(parent, text) {
    let last = 0;
    const re = new RegExp(INLINE.source, "g");  // a fresh one: this function recurses
    for (let m = re.exec(text); m; m = re.exec(text)) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      if (m[2] !== undefined) parent.append(el("code", "md-code", m[2].replace(/^ (.*) $/s, "$1")));
      else if (m[3] !== undefined || m[4] !== undefined) inline(parent.appendChild(el("strong")), m[3] ?? m[4]);
      else inline(parent.appendChild(el("em")), m[5] ?? m[6]);
      last = re.lastIndex;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
  }

  /** Lines joined by line breaks (<br>), each line's inline Markdown drawn. */
  function lines(parent, list) {
    list.forEach((line, i) => {
      if (i) parent.append(el("br"));
      inline(parent, line);
    });
    return parent;
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = el("textarea");  // plain http on another host: the old way
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) throw new Error("copy refused");
  }

  function codeBlock(code, lang) {
    const box = el("div", "code-block");
    const head = el("div", "code-head");
    head.append(el("span", "code-lang", lang || "code"));
    const button = el("button", "copy-code", "Copy");
    button.type = "button";
    button.setAttribute("aria-label", `Copy ${lang || "code"} to the clipboard`);
    button.addEventListener("click", async () => {
      try {
        await copyText(code);
        button.textContent = "Copied";
      } catch {
        button.textContent = "Copy failed";
      }
      window.setTimeout(() => { button.textContent = "Copy"; }, COPIED_MS);
    });
    head.append(button);
    const pre = el("pre");
    const body = el("code", lang ? `language-${lang}` : "", code);
    pre.append(body);
    box.append(head, pre);
    box.dataset.code = "true";
    return box;
  }

  /** Block structure of `source` as a list of nodes. */
  // A fenced code block from line `start` (the opening fence): its node and the line after it.
  function fencedBlock(src, start, fence) {
    const marker = fence[1];
    const body = [];
    let i = start + 1;
    while (i < src.length && !(src[i].trim().startsWith(marker) && src[i].trim().replace(/[`~]/g, "") === "")) {
      body.push(src[i]);
      i++;
    }
    return { node: codeBlock(body.join("\n"), fence[2]), next: i + 1 };
  }

  function headingBlock(match) {
    const level = Math.min(6, match[1].length + 2);  // inside an answer, below the page's own headings
    const h = el(`h${level}`, "md-heading");
    inline(h, match[2]);
    return h;
  }

  // One list item; a new list starts when there is none or its kind changes. Returns the list.
  function listItem(list, bullet, numbered, out) {
    const ordered = Boolean(numbered);
    if (!list || list.ordered !== ordered) {
      list = { node: el(ordered ? "ol" : "ul"), ordered, item: null };
      if (ordered && numbered[1] !== "1") list.node.start = Number(numbered[1]);
      out.push(list.node);
    }
    list.item = el("li");
    list.lines = [bullet ? bullet[1] : numbered[2]];
    lines(list.item, list.lines);
    list.node.append(list.item);
    return list;
  }

  function blocks(source) {
    const out = [];
    const src = source.replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;   // {node, ordered, item, lines}
    const flushPara = () => {
      if (para.length) out.push(lines(el("p"), para));
      para = [];
    };
    for (let i = 0; i < src.length; i++) {
      const line = src[i];
      const fence = FENCE.exec(line);
      const heading = fence ? null : HEADING.exec(line);
      const bullet = fence || heading ? null : BULLET.exec(line);
      const numbered = fence || heading || bullet ? null : NUMBERED.exec(line);
      if (fence || heading || !line.trim()) {
        flushPara();
        list = null;
      }
      if (fence) {
        const block = fencedBlock(src, i, fence);
        out.push(block.node);
        i = block.next - 1;
      } else if (heading) {
        out.push(headingBlock(heading));
      } else if (!line.trim()) {
        continue;
      } else if (bullet || numbered) {
        flushPara();
        list = listItem(list, bullet, numbered, out);
      } else if (list && INDENTED.test(line)) {  // a continuation of the last item
        list.lines.push(line.trim());
        list.item.replaceChildren();
        lines(list.item, list.lines);
      } else {
        list = null;
        para.push(line);
      }
    }
    flushPara();
    return out;
  }

  function render(container, source) {
    container.replaceChildren(...blocks(source || ""));
    container.classList.add("md");
  }

  window.KaizenMarkdown = { render };
})();
