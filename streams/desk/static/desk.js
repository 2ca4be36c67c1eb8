// Queue auto-refresh: re-fetch the rows (same filters) every data-refresh
// seconds and swap them in, unless the box is unticked or the tab is hidden.
(function () {
  const table = document.getElementById("queue");
  if (!table) return;
  const box = document.getElementById("autorefresh");
  const every = parseInt(table.dataset.refresh || "30", 10) * 1000;
  async function refresh() {
    if ((box && !box.checked) || document.hidden) return;
    try {
      const r = await fetch(table.dataset.partial, { credentials: "same-origin" });
      // A redirect means the session ended: the answer is the login page,
      // which must not land inside the table. Reloading shows it whole.
      if (r.redirected) { window.location.reload(); return; }
      if (r.ok) document.getElementById("queue-rows").innerHTML = await r.text();
    } catch (e) { /* next tick retries */ }
  }
  setInterval(refresh, every);
})();
