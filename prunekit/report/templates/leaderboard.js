/* prunekit report: sort, filter and re-rank the leaderboard table in place (no network, no library).
   Without JavaScript the page shows the same table, ranked by the server-side order. */
(function () {
  "use strict";
  var table = document.getElementById("leaderboard");
  if (!table || !table.tBodies.length || !table.tHead) { return; }
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var headers = Array.prototype.slice.call(table.tHead.querySelectorAll("th[data-index]"));
  var filter = document.getElementById("leaderboard-filter");
  var target = document.getElementById("target-language");
  var status = document.getElementById("leaderboard-status");
  var controls = document.getElementById("leaderboard-controls");
  var sorted = { header: null, descending: false };
  var targetIndex = null;

  function value(row, index, type) {
    var cell = row.cells[index];
    var raw = cell.getAttribute("data-value");
    if (type === "num") {
      var number = raw === null || raw === "" ? NaN : parseFloat(raw);
      return isNaN(number) ? null : number;
    }
    return (raw === null ? cell.textContent : raw).trim().toLowerCase();
  }

  /* Order the body rows by one column; n/a cells stay last, ties keep the leaderboard's order. */
  function arrange(index, type, descending) {
    var ordered = rows.slice().sort(function (a, b) {
      var x = value(a, index, type);
      var y = value(b, index, type);
      if (x === null || y === null) {
        if (x !== y) { return x === null ? 1 : -1; }
      } else if (x !== y) {
        return (x < y ? -1 : 1) * (descending ? -1 : 1);
      }
      return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
    });
    ordered.forEach(function (row) { tbody.appendChild(row); });
    return ordered;
  }

  function markSorted(th, descending) {
    headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
    if (th) { th.setAttribute("aria-sort", descending ? "descending" : "ascending"); }
    sorted = { header: th, descending: descending };
  }

  function sortBy(th) {
    var numeric = th.getAttribute("data-type") === "num";
    var descending = sorted.header === th ? !sorted.descending : numeric && th.getAttribute("data-better") === "higher";
    markSorted(th, descending);
    arrange(Number(th.getAttribute("data-index")), th.getAttribute("data-type"), descending);
    highlight();
  }

  function visible() {
    return Array.prototype.filter.call(tbody.rows, function (row) { return !row.hidden; });
  }

  /* The best shown checkpoint for the target column gets the highlight; the status line names it. */
  function highlight() {
    rows.forEach(function (row) { row.classList.remove("target-best"); });
    var shown = visible();
    var text = shown.length + " of " + rows.length + " checkpoints shown";
    if (targetIndex !== null) {
      var th = headers.filter(function (h) { return Number(h.getAttribute("data-index")) === targetIndex; })[0];
      var lower = th.getAttribute("data-better") !== "higher";
      var best = null;
      shown.forEach(function (row) {
        var v = value(row, targetIndex, "num");
        var b = best === null ? null : value(best, targetIndex, "num");
        if (v !== null && (b === null || (lower ? v < b : v > b))) { best = row; }
      });
      if (best !== null) {
        best.classList.add("target-best");
        text += " · best by " + th.getAttribute("data-target") + ": " + best.getAttribute("data-name") +
          " (" + best.cells[targetIndex].textContent.trim() + ")";
      }
    }
    if (status) { status.textContent = text; }
  }

  function applyFilter() {
    var terms = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    rows.forEach(function (row) {
      var text = row.getAttribute("data-search");
      row.hidden = !terms.every(function (term) { return text.indexOf(term) !== -1; });
    });
    highlight();
  }

  /* Rank every checkpoint by the chosen language's perplexity (or task), best first, ties share a rank. */
  function retarget() {
    var key = target.value || table.getAttribute("data-rank-by") || "";
    Array.prototype.forEach.call(table.querySelectorAll(".target"), function (el) { el.classList.remove("target"); });
    var th = key ? table.tHead.querySelector('th[data-col="' + key + '"]') : null;
    if (!th) {
      targetIndex = null;
      markSorted(null, false);
      arrange(0, "num", false);
      highlight();
      return;
    }
    targetIndex = Number(th.getAttribute("data-index"));
    var descending = th.getAttribute("data-better") === "higher";
    markSorted(th, descending);
    var ordered = arrange(targetIndex, "num", descending);
    var rank = 0;
    var previous = null;
    ordered.forEach(function (row, i) {
      var v = value(row, targetIndex, "num");
      var cell = row.cells[0];
      if (v === null) {
        cell.textContent = "—";
        cell.setAttribute("data-value", "");
        return;
      }
      if (v !== previous) { rank = i + 1; previous = v; }
      cell.textContent = String(rank);
      cell.setAttribute("data-value", String(rank));
    });
    th.classList.add("target");
    Array.prototype.forEach.call(table.rows, function (row) {
      if (row.parentNode !== table.tHead || row.classList.contains("dense")) {
        var cell = row.cells[targetIndex];
        if (cell) { cell.classList.add("target"); }
      }
    });
    highlight();
  }

  headers.forEach(function (th) {
    th.tabIndex = 0;
    th.classList.add("sortable");
    th.title = (th.title ? th.title + " · " : "") + "click to sort, click again to reverse";
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        sortBy(th);
      }
    });
  });
  if (filter) { filter.addEventListener("input", applyFilter); }
  if (target) { target.addEventListener("change", retarget); }
  if (controls) { controls.hidden = false; }
  if (target) { retarget(); } else { highlight(); }
}());
