// Kaizen web pages: the helpers the chat page (app.js) and the operator page (admin.js) share.
// Plain JS, no build step, no external code; makes no API call of its own.
//
// Loaded by index.html and admin.html before the page's own script (both `defer`, so they run
// in document order) and exposed as one frozen namespace, window.Kaizen, rather than globals.
// What differs between the pages stays in their scripts: how each words an error (describe),
// where each keeps its secret (localStorage for the chat key, sessionStorage for the admin token).
"use strict";

(() => {
  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  /** get/set on one Web Storage area by name; `set` with "" or null removes the entry. */
  function storage(area) {
    // reading window.localStorage itself throws where storage is off, so it is looked up per call
    return {
      get(name) {
        try { return window[area].getItem(name); } catch { return null; }
      },
      set(name, value) {
        try {
          if (value === null || value === undefined || value === "") window[area].removeItem(name);
          else window[area].setItem(name, value);
        } catch { /* private mode or storage off: the setting lasts for this page only */ }
      },
    };
  }

  /** Both pages keep one role=status live region, #status, for what a screen reader should hear. */
  function announce(text) {
    const status = document.getElementById("status");
    status.textContent = "";
    // a fresh text node so screen readers repeat an identical message
    window.setTimeout(() => { status.textContent = text; }, 30);
  }

  /** Request headers with `Authorization: Bearer <secret>` when a secret is set. */
  function authHeaders(secret, extra) {
    const out = Object.assign({}, extra);
    if (secret) out.Authorization = `Bearer ${secret}`;
    return out;
  }

  // -- errors -------------------------------------------------------------------------------------

  /** The API's error from a failed response and its text: {status, message, type, code, param,
   *  retryAfter}. OpenAI's shape {"error": {...}} first, then FastAPI's {"detail": "..."}. */
  function errorFrom(res, raw) {
    let body = null;
    try { body = JSON.parse(raw); } catch { /* not JSON: a proxy's page, say */ }
    const info = body && typeof body.error === "object" && body.error ? body.error : {};
    return {
      status: res.status,
      message: info.message || (typeof body?.detail === "string" ? body.detail : raw.slice(0, 300))
        || res.statusText,
      type: info.type || null,
      code: info.code || null,
      param: info.param || null,
      retryAfter: Number.parseInt(res.headers.get("Retry-After") || "", 10) || null,
    };
  }

  async function apiError(res) {
    return errorFrom(res, await res.text().catch(() => ""));
  }

  /** A fetch that never reached the server, in the same shape (status 0). */
  function networkError(err) {
    const message = String(err && err.message ? err.message : err);
    return { status: 0, message, type: "network", code: null };
  }

  /** An alert box (role=alert): the page's title and advice (words or a node), then what the
   *  browser or the server actually said, so a report to the operator carries it. */
  function errorBox(err, title, advice) {
    const box = make("div", "notice error");
    box.setAttribute("role", "alert");
    box.dataset.status = String(err.status);
    box.append(make("strong", "notice-title", title));
    if (advice instanceof Node) box.append(advice);
    else if (advice) box.append(make("p", "notice-advice", advice));
    box.append(make("p", "notice-detail", err.status === 0 ? `Browser said: ${err.message}`
      : `Server said: ${err.message} (HTTP ${err.status}${err.code ? `, ${err.code}` : ""})`));
    return box;
  }

  function dismissButton(onClick) {
    const close = make("button", "notice-close", "Dismiss");
    close.type = "button";
    close.addEventListener("click", onClick);
    return close;
  }

  // -- the settings panel and its secret field --------------------------------------------------

  /** The fold-out settings panel under its toggle button; opening can focus the secret's field. */
  function settingsPanel(panel, toggle, field) {
    const open = (focusField) => {
      panel.hidden = false;
      toggle.setAttribute("aria-expanded", "true");
      if (focusField) field.focus();
    };
    const close = () => {
      panel.hidden = true;
      toggle.setAttribute("aria-expanded", "false");
    };
    toggle.addEventListener("click", () => { if (panel.hidden) open(true); else close(); });
    return { open, close };
  }

  /** The Show/Hide button of a password field. */
  function revealButton(button, field) {
    button.addEventListener("click", () => {
      const show = field.type === "password";
      field.type = show ? "text" : "password";
      button.textContent = show ? "Hide" : "Show";
      button.setAttribute("aria-pressed", String(show));
    });
  }

  window.Kaizen = Object.freeze({
    make, storage, announce, authHeaders,
    errorFrom, apiError, networkError, errorBox, dismissButton,
    settingsPanel, revealButton,
  });
})();
