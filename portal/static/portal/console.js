// The operator console's live part (templates/console/console.html): reads /ws/stats/, keeps
// the latest summary of each gateway process (dropping those silent for more than
// config.stale_seconds), sums them into the tiles once a second and rolls them into a chart;
// shows each SGLang server's state and the "overloaded" banner. Thresholds, the overload rule
// and every text come from the page (json_script "console-config"), translated there.
"use strict";
(() => {
  const HISTORY = 120; // chart points, one a second
  const UPSTREAM_STALE_MS = 60000; // a GPU server not scraped for this long leaves the table
  const RECONNECT_MAX_MS = 15000;

  const config = JSON.parse(document.getElementById("console-config").textContent);
  const texts = config.texts;
  const locale = document.getElementById("console-locale").dataset.locale || undefined;
  const number = new Intl.NumberFormat(locale, { maximumFractionDigits: 1 });
  const whole = new Intl.NumberFormat(locale, { maximumFractionDigits: 0 });
  const percent = new Intl.NumberFormat(locale, { style: "percent", maximumFractionDigits: 1 });
  const clock = new Intl.DateTimeFormat(locale, {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false, timeZone: "Asia/Seoul",
  });
  const fill = (text, values) => text.replace(/%\((\w+)\)s/g, (_, name) => values[name] ?? "");

  const processes = new Map(); // process → { summary, seen }
  const upstreams = new Map(); // url → { summary, seen, queuedStreak, ttftMs, lastTtft }
  const GATEWAY_METRICS = [
    "requests_per_second", "tokens_per_second", "rate_limited_per_second",
    "errors_per_second", "in_flight",
  ];

  // --- Connection ------------------------------------------------------------------------------
  const indicator = document.getElementById("console-connection");
  let socket = null;
  let retryMs = 1000;

  function setState(state) {
    indicator.dataset.state = state;
    indicator.textContent = texts[state] || state;
    indicator.className = `badge ${state === "open" ? "ok" : state === "closed" ? "bad" : "idle"}`;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // The indicator stays "closed" until the socket opens (browser tests wait for "open").
    socket = new WebSocket(`${scheme}//${location.host}/ws/stats/`);
    socket.addEventListener("open", () => {
      retryMs = 1000;
      setState("open");
    });
    socket.addEventListener("message", (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.kind === "gateway") gatewaySummary(message);
      else if (message.kind === "sglang") sglangSummary(message);
    });
    socket.addEventListener("close", () => {
      setState("closed");
      // Refused (4403: logged out or no longer staff) or cut: try again, more slowly each time.
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, RECONNECT_MAX_MS);
    });
  }

  // --- Gateway processes -----------------------------------------------------------------------
  function gatewaySummary(summary) {
    if (typeof summary.process !== "string") return;
    processes.set(summary.process, { summary, seen: Date.now() });
  }

  function sums() {
    const now = Date.now();
    const total = Object.fromEntries(GATEWAY_METRICS.map((name) => [name, 0]));
    for (const [name, entry] of processes) {
      if (now - entry.seen > config.stale_seconds * 1000) {
        processes.delete(name);
        continue;
      }
      for (const metric of GATEWAY_METRICS) total[metric] += Number(entry.summary[metric]) || 0;
    }
    return total;
  }

  function level(metric, value) {
    const limits = config.thresholds[metric];
    if (!limits || value === null || value === undefined) return "";
    if (value >= limits.bad) return "bad";
    if (value >= limits.warn) return "warn";
    return "ok";
  }

  function showTiles(total) {
    const live = indicator.dataset.state === "open";
    for (const metric of GATEWAY_METRICS) {
      const value = document.querySelector(`[data-metric="${metric}"]`);
      if (!value) continue;
      value.textContent = live ? number.format(total[metric]) : "–";
      value.dataset.value = String(total[metric]);
      const tile = value.closest(".tile");
      tile.classList.remove("ok", "warn", "bad");
      const found = live ? level(metric, total[metric]) || "ok" : "";
      if (found) tile.classList.add(found);
    }
    document.getElementById("console-processes").textContent = live
      ? fill(texts.processes, { n: whole.format(processes.size) })
      : "";
  }

  // --- Chart -----------------------------------------------------------------------------------
  let chart = null;
  function makeChart() {
    const canvas = document.getElementById("console-chart");
    if (!canvas || typeof Chart === "undefined") return;
    const line = (label, color, axis) => ({
      label, data: [], borderColor: color, backgroundColor: color, yAxisID: axis,
      pointRadius: 0, borderWidth: 2, tension: 0.2,
    });
    chart = new Chart(canvas, {
      type: "line",
      data: {
        labels: [],
        datasets: [
          line(texts.requests, "#2f5bea", "y"),
          line(texts.rate_limited, "#e69a14", "y"),
          line(texts.errors, "#d64545", "y"),
          line(texts.tokens, "#1f9d6b", "y1"),
        ],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { ticks: { maxRotation: 0, autoSkipPadding: 16 } },
          y: { beginAtZero: true, position: "left", ticks: { callback: (v) => number.format(v) } },
          y1: {
            beginAtZero: true, position: "right", grid: { drawOnChartArea: false },
            ticks: { callback: (v) => number.format(v) },
          },
        },
        plugins: {
          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${number.format(c.parsed.y)}` } },
        },
      },
    });
  }

  function pushPoint(total) {
    if (!chart) return;
    const data = chart.data;
    data.labels.push(clock.format(new Date()));
    const values = [
      total.requests_per_second, total.rate_limited_per_second,
      total.errors_per_second, total.tokens_per_second,
    ];
    data.datasets.forEach((set, i) => set.data.push(values[i]));
    if (data.labels.length > HISTORY) {
      data.labels.shift();
      data.datasets.forEach((set) => set.data.shift());
    }
    chart.update("none");
  }

  // --- GPU servers -----------------------------------------------------------------------------
  function sglangSummary(message) {
    const now = Date.now();
    for (const item of message.upstreams || []) {
      if (typeof item.url !== "string") continue;
      const entry = upstreams.get(item.url) || { queuedStreak: 0, ttftMs: null, lastTtft: null };
      entry.summary = item;
      entry.seen = now;
      entry.queuedStreak = item.ok && item.queued_requests > 0 ? entry.queuedStreak + 1 : 0;
      // TTFT over the last scrape interval: growth of SGLang's histogram sum over its count.
      if (typeof item.ttft_sum === "number" && typeof item.ttft_count === "number") {
        const last = entry.lastTtft;
        if (last && item.ttft_count > last.count && item.ttft_sum >= last.sum) {
          entry.ttftMs = (1000 * (item.ttft_sum - last.sum)) / (item.ttft_count - last.count);
        } else if (last && item.ttft_count < last.count) {
          entry.ttftMs = null; // the server restarted: its counters began again
        }
        entry.lastTtft = { sum: item.ttft_sum, count: item.ttft_count };
      }
      upstreams.set(item.url, entry);
    }
    showUpstreams();
  }

  function cell(row, metric, text, found) {
    let td = row.querySelector(`[data-metric="${metric}"]`);
    if (!td) {
      td = document.createElement("td");
      td.className = "num";
      td.dataset.metric = metric;
      row.appendChild(td);
    }
    td.textContent = text;
    td.classList.remove("ok", "warn", "bad");
    if (found) td.classList.add(found);
  }

  const shown = (value, format) =>
    value === null || value === undefined || Number.isNaN(value) ? "–" : format(value);

  function showUpstreams() {
    const now = Date.now();
    const body = document.querySelector("#console-upstreams tbody");
    const reasons = [];
    for (const [url, entry] of upstreams) {
      if (now - entry.seen > UPSTREAM_STALE_MS) upstreams.delete(url);
    }
    for (const row of body.querySelectorAll("tr[data-upstream]")) {
      if (!upstreams.has(row.dataset.upstream)) row.remove();
    }
    for (const [url, entry] of [...upstreams].sort((a, b) => a[0].localeCompare(b[0]))) {
      const s = entry.summary;
      let row = body.querySelector(`tr[data-upstream="${CSS.escape(url)}"]`);
      if (!row) {
        row = document.createElement("tr");
        row.dataset.upstream = url;
        const name = document.createElement("td");
        name.className = "upstream-name";
        row.appendChild(name);
        body.appendChild(row);
      }
      const name = row.querySelector(".upstream-name");
      name.textContent = url;
      if (!s.ok) {
        const badge = document.createElement("span");
        badge.className = "badge bad";
        badge.textContent = texts.unreachable;
        name.append(" ", badge);
      }
      row.dataset.ok = String(Boolean(s.ok));
      cell(row, "running_requests", shown(s.running_requests, (v) => whole.format(v)), "");
      cell(row, "queued_requests", shown(s.queued_requests, (v) => whole.format(v)),
        s.ok ? level("queued_requests", s.queued_requests) : "bad");
      cell(row, "kv_cache_usage", shown(s.kv_cache_usage, (v) => percent.format(v)),
        level("kv_cache_usage", s.kv_cache_usage));
      cell(row, "prefix_cache_hit_rate", shown(s.prefix_cache_hit_rate, (v) => percent.format(v)), "");
      cell(row, "generation_throughput", shown(s.generation_throughput, (v) => number.format(v)), "");
      cell(row, "time_to_first_token_ms",
        shown(entry.ttftMs, (v) => `${number.format(v)} ms`), "");
      if (s.ok && entry.queuedStreak >= config.overload.queued_samples) {
        reasons.push(fill(texts.queued_reason, { url, n: whole.format(entry.queuedStreak) }));
      }
      if (s.ok && s.kv_cache_usage >= config.overload.kv_usage) {
        reasons.push(fill(texts.kv_reason, { url, percent: percent.format(s.kv_cache_usage) }));
      }
    }
    document.getElementById("console-no-upstreams").hidden = upstreams.size > 0;
    const banner = document.getElementById("console-overload");
    banner.hidden = reasons.length === 0;
    banner.dataset.overloaded = String(reasons.length > 0);
    banner.textContent = reasons.length ? fill(texts.overloaded, { reasons: reasons.join("; ") }) : "";
  }

  // --- Once a second ---------------------------------------------------------------------------
  function tick() {
    const total = sums();
    showTiles(total);
    pushPoint(total);
  }

  document.addEventListener("DOMContentLoaded", () => {
    makeChart();
    connect();
    tick();
    setInterval(tick, 1000);
    setInterval(showUpstreams, 5000); // drops servers that stopped reporting
  });
})();
