// Live progress of the downloads in progress (the overview's table): polls a small JSON
// endpoint and redraws the rows with textContent only (nothing is parsed as HTML).
"use strict";
(function () {
  var table = document.getElementById("downloads");
  if (!table) { return; }
  var body = table.tBodies[0];
  var source = table.getAttribute("data-source");
  var MAX_ROWS = 100;

  function cell(row, text, cls) {
    var td = row.insertCell();
    td.textContent = text;
    if (cls) { td.className = cls; }
    return td;
  }

  function draw(list) {
    while (body.rows.length) { body.deleteRow(0); }
    if (!list.length) {
      var empty = body.insertRow();
      empty.className = "none";
      cell(empty, "None right now.").colSpan = 4;
      return;
    }
    list.slice(0, MAX_ROWS).forEach(function (d) {
      var row = body.insertRow();
      cell(row, d.upstream);
      var td = row.insertCell();
      if (d.size) {
        var bar = document.createElement("progress");
        bar.max = d.size;
        bar.value = d.written;
        bar.setAttribute("aria-label", "Progress of a download from " + d.upstream);
        td.appendChild(bar);
      } else {
        td.textContent = "—";
      }
      cell(row, d.written_text, "num");
      cell(row, d.size_text, "num");
    });
  }

  function poll() {
    if (document.hidden) { return; }
    fetch(source, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { draw(data.downloads || []); } })
      .catch(function () {});
  }

  window.setInterval(poll, 1000);
})();
