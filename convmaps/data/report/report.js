// convmaps report: names the channel under the mouse and sorts tables. The pages read the same
// without it; no data is fetched (browsers block fetch from file://).
(function () {
  "use strict";
  var tip = document.createElement("div");
  tip.id = "tip";
  document.body.appendChild(tip);
  document.querySelectorAll("img[data-range]").forEach(function (img) {
    var grid = img.dataset.grid ? JSON.parse(img.dataset.grid) : null;
    var range = img.dataset.range || "";
    img.addEventListener("mousemove", function (ev) {
      var r = img.getBoundingClientRect();
      var x = (ev.clientX - r.left) * img.naturalWidth / r.width;
      var y = (ev.clientY - r.top) * img.naturalHeight / r.height;
      var text = range ? "range " + range.split(";")[0].replace(",", " … ") : "";
      if (grid) {
        var col = Math.floor((x - grid.left) / grid.px), row = Math.floor((y - grid.top) / grid.py);
        var dx = x - grid.left - col * grid.px, dy = y - grid.top - row * grid.py - grid.band;
        var c = row * grid.cols + col;
        if (col >= 0 && col < grid.cols && row >= 0 && c < grid.n && dx < grid.w && dy >= 0 && dy < grid.h) {
          var ranges = range.split(";");
          text = "channel " + c + " · range " + (ranges[c] || ranges[0]).replace(",", " … ");
        }
      }
      if (!text) { tip.style.display = "none"; return; }
      tip.textContent = text;
      tip.style.left = ev.clientX + 12 + "px";
      tip.style.top = ev.clientY + 12 + "px";
      tip.style.display = "block";
    });
    img.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  });
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th").forEach(function (th, i) {
      var down = false;
      th.addEventListener("click", function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        down = !down;
        rows.sort(function (a, b) {
          var x = a.cells[i].textContent, y = b.cells[i].textContent;
          var p = parseFloat(x), q = parseFloat(y);
          var cmp = (!isNaN(p) && !isNaN(q)) ? p - q : x.localeCompare(y);
          return down ? -cmp : cmp;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
