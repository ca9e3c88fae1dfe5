// stickyci dashboard: while a run is going, fetch the changing part of its page every second
// and swap it in. The server renders (and escapes) it; nothing here builds markup from data.
"use strict";
(function () {
  const box = document.getElementById("live");
  if (!box) return;
  async function tick() {
    if (box.dataset.live !== "1") return;
    try {
      const r = await fetch(box.dataset.src, {credentials: "same-origin", cache: "no-store"});
      if (r.status === 401) { window.location.reload(); return; }
      if (r.ok) {
        box.innerHTML = await r.text();
        const head = box.querySelector("[data-running]");
        box.dataset.live = head && head.dataset.running === "1" ? "1" : "0";
      }
    } catch (e) {
      // The server restarting or the network going away: try again at the next tick.
    }
    window.setTimeout(tick, 1000);
  }
  window.setTimeout(tick, 1000);
})();
