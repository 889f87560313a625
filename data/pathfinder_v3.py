"""Pathfinder generator version 3: the construction of the LRA release (PATHFINDER.md).

Our own code, after the description in /work/shared/PATHFINDER.md of Linsley/Kim's
snakes2.py as LRA ran it. Per image (all images of a batch advance together):
  1. Two main snakes of `contour_length` dashes, grown alternately (a dash of snake 0,
     a dash of snake 1, ...). Snake 0 starts at least 2 * seed_distance from every
     border, snake 1 round(seed_distance) from it in a random direction.
  2. A step: K candidate headings on the circle around the pivot, weighted by
     cos^2(min(c * |turn|, pi / 2)) (c = continuity) times "free"; one is drawn by its
     weight. The dash covers [m, L + m] of the step and the pivot moves L + 2m, so
     consecutive dashes are 2m apart (m = margin, per image at 128 px).
  3. "Free" is a soft test against a float occupancy mask (1x pixels): max(mask +
     dilated candidate dash) < accept (1.8). A snake's newest dash enters the mask only
     after its next step, so the two snakes may touch or cross where one meets the
     other's newest dash. A main snake with no free heading fails the image (drawn
     again, same label); a distractor that gets stuck is left out.
  4. num_distractors snakes of distractor_length dashes, each from a uniform start.
  5. Markers: the start of a random snake i, and the far end of i (label 1) or of the
     other snake (label 0). Every draw is made whatever the label.
  6. Drawing at 2x: dashes (contrast main / distractor) and marker disks (contrast
     marker) as antialiased coverage, combined by max; shrunk 2x by a separable
     Lanczos-3 filter in float (no clipping of the overshoot), negatives set to 0, and
     each image stretched so its brightest pixel is 255.
Labels are i.i.d. fair coins per image (as the release), not balanced per chunk.
Selected by config.data.generator_version = 3 (data/pathfinder.py keeps 2 the default:
the statistics below do not all match yet).

Shapes: b = images of a batch, k = candidate headings, w = window pixels,
canvas pixels flattened (b, size * size) at 1x and (b, 4 * size * size) at 2x.

Measured (tests/test_data_pathfinder.py's samples; targets from PATHFINDER.md, pixel
values / 255; blobs = 8-connected components of pixels >= 32; "ok" = within 15%):
  32 px (147 images; target = the original re-run): mean 0.080 (0.080-0.087) ok,
    > 0 44.6% (38-41%) ok, >= 32 18.7% (14-15%) MISS, >= 128 5.2% (8-9%) MISS,
    blobs 25.6 (~16) MISS, snakes touching 23% (22-29%) ok, about 3.6 distractors
    placed (about 2).
  128 px (21 images; target = re-run / release): mean 0.044 (0.040 / 0.037) ok,
    > 0 17.5% (18.5 / 16.1%) ok, >= 32 7.7% (7.4%) ok, >= 128 4.1% (4.2 / 3.9%) ok,
    marker plateau 0.91 = 233 (225) ok, blobs 80 (82 / 87) ok, about 13-15
    distractors placed (14-15).
  64 px: not measured: 14 dashes of 7 px from the centre nearly always hit a border
    under continuity 1.8 (< 1 pair in 600 fits), so this preset is impractically slow.
What differs from the original, as far as known: our footprints (the mask a dash
leaves) are drawn analytically (half width = thickness / 2 + margin, a linear edge of
`soft` px) where the original rasterises, dilates and Lanczos-filters each one; we
filter once after combining all dashes by max (the original filters every dash
alone); the Lanczos kernel is applied as an exact 2:1 matrix (the original resizes
each paddle's window by a ratio near 2); the wrapper's retry counts (segment 3 draws,
distractor 1 (32 px), 2 (128 px) or 4 tries) are our guesses. At 32 px dashes stay too separate
(too many blobs) and their faint skirts too wide.

Speed (generate_chunk, one process on this 2-core machine shared with other work, no PNG
writing): 310 images/s at 32 px, 18 images/s at 128 px (most snake pairs die at a
border and are grown again: 8 pairs per image are grown at once at 32 px, 64 at 128).
With 16 processes that is about 40 s for 200k images at 32 px, but about 12 minutes at
128 px: above the aim of a few minutes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

VERSION = 3


@dataclasses.dataclass(frozen=True)
class SettingsV3:
  """Version-3 generator settings, 1x pixels (PATHFINDER.md "Parameters", original column)."""

  size: int = 32
  contour_length: int = 14
  paddle_length: float = 2.0
  paddle_thickness: float = 0.5
  margins: tuple = (1,)           # margin m per image, drawn uniformly from these
  continuity: float = 1.0
  num_distractors: int = 10
  distractor_length: int = 4
  marker_radius: float = 1.5
  seed_distance: float = 7.0
  contrast_main: float = 1.5
  contrast_distractor: float = 2.0
  contrast_marker: float = 1.0
  padding: float = 1.0            # dash ends keep this far from the border
  candidates: int = 32            # headings tried per step (the original: circle pixels)
  dilation: float = 1.0           # px added to a candidate dash for the soft test
  accept: float = 1.8             # max(mask + dilated dash) must stay below this
  soft: float = 2.0               # px over which a footprint's edge falls from 1 to 0
  distractor_attempts: int = 4    # tries per distractor before it is left out
  hard_lines: bool = False        # dashes drawn unantialiased at 2x
  main_tries: int = 8             # snake pairs grown per image at once (keep the first fit)

  # the metadata line's fields, as in write_dataset
  @property
  def margin(self) -> float:
    return float(self.margins[0])

  def validate(self):
    if self.size not in (32, 64, 128, 256):
      raise ValueError(f"Pathfinder v3 size must be 32, 64, 128 or 256, got {self.size!r}")
    for name in ("contour_length", "distractor_length", "candidates"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"Pathfinder {name} must be a positive int, got {v!r}")
    if not isinstance(self.num_distractors, int) or self.num_distractors < 0:
      raise ValueError(f"Pathfinder num_distractors must be an int >= 0, got {self.num_distractors!r}")
    if not self.margins or min(self.margins) < 0:
      raise ValueError(f"Pathfinder margins must be a non-empty tuple of values >= 0, got {self.margins!r}")


PRESETS_V3 = {
    # 32 px: PIL-like hard lines and one try per distractor came closer to the re-run's
    # statistics (mean, fraction lit, about 2-4 distractors placed) than the defaults
    32: SettingsV3(32, 14, 2.0, 0.5, (1,), 1.0, 10, 4, 1.5, 7.0, 1.5, 2.0, 1.0, 1.0,
                   distractor_attempts=1, hard_lines=True, main_tries=8),
    # 64 px: 14 dashes of 7 px from the centre almost always run into a border (< 1 in
    # 600 pairs fit here), so this preset is very slow; see the module docstring.
    64: SettingsV3(64, 14, 5.0, 1.0, (1,), 1.8, 11, 4, 2.5, 12.0, 0.8, 0.8, 1.0, 1.0,
                   main_tries=256),
    # 128 px: two tries per distractor place about 14 of the 17 asked (PATHFINDER.md:
    # about 14-15 fit) and bring the mean intensity near the release's
    128: SettingsV3(128, 14, 5.0, 1.5, (2, 3), 1.8, 17, 4, 3.0, 20.0, 0.9, 0.9, 1.0, 1.0,
                    distractor_attempts=2, main_tries=64),
    256: SettingsV3(256, 14, 5.0, 2.0, (3,), 1.8, 15, 4, 5.0, 27.0, 1.0, 1.0, 1.0, 22.0,
                    main_tries=64),
}


def settings_v3(size: int, contour_length: int = 14) -> SettingsV3:
  if size not in PRESETS_V3:
    raise ValueError(f"Pathfinder size must be one of {sorted(PRESETS_V3)}, got {size!r}")
  return dataclasses.replace(PRESETS_V3[size], contour_length=contour_length)


# ---------------------------------------------------------------------------------------

def _seg_windows(a, b, reach: float, size: int):
  """Pixels near segments a -> b (..., 2) (x, y), pixel (r, c) centred at (c, r).

  Returns flat indices (..., w) int64, distances (..., w) float32 (inf outside).
  """
  ax, ay, bx, by = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
  abx, aby = bx - ax, by - ay
  half = float(np.sqrt(np.max(abx * abx + aby * aby, initial=0.0))) / 2
  r = int(math.ceil(half + reach)) + 1
  off = np.arange(-r, r + 1, dtype=np.float32)
  offy, offx = (o.ravel() for o in np.meshgrid(off, off, indexing="ij"))
  px = np.rint((ax + bx) / 2)[..., None] + offx
  py = np.rint((ay + by) / 2)[..., None] + offy
  apx, apy = px - ax[..., None], py - ay[..., None]
  abx, aby = abx[..., None], aby[..., None]
  t = np.clip((apx * abx + apy * aby) / np.maximum(abx * abx + aby * aby, 1e-12), 0.0, 1.0)
  dx, dy = apx - t * abx, apy - t * aby
  d = np.sqrt(dx * dx + dy * dy).astype(np.float32)
  inside = (px >= 0) & (px <= size - 1) & (py >= 0) & (py <= size - 1)
  d = np.where(inside, d, np.float32(np.inf))
  idx = (np.clip(py, 0, size - 1).astype(np.int64) * size
         + np.clip(px, 0, size - 1).astype(np.int64))
  return idx, d


def _stamp(canvas, rows, a, b, half_width: float, value, size: int, hard: bool = False):
  """canvas (B, size*size) = max(canvas, value * coverage of the segments).

  rows (R,) image of each segment; a, b (R, 2); value scalar or (R,). hard: a pixel is
  lit when its centre lies within half_width (the original's PIL lines, not antialiased).
  """
  if rows.size == 0:
    return
  idx, d = _seg_windows(a, b, half_width + 0.5, size)
  cover = (d <= half_width).astype(np.float32) if hard else np.clip(half_width + 0.5 - d, 0.0, 1.0)
  val = cover * np.asarray(value, np.float32).reshape(-1, 1)
  flat = (rows[:, None] * canvas.shape[1] + idx).ravel()
  np.maximum.at(canvas.reshape(-1), flat, val.ravel())


class _Grower:
  """Grows snakes a dash at a time on a batch of B images (see the module docstring)."""

  def __init__(self, rng, s: SettingsV3, num_b: int):
    self.rng, self.s, self.num_b = rng, s, num_b
    self.occ = np.zeros((num_b, s.size * s.size), np.float32)  # the soft occupancy mask
    self.margin = rng.choice(np.asarray(s.margins, np.float32), num_b)  # (B,)
    self.w = s.paddle_thickness / 2
    # a dash's footprint in the mask: the dash widened by the margin (the original's
    # dilated paddle), so dashes of different snakes keep about m apart
    r = int(max(s.margins))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    keep = ox ** 2 + oy ** 2 <= r * r
    self.disk = np.stack([ox[keep], oy[keep]], -1).astype(np.float32)  # (p, 2)
    self.disk_r2 = (self.disk ** 2).sum(-1)

  def subset(self, rows):
    """Keeps images rows (B',) only, in that order."""
    self.occ, self.margin, self.num_b = self.occ[rows], self.margin[rows], rows.size

  def footprint(self, a, b, rows):
    """Mask footprint of dashes a -> b (..., 2) of images rows (...): (idx, value)."""
    soft = self.s.soft
    reach = self.w + float(max(self.s.margins)) + soft / 2
    idx, d = _seg_windows(a, b, reach, self.s.size)
    half = self.w + self.margin[rows][..., None]
    return idx, np.clip((half + soft / 2 - d) / soft, 0.0, 1.0)

  def fits(self, a, b, rows):
    """(...) bool: the soft test max(mask + footprint) < accept for dashes a -> b."""
    idx, val = self.footprint(a, b, rows)
    return (self.occ[rows[..., None], idx] + val).max(-1) < self.s.accept

  def end_free(self, head, rows):
    """(...) 1 - the mask's largest value within m of the pixel of head (..., 2)."""
    s = self.s
    px = np.rint(head[..., None, 0] + self.disk[:, 0])
    py = np.rint(head[..., None, 1] + self.disk[:, 1])
    near = self.disk_r2 <= self.margin[rows][..., None] ** 2
    inside = (px >= 0) & (px <= s.size - 1) & (py >= 0) & (py <= s.size - 1)
    idx = (np.clip(py, 0, s.size - 1).astype(np.int64) * s.size
           + np.clip(px, 0, s.size - 1).astype(np.int64))
    v = np.where(near & inside, self.occ[rows[..., None], idx], 0.0)
    return 1.0 - v.max(-1)

  def step(self, sel, pivot, heading, tries: int = 3):
    """One dash for each image sel (R,) from pivot (R, 2) after heading (R,).

    Returns a, b (R, 2) the dash ends, the next pivot (R, 2), the new heading (R,) and
    ok (R,) bool, False where no candidate passed.
    """
    s, rng, num_b = self.s, self.rng, sel.size
    k = s.candidates
    rows = np.arange(num_b)
    ang = (heading[:, None] + np.float32(2 * np.pi / k)
           * (np.arange(k, dtype=np.float32) + rng.uniform(0, 1, (num_b, 1)).astype(np.float32)))
    m = self.margin[sel, None]
    dx, dy = np.cos(ang), np.sin(ang)
    # the original's candidates are whole pixels on the circle; the heading is that of
    # the pixel (so paths live on the pixel grid, which joins some diagonal gaps)
    head = np.rint(np.stack([pivot[:, 0:1] + (m + s.paddle_length) * dx,
                             pivot[:, 1:2] + (m + s.paddle_length) * dy], -1))  # (B, K, 2)
    ang = np.arctan2(head[..., 1] - pivot[:, None, 1], head[..., 0] - pivot[:, None, 0])
    dx, dy = np.cos(ang), np.sin(ang)
    turn = np.abs(np.angle(np.exp(1j * (ang - heading[:, None])))).astype(np.float32)
    wt = np.cos(np.minimum(s.continuity * turn, np.pi / 2)) ** 2
    lo, hi = s.padding, s.size - 1 - s.padding
    inside = ((head >= lo) & (head <= hi)).all(-1)
    wt = wt * inside * np.maximum(self.end_free(head, np.broadcast_to(sel[:, None], (num_b, k))), 0)
    total = wt.sum(1)
    cum = np.cumsum(wt, 1)
    # the original draws up to `tries` candidates from this distribution and keeps the
    # first that passes the soft test
    u = rng.uniform(0, 1, (num_b, tries)).astype(np.float32) * total[:, None]
    pick = np.minimum((cum[:, None, :] < u[..., None]).sum(-1), k - 1)  # (B, T)
    r2 = np.broadcast_to(rows[:, None], pick.shape)
    b = head[r2, pick]  # (B, T, 2)
    dirs = np.stack([dx[r2, pick], dy[r2, pick]], -1)
    a = b - s.paddle_length * dirs
    ok = np.zeros((num_b, tries), bool)
    live = np.nonzero((total > 1e-4)[:, None] & np.ones_like(ok))
    if live[0].size:
      ok[live] = self.fits(a[live], b[live], sel[live[0]])
    first = ok.argmax(1)
    got = ok.any(1) & (total > 1e-4)
    new_ang = ang[rows, pick[rows, first]]
    b1 = b[rows, first]
    new_pivot = np.rint(b1 + m * np.stack([np.cos(new_ang), np.sin(new_ang)], -1))
    return a[rows, first], b1, new_pivot.astype(np.float32), new_ang.astype(np.float32), got

  def commit(self, rows, a, b):
    if rows.size == 0:
      return
    idx, val = self.footprint(a, b, rows)
    flat = (rows[:, None] * self.occ.shape[1] + idx).ravel()
    np.maximum.at(self.occ.reshape(-1), flat, val.ravel())


def _first_dash(rng, s: SettingsV3, lo, hi, num_b: int, tries: int = 8):
  """Seed dashes from a uniform start in [lo, hi]^2 whose far end stays there too.

  Returns starts (B, 2), headings (B,), ok (B,)."""
  start = rng.uniform(lo, hi, (num_b, tries, 2)).astype(np.float32)
  head = rng.uniform(-np.pi, np.pi, (num_b, tries)).astype(np.float32)
  end = start + s.paddle_length * np.stack([np.cos(head), np.sin(head)], -1)
  ok = ((end >= lo) & (end <= hi)).all(-1)
  first = ok.argmax(1)
  r = np.arange(num_b)
  return start[r, first], head[r, first], ok.any(1)


def _grow_main(g: _Grower, rng):
  """Two seeded snakes grown alternately.

  Returns dashes (B, 2, n, 2 ends, 2), ok (B,) bool.
  """
  s, num_b = g.s, g.num_b
  n = s.contour_length
  lo = 2 * s.seed_distance
  start0, head0, ok = _first_dash(rng, s, lo, s.size - 1 - lo, num_b)
  start0 = np.rint(start0)
  phi = rng.uniform(0, 2 * np.pi, num_b)
  start1 = np.rint(start0 + round(s.seed_distance) * np.stack([np.cos(phi), np.sin(phi)], -1))
  head1 = rng.uniform(-np.pi, np.pi, num_b).astype(np.float32)
  end1 = start1 + s.paddle_length * np.stack([np.cos(head1), np.sin(head1)], -1)
  ok &= ((start1 >= 0) & (start1 <= s.size - 1) & (end1 >= 0) & (end1 <= s.size - 1)).all(-1)
  dashes = np.zeros((num_b, 2, n, 2, 2), np.float32)
  heads = np.stack([head0, head1], 1)
  dashes[:, 0, 0] = np.stack([start0, start0 + s.paddle_length * np.stack(
      [np.cos(head0), np.sin(head0)], -1)], 1)
  dashes[:, 1, 0] = np.stack([start1, end1], 1)
  dirs = np.stack([np.cos(heads), np.sin(heads)], -1)
  pivot = np.rint(dashes[:, :, 0, 1] + g.margin[:, None, None] * dirs)  # (B, 2, 2)
  for t in range(1, n):
    for j in range(2):
      sel = np.flatnonzero(ok)  # only the images still growing: most die at a border
      a, b, pivot[sel, j], heads[sel, j], got = g.step(sel, pivot[sel, j], heads[sel, j])
      ok[sel] = got
      dashes[sel, j, t, 0], dashes[sel, j, t, 1] = a, b
      # this snake's previous dash enters the mask only now
      sel = sel[got]
      g.commit(sel, dashes[sel, j, t - 1, 0], dashes[sel, j, t - 1, 1])
  sel = np.flatnonzero(ok)
  for j in range(2):
    g.commit(sel, dashes[sel, j, n - 1, 0], dashes[sel, j, n - 1, 1])
  return dashes, ok


def _grow_distractor(g: _Grower, rng, active, attempts: int = 4, seeds: int = 8):
  """One distractor per image where active, up to `attempts` tries.

  A seed dash needs its whole footprint where the mask is <= 0.3 (the original's
  test for a free seed). Returns dashes (B, n, 2, 2), placed (B,) bool.
  """
  s, num_b = g.s, g.num_b
  n = s.distractor_length
  lo, hi = s.padding, s.size - 1 - s.padding
  dashes = np.zeros((num_b, n, 2, 2), np.float32)
  placed = np.zeros(num_b, bool)
  everyone = np.arange(num_b)
  for _ in range(attempts):
    todo = active & ~placed
    if not todo.any():
      break
    start = np.rint(rng.uniform(lo, hi, (num_b, seeds, 2))).astype(np.float32)
    head = rng.uniform(-np.pi, np.pi, num_b).astype(np.float32)
    d = np.stack([np.cos(head), np.sin(head)], -1)[:, None]
    end = start + s.paddle_length * d
    ok = ((end >= lo) & (end <= hi)).all(-1) & todo[:, None]
    live = np.nonzero(ok)
    if live[0].size:
      idx, val = g.footprint(start[live], end[live], live[0])
      ok[live] = ~((g.occ[live[0][:, None], idx] > 0.3) & (val > 0)).any(-1)
    pick = ok.argmax(1)
    cur = ok.any(1)
    trial = np.zeros_like(dashes)
    trial[:, 0, 0], trial[:, 0, 1] = start[everyone, pick], end[everyone, pick]
    pivot = np.rint(trial[:, 0, 1] + g.margin[:, None] * d[:, 0])
    for t in range(1, n):
      sel = np.flatnonzero(cur)
      a, b, pivot[sel], head[sel], got = g.step(sel, pivot[sel], head[sel])
      cur[sel] = got
      trial[sel, t, 0], trial[sel, t, 1] = a, b
    dashes[cur] = trial[cur]
    placed |= cur
    rows = everyone[cur]
    for t in range(n):
      g.commit(rows, trial[rows, t, 0], trial[rows, t, 1])
  return dashes, placed


def lanczos_matrix(size: int, a: int = 3) -> np.ndarray:
  """(size, 2 * size) float32: a Lanczos-a filter that halves a signal (PIL's way:
  support scaled by the factor, weights renormalised at the borders)."""
  i = np.arange(size)[:, None]
  j = np.arange(2 * size)[None, :]
  x = (j + 0.5 - 2 * (i + 0.5)) / 2  # input-to-output distance, output px
  k = np.where(np.abs(x) < a, np.sinc(x) * np.sinc(x / a), 0.0)
  return (k / k.sum(1, keepdims=True)).astype(np.float32)


def generate_images(rng: np.random.Generator, labels, s: SettingsV3, *, parts: bool = False):
  """Draws one version-3 image per label.

  Args:
    rng: NumPy generator. labels: (B,) ints in {0, 1}. s: SettingsV3.
    parts: also return the two main snakes drawn alone (for tests).

  Returns:
    images (B, size, size) uint8; ok (B,) bool (False: a main snake got stuck, draw
    again); markers (B, 2, 2) float32 (x, y) marker centres; and with parts, snakes
    (B, 2, size, size) float32, each main snake alone after the filter, in the
    image's own scale (1 = the image's brightest pixel).
  """
  labels = np.asarray(labels)
  num_b, size = labels.shape[0], s.size
  # Most seeds die at a border (the original retries until two snakes fit): grow
  # `main_tries` pairs per image at once and keep the first pair that fits.
  tries = s.main_tries
  g = _Grower(rng, s, num_b * tries)
  main, fit = _grow_main(g, rng)
  fit = fit.reshape(num_b, tries)
  ok = fit.any(1)
  pick = np.arange(num_b) * tries + fit.argmax(1)
  main = main[pick]
  g.subset(pick)
  dis = [_grow_distractor(g, rng, ok, s.distractor_attempts)
         for _ in range(s.num_distractors)]
  which = rng.integers(0, 2, num_b)  # the snake whose start carries a marker
  r = np.arange(num_b)
  ends = main[:, :, -1, 1]  # (B, 2, 2) far end of each snake
  other = np.where(labels == 1, which, 1 - which)
  markers = np.stack([main[r, which, 0, 0], ends[r, other]], 1).astype(np.float32)

  big = 2 * size
  hw = s.paddle_thickness  # half width at 2x
  rows = np.flatnonzero(ok)

  def draw_main(canvas, only=None):
    for j in ((0, 1) if only is None else (only,)):
      for t in range(s.contour_length):
        _stamp(canvas, rows, 2 * main[rows, j, t, 0], 2 * main[rows, j, t, 1], hw,
               s.contrast_main, big, s.hard_lines)

  canvas = np.zeros((num_b, big * big), np.float32)  # rows of failed images stay 0
  draw_main(canvas)
  for dashes, placed in dis:
    pr = np.flatnonzero(placed)
    for t in range(s.distractor_length):
      _stamp(canvas, pr, 2 * dashes[pr, t, 0], 2 * dashes[pr, t, 1], hw,
             s.contrast_distractor, big, s.hard_lines)
  mk = np.repeat(rows, 2)
  mpts = 2 * markers[rows].reshape(-1, 2)
  _stamp(canvas, mk, mpts, mpts, 2 * s.marker_radius, s.contrast_marker, big)

  lz = lanczos_matrix(size)

  def shrink(c):  # (B, 4 size^2) -> (B, size, size), float, overshoot kept
    return np.einsum("ij,bjk,lk->bil", lz, c.reshape(num_b, big, big), lz, optimize=True)

  small = np.maximum(shrink(canvas), 0.0)
  peak = np.maximum(small.reshape(num_b, -1).max(1), 1e-12)[:, None, None]
  images = np.rint(small / peak * 255).astype(np.uint8)
  if not parts:
    return images, ok, markers
  snakes = np.zeros((num_b, 2, size, size), np.float32)
  for j in range(2):
    c = np.zeros_like(canvas)
    draw_main(c, j)
    snakes[:, j] = np.maximum(shrink(c), 0.0) / peak
  return images, ok, markers, snakes


def generate_chunk(seed: int, chunk: int, count: int, s: SettingsV3, batch: int = 0):
  """`count` images and i.i.d. fair labels of one chunk, from (seed, chunk)."""
  batch = batch or max(8, 2048 // s.main_tries)
  from data.pathfinder import draw_until_done  # deferred: data.pathfinder imports this module
  rng = np.random.default_rng([seed, chunk, VERSION])
  labels = rng.integers(0, 2, count)
  images = draw_until_done(rng, labels, s.size, batch,
                           lambda rng, lab: generate_images(rng, lab, s))
  return images, labels.astype(np.int32)
