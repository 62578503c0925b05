// Kaizen chat page: plain JS, no build step, no external code.
//
// Talks to the same origin's OpenAI-shaped API:
//   POST /v1/chat/completions  {"stream": true, "comparison": "allow"|"off"|"force"}
//        -> SSE `data:` lines of chat.completion.chunk, then `data: [DONE]`;
//           a paired answer carries a top-level `comparison_id` and choices 0 and 1
//   POST /v1/feedback          {"comparison_id", "choice": 0|1|"tie"|"both_bad", "reason"?}
//   GET  /v1/models            the served version (also in X-Kaizen-Model-Version)
//
// Answers are drawn as Markdown by markdown.js (DOM nodes and text nodes only, never HTML);
// the helpers both pages share (elements, storage, errors, the settings panel) are common.js's.
// The conversation is kept in localStorage (kaizen.chat) until "New chat", so a reload keeps it;
// a pair not yet voted on can still be voted on after a reload.
//
// Hidden query parameters: ?compare=force|off (tests, demos), ?max_tokens=N.
"use strict";

(() => {
  const {
    make, announce, authHeaders, apiError, networkError, dismissButton, settingsPanel, revealButton,
  } = window.Kaizen;
  const { get: storageGet, set: storageSet } = window.Kaizen.storage("localStorage");
  const KEY_STORE = "kaizen.apiKey";
  const COMPARE_STORE = "kaizen.compare";
  const CHAT_STORE = "kaizen.chat";
  const CHAT_FORMAT = 1;
  const VERSION_HEADER = "X-Kaizen-Model-Version";
  const LABELS = ["A", "B"];
  // Vote keys (documented on the page): digits and letters, either works.
  const VOTE_KEYS = { "1": 0, a: 0, "2": 1, b: 1, "3": "tie", t: "tie", "4": "both_bad", x: "both_bad" };
  const CHOICES = [
    { choice: 0, text: "A is better", key: "1" },
    { choice: 1, text: "B is better", key: "2" },
    { choice: "tie", text: "Tie", key: "3" },
    { choice: "both_bad", text: "Both are bad", key: "4" },
  ];

  const params = new URLSearchParams(location.search);
  const compareParam = ["force", "off", "allow"].includes(params.get("compare")) ? params.get("compare") : null;
  const maxTokensParam = Number.parseInt(params.get("max_tokens") || "", 10);

  const el = (id) => document.getElementById(id);
  const ui = {
    log: el("log"), empty: el("empty"), main: el("main"), alerts: el("alerts"),
    form: el("composer"), prompt: el("prompt"), send: el("send"), stop: el("stop"),
    newChat: el("new-chat"), version: el("model-version"),
    settings: el("settings"), settingsToggle: el("settings-toggle"),
    key: el("api-key"), showKey: el("show-key"), forgetKey: el("forget-key"), keyHint: el("key-hint"),
    compare: el("compare"), compareNote: el("compare-note"),
  };
  const keyHintText = ui.keyHint.innerHTML;
  const settings = settingsPanel(ui.settings, ui.settingsToggle, ui.key);

  const state = {
    messages: [],        // the conversation as the API sees it (committed turns only)
    controller: null,    // AbortController of the answer being streamed
    pair: null,          // the paired answer waiting for a vote
    turns: [],           // what the log shows, as saved in localStorage (see saveChat)
  };

  // -- small helpers ------------------------------------------------------------------

  function apiKey() { return ui.key.value.trim(); }

  function headers(extra) { return authHeaders(apiKey(), extra); }

  function nearBottom() {
    const m = ui.main;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollToEnd(force) {
    if (force || state.stick) ui.main.scrollTop = ui.main.scrollHeight;
  }

  function comparisonMode() {
    if (compareParam) return compareParam;
    return ui.compare.checked ? "allow" : "off";
  }

  // -- errors, in words -----------------------------------------------------------------

  function seconds(n) { return n === 1 ? "1 second" : `${n} seconds`; }

  /** A title and an explanation a person can act on, for the place the error happened. */
  function describe(err, where) {
    const wait = err.retryAfter ? seconds(err.retryAfter) : null;
    switch (err.status) {
      case 0:
        return ["Could not reach the Kaizen server.", "Check your connection and that the server is running, then try again."];
      case 401:
        return ["Your API key was not accepted.", apiKey()
          ? "Check the key under Settings: it may be mistyped or revoked."
          : "This server needs an API key: enter it under Settings."];
      case 403:
        return where === "vote"
          ? ["This comparison belongs to someone else.", "Only the person it was shown to can vote on it."]
          : ["This key may not do that.", "Ask the operator for a key with access."];
      case 404:
        return where === "vote"
          ? ["The server does not know this comparison.", "It may have been cleaned up; your vote was not recorded."]
          : ["Not found.", "The server does not offer what the page asked for."];
      case 409:
        return ["This comparison already has a vote.", "Only the first vote on a pair counts."];
      case 410:
        return ["This comparison has expired.", "Pairs can only be voted on for a limited time after they are shown."];
      case 413:
        return ["The message is too long for this server.", "Start a new chat or shorten the message."];
      case 429:
        return ["Too many requests: you are being rate limited.",
          wait ? `Please wait ${wait} before trying again.` : "Please wait a little before trying again."];
      case 503:
        if (err.code === "loading") return ["The model is still loading.", "Try again in a few seconds."];
        return ["The server is busy right now.", wait ? `Try again in ${wait}.` : "Try again shortly."];
      default:
        if (err.status >= 500) return ["The server had a problem answering.", "Try again; if it keeps happening, tell the operator."];
        return ["The server refused the request.", ""];
    }
  }

  /** An alert box (role=alert): title, advice (a countdown while rate limited), what the server said. */
  function errorBox(err, where) {
    const [title, advice] = describe(err, where);
    const rateLimited = err.status === 429 && err.retryAfter;
    return window.Kaizen.errorBox(err, title, rateLimited ? countdown(err.retryAfter, where) : advice);
  }

  /** "Please wait N seconds", counting down each second to "You can try again now." */
  function countdown(total, where) {
    const p = make("p", "notice-advice countdown");
    const until = Date.now() + total * 1000;
    const again = where === "vote" ? "You can vote again now." : "You can try again now.";
    let first = true;
    const tick = () => {
      if (!first && !p.isConnected) return;  // dismissed: stop counting
      first = false;
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      p.dataset.remaining = String(left);
      p.textContent = left > 0 ? `Please wait ${seconds(left)} before trying again.` : again;
      if (left > 0) window.setTimeout(tick, 1000);
    };
    tick();
    p.setAttribute("aria-live", "off");  // the alert announced it once; no announcement every second
    return p;
  }

  function showAlert(err, where) {
    clearAlerts();
    const box = errorBox(err, where);
    box.append(dismissButton(() => { box.remove(); ui.prompt.focus(); }));
    ui.alerts.append(box);
    if (err.status === 401) settings.open(false);
  }

  function clearAlerts() { ui.alerts.replaceChildren(); }

  // -- model version --------------------------------------------------------------------

  function noteVersion(version) {
    if (!version) return;
    ui.version.textContent = `model ${version}`;
    ui.version.title = `Answers come from model version ${version}`;
    ui.version.dataset.version = version;
  }

  async function loadVersion() {
    let res;
    try {
      res = await fetch("/v1/models", { headers: headers({}) });
    } catch (err) {
      ui.version.textContent = "offline";
      ui.version.title = `Could not reach the server: ${err}`;
      return false;
    }
    if (res.ok) {
      const body = await res.json().catch(() => null);
      const card = body && Array.isArray(body.data) ? body.data[0] : null;
      noteVersion(res.headers.get(VERSION_HEADER) || (card && card.version));
      ui.keyHint.innerHTML = keyHintText;
      ui.keyHint.classList.remove("warn");
      return true;
    }
    const err = await apiError(res);
    if (!ui.version.dataset.version) ui.version.textContent = "model ?";
    ui.version.title = describe(err).join(" ");
    if (err.status === 401) {
      ui.keyHint.textContent = apiKey()
        ? "The server did not accept this key. Check it for typos."
        : "This server needs an API key. Paste yours here.";
      ui.keyHint.classList.add("warn");
      if (!apiKey()) settings.open(true);
    } else if (err.status === 503) {
      ui.version.textContent = "model loading…";
    }
    return false;
  }

  // -- settings ---------------------------------------------------------------------------

  /** Store the key; once the server accepts it, fold the settings away. */
  async function saveKey() {
    storageSet(KEY_STORE, apiKey());
    const ok = await loadVersion();
    if (ok && apiKey()) {
      announce("API key saved and accepted.");
      if (!ui.settings.contains(document.activeElement)) settings.close();
    }
  }

  // -- SSE ----------------------------------------------------------------------------------

  /** Yields the data of each server-sent event of a fetch body (multi-line data joined by \n). */
  async function* sseData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, cut);
          buffer = buffer.slice(cut + (buffer.startsWith("\r\n", cut) ? 2 : 1));
          if (line === "") {                       // blank line: the event is complete
            if (data.length) yield data.join("\n");
            data = [];
          } else if (line.startsWith("data:")) {
            data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
          }                                        // comments (": ping"), event:, id: are ignored
        }
        if (done) break;
      }
      if (buffer.startsWith("data:")) data.push(buffer.slice(buffer.startsWith("data: ") ? 6 : 5));
      if (data.length) yield data.join("\n");
    } finally {
      reader.releaseLock();
    }
  }

  // -- rendering ----------------------------------------------------------------------------

  function hideEmpty() { ui.empty.hidden = true; }

  /** Draw `raw` (model text) as Markdown into a `.text` element; the raw text rides along in data-raw. */
  function setText(node, raw) {
    node.dataset.raw = raw;
    window.KaizenMarkdown.render(node, raw);
  }

  function renderUser(text) {
    hideEmpty();
    const row = make("div", "msg user");
    const bubble = make("div", "bubble text", text);
    row.append(make("span", "sr-only", "You said:"), bubble);
    ui.log.append(row);
    return row;
  }

  /** One assistant turn: a single answer, or a pair once the stream says so. */
  function renderTurn() {
    hideEmpty();
    const row = make("div", "msg assistant");
    const single = make("div", "answer single");
    const text = make("div", "text md");
    text.setAttribute("aria-busy", "true");
    single.append(make("span", "sr-only", "Kaizen answered:"), text, typing());
    row.append(single);
    ui.log.append(row);
    return { row, single, texts: [text], cards: [single], pair: null };
  }

  function typing() {
    const dots = make("span", "typing");
    dots.setAttribute("aria-hidden", "true");
    dots.append(make("i"), make("i"), make("i"));
    return dots;
  }

  function makePair(turn, comparisonId) {
    turn.row.classList.add("paired");
    const wrap = make("div", "pair");
    wrap.dataset.comparisonId = comparisonId;
    const intro = make("p", "pair-intro", "Two answers this time. Which one is better?");
    const grid = make("div", "pair-grid");
    const cards = [];
    const texts = [];
    LABELS.forEach((label, i) => {
      const card = make("section", "answer card");
      card.dataset.label = label;
      card.setAttribute("aria-label", `Answer ${label}`);
      const head = make("header", "card-head");
      head.append(make("span", "badge", label), make("span", "card-title", `Answer ${label}`));
      const text = make("div", "text md");
      text.setAttribute("aria-busy", "true");
      card.append(head, text, typing());
      grid.append(card);
      cards.push(card);
      texts.push(text);
    });
    wrap.append(intro, grid);
    turn.single.replaceWith(wrap);
    Object.assign(turn, { pairEl: wrap, cards, texts, intro, grid });
    turn.pair = { comparisonId, turn, ready: false, settled: false, voting: false };
    return turn.pair;
  }

  function finishCard(card, text, reason) {
    text.setAttribute("aria-busy", "false");
    card.querySelector(".typing")?.remove();
    if (reason === "length") card.append(make("p", "meta", "Cut off at the length limit."));
  }

  // -- votes ----------------------------------------------------------------------------------

  function renderVoteBar(pair) {
    const bar = make("div", "vote");
    bar.setAttribute("role", "group");
    bar.setAttribute("aria-label", "Vote for the better answer");
    const buttons = make("div", "vote-buttons");
    pair.buttons = CHOICES.map(({ choice, text, key }) => {
      const b = make("button", "vote-button");
      b.type = "button";
      b.dataset.choice = String(choice);
      b.append(make("span", "", text), make("kbd", "", key));
      b.setAttribute("aria-keyshortcuts", key);
      b.addEventListener("click", () => vote(pair, choice));
      buttons.append(b);
      return b;
    });
    const reasonId = `reason-${pair.comparisonId}`;
    const reasonLabel = make("label", "sr-only", "Reason (optional)");
    reasonLabel.htmlFor = reasonId;
    pair.reason = make("input", "reason");
    Object.assign(pair.reason, { id: reasonId, type: "text", maxLength: 2000, placeholder: "Why? (optional)" });
    pair.reason.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { e.preventDefault(); pair.buttons[0].focus(); } // so the vote keys work
    });
    const help = make("p", "vote-help");
    help.innerHTML = "<span>Keys:</span> <span><kbd>1</kbd>/<kbd>A</kbd> A better</span> "
      + "<span><kbd>2</kbd>/<kbd>B</kbd> B better</span> <span><kbd>3</kbd>/<kbd>T</kbd> tie</span> "
      + "<span><kbd>4</kbd>/<kbd>X</kbd> both bad</span> "
      + "<span class=\"muted\">(outside the message box: <kbd>Esc</kbd> leaves it)</span>";
    pair.feedback = make("div", "vote-feedback");
    bar.append(buttons, reasonLabel, pair.reason, help, pair.feedback);
    pair.bar = bar;
    pair.turn.pairEl.append(bar);
  }

  function chosenIndex(choice) { return choice === 1 ? 1 : 0; } // ties and both-bad continue with A

  /** The pair is done with: the conversation continues with one of its answers. */
  function settlePair(pair, continueWith, note, cls) {
    pair.settled = true;
    if (state.pair === pair) state.pair = null;
    const turn = pair.turn;
    state.messages.push({ role: "assistant", content: pair.texts[continueWith] });
    if (pair.record) Object.assign(pair.record, { continueWith, note: note || null, noteClass: cls || null });
    turn.cards.forEach((card, i) => card.classList.toggle("continued", i === continueWith));
    turn.pairEl.classList.add("settled");
    turn.intro.textContent = `The conversation continues with answer ${LABELS[continueWith]}.`;
    if (pair.buttons) pair.buttons.forEach((b) => { b.disabled = true; });
    if (pair.reason) pair.reason.disabled = true;
    if (note) {
      const msg = make("p", cls || "vote-note", note);
      if (pair.feedback) pair.feedback.replaceChildren(msg); else turn.pairEl.append(msg);
    }
    saveChat();
  }

  /** After the vote, each answer says which model version wrote it (the server tells only now). */
  function labelVersions(turn, versions) {
    if (!Array.isArray(versions) || versions.length !== turn.cards.length) return;
    turn.cards.forEach((card, i) => {
      card.dataset.version = versions[i];
      const head = card.querySelector(".card-head");
      head.querySelector(".card-version")?.remove();
      const tag = make("span", "card-version", versions[i]);
      tag.title = `Answer ${LABELS[i]} came from model version ${versions[i]}`;
      head.append(tag);
    });
  }

  function markVote(turn, choice) {
    turn.pairEl.dataset.voted = String(choice);
    turn.cards.forEach((card, i) => {
      card.classList.toggle("winner", choice === i);
      card.classList.toggle("loser", choice === 1 - i);
    });
  }

  async function vote(pair, choice) {
    if (!pair.ready || pair.settled || pair.voting) return;
    pair.voting = true;
    pair.buttons.forEach((b) => { b.disabled = true; });
    pair.buttons.find((b) => b.dataset.choice === String(choice))?.classList.add("picked");
    pair.feedback.replaceChildren(make("p", "vote-note", "Sending your vote…"));
    const body = { comparison_id: pair.comparisonId, choice };
    const reason = pair.reason.value.trim();
    if (reason) body.reason = reason;
    let res, err = null;
    try {
      res = await fetch("/v1/feedback", {
        method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
      });
      if (res.status !== 202) err = await apiError(res);
    } catch (e) {
      err = networkError(e);
    }
    pair.voting = false;
    if (!err) {
      const out = await res.json().catch(() => ({}));
      pair.eventId = out.event_id;
      markVote(pair.turn, choice);
      labelVersions(pair.turn, out.model_versions);
      if (pair.record) Object.assign(pair.record, { voted: choice, versions: out.model_versions || null });
      const which = chosenIndex(choice);
      settlePair(pair, which, `Thanks for your vote! Kaizen learns from it. Continuing with answer ${LABELS[which]}.`, "vote-thanks");
      pair.feedback.querySelector(".vote-thanks").setAttribute("role", "status");
      announce(`Thanks for your vote. Continuing with answer ${LABELS[which]}.`);
      ui.prompt.focus();
      return;
    }
    pair.buttons.forEach((b) => b.classList.remove("picked"));
    const box = errorBox(err, "vote");
    if ([403, 404, 409, 410].includes(err.status)) {
      // this pair can never take the vote: carry on with A
      settlePair(pair, 0, null);
      pair.feedback.replaceChildren(box);
    } else {
      pair.buttons.forEach((b) => { b.disabled = false; }); // a retry may work (429, 503, network)
      pair.feedback.replaceChildren(box);
      if (err.status === 401) settings.open(false);
    }
  }

  // -- sending ----------------------------------------------------------------------------------

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.form.classList.toggle("busy", busy);
    if (busy && document.activeElement === ui.send) ui.stop.focus();
  }

  function requestBody() {
    // no `model`: the server answers with the one it serves, whatever KAIZEN_SERVED_MODEL_NAME says
    const body = { messages: state.messages.slice(), stream: true, comparison: comparisonMode() };
    if (Number.isFinite(maxTokensParam) && maxTokensParam > 0) body.max_tokens = maxTokensParam;
    return body;
  }

  /** One exchange: the question on screen, the answer streamed into its turn, then settled. */
  async function send(text) {
    if (state.controller || !text.trim()) return;
    const ex = beginExchange(text);
    const res = await openStream(ex);
    if (!res) return;
    const got = await readAnswer(res, ex);
    const stopped = ex.controller.signal.aborted;
    finishRequest();
    ex.turn.cards.forEach((card, i) => finishCard(card, ex.turn.texts[i], null));
    if (got.pair) endPair(ex, got, stopped);
    else endAnswer(ex, got, stopped);
  }

  /** The question and an empty answer turn on screen; a pair still waiting for a vote is settled. */
  function beginExchange(text) {
    if (state.pair && !state.pair.settled) {
      settlePair(state.pair, 0, "Not rated: you moved on, so the conversation continues with answer A.");
    }
    clearAlerts();
    state.messages.push({ role: "user", content: text });
    const userRow = renderUser(text);
    const turn = renderTurn();
    state.stick = true;
    scrollToEnd(true);
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    return { text, userRow, userRecord: { kind: "user", text }, turn, controller };
  }

  /** Undo an exchange the server did not take: the message goes back into the box so nothing typed is lost. */
  function withdraw(ex) {
    finishRequest();
    state.messages.pop();
    ex.userRow.remove();
    ex.turn.row.remove();
    if (!ui.prompt.value) { ui.prompt.value = ex.text; autosize(); }
    if (!state.messages.length && !ui.log.querySelector(".msg")) ui.empty.hidden = false;
  }

  /** The streaming response, or null once the failure is shown and the exchange withdrawn. */
  async function openStream(ex) {
    let res;
    try {
      res = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(requestBody()), signal: ex.controller.signal,
      });
    } catch (e) {
      withdraw(ex);
      if (!ex.controller.signal.aborted) showAlert(networkError(e), "chat");
      return null;
    }
    if (!res.ok) {
      const err = await apiError(res);
      withdraw(ex);
      showAlert(err, "chat");
      announce(describe(err, "chat")[0]);
      return null;
    }
    noteVersion(res.headers.get(VERSION_HEADER));
    return res;
  }

  /** Draw the stream's chunks into the turn until [DONE], an error event, a cut or Stop. */
  async function readAnswer(res, ex) {
    const got = { texts: [""], pair: null, sawDone: false, streamErr: null };
    try {
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") { got.sawDone = true; break; }
        let chunk;
        try { chunk = JSON.parse(data); } catch { continue; }
        // the API's error event when the engine fails mid-answer (a 503 it can no longer send as a status)
        if (chunk.error) {
          got.streamErr = { status: chunk.error.type === "service_unavailable" ? 503 : 500, ...chunk.error };
          break;
        }
        drawChunk(ex.turn, got, chunk);
      }
    } catch (e) {
      if (!ex.controller.signal.aborted) got.streamErr = networkError(e);
    }
    return got;
  }

  /** One chat.completion.chunk: the first with a comparison_id turns the answer into a pair. */
  function drawChunk(turn, got, chunk) {
    noteVersion(chunk.model_version);
    if (chunk.comparison_id && !got.pair) {
      got.pair = makePair(turn, chunk.comparison_id);
      got.texts.push("");
    }
    for (const choice of chunk.choices || []) {
      const i = choice.index;
      if (i < 0 || i >= turn.texts.length) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        state.stick = nearBottom();
        got.texts[i] += piece;
        setText(turn.texts[i], got.texts[i]);
        scrollToEnd();
      }
      if (choice.finish_reason) finishCard(turn.cards[i], turn.texts[i], choice.finish_reason);
    }
  }

  /** A single answer joins the conversation as far as it got, with a note if it did not finish. */
  function endAnswer(ex, got, stopped) {
    const { turn } = ex;
    const text = got.texts[0];
    state.messages.push({ role: "assistant", content: text });
    turn.row.dataset.done = "true";
    setText(turn.texts[0], text);
    if (stopped) turn.single.append(make("p", "meta", "Stopped."));
    else if (got.streamErr || !got.sawDone) {
      turn.single.append(errorBox(got.streamErr || networkError("the answer was cut off"), "chat"));
    }
    state.turns.push(ex.userRecord, { kind: "answer", text, note: stopped ? "Stopped." : null });
    saveChat();
    announce(stopped ? "Answer stopped." : "Answer complete.");
  }

  /** A pair delivered whole waits for a vote; one cut short continues with A, unrated. */
  function endPair(ex, got, stopped) {
    const { turn, userRecord } = ex;
    const { pair, texts, streamErr } = got;
    pair.texts = texts;
    texts.forEach((t, i) => setText(turn.texts[i], t));
    pair.record = { kind: "pair", comparisonId: pair.comparisonId, texts, ready: false, continueWith: null,
                    voted: null, versions: null, note: null, noteClass: null };
    state.turns.push(userRecord, pair.record);
    if (stopped || streamErr || !got.sawDone) {
      // the server keeps only pairs delivered whole: this one cannot be voted on
      const why = stopped ? "Stopped before both answers were complete, so this pair can't be rated."
        : "The answers were cut off, so this pair can't be rated.";
      settlePair(pair, 0, why);
      if (streamErr) turn.pairEl.append(errorBox(streamErr, "chat"));
      announce(why);
      return;
    }
    pair.ready = true;
    pair.record.ready = true;
    state.pair = pair;
    turn.pairEl.dataset.ready = "true";
    renderVoteBar(pair);
    saveChat();
    scrollToEnd();
    announce("Two answers are ready. Vote for the better one: 1 for A, 2 for B, 3 tie, 4 both bad.");
  }

  function finishRequest() {
    state.controller = null;
    setBusy(false);
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.messages = [];
    state.pair = null;
    state.turns = [];
    storageSet(CHAT_STORE, null);
    ui.log.querySelectorAll(".msg").forEach((node) => node.remove());
    ui.empty.hidden = false;
    clearAlerts();
    ui.prompt.value = "";
    autosize();
    ui.prompt.focus();
    announce("New chat.");
  }

  // -- the conversation across reloads ---------------------------------------------------------

  function saveChat() {
    if (!state.turns.length) { storageSet(CHAT_STORE, null); return; }
    storageSet(CHAT_STORE, JSON.stringify({ format: CHAT_FORMAT, messages: state.messages, turns: state.turns }));
  }

  /** Draw a saved conversation again: the same renderers as a live one, so the same Markdown. */
  function restoreChat() {
    let saved = null;
    try { saved = JSON.parse(storageGet(CHAT_STORE) || "null"); } catch { saved = null; }
    if (!saved || saved.format !== CHAT_FORMAT || !Array.isArray(saved.turns) || !Array.isArray(saved.messages)) return;
    state.messages = saved.messages;
    state.turns = saved.turns;
    for (const rec of state.turns) {
      if (rec.kind === "user") {
        renderUser(String(rec.text));
      } else if (rec.kind === "answer") {
        const turn = renderTurn();
        finishCard(turn.single, turn.texts[0], null);
        setText(turn.texts[0], String(rec.text));
        turn.row.dataset.done = "true";
        if (rec.note) turn.single.append(make("p", "meta", String(rec.note)));
      } else if (rec.kind === "pair") {
        const turn = renderTurn();
        const pair = makePair(turn, String(rec.comparisonId));
        pair.record = rec;
        pair.texts = rec.texts.map(String);
        pair.texts.forEach((t, i) => { finishCard(turn.cards[i], turn.texts[i], null); setText(turn.texts[i], t); });
        if (rec.continueWith !== null && rec.continueWith !== undefined) {
          // settled before the reload: show it as it was, without touching the saved messages
          pair.settled = true;
          turn.cards.forEach((card, i) => card.classList.toggle("continued", i === rec.continueWith));
          turn.pairEl.classList.add("settled");
          turn.intro.textContent = `The conversation continues with answer ${LABELS[rec.continueWith]}.`;
          if (rec.voted !== null && rec.voted !== undefined) markVote(turn, rec.voted);
          labelVersions(turn, rec.versions);
          if (rec.note) turn.pairEl.append(make("p", rec.noteClass || "vote-note", String(rec.note)));
        } else if (rec.ready) {
          pair.ready = true;
          state.pair = pair;
          turn.pairEl.dataset.ready = "true";
          renderVoteBar(pair);
        }
      }
    }
    scrollToEnd(true);
  }

  // -- composer ---------------------------------------------------------------------------------

  function autosize() {
    ui.prompt.style.height = "auto";
    ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
  }

  function submit() {
    const text = ui.prompt.value;
    if (!text.trim() || state.controller) return;
    ui.prompt.value = "";
    autosize();
    send(text);
  }

  ui.form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  ui.prompt.addEventListener("input", autosize);
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    } else if (e.key === "Escape") {
      ui.prompt.blur();
      if (state.pair && state.pair.ready && !state.pair.settled) state.pair.buttons[0].focus();
    }
  });
  ui.stop.addEventListener("click", () => { stop(); ui.prompt.focus(); });
  ui.newChat.addEventListener("click", newChat);
  ui.key.addEventListener("change", saveKey);
  ui.key.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); ui.prompt.focus(); } // leaving the field fires "change"
  });
  revealButton(ui.showKey, ui.key);
  ui.forgetKey.addEventListener("click", () => { ui.key.value = ""; saveKey(); ui.key.focus(); });
  ui.compare.addEventListener("change", () => storageSet(COMPARE_STORE, ui.compare.checked ? "allow" : "off"));
  ui.main.addEventListener("scroll", () => { state.stick = nearBottom(); }, { passive: true });

  // Vote shortcuts, and "/" back to the message box, whenever no text field has focus.
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const t = e.target;
    if (t instanceof HTMLElement && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
    if (e.key === "/") { e.preventDefault(); ui.prompt.focus(); return; }
    const choice = VOTE_KEYS[e.key.toLowerCase()];
    const pair = state.pair;
    if (choice === undefined || !pair || !pair.ready || pair.settled) return;
    e.preventDefault();
    vote(pair, choice);
  });

  // -- start ------------------------------------------------------------------------------------

  ui.key.value = storageGet(KEY_STORE) || "";
  if (compareParam) {
    ui.compare.checked = compareParam !== "off";
    ui.compare.disabled = true;
    ui.compareNote.textContent = compareParam === "force"
      ? "Comparison mode: every answer comes as a pair." : "";
  } else {
    ui.compare.checked = storageGet(COMPARE_STORE) !== "off";
  }
  state.stick = true;
  restoreChat();
  autosize();
  loadVersion();
  ui.prompt.focus();
})();
