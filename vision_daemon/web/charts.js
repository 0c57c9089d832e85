// Line charts on a canvas, drawn by hand: two small time series panels do not justify a chart
// library, and the page may load nothing from anywhere but the daemon.

const GRID = "rgba(255,255,255,0.08)";
const AXIS_TEXT = "#8b95a5";

const TICKS = 4;

/** A round step (1, 2, 2.5 or 5 times a power of ten) so that TICKS steps cover v. */
function niceStep(v) {
  const raw = v > 0 ? v / TICKS : 0.25;
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (raw <= m * p) return m * p;
  return 10 * p;
}

function fmtTick(v) {
  if (v >= 100 || Number.isInteger(v)) return v.toFixed(0);
  return String(Number(v.toFixed(2)));
}

/**
 * Draw series [{name, color, values}] against times (unix s, oldest first) on the canvas, sized
 * to its CSS box at the device's pixel ratio. null values leave gaps.
 */
export function drawChart(canvas, times, series, unit) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth;
  const cssH = canvas.clientHeight;
  if (!cssW || !cssH) return;
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  ctx.font = "11px system-ui, sans-serif";
  const left = 44;
  const right = 10;
  const top = 22;
  const bottom = 20;
  const w = cssW - left - right;
  const h = cssH - top - bottom;
  canvas.dataset.points = String(times.length);

  let max = 0;
  for (const s of series) for (const v of s.values) if (typeof v === "number" && v > max) max = v;
  const yMax = niceStep(max * 1.05) * TICKS;
  const t1 = times.length ? times[times.length - 1] : 0;
  const t0 = times.length ? Math.min(times[0], t1 - 60) : -60;
  const span = Math.max(1, t1 - t0);
  const x = (t) => left + ((t - t0) / span) * w;
  const y = (v) => top + h - (v / yMax) * h;

  ctx.strokeStyle = GRID;
  ctx.fillStyle = AXIS_TEXT;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= TICKS; i++) {
    const v = (yMax * i) / TICKS;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, yy);
    ctx.lineTo(left + w, yy);
    ctx.stroke();
    ctx.fillText(fmtTick(v), left - 6, yy);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const stepS = span > 600 ? 300 : span > 240 ? 120 : span > 120 ? 60 : 30;
  for (let ago = 0; ago <= span; ago += stepS) {
    const xx = x(t1 - ago);
    ctx.fillText(ago === 0 ? "now" : `-${ago >= 60 ? `${ago / 60} min` : `${ago} s`}`, xx, top + h + 5);
  }
  ctx.textAlign = "left";
  ctx.fillText(unit, 4, 4);

  let lx = left;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.75;
    ctx.beginPath();
    let pen = false;
    const ok = (v) => typeof v === "number" && Number.isFinite(v);
    s.values.forEach((v, i) => {
      if (!ok(v)) {
        pen = false;
        return;
      }
      if (pen) ctx.lineTo(x(times[i]), y(v));
      else ctx.moveTo(x(times[i]), y(v));
      pen = true;
    });
    ctx.stroke();
    ctx.fillStyle = s.color;
    s.values.forEach((v, i) => {
      // a point with no neighbour draws no line: show it as a dot
      if (ok(v) && !ok(s.values[i - 1]) && !ok(s.values[i + 1])) {
        ctx.fillRect(x(times[i]) - 1.5, y(v) - 1.5, 3, 3);
      }
    });
    // legend, top row
    ctx.fillStyle = s.color;
    ctx.fillRect(lx + 20, 7, 10, 3);
    ctx.fillStyle = AXIS_TEXT;
    ctx.fillText(s.name, lx + 34, 3);
    lx += 34 + ctx.measureText(s.name).width + 10;
  }
}
