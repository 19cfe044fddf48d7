// Atelier dashboard: live updates over Server-Sent Events. No framework, nothing loaded from elsewhere.
"use strict";

function liveList(table) {
  const rows = document.getElementById("job-rows");
  const state = document.getElementById("live-state");
  const limit = parseInt(table.dataset.limit || "50", 10);
  const source = new EventSource(table.dataset.live);
  source.addEventListener("open", () => { state.textContent = "Live: new jobs and state changes appear here."; });
  source.addEventListener("error", () => { state.textContent = "Live updates reconnecting…"; });
  source.addEventListener("job", (message) => {
    const data = JSON.parse(message.data);
    const old = document.getElementById("row-" + data.id);
    if (old && old.dataset.v === String(data.v)) return;
    const template = document.createElement("template");
    template.innerHTML = data.html.trim();
    const row = template.content.firstElementChild;
    if (old) {
      old.replaceWith(row);
    } else {
      rows.prepend(row);
      while (rows.children.length > limit) rows.lastElementChild.remove();
    }
    const empty = document.getElementById("no-jobs");
    if (empty) empty.hidden = true;
  });
  source.addEventListener("gone", (message) => {
    const old = document.getElementById("row-" + JSON.parse(message.data).id);
    if (old) old.remove();
  });
}

// A job or batch page: follow its event stream; on each event, fetch the page's main part again.
function livePart(box) {
  let busy = false, again = false, source = null;
  const finished = () => {
    const flag = box.querySelector("[data-terminal]");
    return flag && flag.dataset.terminal === "true";
  };
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const response = await fetch(box.dataset.fragment, {credentials: "same-origin", cache: "no-store"});
      if (response.ok) {
        const focused = document.activeElement && document.activeElement.id;
        box.innerHTML = await response.text();
        if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
      }
    } finally {
      busy = false;
      if (finished() && source) { source.close(); source = null; }
      if (again) { again = false; setTimeout(refresh, 200); }
    }
  }
  if (finished()) return;
  source = new EventSource(box.dataset.stream);
  source.onmessage = refresh;
  ["state", "job.submitted", "job.running", "job.succeeded", "job.failed", "job.canceled", "job.timed_out",
   "job.created", "job.queued", "job.submitting", "job.progress", "batch.progress", "batch.completed"].forEach((name) => {
    source.addEventListener(name, refresh);
  });
  source.addEventListener("error", () => { if (finished() && source) { source.close(); source = null; } });
}

document.addEventListener("DOMContentLoaded", () => {
  // A chooser form (the playground's model) takes effect as soon as a choice changes; its button stays
  // for keyboard users who prefer it.
  document.querySelectorAll("form[data-autosubmit] select").forEach((select) => {
    select.addEventListener("change", () => select.form.submit());
  });
  const table = document.querySelector("table[data-live]");
  if (table) liveList(table);
  ["job-main", "batch-main"].forEach((id) => {
    const box = document.getElementById(id);
    if (box) livePart(box);
  });
});
