// safeshift dashboard: live updates without reload, and actions without leaving the page.
// Everything works without JavaScript too: the pages are server-rendered, the forms post.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var POLL_MS = 500;
  function poll() {
    if (!live) return;
    var url = live.dataset.live;
    var sep = url.indexOf("?") >= 0 ? "&" : "?";
    fetch(url + sep + "version=" + encodeURIComponent(live.dataset.version) +
          "&rendered=" + encodeURIComponent(live.dataset.rendered),
          { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 204) return null;
        if (r.status === 401 || r.status === 403) { window.location.reload(); return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (doc) {
        if (!doc) return;
        // keep an action form someone is typing in
        if (live.querySelector("details.action[open]")) return;
        live.innerHTML = doc.html;
        live.dataset.version = doc.version;
        live.dataset.rendered = doc.rendered;
        bind();
      })
      .catch(function () {})
      .finally(function () { window.setTimeout(poll, POLL_MS); });
  }
  function bind() {
    var forms = document.querySelectorAll("form.act");
    Array.prototype.forEach.call(forms, function (form) {
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var body = new URLSearchParams(new FormData(form));
        var status = form.querySelector(".result");
        if (!status) {
          status = document.createElement("p");
          status.className = "result";
          status.setAttribute("role", "alert");
          form.appendChild(status);
        }
        // form.action would be the input named "action": read the attribute
        fetch(form.getAttribute("action"), { method: "POST", body: body, credentials: "same-origin",
                             headers: { "Accept": "application/json" } })
          .then(function (r) { return r.json().then(function (doc) { return [r, doc]; }); })
          .then(function (pair) {
            var r = pair[0], doc = pair[1];
            if (!r.ok) { status.className = "result error"; status.textContent = doc.error || ("refused: " + r.status); return; }
            var details = form.closest("details");
            if (details) details.open = false;
            live.innerHTML = doc.html;
            live.dataset.version = doc.version;
            live.dataset.rendered = doc.rendered;
            var note = document.getElementById("notice");
            if (!note) {
              note = document.createElement("p");
              note.id = "notice"; note.className = "ok"; note.setAttribute("role", "status");
              live.parentNode.insertBefore(note, live);
            }
            note.textContent = doc.message;
            bind();
          })
          .catch(function () { status.className = "result error"; status.textContent = "the server did not answer"; });
      });
    });
  }
  bind();
  if (live) window.setTimeout(poll, POLL_MS);
})();
