// jobfleet dashboard: live fragments, log following and actions, in plain JavaScript.
//   <el data-refresh="URL" data-every="MS">  fetched again every MS ms and swapped in
//   <pre data-log="URL" data-offset data-attempt data-done>  appends a job's log as it grows
//   <button data-post="URL" [data-confirm="TEXT"]>  POSTs with the dashboard token
(function () {
  "use strict";
  const meta = document.querySelector('meta[name="jobfleet-token"]');
  const token = meta ? meta.content : "";
  const flash = document.getElementById("flash");

  function say(text, isError) {
    flash.textContent = text;
    flash.classList.toggle("error", Boolean(isError));
  }

  async function refresh(el) {
    try {
      const r = await fetch(el.dataset.refresh, { cache: "no-store", credentials: "same-origin" });
      if (!r.ok) throw new Error(r.status);
      el.innerHTML = await r.text();
      el.removeAttribute("data-stale");
    } catch (e) {
      el.setAttribute("data-stale", "1");  // shown faded until the server answers again
    }
  }

  document.querySelectorAll("[data-refresh]").forEach(function (el) {
    setInterval(function () { if (!document.hidden) refresh(el); }, +el.dataset.every || 2000);
  });

  // Follow the latest attempt's log; start over when a new attempt begins.
  const log = document.querySelector("pre[data-log]");
  async function follow() {
    const d = log.dataset;
    try {
      const r = await fetch(d.log + "?offset=" + d.offset, { cache: "no-store" });
      if (r.ok) {
        const attempt = r.headers.get("X-Attempt");
        if (attempt !== d.attempt) {  // a new attempt: read it from its start
          Object.assign(d, { attempt: attempt, offset: "0" });
          log.textContent = "";
          document.querySelector(".log-attempt").textContent = attempt;
          return setTimeout(follow, 0);
        }
        log.textContent += await r.text();
        if (log.textContent.length > 4e6) log.textContent = log.textContent.slice(-2e6);
        if (log.textContent) document.getElementById("log-empty").hidden = true;
        d.offset = r.headers.get("X-Next-Offset");
        d.more = r.headers.get("X-Log-More");
        const state = r.headers.get("X-Job-State");
        d.done = r.headers.get("X-Log-Complete") === "1" && state !== "queued" && state !== "running" ? "1" : "0";
      }
    } catch (e) { /* the server is away: try again */ }
    if (d.done !== "1") setTimeout(follow, d.more === "1" ? 0 : 1000);
  }
  if (log && log.dataset.done !== "1") setTimeout(follow, 1000);

  // Actions: a POST carrying the token; the message survives the reload that follows.
  document.addEventListener("click", async function (ev) {
    const button = ev.target.closest("button[data-post]");
    if (!button || (button.dataset.confirm && !confirm(button.dataset.confirm))) return;
    button.disabled = true;
    try {
      const r = await fetch(button.dataset.post, { method: "POST", headers: { "X-Jobfleet-Token": token } });
      const body = await r.json();
      if (!r.ok) throw new Error(body.detail || r.status);
      sessionStorage.setItem("jobfleet-flash", body.message);
      location.reload();
    } catch (e) {
      say("failed: " + e.message, true);
      button.disabled = false;
    }
  });
  const said = sessionStorage.getItem("jobfleet-flash");
  if (said) { sessionStorage.removeItem("jobfleet-flash"); say(said, false); }
})();
