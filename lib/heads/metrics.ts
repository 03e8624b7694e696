/**
 * Label-map metrics and previews: {@link meanIoU} (GATE's segmentation score) and {@link colorize}.
 *
 * @module
 */
import { InvalidArgumentError } from '../errors.js';
import { IGNORE, type LabelMap } from './data.js';

/** mIoU as docs/method.md §Amalgamation and heads: per class (incl. background) intersection and union summed over images, IoU = I/(U+1e-8), mean over classes; ignore (255) pixels of the truth are left out. */
export function meanIoU(preds: readonly LabelMap[], truths: readonly LabelMap[], classes: number): { miou: number; iou: number[] } {
  const inter = new Float64Array(classes);
  const union = new Float64Array(classes);
  preds.forEach((p, i) => {
    const t = truths[i]!;
    if (p.data.length !== t.data.length) throw new InvalidArgumentError(`meanIoU: image ${i}: prediction and truth differ in size`);
    for (let j = 0; j < t.data.length; j++) {
      const g = t.data[j]!;
      if (g === IGNORE) continue;
      const q = p.data[j]!;
      if (q === g) {
        if (g < classes) {
          inter[g]++;
          union[g]++;
        }
      } else {
        if (g < classes) union[g]++;
        if (q < classes) union[q]++;
      }
    }
  });
  const iou = Array.from(inter, (v, c) => v / (union[c]! + 1e-8));
  return { miou: iou.reduce((a, b) => a + b, 0) / classes, iou };
}
/** A distinct colour per class (PASCAL VOC's palette): H×W×3 RGB preview of a label map; ignore is white. */
export function colorize(m: LabelMap): Uint8Array {
  const out = new Uint8Array(m.data.length * 3);
  m.data.forEach((v, i) => {
    let r = 0;
    let g = 0;
    let b = 0;
    if (v === IGNORE) r = g = b = 255;
    else {
      let c = v;
      for (let s = 7; s >= 0 && c; s--, c >>= 3) {
        r |= (c & 1) << s;
        g |= ((c >> 1) & 1) << s;
        b |= ((c >> 2) & 1) << s;
      }
    }
    out[3 * i] = r;
    out[3 * i + 1] = g;
    out[3 * i + 2] = b;
  });
  return out;
}

