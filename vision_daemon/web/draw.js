// Drawing a frame and its detections on a canvas, at the frame's own resolution (so a box's
// pixel coordinates are the canvas's), one stroke colour per class.

/** Stroke colour of class id i is PALETTE[i % PALETTE.length] (the tests read this list). */
export const PALETTE = [
  "#ff2d55", "#00c7be", "#ffcc00", "#5e5ce6", "#34c759", "#ff9500", "#bf5af2", "#0a84ff",
  "#ff453a", "#64d2ff", "#a2845e", "#30d158", "#ff6482", "#ffd60a", "#ac8e68", "#8e8cd8",
];

export function classColor(classId) {
  const i = Number.isInteger(classId) && classId >= 0 ? classId : 0;
  return PALETTE[i % PALETTE.length];
}

function textColor(hex) {
  const n = parseInt(hex.slice(1), 16);
  const luma = 0.299 * (n >> 16) + 0.587 * ((n >> 8) & 255) + 0.114 * (n & 255);
  return luma > 150 ? "#000" : "#fff";
}

/**
 * Draw the bitmap, then each detection's box and "label 0.87" above it. The stroke is at least
 * 3 px wide, so the pixel under a box's edge coordinate is always fully the class's colour.
 * Strokes and labels keep a readable size however small the canvas is shown.
 */
export function drawFrame(canvas, ctx, bitmap, detections) {
  const w = bitmap.width;
  const h = bitmap.height;
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  ctx.drawImage(bitmap, 0, 0);
  if (!detections || !detections.length) return;
  const shown = canvas.clientWidth;
  const scale = shown > 0 ? w / shown : 1; // canvas pixels per CSS pixel
  const lw = Math.max(3, Math.round(Math.max(w, h) / 256), Math.round(2 * scale));
  const fontPx = Math.max(11, Math.round(h / 40), Math.round(10 * scale));
  ctx.lineWidth = lw;
  ctx.font = `${fontPx}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of detections) {
    const [x1, y1, x2, y2] = d.bbox;
    const color = classColor(d.class_id);
    ctx.strokeStyle = color;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
  // Labels after every box, so a box drawn later never hides one.
  for (const d of detections) {
    const [x1, y1] = d.bbox;
    const conf = d.conf ?? d.confidence;
    const text = typeof conf === "number" ? `${d.label} ${conf.toFixed(2)}` : String(d.label);
    const color = classColor(d.class_id);
    const tw = ctx.measureText(text).width + 6;
    const th = fontPx + 4;
    // Above the box, clear of its top edge; inside it when the box touches the frame's top.
    let lx = x1 - lw / 2;
    let ly = y1 - lw / 2 - th;
    if (ly < 0) {
      lx = x1 + lw / 2;
      ly = y1 + lw / 2;
    }
    lx = Math.min(Math.max(0, lx), Math.max(0, w - tw));
    ctx.fillStyle = color;
    ctx.fillRect(lx, ly, tw, th);
    ctx.fillStyle = textColor(color);
    ctx.fillText(text, lx + 3, ly + 2);
  }
}
