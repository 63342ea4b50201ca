// lagompy console: live refresh of the tables marked data-refresh (every data-every seconds).
// The pages work without it; it only keeps the figures fresh. No dependencies, no build step.
(function () {
  "use strict";
  function refresh(el) {
    var every = Number(el.getAttribute("data-every")) * 1000;
    if (!every) return;
    window.setInterval(function () {
      // Never replace a table the operator is typing into (an offset field).
      if (document.hidden || el.contains(document.activeElement)) return;
      fetch(el.getAttribute("data-refresh"), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) el.innerHTML = html; })
        .catch(function () {});
    }, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(refresh);
  });
})();
