// Kaizen operator page: plain JS, no build step, no external code.
//
// Reads the admin API only (every call sends `Authorization: Bearer <admin token>`):
//   GET  /admin/versions        versions, stages, gate metrics, what serves
//   GET  /admin/versions/{v}    one version with its lineage and audit entries
//   GET  /admin/rollout         champion, canary + fraction, head-to-head, health, decision
//   GET  /admin/rounds          training rounds (reward, KL, reward-model accuracy)
//   GET  /admin/stats           request and vote rates
//   GET  /admin/audit           registry changes
//   GET  /admin/schedule        what starts the next training round (the trainer's scheduler)
//   POST /admin/rollout | /admin/promote | /admin/rollback   the operator's buttons
// Every figure shown is one the server sends; the page only draws it. The helpers both pages
// share (elements, storage, errors, the settings panel) are common.js's.
//
// Hidden query parameter: ?refresh=N (seconds between refreshes, 0 = off; default 5).
"use strict";

(() => {
  const { make, announce, authHeaders, errorFrom, networkError, dismissButton, settingsPanel, revealButton } =
    window.Kaizen;
  const { get: storageGet, set: storageSet } = window.Kaizen.storage("sessionStorage");
  const TOKEN_STORE = "kaizen.adminToken";
  const params = new URLSearchParams(location.search);
  const refreshParam = Number.parseFloat(params.get("refresh") ?? "");
  const REFRESH_MS = Number.isFinite(refreshParam) && refreshParam >= 0 ? refreshParam * 1000 : 5000;
  const ROUND_SERIES = [
    { key: "reward_mean", title: "Reward (mean)", digits: 3 },
    { key: "kl", title: "KL to the reference", digits: 4 },
    { key: "rm_accuracy", title: "Reward-model accuracy", digits: 3, percent: true },
  ];
  const CHOICE_LABELS = { 0: "A better", 1: "B better", tie: "Tie", both_bad: "Both bad" };
  const SVG_NS = "http://www.w3.org/2000/svg";

  const el = (id) => document.getElementById(id);
  const ui = {
    token: el("admin-token"), tokenForm: el("token-form"), tokenHint: el("token-hint"),
    showToken: el("show-token"), forgetToken: el("forget-token"),
    settings: el("settings"), settingsToggle: el("settings-toggle"), refresh: el("refresh"),
    updated: el("updated"), alerts: el("alerts"), result: el("result"),
    split: el("split"), splitLegend: el("split-legend"), servingNote: el("serving-note"),
    autoRollout: el("auto-rollout"), promoteCanary: el("promote-canary"), rollback: el("rollback"),
    decision: el("decision"), decisionReason: el("decision-reason"), h2hChart: el("h2h-chart"),
    health: el("health").tBodies[0],
    rates: el("rates"), window: el("window"), votesChart: el("votes-chart"),
    versions: el("versions-table").tBodies[0], versionsCount: el("versions-count"), detail: el("version-detail"),
    roundsCharts: el("rounds-charts"), rounds: el("rounds-table").tBodies[0], roundsCount: el("rounds-count"),
    audit: el("audit-table").tBodies[0],
    firstRun: el("first-run"), firstRunFacts: el("first-run-facts"), trainerPill: el("trainer-pill"),
    dialog: el("confirm"), dialogForm: el("confirm-form"), dialogTitle: el("confirm-title"),
    dialogText: el("confirm-text"), fractionField: el("fraction-field"), fraction: el("fraction"),
    reason: el("reason"), dialogError: el("confirm-error"), dialogOk: el("confirm-ok"), dialogCancel: el("confirm-cancel"),
  };
  const tokenHintText = ui.tokenHint.innerHTML;
  const settings = settingsPanel(ui.settings, ui.settingsToggle, ui.token);

  const state = {
    loading: false,
    authFailed: false,   // the token was refused: stop polling until it changes
    rollout: null,
    versions: null,
    detailVersion: null,
    pending: null,       // the action the dialog asks about
    busy: false,         // the server is carrying the action out
    opener: null,        // the button that opened the dialog (focus returns there)
    rendered: {},        // last JSON drawn per section: redraw only on change (keeps focus and scroll)
  };

  // -- small helpers ------------------------------------------------------------------

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function token() { return ui.token.value.trim(); }

  const isNum = (x) => typeof x === "number" && Number.isFinite(x);
  const DASH = "—";

  function num(x, digits = 3) { return isNum(x) ? x.toFixed(digits) : DASH; }
  function pct(x, digits = 0) { return isNum(x) ? `${(x * 100).toFixed(digits)}%` : DASH; }
  function count(x) { return isNum(x) ? x.toLocaleString("en") : DASH; }

  function bytes(n) {
    if (!isNum(n)) return DASH;
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
  }

  /** "3 min ago" for a time, with the exact time as a tooltip. */
  function when(iso) {
    const span = make("time", "when");
    if (!iso) { span.textContent = DASH; return span; }
    const t = new Date(typeof iso === "number" ? iso * 1000 : iso);
    if (Number.isNaN(t.getTime())) { span.textContent = String(iso); return span; }
    span.dateTime = t.toISOString();
    span.title = t.toLocaleString();
    span.textContent = ago(t);
    return span;
  }

  function ago(t) {
    const s = Math.round((Date.now() - t.getTime()) / 1000);
    return s < 45 ? "just now" : s < 3600 ? `${Math.round(s / 60)} min ago`
      : s < 86400 ? `${Math.round(s / 3600)} h ago` : t.toLocaleDateString();
  }

  /** Sections redraw only when their data changes, so "2 min ago" is kept current here. */
  function touchTimes() {
    document.querySelectorAll("time.when[datetime]").forEach((node) => {
      const text = ago(new Date(node.dateTime));
      if (node.textContent !== text) node.textContent = text;
    });
  }

  function stageBadge(stage) {
    const b = make("span", `stage stage-${stage || "unknown"}`, stage || "unknown");
    return b;
  }

  function cell(row, content, className) {
    const td = make("td", className);
    if (content instanceof Node) td.append(content); else td.textContent = content ?? DASH;
    row.append(td);
    return td;
  }

  /** Redraw a section only when its data changed; keep keyboard focus where it was. */
  function draw(section, data, render) {
    const json = JSON.stringify(data);
    if (state.rendered[section] === json) return;
    state.rendered[section] = json;
    const focusKey = document.activeElement?.dataset?.focusKey;
    render(data);
    if (focusKey && !document.activeElement?.dataset?.focusKey) {
      document.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`)?.focus();
    }
  }

  // -- API and errors in words ----------------------------------------------------------------

  /** {ok: true, body} or {ok: false, err} (common.js's error shape): an admin call never throws. */
  async function api(method, path, body) {
    const headers = authHeaders(token(), { Accept: "application/json" });
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      return { ok: false, err: networkError(e) };
    }
    const raw = await res.text().catch(() => "");
    if (!res.ok) return { ok: false, err: errorFrom(res, raw) };
    let json = null;
    try { json = JSON.parse(raw); } catch { /* not JSON: a proxy's page, say */ }
    return { ok: true, body: json };
  }

  function describe(err) {
    switch (err.status) {
      case 0: return ["Could not reach the Kaizen server.", "Check that it is running, then refresh."];
      case 401: return ["This page needs the admin token.",
        "Enter the server's KAIZEN_ADMIN_TOKEN under Admin token, or, on a local development server, " +
        "open the URL that `kaizen config --show-admin-url` prints on the server machine."];
      case 403: return ["The admin token was not accepted.",
        "Check it under Admin token: it must be the server's KAIZEN_ADMIN_TOKEN (a user API key is not enough)."];
      case 404: return ["Not found.", "The server does not know what the page asked for."];
      case 409: return ["The registry refused the change.", "It conflicts with the current rollout; see the reason below."];
      case 400: case 422: return ["The server rejected these values.", "See the reason below and try again."];
      case 429: return ["Too many requests.", "Wait a little and try again."];
      case 503: return ["The server is not ready.", "The model may still be loading; try again shortly."];
      default:
        if (err.status >= 500) return ["The server had a problem.", "Try again; if it keeps happening, check its logs."];
        return ["The server refused the request.", ""];
    }
  }

  function errorBox(err) {
    const [title, advice] = describe(err);
    return window.Kaizen.errorBox(err, title, advice);
  }

  function showAlert(err) {
    // the same error twice in a row (polling) keeps the one box, so screen readers are not flooded
    const same = ui.alerts.firstElementChild;
    if (same && same.dataset.status === String(err.status) && same.dataset.message === err.message) return;
    const box = errorBox(err);
    box.dataset.message = err.message;
    ui.alerts.replaceChildren(box);
  }

  function sectionError(container, err) {
    const [title] = describe(err);
    container.replaceChildren(make("p", "empty-note",
      err.status === 404 ? "Not available on this server (HTTP 404)." : `${title} (HTTP ${err.status})`));
  }

  // -- loading ------------------------------------------------------------------------------

  async function refresh() {
    if (state.loading) return;
    state.loading = true;
    ui.refresh.setAttribute("aria-busy", "true");
    try {
      const [versions, rollout, stats, rounds, audit, schedule] = await Promise.all([
        api("GET", "/admin/versions"), api("GET", "/admin/rollout"), api("GET", "/admin/stats"),
        api("GET", "/admin/rounds?limit=50"), api("GET", "/admin/audit?limit=50"), api("GET", "/admin/schedule"),
      ]);
      const results = [versions, rollout, stats, rounds, audit];
      const denied = results.find((r) => !r.ok && (r.err.status === 401 || r.err.status === 403));
      const down = results.find((r) => !r.ok && r.err.status === 0);
      if (denied || down) {
        tokenRefused(denied ? denied.err : null);
        showAlert((denied || down).err);
        document.body.dataset.state = denied ? "denied" : "offline";
        if (denied) delete document.body.dataset.loaded;
        return;
      }
      state.authFailed = false;
      ui.alerts.replaceChildren();
      ui.tokenHint.innerHTML = tokenHintText;
      ui.tokenHint.classList.remove("warn");
      if (rollout.ok) { state.rollout = rollout.body; draw("rollout", rollout.body, renderRollout); }
      else sectionError(ui.h2hChart, rollout.err);
      if (versions.ok) { state.versions = versions.body; draw("versions", versions.body, renderVersions); }
      else sectionError(ui.detail, versions.err);
      if (stats.ok) draw("stats", stats.body, renderStats); else { state.rendered.stats = null; sectionError(ui.rates, stats.err); }
      if (rounds.ok) draw("rounds", rounds.body, renderRounds);
      else { state.rendered.rounds = null; sectionError(ui.roundsCharts, rounds.err); }
      if (audit.ok) draw("audit", audit.body, renderAudit);
      renderFirstRun(versions.ok ? versions.body : null, schedule.ok ? schedule.body : null);
      document.body.dataset.state = "ready";
      document.body.dataset.loaded = "true";
      touchTimes();
      ui.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } finally {
      state.loading = false;
      ui.refresh.removeAttribute("aria-busy");
    }
  }

  function tokenRefused(err) {
    state.authFailed = Boolean(err);
    state.rendered = {};
    if (!err) return;
    settings.open(!token());
    ui.tokenHint.textContent = token()
      ? "The server did not accept this token. Check it for typos."
      : "Paste the server's admin token (KAIZEN_ADMIN_TOKEN) here; a local development server " +
        "generates one: `kaizen config --show-admin-url` prints the URL that signs in with it.";
    ui.tokenHint.classList.add("warn");
  }

  function tick() {
    if (document.hidden || state.authFailed || ui.dialog.open) return;
    refresh();
  }

  // -- traffic and head-to-head ---------------------------------------------------------------

  function renderRollout(r) {
    const fraction = r.canary ? (isNum(r.canary_fraction) ? r.canary_fraction : 0) : 0;
    renderSplit(r, fraction);
    renderServing(r, fraction);

    ui.autoRollout.textContent = r.auto_rollout ? "auto rollout on" : "auto rollout off";
    ui.autoRollout.title = r.auto_rollout
      ? "The server promotes or rolls back the canary from live votes"
      : "Only operators promote or roll back";

    ui.promoteCanary.disabled = !r.canary;
    ui.promoteCanary.textContent = r.canary ? `Promote ${r.canary}…` : "Promote canary…";
    ui.rollback.disabled = !r.champion;
    ui.rollback.textContent = r.canary ? `Roll back ${r.canary}…` : `Roll back ${r.champion || ""}…`.replace(" …", "…");

    renderHeadToHead(r);
    renderHealth(r.health || {}, r);
  }

  /** The champion/canary traffic bar, its shares in words for screen readers. */
  function renderSplit(r, fraction) {
    ui.split.replaceChildren();
    ui.split.dataset.champion = r.champion || "";
    ui.split.dataset.canary = r.canary || "";
    ui.split.dataset.fraction = String(fraction);
    const parts = [{ cls: "champion", version: r.champion, share: 1 - fraction, role: "champion" }];
    if (r.canary) parts.push({ cls: "canary", version: r.canary, share: fraction, role: "canary" });
    for (const p of parts) {
      const seg = make("div", `split-seg ${p.cls}`);
      seg.style.flexGrow = String(Math.max(p.share, 0.0001));
      seg.append(make("span", "split-label", `${p.version || DASH} · ${pct(p.share)}`));
      seg.title = `${p.role} ${p.version}: ${pct(p.share, 1)} of users`;
      ui.split.append(seg);
    }
    const words = r.canary
      ? `Traffic split: champion ${r.champion} ${pct(1 - fraction)}, canary ${r.canary} ${pct(fraction)}`
      : `Traffic split: champion ${r.champion || "none"} 100%, no canary`;
    ui.split.setAttribute("aria-label", words);
  }

  /** The registry's rollout next to what the server serves now (they differ while it switches). */
  function renderServing(r, fraction) {
    ui.splitLegend.replaceChildren();
    const fact = (term, value, id) => {
      const d = make("div");
      const dd = make("dd");
      if (id) dd.id = id;
      if (value instanceof Node) dd.append(value); else dd.textContent = value;
      d.append(make("dt", "", term), dd);
      ui.splitLegend.append(d);
    };
    fact("Champion", r.champion || "none");
    fact("Canary", r.canary ? `${r.canary} on ${pct(fraction)} of users` : "none");
    if (r.canary && r.canary_started) fact("Canary since", when(r.canary_started));
    const serving = r.serving || {};
    fact("Serving now", serving.canary ? `${serving.champion} and ${serving.canary}` : (serving.champion || DASH),
      "serving-now");

    const switching = (serving.champion && serving.champion !== r.champion)
      || ((serving.canary || null) !== (r.canary || null));
    ui.servingNote.textContent = switching
      ? "The server is switching to what the registry says; this updates on its own."
      : "";
    const refused = Object.entries(r.refused || {});
    if (refused.length) {
      ui.servingNote.textContent = [ui.servingNote.textContent,
        ...refused.map(([v, why]) => `The server refuses to load ${v}: ${why}.`)].filter(Boolean).join(" ");
    }
    ui.servingNote.classList.toggle("warn", Boolean(switching || refused.length));
  }

  function renderHeadToHead(r) {
    const h = r.head_to_head || {};
    const d = r.decision || {};
    ui.decision.className = `pill decision-${d.state || "none"}`;
    if (r.canary && !r.auto_rollout && (!d.state || d.state === "none")) {
      // the server judges only when it may act on the verdict
      ui.decision.textContent = "manual decision";
      ui.decisionReason.textContent = "Auto rollout is off: promote or roll back by hand.";
    } else if (r.canary && !r.auto_rollout) {
      // auto rollout off: the server's verdict is advice; the operator acts
      ui.decision.textContent = `advice: ${d.state}`;
      ui.decisionReason.textContent = `${d.reason || ""} (auto rollout is off: promote or roll back by hand)`;
    } else {
      ui.decision.textContent = d.state ? `decision: ${d.state}` : "";
      ui.decisionReason.textContent = d.reason || "";
    }
    ui.h2hChart.replaceChildren();
    if (!r.canary) {
      ui.h2hChart.append(make("p", "empty-note", "No canary running. Put a version on canary from the table below."));
      return;
    }
    if (!h.votes) {
      ui.h2hChart.append(make("p", "empty-note", `No votes between ${r.canary} and ${r.champion} yet.`));
      return;
    }
    ui.h2hChart.append(winRateChart(h, r), voteBar(h, r));
  }

  /** Win rate of the canary over the champion with its interval, on a 0–100% axis. */
  function winRateChart(h, r) {
    const W = 320, H = 58, L = 10, R = 310, y = 24;
    const x = (v) => L + (R - L) * Math.min(Math.max(v, 0), 1);
    const words = `Canary ${r.canary} win rate ${pct(h.win_rate, 1)}`
      + (isNum(h.lower) ? `, interval ${pct(h.lower, 1)} to ${pct(h.upper, 1)}` : "")
      + `, over ${h.votes} votes; 50% means no difference`;
    const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "winrate", role: "img", "aria-label": words });
    s.append(svg("title", {}, words));
    s.append(svg("line", { x1: L, x2: R, y1: y, y2: y, class: "axis" }));
    for (const t of [0, 0.25, 0.5, 0.75, 1]) {
      s.append(svg("line", { x1: x(t), x2: x(t), y1: y - 4, y2: y + 4, class: "tick" }));
      s.append(svg("text", { x: x(t), y: H - 4, class: "tick-label", "text-anchor": "middle" }, `${t * 100}%`));
    }
    s.append(svg("line", { x1: x(0.5), x2: x(0.5), y1: 4, y2: y + 10, class: "even" }));
    if (isNum(h.lower) && isNum(h.upper)) {
      s.append(svg("rect", { x: x(h.lower), y: y - 7, width: Math.max(x(h.upper) - x(h.lower), 1), height: 14, rx: 4, class: "interval" }));
    }
    if (isNum(h.win_rate)) {
      s.append(svg("circle", { cx: x(h.win_rate), cy: y, r: 6, class: "point" }));
      const anchor = h.win_rate > 0.85 ? "end" : h.win_rate < 0.15 ? "start" : "middle";
      s.append(svg("text", { x: x(h.win_rate), y: 11, class: "value-label", "text-anchor": anchor }, pct(h.win_rate, 1)));
    }
    const wrap = make("figure", "figure");
    wrap.dataset.winRate = String(h.win_rate);
    wrap.append(s, make("figcaption", "hint", `${r.canary} vs ${r.champion}: win rate with its interval (shaded)`));
    return wrap;
  }

  /** Votes split into canary wins, champion wins, ties and both-bad. */
  function voteBar(h, r) {
    const parts = [
      { cls: "canary", label: `${r.canary} better`, n: h.canary_wins },
      { cls: "champion", label: `${r.champion} better`, n: h.champion_wins },
      { cls: "tie", label: "tie", n: h.ties },
      { cls: "bad", label: "both bad", n: h.both_bad },
    ];
    const box = make("div", "votebar-box");
    const bar = make("div", "votebar");
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${h.votes} votes: ` + parts.map((p) => `${count(p.n || 0)} ${p.label}`).join(", "));
    const legend = make("ul", "legend");
    for (const p of parts) {
      const n = isNum(p.n) ? p.n : 0;
      if (n > 0) {
        const seg = make("span", `votebar-seg ${p.cls}`);
        seg.style.flexGrow = String(n);
        bar.append(seg);
      }
      const li = make("li");
      li.append(make("span", `swatch ${p.cls}`), make("span", "", `${p.label} `), make("strong", "", count(n)));
      legend.append(li);
    }
    box.append(bar, legend);
    return box;
  }

  function renderHealth(health, r) {
    ui.health.replaceChildren();
    for (const side of ["champion", "canary"]) {
      const hh = health[side];
      if (!hh) continue;
      const tr = make("tr");
      const th = make("th", "", `${side} ${side === "champion" ? r.champion : r.canary}`);
      th.scope = "row";
      tr.append(th);
      cell(tr, count(hh.requests), "num");
      cell(tr, `${count(hh.errors)} (${pct(hh.error_rate, 1)})`, "num");
      cell(tr, isNum(hh.ttft_p50_s) ? `${(hh.ttft_p50_s * 1000).toFixed(0)} ms` : DASH, "num");
      ui.health.append(tr);
    }
  }

  // -- rates -------------------------------------------------------------------------------------

  function renderStats(s) {
    ui.rates.replaceChildren();
    const stat = (label, value, id) => {
      const d = make("div", "stat");
      const dd = make("dd", "stat-value", value);
      if (id) dd.id = id;
      d.append(make("dt", "stat-label", label), dd);
      ui.rates.append(d);
    };
    stat("Requests / s", num(s.requests_per_s, 2), "requests-rate");
    stat("Votes / s", num(s.votes_per_s, 2), "votes-rate");
    stat("Requests", count(s.requests_total));
    stat("Votes", count(s.votes_total));
    ui.window.textContent = isNum(s.window_s) ? `rates over the last ${s.window_s >= 120 ? `${Math.round(s.window_s / 60)} min` : `${s.window_s} s`}` : "";
    ui.votesChart.replaceChildren();
    const by = s.votes_by_choice || {};
    const keys = Object.keys(by);
    if (!keys.length) return;
    const max = Math.max(1, ...keys.map((k) => by[k] || 0));
    const list = make("ul", "bars");
    list.setAttribute("aria-label", "Votes by choice");
    for (const k of keys) {
      const li = make("li");
      const fill = make("span", "bar-fill");
      fill.style.width = `${((by[k] || 0) / max) * 100}%`;
      const track = make("span", "bar-track");
      track.setAttribute("aria-hidden", "true");
      track.append(fill);
      li.append(make("span", "bar-label", CHOICE_LABELS[k] || k), track, make("span", "bar-value", count(by[k])));
      list.append(li);
    }
    ui.votesChart.append(list);
  }

  // -- versions ----------------------------------------------------------------------------------

  function versionNumber(v) { const m = /^v(\d+)$/.exec(v || ""); return m ? Number(m[1]) : -1; }

  function renderVersions(body) {
    const items = (body.data || []).slice().sort((a, b) => versionNumber(b.version) - versionNumber(a.version));
    ui.versionsCount.textContent = `${items.length} version${items.length === 1 ? "" : "s"}`;
    ui.versions.replaceChildren();
    if (!items.length) {
      const tr = make("tr");
      const td = cell(tr, "No versions yet.", "empty-note");
      td.colSpan = 10;
      ui.versions.append(tr);
    }
    for (const v of items) {
      const tr = make("tr");
      tr.dataset.version = v.version;
      tr.dataset.stage = v.stage;
      const th = make("th");
      th.scope = "row";
      th.append(make("span", "mono", v.version));
      if (v.serving) th.append(make("span", "serving-dot", "serving"));
      tr.append(th);
      const stageCell = cell(tr, stageBadge(v.stage));
      stageCell.title = v.stage_reason || "";
      if (v.refused) stageCell.append(make("span", "refused", `refused by the server: ${v.refused}`));
      cell(tr, v.parent || DASH, "mono");
      cell(tr, when(v.created));
      cell(tr, v.reward_model || DASH, "mono");
      const gate = v.gate || {};
      cell(tr, pct(gate.win_rate, 1), "num");
      cell(tr, num(gate.kl, 4), "num");
      cell(tr, gate.passed === true ? "passed" : gate.passed === false ? "failed" : DASH,
        gate.passed === true ? "ok-text" : gate.passed === false ? "bad-text" : "");
      cell(tr, bytes(v.size_bytes), "num");
      const actions = make("div", "row-actions");
      const isServing = v.version === body.champion || v.version === body.canary;
      if (!isServing) {
        actions.append(actionButton("Canary…", `Put ${v.version} on canary`, "canary", v.version));
      }
      if (v.version !== body.champion) {
        actions.append(actionButton("Promote…", `Promote ${v.version} to champion`, "promote", v.version));
      }
      const details = actionButton("Details", `Details of ${v.version}`, "details", v.version);
      details.setAttribute("aria-expanded", String(state.detailVersion === v.version));
      details.setAttribute("aria-controls", "version-detail");
      actions.append(details);
      cell(tr, actions);
      ui.versions.append(tr);
    }
    if (state.detailVersion) loadDetail(state.detailVersion, false);
  }

  function actionButton(text, label, action, version) {
    const b = make("button", "secondary small", text);
    b.type = "button";
    b.dataset.action = action;
    b.dataset.version = version;
    b.dataset.focusKey = `${action}:${version}`;
    b.setAttribute("aria-label", label);
    return b;
  }

  async function loadDetail(version, focus) {
    const res = await api("GET", `/admin/versions/${encodeURIComponent(version)}`);
    if (state.detailVersion !== version) return;
    ui.detail.hidden = false;
    if (!res.ok) { ui.detail.replaceChildren(errorBox(res.err)); return; }
    const json = JSON.stringify(res.body);
    if (ui.detail.dataset.json === json) return;
    ui.detail.dataset.json = json;
    renderDetail(res.body);
    if (focus) ui.detail.focus();
  }

  function renderDetail(v) {
    ui.detail.replaceChildren();
    const head = make("div", "detail-head");
    head.append(make("h3", "", `Version ${v.version}`), stageBadge(v.stage));
    const close = make("button", "secondary small", "Close");
    close.type = "button";
    close.dataset.action = "close-detail";
    close.dataset.focusKey = "close-detail";
    head.append(close);
    ui.detail.append(head);

    const lineage = make("p", "lineage");
    lineage.append(make("strong", "", "Lineage: "));
    const chain = v.lineage && v.lineage.length ? v.lineage : [v.version];
    chain.forEach((name, i) => {
      if (i) lineage.append(make("span", "arrow", " ← "));
      lineage.append(make("span", "mono", name));
    });
    lineage.append(make("span", "hint", "  (newest first, back to the base model)"));
    ui.detail.append(lineage);
    if (v.stage_reason) ui.detail.append(make("p", "hint", `Stage since ${new Date(v.stage_changed).toLocaleString()}: ${v.stage_reason}`));

    const groups = make("div", "kv-groups");
    groups.append(kvList("Training", v.training), kvList("Gate", v.gate));
    ui.detail.append(groups);
    if (Array.isArray(v.audit) && v.audit.length) {
      ui.detail.append(make("h4", "", "History"));
      const list = make("ol", "history");
      for (const e of v.audit.slice().reverse()) {
        const li = make("li");
        li.append(when(e.at), make("span", "", ` ${e.action}`));
        if (e.from_stage || e.to_stage) li.append(make("span", "hint", ` ${e.from_stage || "·"} → ${e.to_stage || "·"}`));
        li.append(make("span", "", ` by ${e.who}${e.why ? `: ${e.why}` : ""}`));
        list.append(li);
      }
      ui.detail.append(list);
    }
  }

  function kvList(title, obj) {
    const box = make("div", "kv");
    box.append(make("h4", "", title));
    const entries = Object.entries(obj || {});
    if (!entries.length) { box.append(make("p", "hint", "nothing recorded")); return box; }
    const dl = make("dl", "facts");
    for (const [k, val] of entries) {
      const d = make("div");
      const dd = make("dd", "mono");
      if (typeof val === "object" && val !== null) {
        // nested records (PPO summary, config, sanity answers): folded, as the server sent them
        d.className = "kv-wide";
        const box = make("details");
        box.append(make("summary", "", Array.isArray(val) ? `${val.length} items` : `${Object.keys(val).length} fields`),
          make("pre", "json", JSON.stringify(val, null, 2)));
        dd.append(box);
      } else {
        dd.textContent = isNum(val) ? (Number.isInteger(val) ? count(val) : num(val, 4)) : String(val);
      }
      d.append(make("dt", "", k.replaceAll("_", " ")), dd);
      dl.append(d);
    }
    box.append(dl);
    return box;
  }

  // -- training rounds ------------------------------------------------------------------------------

  const first = (...xs) => xs.find((x) => x !== undefined && x !== null) ?? null;

  /** The fields the page shows, picked from a round record: the names of the admin API's
   *  contract first, then those trainer/rounds.py writes (`ppo` summary, `gate`). */
  function roundView(r) {
    const ppo = r.ppo || {};
    const gate = r.gate || {};
    return {
      id: first(r.round, r.round_id),
      started: r.started || null,
      at: first(r.finished, r.ended, r.started),
      outcome: [r.outcome, r.outcome === "running" && r.phase ? `(${r.phase})` : ""].filter(Boolean).join(" "),
      version: r.version || null,
      reward_model: r.reward_model || null,
      rm_accuracy: first(r.rm_accuracy, r.reward_accuracy),
      reward_mean: first(r.reward_mean, ppo.reward_last),
      kl: first(r.kl, gate.kl, ppo.kl_last),
      kl_coef: first(r.kl_coef, ppo.kl_coef_last),
      win_rate: first(gate.win_rate),
      gate_kl: first(gate.kl),
      sanity: first(gate.sanity_passed),
      passed: gate.passed,
      note: first(r.reason, r.error, Array.isArray(gate.failed) && gate.failed.length ? gate.failed.join("; ") : null),
    };
  }

  function shortTime(iso) {
    const t = new Date(iso);
    return Number.isNaN(t.getTime()) ? "" : t.toLocaleString("en", { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function renderRounds(body) {
    // the server sends newest first; charts read left to right, oldest first
    const rounds = (body.data || []).slice().reverse().map(roundView);
    ui.roundsCount.textContent = `${rounds.length} round${rounds.length === 1 ? "" : "s"}`;
    ui.roundsCharts.replaceChildren();
    if (!rounds.length) {
      ui.roundsCharts.append(make("p", "empty-note", "No training rounds yet."));
    } else {
      for (const series of ROUND_SERIES) ui.roundsCharts.append(lineChart(rounds, series));
    }
    ui.rounds.replaceChildren();
    for (const r of rounds.slice().reverse()) {
      const tr = make("tr");
      const th = make("th", "mono", r.id ?? DASH);
      th.scope = "row";
      tr.append(th);
      cell(tr, when(r.at));
      cell(tr, r.outcome || DASH).title = r.note || "";
      const versionCell = cell(tr, r.version ? "" : DASH, "mono");
      if (r.version) {
        // the round's published version: opens its details (lineage, gate and training numbers)
        const link = actionButton(r.version, `Details of ${r.version}, published by round ${r.id}`, "details", r.version);
        link.className = "link-button mono";
        link.dataset.focusKey = `round-details:${r.id}`;
        versionCell.append(link);
      }
      cell(tr, r.reward_model || DASH, "mono");
      cell(tr, pct(r.rm_accuracy, 1), "num");
      cell(tr, num(r.reward_mean, 3), "num");
      cell(tr, num(r.kl, 4), "num");
      cell(tr, num(r.kl_coef, 3), "num");
      const gateCell = cell(tr, r.passed === true ? `passed (${pct(r.win_rate, 0)})` : r.passed === false ? `failed (${pct(r.win_rate, 0)})` : DASH,
        r.passed === true ? "ok-text" : r.passed === false ? "bad-text" : "");
      if (r.passed === true || r.passed === false) {
        gateCell.append(make("span", "gate-numbers", ` · KL ${num(r.gate_kl, 3)}`
          + (r.sanity === false ? " · sanity failed" : "")));
        if (r.note) gateCell.title = r.note;
      }
      ui.rounds.append(tr);
    }
  }

  /** One metric over the rounds as a small line chart, oldest left (points where it is known). */
  function lineChart(rounds, series) {
    const pts = rounds.map((r, i) => ({ i, y: r[series.key], r })).filter((p) => isNum(p.y));
    const fig = make("figure", "figure round-chart");
    fig.dataset.series = series.key;
    const fmt = (y) => (series.percent ? pct(y, 1) : num(y, series.digits));
    const head = make("figcaption", "chart-title");
    const latest = make("strong", "", pts.length ? fmt(pts[pts.length - 1].y) : DASH);
    latest.className = "latest";
    head.append(make("span", "", series.title), latest);
    fig.append(head);
    if (!pts.length) {
      fig.append(make("p", "empty-note", "not recorded"));
      return fig;
    }
    const W = 300, H = 110, L = 44, R = 292, T = 10, B = 88;
    const ys = pts.map((p) => p.y);
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (series.percent) { lo = Math.min(lo, 0.5); hi = Math.max(hi, 0.5); }
    if (hi === lo) { hi += Math.abs(hi) * 0.1 || 1; lo -= Math.abs(lo) * 0.1 || 0; }
    const n = rounds.length;
    const X = (i) => (n === 1 ? (L + R) / 2 : L + (i / (n - 1)) * (R - L));
    const Y = (v) => B - ((v - lo) / (hi - lo)) * (B - T);
    const words = `${series.title} over ${pts.length} round${pts.length === 1 ? "" : "s"}: `
      + `first ${fmt(ys[0])}, latest ${fmt(ys[ys.length - 1])}, lowest ${fmt(Math.min(...ys))}, highest ${fmt(Math.max(...ys))}`;
    const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "line-chart", role: "img", "aria-label": words });
    s.append(svg("title", {}, words));
    s.append(svg("line", { x1: L, x2: R, y1: B, y2: B, class: "axis" }));
    s.append(svg("line", { x1: L, x2: R, y1: T, y2: T, class: "grid" }));
    s.append(svg("text", { x: L - 5, y: T + 4, class: "tick-label", "text-anchor": "end" }, fmt(hi)));
    s.append(svg("text", { x: L - 5, y: B + 4, class: "tick-label", "text-anchor": "end" }, fmt(lo)));
    s.append(svg("text", { x: L, y: H - 4, class: "tick-label", "text-anchor": "start" }, shortTime(rounds[0].started)));
    if (n > 1) s.append(svg("text", { x: R, y: H - 4, class: "tick-label", "text-anchor": "end" }, shortTime(rounds[n - 1].started)));
    if (series.percent && lo < 0.5 && hi > 0.5) {
      s.append(svg("line", { x1: L, x2: R, y1: Y(0.5), y2: Y(0.5), class: "even" }));
    }
    if (pts.length > 1) {
      s.append(svg("polyline", { points: pts.map((p) => `${X(p.i)},${Y(p.y)}`).join(" "), class: "series" }));
    }
    for (const p of pts) {
      const dot = svg("circle", { cx: X(p.i), cy: Y(p.y), r: 3.5, class: p.r.passed === false ? "point hollow" : "point" });
      dot.append(svg("title", {}, `${p.r.id ?? "round"}: ${fmt(p.y)}${p.r.outcome ? ` (${p.r.outcome})` : ""}`));
      s.append(dot);
    }
    fig.append(s);
    const legend = make("p", "chart-note", "Hollow: the gate rejected that round's model.");
    if (pts.some((p) => p.r.passed === false)) fig.append(legend);
    return fig;
  }

  // -- audit -----------------------------------------------------------------------------------------

  function renderAudit(body) {
    ui.audit.replaceChildren();
    const entries = body.data || [];
    if (!entries.length) {
      const tr = make("tr");
      cell(tr, "Nothing recorded yet.", "empty-note").colSpan = 6;
      ui.audit.append(tr);
    }
    for (const e of entries) {
      const tr = make("tr");
      tr.dataset.action = e.action;
      cell(tr, when(e.at));
      cell(tr, e.action);
      cell(tr, e.version || DASH, "mono");
      cell(tr, e.from_stage || e.to_stage ? `${e.from_stage || "·"} → ${e.to_stage || "·"}` : DASH);
      cell(tr, e.who);
      cell(tr, e.why || DASH);
      ui.audit.append(tr);
    }
  }

  // -- actions: canary, promote, roll back ------------------------------------------------------------

  function ask(action, version, opener) {
    const r = state.rollout || {};
    state.pending = { action, version };
    state.opener = opener || document.activeElement;
    ui.dialogError.replaceChildren();
    ui.reason.value = "";
    ui.fractionField.hidden = action !== "canary";
    ui.fraction.required = action === "canary";
    ui.dialog.dataset.action = action;
    let title, text, ok;
    if (action === "canary") {
      title = `Put ${version} on canary?`;
      text = `A share of users will get answers from ${version} instead of the champion ${r.champion || ""}. `
        + "Their votes compare the two.";
      ok = "Start canary";
      const row = (state.versions?.data || []).find((v) => v.version === version);
      if (row && row.stage === "rejected") {
        text += ` ${version} was rejected${row.stage_reason ? ` (${row.stage_reason})` : ""}: give a reason to try it anyway.`;
      }
      if (r.canary && r.canary !== version) {
        text += ` ${r.canary} is on canary now: the server will refuse until it is promoted or rolled back.`;
      }
      ui.fraction.value = r.canary === version && isNum(r.canary_fraction)
        ? String(Math.round(r.canary_fraction * 100)) : "50";
    } else if (action === "promote") {
      title = `Promote ${version} to champion?`;
      text = `Every user will get answers from ${version}; the champion ${r.champion || ""} retires `
        + "and stays available for a roll back.";
      ok = `Promote ${version}`;
    } else {
      title = r.canary ? `Roll back the canary ${r.canary}?` : `Roll back the champion ${r.champion}?`;
      text = r.canary
        ? `${r.canary} stops serving and is marked rejected; everyone goes back to ${r.champion}.`
        : `${r.champion} is marked rejected and the previous champion serves again.`;
      ok = "Roll back";
    }
    ui.dialogTitle.textContent = title;
    ui.dialogText.textContent = text;
    ui.dialogOk.textContent = ok;
    ui.dialogOk.className = action === "rollback" ? "danger-button" : "primary";
    ui.dialogOk.disabled = false;
    ui.dialogCancel.disabled = false;
    ui.dialog.showModal();
    (action === "canary" ? ui.fraction : ui.reason).focus();
  }

  function closeDialog() {
    if (ui.dialog.open) ui.dialog.close();
  }

  // Esc while the server works would hide the outcome: the dialog stays until it answers
  ui.dialog.addEventListener("cancel", (e) => { if (state.busy) e.preventDefault(); });

  ui.dialog.addEventListener("close", () => {
    state.pending = null;
    const back = state.opener && document.contains(state.opener) ? state.opener
      : state.opener?.dataset?.focusKey
        ? document.querySelector(`[data-focus-key="${CSS.escape(state.opener.dataset.focusKey)}"]`) : null;
    (back || ui.promoteCanary).focus?.();
    state.opener = null;
  });

  async function confirmAction() {
    const pending = state.pending;
    if (!pending) return;
    const reason = ui.reason.value.trim();
    let path, body;
    if (pending.action === "canary") {
      const percent = Number(ui.fraction.value);
      if (!(percent > 0 && percent <= 100)) {
        ui.dialogError.replaceChildren(errorBox({ status: 422, message: "the share must be between 1 and 100 %", code: null }));
        ui.fraction.focus();
        return;
      }
      path = "/admin/rollout";
      body = { version: pending.version, fraction: percent / 100 };
    } else if (pending.action === "promote") {
      path = "/admin/promote";
      body = { version: pending.version };
    } else {
      path = "/admin/rollback";
      body = {};
    }
    if (reason) body.reason = reason;
    body.who = "operator (web)";
    ui.dialogOk.disabled = true;
    ui.dialogCancel.disabled = true;
    ui.dialogOk.setAttribute("aria-busy", "true");
    ui.dialogError.replaceChildren(make("p", "hint", {
      canary: "Starting the canary: the server loads its weights first, which can take a minute…",
      promote: "Promoting: the server swaps the weights in before it answers…",
      rollback: "Rolling back…",
    }[pending.action]));
    state.busy = true;
    const res = await api("POST", path, body);
    state.busy = false;
    ui.dialogOk.removeAttribute("aria-busy");
    ui.dialogOk.disabled = false;
    ui.dialogCancel.disabled = false;
    if (!res.ok) {
      ui.dialogError.replaceChildren(errorBox(res.err));
      return;
    }
    const r = res.body || {};
    closeDialog();
    showResult(pending, r);
    if (r && (r.champion !== undefined)) {
      state.rollout = r;
      draw("rollout", r, renderRollout);
    }
    refresh();
  }

  function showResult(pending, r) {
    let text;
    if (pending.action === "canary") {
      text = `${r.canary || pending.version} is on canary for ${pct(r.canary_fraction)} of users; champion ${r.champion}.`;
    } else if (pending.action === "promote") {
      text = `${r.champion || pending.version} is the champion now.`;
    } else {
      text = `Rolled back: ${r.champion} serves everyone${r.canary ? `, canary ${r.canary}` : ", no canary"}.`;
    }
    const box = make("div", "notice success");
    box.dataset.action = pending.action;
    box.append(make("strong", "notice-title", "Done. "), make("span", "", text));
    box.append(dismissButton(() => ui.result.replaceChildren()));
    ui.result.replaceChildren(box);
  }

  ui.dialogForm.addEventListener("submit", (e) => { e.preventDefault(); confirmAction(); });
  ui.dialogCancel.addEventListener("click", closeDialog);
  ui.promoteCanary.addEventListener("click", () => {
    if (state.rollout?.canary) ask("promote", state.rollout.canary, ui.promoteCanary);
  });
  ui.rollback.addEventListener("click", () => ask("rollback", null, ui.rollback));

  document.addEventListener("click", (e) => {
    const b = e.target instanceof Element ? e.target.closest("button[data-action]") : null;
    if (!b || ui.dialog.contains(b)) return;
    const { action, version } = b.dataset;
    if (action === "canary" || action === "promote") ask(action, version, b);
    else if (action === "details") {
      if (b.classList.contains("link-button") && state.detailVersion === version) loadDetail(version, true);
      else toggleDetail(version);
      if (b.classList.contains("link-button")) ui.detail.scrollIntoView({ block: "nearest" });
    }
    else if (action === "close-detail") toggleDetail(state.detailVersion);
  });

  function toggleDetail(version) {
    const open = state.detailVersion !== version;
    state.detailVersion = open ? version : null;
    ui.detail.dataset.json = "";
    document.querySelectorAll('button[data-action="details"]').forEach((b) => {
      b.setAttribute("aria-expanded", String(open && b.dataset.version === version));
    });
    if (open) {
      ui.detail.hidden = false;
      ui.detail.replaceChildren(make("p", "hint", `Loading ${version}…`));
      loadDetail(version, true);
    } else {
      ui.detail.hidden = true;
      ui.detail.replaceChildren();
      document.querySelector(`[data-focus-key="details:${CSS.escape(version)}"]`)?.focus();
    }
  }

  // -- first run: only v0 ------------------------------------------------------------------------

  function duration(s) {
    if (!isNum(s)) return DASH;
    if (s >= 3600) return `${(s / 3600).toFixed(s % 3600 ? 1 : 0)} h`;
    if (s >= 60) return `${Math.round(s / 60)} min`;
    return `${Math.round(s)} s`;
  }

  function clock(unix) {
    return isNum(unix) ? new Date(unix * 1000).toLocaleTimeString("en", { hour: "2-digit", minute: "2-digit" }) : DASH;
  }

  /** While only v0 exists: what happens next, from the trainer's own numbers. */
  function renderFirstRun(versions, sched) {
    // skipped rounds (no reward model yet) are part of a first run: the panel stays until a version is published
    const onlyBase = Boolean(versions) && (versions.data || []).length <= 1;
    ui.firstRun.hidden = !onlyBase;
    if (!onlyBase) return;
    const facts = [];
    const fact = (term, text, key) => facts.push([term, text, key]);
    if (!sched || !sched.trainer_reporting) {
      ui.trainerPill.textContent = "trainer not running";
      ui.trainerPill.className = "pill bad-pill";
      fact("Trainer", "Not reporting. Votes wait in the outbox and on Kafka until it runs: `kaizen up` starts it, "
        + "or `kaizen train` alone.", "trainer");
      if (sched) fact("What starts a round", `${count(sched.min_new_preferences)} new votes, or ${duration(sched.round_interval_s)} `
        + "after the last round with at least one new vote.", "trigger");
    } else {
      ui.trainerPill.textContent = sched.round_running ? "training round running" : "trainer waiting for votes";
      ui.trainerPill.className = "pill";
      const needed = Math.max(0, sched.min_new_preferences - sched.new_votes);
      fact("Votes so far", `${count(sched.votes_total)} stored (${count(sched.votes_decided)} chose an answer; `
        + "ties and both-bad teach nothing yet).", "votes");
      fact("What starts a round", `${count(sched.min_new_preferences)} new votes since the last round `
        + `(KAIZEN_MIN_NEW_PREFERENCES), or ${duration(sched.round_interval_s)} after the last round `
        + "(or the trainer's start) if at least one new vote came in (KAIZEN_ROUND_INTERVAL).", "trigger");
      let next;
      if (sched.round_running) next = "A round is running now (about 20 minutes on 2 CPU cores).";
      else if (sched.due) next = `Due now: ${sched.due}.`;
      else if (sched.new_votes > 0) next = `When ${count(needed)} more vote${needed === 1 ? "" : "s"} arrive, or at ${clock(sched.interval_due_at)}, whichever comes first.`;
      else next = `When ${count(needed)} more votes arrive (the ${duration(sched.round_interval_s)} timer needs one new vote first).`;
      fact("Next round", next, "next");
      if (!sched.reward_model) {
        const target = sched.reward_min_holdout;
        const approx = Math.round(target / sched.reward_holdout_fraction);
        fact("First reward model", `Needs ${count(target)} held-out votes that chose an answer (about ${count(approx)} such votes: `
          + `${pct(sched.reward_holdout_fraction)} are held out to judge it); ${count(sched.votes_held_out)} so far. `
          + "Until then rounds are skipped.", "reward");
      } else {
        fact("Reward model", sched.reward_model, "reward");
      }
    }
    ui.firstRunFacts.replaceChildren();
    for (const [term, text, key] of facts) {
      const div = make("div");
      div.dataset.fact = key;
      div.append(make("dt", "", term), make("dd", "", text));
      ui.firstRunFacts.append(div);
    }
  }

  // -- token ---------------------------------------------------------------------------------------

  async function useToken() {
    storageSet(TOKEN_STORE, token());
    state.authFailed = false;
    state.rendered = {};
    await refresh();
    if (!state.authFailed && document.body.dataset.state === "ready") {
      announce("Admin token accepted.");
      settings.close();
      el("main").focus();
    }
  }

  ui.tokenForm.addEventListener("submit", (e) => { e.preventDefault(); useToken(); });
  revealButton(ui.showToken, ui.token);
  ui.forgetToken.addEventListener("click", () => { ui.token.value = ""; storageSet(TOKEN_STORE, ""); ui.token.focus(); });
  ui.refresh.addEventListener("click", () => { state.authFailed = false; refresh(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) tick(); });

  // -- start ---------------------------------------------------------------------------------------

  // `kaizen up` prints this page's address with the admin token in the fragment
  // (/admin#token=...): browsers never send a fragment to the server, so it stays out of
  // logs. Take it, keep it like a typed token, and clear it from the address bar and history.
  const fragment = new URLSearchParams(location.hash.slice(1));
  const fromUrl = fragment.get("token");
  if (fromUrl) {
    storageSet(TOKEN_STORE, fromUrl.trim());
    history.replaceState(null, "", location.pathname + location.search);
  }
  ui.token.value = storageGet(TOKEN_STORE) || "";
  refresh();
  if (REFRESH_MS > 0) window.setInterval(tick, REFRESH_MS);
})();
