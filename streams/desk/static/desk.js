// Queue auto-refresh: re-fetch the rows (same filters) every data-refresh
// seconds (0: never) and swap them in, unless the box is unticked, the tab is
// hidden, or the keyboard is in the table (swapping the rows would throw the
// focus, and a screen reader's place, back to the top of the page).
(function () {
  const table = document.getElementById("queue");
  if (!table) return;
  const box = document.getElementById("autorefresh");
  const every = parseInt(table.dataset.refresh || "30", 10) * 1000;
  if (!(every > 0)) return;
  async function refresh() {
    if ((box && !box.checked) || document.hidden || table.contains(document.activeElement)) return;
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

// A table wider than its box scrolls inside it (a phone, a narrow window):
// the keyboard can scroll it only once it can focus it, so such a box is a
// tab stop while it is too wide, and only then (no stray stops on a laptop).
(function () {
  function mark() {
    for (const box of document.querySelectorAll("main table, main .table-scroll")) {
      const wide = box.scrollWidth > box.clientWidth + 1;
      if (wide && !box.hasAttribute("tabindex")) box.setAttribute("tabindex", "0");
      else if (!wide && box.getAttribute("tabindex") === "0") box.removeAttribute("tabindex");
    }
  }
  mark();
  window.addEventListener("resize", mark);
})();
