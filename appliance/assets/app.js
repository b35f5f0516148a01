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

  // Actions go through the same /api/v1 as scripts do, with the session's CSRF token.
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  async function api(method, path, body, contentType) {
    const headers = { "x-csrf-token": csrf() };
    if (contentType) headers["content-type"] = contentType;
    const response = await fetch(path, { method, headers, body, credentials: "same-origin" });
    let data = null;
    try { data = await response.json(); } catch (_) { /* no body */ }
    if (!response.ok) throw new Error((data && data.error && data.error.message) || `${response.status} ${response.statusText}`);
    return data;
  }
  function showError(message) {
    const el = document.querySelector("[data-api-error]");
    if (el) { el.textContent = message; el.hidden = false; el.scrollIntoView({ block: "nearest" }); } else { window.alert(message); }
  }
  function jsonFor(kind, form) {
    const f = new FormData(form);
    const text = (k) => String(f.get(k) || "").trim();
    switch (kind) {
      case "bandwidth": { const v = text("mib_per_second"); return { bytes_per_second: v ? Math.round(parseFloat(v) * 1048576) : null }; }
      case "stage": {
        const source = text("source");
        const body = { hardware: text("hardware"), version: text("version") };
        if (/^https?:\/\//.test(source)) body.url = source; else body.path = source;
        return body;
      }
      case "assign": return { vehicle_id: text("vehicle_id"), version: text("version") };
      case "rollout": {
        const body = { version: text("version") };
        if (text("hardware")) body.hardware = text("hardware");
        if (text("canary")) body.waves = [{ count: parseInt(text("canary"), 10) }, { percent: 25 }, { percent: 100 }];
        if (text("threshold") || text("confidence")) {
          body.gate = { threshold: parseFloat(text("threshold") || "98") / 100, confidence: parseFloat(text("confidence") || "95") / 100 };
        }
        return body;
      }
      case "charging-vehicle": {
        // datetime-local is the browser's local time; the API takes Unix ms.
        const departure = text("departure");
        return {
          departure_ms: departure ? new Date(departure).getTime() : null,
          target_soc_percent: text("target_soc_percent") ? parseFloat(text("target_soc_percent")) : null,
          priority: parseInt(text("priority") || "0", 10),
        };
      }
      case "charging-site": {
        // Whitespace or semicolons between prices: a comma may be a decimal comma, and
        // "0,25" must be refused, not read as 0 and 25.
        const words = text("tariff").split(/[\s;]+/).filter(Boolean);
        const bad = words.find((w) => !Number.isFinite(Number(w)));
        if (bad !== undefined) throw new Error(`Tariff: "${bad}" is not a price; write decimals with a point and separate prices with spaces.`);
        return { limit_kw: parseFloat(text("limit_kw")), tariff: words.map(Number) };
      }
      default: return Object.fromEntries(f.entries());
    }
  }
  function upload(form) {
    const file = form.querySelector("input[type=file]").files[0];
    if (!file) return;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.upload);
    xhr.setRequestHeader("x-csrf-token", csrf());
    xhr.setRequestHeader("content-type", "application/x-tar");
    xhr.upload.onprogress = (e) => {
      if (!e.lengthComputable) return;
      set("staging-bytes", `Uploading and staging: ${bytes(e.loaded)} of ${bytes(e.total)}`);
      meter("staging", pct(e.loaded, e.total));
    };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) { window.location.reload(); return; }
      let message = `${xhr.status} ${xhr.statusText}`;
      try { message = JSON.parse(xhr.responseText).error.message; } catch (_) { /* keep the status */ }
      showError(message);
    };
    xhr.onerror = () => showError("The upload was interrupted.");
    xhr.send(file);
  }
  document.addEventListener("submit", async (e) => {
    const form = e.target;
    if (form.dataset.upload) { e.preventDefault(); upload(form); return; }
    if (!form.dataset.api) return;
    e.preventDefault();
    const [method, path] = form.dataset.api.split(" ");
    try {
      const body = form.dataset.file ? form.querySelector("input[type=file]").files[0] : JSON.stringify(jsonFor(form.dataset.json, form));
      await api(method, path, body, "application/json");
      window.location.reload();
    } catch (err) { showError(err.message); }
  });
  document.addEventListener("click", async (e) => {
    const action = e.target.closest("[data-api-button]");
    if (action) {
      if (action.dataset.confirm && !window.confirm(action.dataset.confirm)) return;
      const [method, path] = action.dataset.apiButton.split(" ");
      try { await api(method, path); window.location.reload(); } catch (err) { showError(err.message); }
      return;
    }
    const validate = e.target.closest("[data-validate]");
    if (validate) {
      validate.disabled = true;
      validate.textContent = "Validating…";
      try {
        const result = await api("GET", validate.dataset.validate);
        const v = result.validation;
        validate.textContent = v.ok ? "Intact" : `Damaged: ${v.bad_chunks.length} chunk(s)`;
        validate.classList.add(v.ok ? "ok" : "danger");
      } catch (err) { showError(err.message); validate.textContent = "Validate"; }
      validate.disabled = false;
    }
  });

  function onStaging(msg) {
    if (!document.querySelector("[data-staging-live]")) return;
    if (msg.state === "running") {
      set("staging-bytes", msg.bytes_total ? `${bytes(msg.bytes_done)} of ${bytes(msg.bytes_total)}` : `${bytes(msg.bytes_done)}`);
      if (msg.bytes_total) meter("staging", pct(msg.bytes_done, msg.bytes_total));
    } else {
      window.setTimeout(() => window.location.reload(), 600);
    }
  }

  // Bays and vehicles: the depot sends the board and the changed vehicles at most once a second.
  const esc = (t) => String(t == null ? "" : t).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  const soc = (v) => (v == null ? "—" : `${v.toFixed(0)} %`);
  const when = (ms) => (ms == null ? "—" : new Date(ms).toISOString().slice(0, 16).replace("T", " ") + " UTC");
  function onBays(bays) {
    const board = document.querySelector("[data-bay-board]");
    if (!board) return;
    board.innerHTML = bays.map((b) => `<div class="bay" data-state="${b.vehicle ? "occupied" : "free"}"><div class="bay-name">${esc(b.bay)}</div>` +
      (b.vehicle ? `<div class="bay-vehicle"><a href="/vehicles#${esc(b.vehicle)}">${esc(b.vehicle)}</a></div><div class="muted">${soc(b.soc_percent)}${b.plugged_in ? " · charging" : ""}${b.online === false ? " · offline" : ""}</div>`
        : `<div class="muted">free</div>`) + "</div>").join("");
    const empty = document.querySelector("[data-bay-board-empty]");
    if (empty && bays.length) empty.remove();
    set("bay-summary", `${bays.filter((b) => b.vehicle).length} of ${bays.length} bays occupied`);
  }
  function onVehicles(vehicles) {
    const body = document.querySelector("[data-vehicles]");
    if (!body) return;
    for (const v of vehicles) {
      const row = body.querySelector(`[data-vehicle="${CSS.escape(v.id)}"]`);
      if (!row) continue;
      const target = v.assigned_version && v.assigned_version !== v.installed_version ? ` <span class="muted">→ ${esc(v.assigned_version)}</span>` : "";
      const cells = [
        `<code>${esc(v.id)}</code>`,
        v.docked ? esc(v.bay || "docked") : `<span class="muted">away</span>`,
        v.online ? `<span class="pill ok">online</span>` : `<span class="pill idle">offline</span>`,
        soc(v.soc_percent) + (v.plugged_in ? " · plugged in" : ""),
        when(v.departure_ms),
        esc(v.installed_version || "—") + target,
        v.ota ? esc(`${v.ota.version} ${v.ota.phase} ${v.ota.outcome}`) : `<span class="muted">—</span>`,
        esc(v.health || "—"),
        when(v.last_seen_at),
      ];
      row.innerHTML = cells.map((c) => `<td>${c}</td>`).join("");
    }
  }

  // Departures are shown in the browser's local time.
  const localInput = (ms) => {
    const d = new Date(ms);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
  };
  const fillTimes = () => document.querySelectorAll("input[type=datetime-local][data-ms]").forEach((el) => {
    if (!el.value) el.value = localInput(parseInt(el.dataset.ms, 10));
  });

  // Sections marked data-live-section are fetched again and swapped in place; one holding a
  // field that is focused or edited but not saved is left alone, so nothing typed is lost.
  document.addEventListener("input", (e) => { if (e.target.form || e.target.getAttribute("form")) e.target.dataset.dirty = "1"; });
  let fetching = null;
  function refreshSections() {
    if (fetching || !document.querySelector("[data-live-section]")) return;
    fetching = window.setTimeout(async () => {
      try {
        const response = await fetch(window.location.href, { credentials: "same-origin", signal: AbortSignal.timeout(10000) });
        if (response.ok) {
          const next = new DOMParser().parseFromString(await response.text(), "text/html");
          document.querySelectorAll("[data-live-section]").forEach((el) => {
            if (el.contains(document.activeElement) || el.querySelector("[data-dirty]")) return;
            const fresh = next.querySelector(`[data-live-section="${CSS.escape(el.dataset.liveSection)}"]`);
            if (fresh) el.replaceWith(document.importNode(fresh, true));
          });
          fillTimes();
        }
      } catch (_) { /* offline for a moment: the next event tries again */ }
      fetching = null;
    }, 1000);
  }

  function connect() {
    fillTimes();
    const indicator = document.querySelector("[data-live-indicator]");
    if (!indicator || !window.EventSource) return;
    const source = new EventSource("/events");
    source.addEventListener("open", () => { indicator.dataset.state = "live"; indicator.textContent = "live"; });
    source.addEventListener("error", () => { indicator.dataset.state = "lost"; indicator.textContent = "reconnecting"; });
    source.addEventListener("system", (e) => onSystem(JSON.parse(e.data)));
    source.addEventListener("staging", (e) => onStaging(JSON.parse(e.data)));
    source.addEventListener("bays", (e) => onBays(JSON.parse(e.data)));
    source.addEventListener("vehicles", (e) => onVehicles(JSON.parse(e.data)));
    // The rollout page redraws from the server, at most every two seconds.
    let redraw = null;
    source.addEventListener("rollout", () => {
      if (!document.querySelector("[data-rollout]") || redraw) return;
      redraw = window.setTimeout(() => window.location.reload(), 2000);
    });
    // So does the disks page, when a reading or an alert arrives.
    source.addEventListener("disks", () => {
      if (!document.querySelector("[data-disk]") || redraw) return;
      redraw = window.setTimeout(() => window.location.reload(), 2000);
    });
    // Chargers and the plan change every poll.
    source.addEventListener("charging", refreshSections);
    // Other sections register their own handlers on this hook.
    window.atlasmesh = { source };
  }

  // Buttons with data-confirm ask before submitting their form.
  document.addEventListener("submit", (e) => {
    const button = e.submitter;
    if (button && button.dataset.confirm && !window.confirm(button.dataset.confirm)) e.stopImmediatePropagation(), e.preventDefault();
  }, true);

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", connect);
  else connect();
})();
