// AtlasMesh panel: keeps `data-live` values current from the depot's server-sent events.
// Pages are complete without this script; it only makes them live.
"use strict";
(function () {
  const bytes = (n) => {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n, u = 0;
    while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
    return u === 0 ? `${n} B` : `${v.toFixed(1)} ${units[u]}`;
  };
  const duration = (s) => {
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d > 0) return `${d}d ${h}h ${m}m`;
    if (h > 0) return `${h}h ${m}m`;
    return `${m}m ${s % 60}s`;
  };
  const set = (key, text) => document.querySelectorAll(`[data-live="${key}"]`).forEach((el) => { el.textContent = text; });
  const meter = (key, pct) => document.querySelectorAll(`[data-live-meter="${key}"]`).forEach((el) => {
    el.dataset.level = pct >= 90 ? "crit" : pct >= 75 ? "warn" : "ok";
    const fill = el.querySelector(".fill");
    if (fill) fill.style.width = `${Math.max(0, Math.min(100, pct)).toFixed(1)}%`;
  });
  const pct = (part, whole) => (whole > 0 ? (part * 100) / whole : 0);

  function onSystem(msg) {
    const s = msg.system;
    set("uptime", duration(msg.uptime_seconds));
    set("cpu", s.cpu_percent.toFixed(0));
    meter("cpu", s.cpu_percent);
    set("load", s.load_average.map((x) => x.toFixed(2)).join(" "));
    const mem = pct(s.memory_used_bytes, s.memory_total_bytes);
    set("mem-pct", mem.toFixed(0));
    meter("mem", mem);
    set("mem", `${bytes(s.memory_used_bytes)} of ${bytes(s.memory_total_bytes)}`);
    set("rss", bytes(s.process_rss_bytes));
    if (s.data_fs) {
      const used = s.data_fs.total_bytes - s.data_fs.available_bytes;
      const p = pct(used, s.data_fs.total_bytes);
      set("fs-pct", p.toFixed(0));
      meter("fs", p);
      set("fs", `${bytes(s.data_fs.available_bytes)} free of ${bytes(s.data_fs.total_bytes)}`);
    }
  }

  function connect() {
    const indicator = document.querySelector("[data-live-indicator]");
    if (!indicator || !window.EventSource) return;
    const source = new EventSource("/events");
    source.addEventListener("open", () => { indicator.dataset.state = "live"; indicator.textContent = "live"; });
    source.addEventListener("error", () => { indicator.dataset.state = "lost"; indicator.textContent = "reconnecting"; });
    source.addEventListener("system", (e) => onSystem(JSON.parse(e.data)));
    // Other sections register their own handlers on this hook.
    window.atlasmesh = { source };
  }

  // Buttons with data-confirm ask before submitting their form.
  document.addEventListener("submit", (e) => {
    const button = e.submitter;
    if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) e.preventDefault();
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", connect);
  else connect();
})();
