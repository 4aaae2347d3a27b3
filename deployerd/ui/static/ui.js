// deployerd status page: keeps the page live over server-sent events. Without it the page is complete, just static.
// The server sends the whole <main> on connect, then only the parts (by id) whose HTML changed.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-events");
  var live = document.getElementById("live");
  if (!url || !window.EventSource || !live) return;
  var text = live.querySelector(".live-text");

  function say(state, message) {
    live.setAttribute("data-state", state);
    text.textContent = message;
  }

  // Keep keyboard focus where it was when the element holding it is replaced.
  function focusKey(el) {
    if (!el || el === body) return null;
    return el.id ? "#" + el.id : (el.getAttribute && el.getAttribute("href"));
  }
  function refocus(key) {
    if (!key) return;
    var el = key.charAt(0) === "#" ? document.getElementById(key.slice(1)) : document.querySelector('[href="' + CSS.escape(key) + '"]');
    if (el && el !== document.activeElement) el.focus({preventScroll: true});
  }
  function patch(apply) {
    var key = focusKey(document.activeElement);
    apply();
    refocus(key);
  }

  var source = new EventSource(url);
  source.addEventListener("open", function () { say("live", "Live"); });
  source.addEventListener("error", function () { say("lost", "Connection lost: retrying"); });
  source.addEventListener("main", function (e) {
    var html = JSON.parse(e.data).html;
    var main = document.getElementById("main");
    patch(function () { main.innerHTML = html; });
  });
  source.addEventListener("parts", function (e) {
    var parts = JSON.parse(e.data).html;
    patch(function () {
      Object.keys(parts).forEach(function (id) {
        var el = document.getElementById(id);
        if (el) el.outerHTML = parts[id];
      });
    });
  });
  function describe(e) {
    var d = JSON.parse(e.data);
    var what = {
      job_started: "started", job_ended: "ended: " + (d.status || ""), rolled_back: "rolled back",
      quarantined: "quarantined", host_down: "down", host_up: "up",
    }[d.kind];
    if (what) say("live", "Live · " + (d.service || d.host || "") + " " + what);
  }
  ["job_started", "job_ended", "rolled_back", "quarantined", "host_down", "host_up"].forEach(function (k) {
    source.addEventListener(k, describe);
  });
})();
