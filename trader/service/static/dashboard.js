// trader live dashboard. Reads GET /events (server-sent events) and renders the run; the control
// buttons POST to /halt, /resume, /flatten with the token typed into this page. The token lives in
// the input field only: it is never put in the URL, a cookie or web storage, and it is sent only
// in the Authorization header of the button's own request. Everything the server sends (the LLM's
// reason included) is rendered as text, never as markup.
"use strict";

(() => {
  const MAX_DECISIONS = 50;
  const MAX_FILLS = 20;
  const MAX_POINTS = 2000;
  const SVG = "http://www.w3.org/2000/svg";

  const model = {
    status: null, // service_status(): state, health, llm, control_enabled, instrument
    decisions: [],
    fills: [],
    equity: [], // [bar_index, ts_ns, equity_usd]
    haltReasons: null,
    sessions: [],
    progress: null,
    live: {}, // position, stop_price, avg_entry, equity_usd from the newest event
    barAge: null, // {age_s, at_ms}
    priceDecimals: 2,
    timeFormat: null,
  };

  const $ = (id) => document.getElementById(id);

  function setText(id, value, cls) {
    const el = $(id);
    el.textContent = value;
    if (cls !== undefined) el.className = cls;
  }

  // -- formatting ---------------------------------------------------------------------------------
  const dash = "–";
  function price(x) {
    return x === null || x === undefined ? dash : Number(x).toFixed(model.priceDecimals);
  }
  function usd(x, signed) {
    if (x === null || x === undefined) return dash;
    const s = Math.abs(x).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    const sign = x < 0 ? "−" : signed && x > 0 ? "+" : "";
    return sign + "$" + s;
  }
  function num(x, digits) {
    return x === null || x === undefined ? dash : Number(x).toFixed(digits);
  }
  function signed(n) {
    return n > 0 ? "+" + n : String(n);
  }
  function time(tsNs, withDate) {
    if (tsNs === null || tsNs === undefined) return dash;
    const d = new Date(tsNs / 1e6);
    if (!model.timeFormat) return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
    return withDate ? model.timeFormat.format(d) : model.timeFormat.format(d).split(", ").pop();
  }
  function seconds(s) {
    if (s === null || s === undefined) return dash;
    return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(1) + " s";
  }
  function pnlClass(x) {
    return x > 0 ? "good" : x < 0 ? "bad" : "";
  }

  // -- the model ----------------------------------------------------------------------------------
  function applyInstrument(instr) {
    if (!instr) return;
    const tick = String(instr.tick_size);
    model.priceDecimals = tick.includes(".") ? tick.split(".")[1].length : 0;
    try {
      model.timeFormat = new Intl.DateTimeFormat("en-CA", {
        timeZone: instr.timezone, year: "numeric", month: "2-digit", day: "2-digit",
        hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false, timeZoneName: "short",
      });
    } catch (e) {
      model.timeFormat = null; // an unknown zone: UTC
    }
  }

  function applyStatus(status) {
    model.status = status;
    applyInstrument(status.instrument);
    const st = status.state;
    model.haltReasons = st.entries_halted_by;
    model.live = {
      position: st.position,
      avg_entry: st.avg_entry,
      stop_price: st.stop_price,
      equity_usd: st.equity_usd,
    };
    if (st.last_bar_age_s !== null && st.last_bar_age_s !== undefined) {
      model.barAge = { age_s: st.last_bar_age_s, at_ms: performance.now() };
    }
  }

  function applySnapshot(snap) {
    model.decisions = snap.decisions.slice(-MAX_DECISIONS);
    model.fills = snap.fills.slice(-MAX_FILLS);
    model.equity = snap.equity.points.slice(-MAX_POINTS);
    model.sessions = snap.sessions;
    model.progress = snap.progress;
    applyStatus(snap);
    if (snap.halt_reasons !== null) model.haltReasons = snap.halt_reasons;
  }

  function addPoint(p) {
    model.equity.push(p);
    if (model.equity.length > MAX_POINTS) {
      // the same thinning the server does: every other point, the newest kept
      const last = model.equity.length - 1;
      model.equity = model.equity.filter((_, i) => i % 2 === 0 || i === last);
    }
  }

  function onBar(d) {
    model.decisions.push(d);
    if (model.decisions.length > MAX_DECISIONS) model.decisions.shift();
    addPoint([d.bar_index, d.ts_ns, d.equity_usd]);
    model.live.position = d.position;
    model.live.stop_price = d.stop_price;
    model.live.equity_usd = d.equity_usd;
    model.barAge = { age_s: 0, at_ms: performance.now() };
  }

  function onFill(f) {
    model.fills.push(f);
    if (model.fills.length > MAX_FILLS) model.fills.shift();
    model.live.position = f.position;
    model.live.avg_entry = f.avg_entry;
    model.live.stop_price = f.stop_price;
  }

  // -- rendering ----------------------------------------------------------------------------------
  let scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    setTimeout(() => {
      scheduled = false;
      render();
    }, 50);
  }

  function render() {
    renderHeader();
    renderHalt();
    renderBar();
    renderPosition();
    renderAccount();
    renderHealth();
    renderLLM();
    renderControls();
    renderEquity();
    renderDecisions();
    renderFills();
  }

  function renderHeader() {
    const s = model.status;
    if (s) {
      setText("mode", s.state.mode);
      setText("symbol", s.instrument ? s.instrument.symbol : dash);
      setText("run-id", "run " + s.state.run_id);
    }
    const p = model.progress;
    setText("progress", p && p.total_bars ? `bar ${p.bars} of ${p.total_bars}` : "");
  }

  function renderHalt() {
    const banner = $("halt-banner");
    const reasons = model.haltReasons;
    if (reasons === null || reasons === undefined) return;
    if (reasons.length) {
      banner.dataset.halted = "yes";
      setText("halt-title", "Entries halted");
      setText("halt-reasons", reasons.join("; "));
    } else {
      banner.dataset.halted = "no";
      setText("halt-title", "Entries allowed");
      setText("halt-reasons", "");
    }
  }

  function renderBar() {
    const d = model.decisions[model.decisions.length - 1];
    if (d) {
      setText("bar-index", String(d.bar_index) + (d.ready ? "" : " (warm-up)"));
      setText("bar-time", time(d.ts_ns, true));
      setText("bar-close", price(d.close));
      setText("bar-ohl", `${price(d.open)} / ${price(d.high)} / ${price(d.low)}`);
      const lat = model.decisions.map((x) => x.latency_us).filter((x) => x !== null).sort((a, b) => a - b);
      const p50 = lat.length ? lat[Math.floor(lat.length / 2)] : null;
      setText("latency", `${num(d.latency_us, 0)} µs (p50 ${num(p50, 0)} µs)`);
    }
    renderAge();
  }

  function renderAge() {
    const a = model.barAge;
    if (!a) return;
    const age = a.age_s + (performance.now() - a.at_ms) / 1000;
    const stale = model.status && model.status.state.stale_data;
    setText("bar-age", age.toFixed(age < 10 ? 1 : 0) + " s ago", stale ? "bad" : "");
  }

  function renderPosition() {
    const l = model.live;
    const s = model.status ? model.status.state : {};
    const pos = l.position;
    setText("position", pos === undefined ? dash : signed(pos), pos > 0 ? "big good" : pos < 0 ? "big bad" : "big");
    setText("avg-entry", pos ? price(l.avg_entry) : dash);
    setText("stop-price", price(l.stop_price));
    setText("trailing", s.trailing === undefined ? dash : s.trailing ? "on" : "off");
    setText("flatten-requested", s.flatten_requested ? "yes" : "no", s.flatten_requested ? "warn" : "");
  }

  function renderAccount() {
    if (!model.status) return;
    const s = model.status.state;
    const eq = model.live.equity_usd ?? s.equity_usd;
    setText("equity", usd(eq), "big");
    setText("balance", usd(s.balance_usd));
    setText("daily-pnl", usd(s.daily_pnl_usd, true), pnlClass(s.daily_pnl_usd));
    setText("peak", usd(s.peak_equity_usd));
    const room = eq - s.drawdown_threshold_usd;
    const limit = s.peak_equity_usd - s.drawdown_threshold_usd; // the trailing drawdown allowed
    setText("dd-room", usd(room), room <= 0 ? "bad" : limit > 0 && room < 0.25 * limit ? "warn" : "");
    setText("dd-threshold", usd(s.drawdown_threshold_usd));
    setText("losses", String(s.consecutive_losses));
  }

  function renderHealth() {
    if (!model.status) return;
    const h = model.status.health;
    const cls = h.status === "ok" ? "good" : h.status === "degraded" ? "warn" : "bad";
    setText("health-status", h.stopping ? "stopping" : h.status, cls);
    const f = h.feed;
    setText("health-feed", `${f.kind}: ${f.connected ? "connected" : "down"}${h.stale_data ? ", stale" : ""}`,
      f.connected && !h.stale_data ? "good" : "bad");
    const b = h.broker;
    let broker = `${b.name}: ${b.connected ? "connected" : `down ${b.disconnected_s}s`}`;
    if (b.blocked) broker += `, blocked (${b.blocked})`;
    if (b.mismatch) broker += `, mismatch (${b.mismatch})`;
    setText("health-broker", broker, b.connected && !b.blocked && !b.mismatch ? "good" : "bad");
    const j = h.journal;
    setText("health-journal", j.problem ? j.problem : "writing", j.problem ? "bad" : "good");
    setText("health-problem", h.problem || (h.degraded.length ? h.degraded.join("; ") : "none"),
      h.problem ? "bad" : "");
  }

  function renderLLM() {
    if (!model.status) return;
    const l = model.status.llm;
    setText("llm-mode", l.mode);
    if (l.queries === undefined) {
      for (const id of ["llm-queries", "llm-errors", "llm-latency", "llm-busy"]) setText(id, dash);
    } else {
      setText("llm-queries", `${l.queries} / ${l.answered}`);
      const bad = l.errors + l.timeouts + l.unparseable;
      setText("llm-errors", `${l.errors} / ${l.timeouts} / ${l.unparseable}`, bad ? "warn" : "");
      setText("llm-latency", `${seconds(l.last_latency_s)} / ${seconds(l.p50_latency_s)} / ${seconds(l.p95_latency_s)}`);
    }
    const d = model.decisions[model.decisions.length - 1];
    if (d) {
      setText("llm-busy", d.llm_busy ? "yes" : "no");
      const a = d.advice;
      const el = $("llm-advice");
      el.textContent = a ? `${a.action} ${num(a.confidence, 2)}, ${a.age_bars} bars old` : "none";
      el.title = a ? a.reason : "";
    }
  }

  function renderControls() {
    const s = model.status;
    if (!s) return;
    const enabled = s.control_enabled;
    for (const el of document.querySelectorAll("#control-form input, #control-form button")) {
      el.disabled = !enabled;
    }
    if (!enabled) {
      setText("control-note",
        "Control is disabled on this service: no control token is configured " +
        "(the environment variable named by service.control_token_env). This page is read-only.",
        "warn");
    }
  }

  function svgEl(name, attrs) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    return el;
  }

  function renderEquity() {
    const svg = $("equity-chart");
    svg.replaceChildren();
    const pts = model.equity.filter((p) => p[2] !== null);
    const last = model.sessions[model.sessions.length - 1];
    setText("session-note", last
      ? `Previous session: net ${usd(last.net_pnl_usd, true)}, ${last.trades} trades, equity ${usd(last.equity_usd)}`
      : "");
    if (pts.length < 2) {
      setText("equity-range", "(waiting for bars)");
      return;
    }
    const W = 800, H = 200, pad = 8;
    let lo = Infinity, hi = -Infinity;
    for (const p of pts) {
      lo = Math.min(lo, p[2]);
      hi = Math.max(hi, p[2]);
    }
    if (hi - lo < 1) {
      lo -= 0.5;
      hi += 0.5;
    }
    const i0 = pts[0][0], i1 = pts[pts.length - 1][0];
    const span = Math.max(1, i1 - i0);
    const x = (i) => ((i - i0) / span) * W;
    const y = (v) => pad + (1 - (v - lo) / (hi - lo)) * (H - 2 * pad);
    const start = pts[0][2];
    svg.appendChild(svgEl("line", { class: "base", x1: 0, x2: W, y1: y(start), y2: y(start) }));
    const coords = pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[2]).toFixed(1)}`).join(" ");
    svg.appendChild(svgEl("polyline", { class: "curve", points: coords }));
    const now = pts[pts.length - 1][2];
    setText("equity-range",
      `${usd(now)} (${usd(now - start, true)} this session) · low ${usd(lo)} · high ${usd(hi)} · ` +
      `${time(pts[0][1])} → ${time(pts[pts.length - 1][1])}`);
  }

  function cell(tr, value, cls) {
    const td = document.createElement("td");
    td.textContent = value;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function probsCell(tr, d) {
    const td = document.createElement("td");
    const box = document.createElement("span");
    box.className = "probs";
    const names = ["HOLD", "BUY", "SELL", "MOVE_TO_BE", "ENABLE_TRAIL", "DISABLE_TRAIL"];
    d.probs.forEach((p, i) => {
      const bar = document.createElement("span");
      bar.className = "p" + i + (names[i] === d.rl_action ? " chosen" : "");
      bar.style.height = Math.round(Math.max(0, Math.min(1, p ?? 0)) * 100) + "%";
      box.appendChild(bar);
    });
    box.title = d.probs.map((p, i) => `${names[i]} ${num(p, 3)}`).join("\n");
    td.appendChild(box);
    tr.appendChild(td);
  }

  function renderDecisions() {
    const body = $("decisions").tBodies[0];
    const rows = [];
    for (let k = model.decisions.length - 1; k >= 0; k--) {
      const d = model.decisions[k];
      const tr = document.createElement("tr");
      tr.dataset.bar = d.bar_index;
      cell(tr, String(d.bar_index), "num");
      cell(tr, time(d.ts_ns));
      cell(tr, price(d.close), "num");
      probsCell(tr, d);
      cell(tr, d.ready ? `${d.rl_action} ${num(d.rl_confidence, 2)}` : "warm-up");
      const a = d.advice;
      const adv = cell(tr, a ? `${a.action} ${num(a.confidence, 2)} (${a.age_bars})` : d.llm_busy ? "asking…" : dash,
        "advice");
      if (a) adv.title = a.reason;
      cell(tr, d.method);
      cell(tr, d.vetoes.map((v) => `${v.rule}: ${v.reason}`).join("; ") || dash, "vetoes");
      cell(tr, d.final_action, "act-" + d.final_action + (d.vetoes.length ? " vetoed" : ""));
      cell(tr, signed(d.position), "num");
      cell(tr, num(d.latency_us, 0), "num");
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  function renderFills() {
    const body = $("fills").tBodies[0];
    const rows = [];
    for (let k = model.fills.length - 1; k >= 0; k--) {
      const f = model.fills[k];
      const tr = document.createElement("tr");
      cell(tr, time(f.ts_ns));
      cell(tr, f.side, "act-" + f.side);
      cell(tr, String(f.qty), "num");
      cell(tr, price(f.price), "num");
      cell(tr, f.purpose);
      cell(tr, signed(f.position), "num");
      cell(tr, price(f.stop_price), "num");
      const pnl = f.trades.reduce((s, t) => s + (t.pnl_usd ?? 0), 0);
      cell(tr, f.trades.length ? usd(pnl, true) : dash, "num " + pnlClass(pnl));
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // -- controls -----------------------------------------------------------------------------------
  function showResult(textValue, ok) {
    const el = $("control-result");
    el.textContent = textValue;
    el.dataset.ok = ok ? "yes" : "no";
  }

  async function refreshState() {
    try {
      const r = await fetch("/state", { cache: "no-store", credentials: "omit" });
      if (r.ok && model.status) {
        model.status.state = await r.json();
        model.haltReasons = model.status.state.entries_halted_by;
        schedule();
      }
    } catch (e) {
      // the stream will bring the state
    }
  }

  async function control(action) {
    const token = $("token").value.trim();
    if (token && !/^[\x21-\x7e]+$/.test(token)) {
      showResult("The token must be printable ASCII without spaces.", false);
      return;
    }
    if (action === "flatten" && !window.confirm("Close the position at the next bar and halt entries?")) {
      return;
    }
    const headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const reason = $("reason").value.trim();
    let r;
    try {
      r = await fetch("/" + action, {
        method: "POST",
        headers,
        body: JSON.stringify(reason ? { reason } : {}),
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
    } catch (e) {
      showResult(`${action}: the service did not answer (${e.message})`, false);
      return;
    }
    let body = {};
    try {
      body = await r.json();
    } catch (e) {
      body = {};
    }
    if (r.ok) {
      showResult(`${action} accepted: entries ${body.halted ? "halted" : "allowed"}, position ${signed(body.position)}`,
        true);
    } else {
      showResult(`${action} refused (${r.status}): ${body.error || r.statusText}`, false);
    }
    refreshState();
  }

  // -- the stream ---------------------------------------------------------------------------------
  function connState(state, label) {
    const el = $("conn");
    el.dataset.state = state;
    el.textContent = label;
  }

  function connect() {
    const es = new EventSource("/events");
    const on = (name, fn) => es.addEventListener(name, (ev) => {
      fn(JSON.parse(ev.data));
      schedule();
    });
    let said_bye = false;
    es.onopen = () => {
      said_bye = false;
      connState("live", "live");
    };
    es.onerror = () =>
      said_bye ? connState("stopped", "service stopped") : connState("reconnecting", "reconnecting…");
    on("snapshot", applySnapshot);
    on("status", applyStatus);
    on("bar", onBar);
    on("fill", onFill);
    on("stop", (s) => { model.live.stop_price = s.new; model.live.position = s.position; });
    on("halt", (h) => { model.haltReasons = h.reasons; });
    on("session", (s) => { model.sessions.push(s); model.equity = []; });
    on("progress", (p) => { model.progress = p; });
    on("bye", () => {
      said_bye = true;
      connState("stopped", "service stopped");
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const b of document.querySelectorAll("button[data-action]")) {
      b.addEventListener("click", () => control(b.dataset.action));
    }
    $("control-form").addEventListener("submit", (ev) => ev.preventDefault());
    setInterval(renderAge, 1000);
    connect();
  });
})();
