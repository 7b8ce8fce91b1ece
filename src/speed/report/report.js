// speed run report: sort the sortable tables, filter the sample tables. Reads only the DOM.
(function () {
  "use strict";

  function cellKey(row, index, numeric) {
    var cell = row.cells[index];
    if (!cell) return numeric ? -Infinity : "";
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (!numeric) return raw.trim().toLowerCase();
    var value = parseFloat(raw);
    return isNaN(value) ? -Infinity : value;
  }

  function makeSortable(table) {
    var headers = table.querySelectorAll("thead th[data-sort]");
    Array.prototype.forEach.call(headers, function (th) {
      th.addEventListener("click", function () {
        var index = th.cellIndex;
        var numeric = th.getAttribute("data-sort") === "num";
        var dir = th.getAttribute("data-dir") === "asc" ? "desc" : "asc";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("data-dir"); });
        th.setAttribute("data-dir", dir);
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellKey(a, index, numeric), y = cellKey(b, index, numeric);
          var order = x < y ? -1 : x > y ? 1 : 0;
          return dir === "asc" ? order : -order;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  function makeFilter(table, controls, counter) {
    if (!table) return;
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    function apply() {
      var kind = controls.kind ? controls.kind.value : "";
      var text = controls.text ? controls.text.value.trim().toLowerCase() : "";
      var changed = controls.changed ? controls.changed.checked : false;
      var shown = 0;
      rows.forEach(function (r) {
        var ok = (!kind || r.getAttribute("data-kind") === kind) &&
          (!changed || r.getAttribute("data-changed") === "yes") &&
          (!text || r.textContent.toLowerCase().indexOf(text) !== -1);
        r.hidden = !ok;
        if (ok) shown += 1;
      });
      if (counter) counter.textContent = shown + " of " + rows.length + " shown";
    }
    [controls.kind, controls.text, controls.changed].forEach(function (el) {
      if (el) el.addEventListener("input", apply);
      if (el) el.addEventListener("change", apply);
    });
    apply();
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), makeSortable);
  makeFilter(document.getElementById("sample-table"), {
    kind: document.getElementById("kind-filter"),
    text: document.getElementById("text-filter"),
    changed: document.getElementById("changed-filter")
  }, document.getElementById("sample-count"));
  makeFilter(document.getElementById("verdict-table"), {
    text: document.getElementById("verdict-filter")
  }, document.getElementById("verdict-count"));
})();
