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
  6. Drawing (render "canvas", 64 and 128 px): at 2x, dashes (contrast main /
     distractor) and marker disks (contrast marker) as antialiased coverage, combined by
     max; shrunk 2x by a separable Lanczos-3 filter in float (no clipping of the
     overshoot), negatives set to 0, and each image stretched so its brightest pixel is
     255. render "window" (32 px): each dash drawn alone as the public code does, a PIL
     line in its own 2x window shrunk by PIL's Lanczos weights, combined by max at 1x.
Labels are i.i.d. fair coins per image (as the release), not balanced per chunk.
Selected by config.data.generator_version = 3 (data/pathfinder.py keeps 2 the default:
no training run on version 3 yet).

Shapes: b = images of a batch, k = candidate headings, w = window pixels,
canvas pixels flattened (b, size * size) at 1x and (b, 4 * size * size) at 2x.

Measured, revision 3 (these presets, generate_images, one seed per size; pixel values /
255; blobs = 8-connected components of pixels >= 32; marker = the value at a marker's
centre; touch = share of images whose two main snakes share a pixel above half their
peak). Target: PATHFINDER.md, the release where it has one (8 images at 64 and 128 px),
else the original re-run (32 px; 128 px: re-run / release); every statistic is within
15% of a target figure (tests/test_data_pathfinder.py checks on 45-600 images):
  px   images mean              > 0               >= 32         >= 128         marker    blobs
  32   3037   0.083 (.080-.087) 40.0% (38-41)     15.0% (14-15) 8.4% (8-9)     249 (-)   13.7 (13.5-16)
  64   2001   0.064 (.063)      27.6% (26.6)      13.9% (13.7)  5.9% (5.8)     227 (219) 15.9 (16)
  128  2016   0.044 (.040/.037) 17.8% (18.5/16.1) 7.8% (7.4)    4.1% (4.2/3.9) 233 (225) 81.4 (82/87)
  (32 px blobs: 13.5 is a re-run here of the original code with cv2.dilate emulated,
  PATHFINDER.md says "~16". 128 px mean: +10% of the re-run, +19% of the 8 release
  images. 64 px: within 4% of the release in every column.)
  touch: 22% at 32 px (PATHFINDER.md 22-29%), 34% at 64, 9% at 128.
  64 px before revision 3 (its v3r2 preset: grid "round"): mean 0.076 (+20%), > 0 34%
  (+28%), >= 32 16.7% (+22%), >= 128 6.6%, blobs 34 (+111%): mostly its distractors,
  whose uniform seeds skip the original's seed test: 9.0 of the 11 asked were placed
  per image, against 5.7 with the original's seeds (5.3 in the re-run of the original
  that revision 2 made here). The original's geometry (grid "original") with its
  per-dash windows (render "window", as at 32 px) gives the dimmer dashes of a re-run
  (PATHFINDER.md: "the re-run's dashes came out dimmer than the release's"): 0.057
  (-10%), > 0 31.4% (+18%), >= 32 13.7%, >= 128 4.3% (-26%), marker 213, blobs 17.3
  (400 draws, 88 images). On one 2x canvas (render "canvas", as Path-X) all six lie
  within 4% of the release, which suggests that the release's 64 and 128 px images
  were drawn whole at 2x and filtered once (higher contrast alone does not do it:
  contrast 1.0 with windows gives > 0 +20%).
  Revision 3 also changed 32 px slightly (dash windows drawn exactly as PIL, candidates
  1 arc px apart): revision 2 measured 0.083, 39.7%, 14.8%, 8.5%, 13.3, touch 21%.
What differs from the original, as far as known: render "canvas" draws dashes as
antialiased coverage (half width = thickness, 2x px) where the original rasterises a
PIL line per dash; grid "round" (128 px) moves a snake's pivot to rint(end + m u) and
draws K `candidates` at a random rotation, and its seeds skip the original's kernel
test; render "window" puts PIL's Lanczos weights in float (no 8-bit rounding, as
PATHFINDER.md: "float, no clipping") where its footprints keep PIL's 8-bit masks.

Speed (generate_chunk, one process, no PNG writing, images/s; this 2-core machine is
shared with other sessions' work, so figures move by 2x with its load; in brackets
revision 2 measured right after or alongside): 106 at 32 px (73), 5.7 at 64 px (4.0 for
revision 2's unfaithful preset; about 1000 snake pairs are grown per image, as in the
original), 15-25 at 128 px (6-7 back to back, same images; its docstring said 18). Under
load: 35-74 (22-50), 1.8-2.9 (1.8-2.5), 8-16. The gains: a dash try is tested only where
earlier ones failed, duplicate candidates are found among neighbouring samples, "free"
is looked up only where the turn weight is not ~0, footprints are kept sparse. With 16
processes, 200k images take about 2 minutes at 32 px, 40 at 64 px and 10 at 128 px.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

VERSION = 3
REVISION = 3  # bumped when the images change (part of the cache key); 2: the 32 px preset;
              # 3: the 64 px preset (grid "original"), PIL's own lines, 1 arc px candidates


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
  hard_lines: bool = False        # dashes drawn unantialiased at 2x (render "canvas" only)
  # "window": each dash drawn alone as the original does (PIL's own line in a window of
  # 2 (2R) + 1 px at 2x around its anchor, R = L + ceil(thickness) + m, shrunk to 2R + 1
  # px by PIL's Lanczos weights, so the anchor's 1x pixel centre is a 2x pixel centre),
  # combined by max at 1x. "canvas": all dashes combined at 2x, then one 2:1 filter.
  render: str = "canvas"
  # "original": the original's integer steps: the next pivot is ceil(pivot + (L + 2m) u),
  # the candidate ends are the distinct pixels floor(pivot' + (L + m) (cos, sin)) of
  # ceil(2 pi (L + m)) evenly spaced angles, a seed's end is ceil(start + L u) and
  # headings of seeds are whole degrees; the padding enters the mask as 1 (so ends keep
  # padding + m from the border). "round": the pivot moves to rint(end + m u) and K
  # `candidates` at a random rotation, rounded to the nearest pixel.
  grid: str = "round"
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
    if self.grid not in ("round", "original"):
      raise ValueError(f"Pathfinder grid must be 'round' or 'original', got {self.grid!r}")
    if self.render not in ("canvas", "window"):
      raise ValueError(f"Pathfinder render must be 'canvas' or 'window', got {self.render!r}")
    if not self.margins or min(self.margins) < 0:
      raise ValueError(f"Pathfinder margins must be a non-empty tuple of values >= 0, got {self.margins!r}")


PRESETS_V3 = {
    # 32 px: the original's construction (per-dash windows, integer steps, its seed
    # test, 5 tries per distractor): all five statistics within 15% of the re-run
    32: SettingsV3(32, 14, 2.0, 0.5, (1,), 1.0, 10, 4, 1.5, 7.0, 1.5, 2.0, 1.0, 1.0,
                   distractor_attempts=5, main_tries=8, render="window",
                   grid="original"),
    # 64 px: the original's geometry (integer steps, its seed test, 5 tries per
    # distractor) drawn on one 2x canvas: all six statistics within 4% of the release.
    # (Per-dash windows as the public code give its re-run's dimmer dashes: > 0 +18%,
    # >= 128 -26%.) 14 dashes of 7 px from near the centre mostly run into a border:
    # about 1 pair in 1000 fits, so 256 pairs are grown per image at once.
    64: SettingsV3(64, 14, 5.0, 1.0, (1,), 1.8, 11, 4, 2.5, 12.0, 0.8, 0.8, 1.0, 1.0,
                   distractor_attempts=5, main_tries=256, grid="original"),
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
    if s.grid == "original":  # the original's mask starts with its padding set to 1
      p = int(round(s.padding))
      edge = np.zeros((s.size, s.size), bool)
      edge[:p], edge[-p:], edge[:, :p], edge[:, -p:] = True, True, True, True
      self.occ[:, edge.ravel()] = 1.0
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
    if self.s.grid == "original":
      return self.footprint_window(a, b, rows)
    soft = self.s.soft
    reach = self.w + float(max(self.s.margins)) + soft / 2
    idx, d = _seg_windows(a, b, reach, self.s.size)
    half = self.w + self.margin[rows][..., None]
    return idx, np.clip((half + soft / 2 - d) / soft, 0.0, 1.0)

  def footprint_window(self, a, b, rows):
    """The original's footprint: the dash drawn at 2x in its window (from rint(b)
    towards a), dilated by a disk of radius 2m, shrunk by PIL's Lanczos and kept in
    0..255 as its 8-bit images (then / 255). Returns (idx, value) (..., w), the
    window's nonzero pixels only (_footprint_sparse; zeros decide no test)."""
    s, aa = self.s, 2
    shape = a.shape[:-1]
    a, b, rows = a.reshape(-1, 2), b.reshape(-1, 2), np.broadcast_to(rows, shape).reshape(-1)
    length = int(round(s.paddle_length))
    anchor = np.rint(b).astype(np.int64)
    theta = np.arctan2(a[:, 1] - anchor[:, 1], a[:, 0] - anchor[:, 0])
    dx, dy = _window_offsets(theta, length, aa)
    margin = self.margin[rows]
    tables = {int(m): _footprint_sparse(length, float(s.paddle_thickness), int(m))
              for m in np.unique(margin)}
    width = max(t[0].shape[-1] for t in tables.values())
    oy = np.zeros((a.shape[0], width), np.int64)
    ox = np.zeros((a.shape[0], width), np.int64)
    val = np.zeros((a.shape[0], width), np.float32)
    for m, (ty, tx, tv) in tables.items():
      sel = np.flatnonzero(margin == m)
      i, j, n = dy[sel] + aa * length, dx[sel] + aa * length, ty.shape[-1]
      oy[sel, :n], ox[sel, :n], val[sel, :n] = ty[i, j], tx[i, j], tv[i, j]
    px, py = anchor[:, 0:1] + ox, anchor[:, 1:2] + oy
    inside = (px >= 0) & (px < s.size) & (py >= 0) & (py < s.size)
    idx = np.clip(py, 0, s.size - 1) * s.size + np.clip(px, 0, s.size - 1)
    val = np.where(inside, val, np.float32(0.0))
    return idx.reshape(shape + (-1,)), val.reshape(shape + (-1,))

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
    ok (R,) bool, False where no candidate passed. grid "original": pivot is the last
    pivot, moved L + 2m along heading here (the original's extend_snake).
    """
    s, rng, num_b = self.s, self.rng, sel.size
    rows = np.arange(num_b)
    m = self.margin[sel, None]
    radius = m + s.paddle_length  # (B, 1)
    if s.grid == "original":
      # the pivot first moves L + 2m along the heading; the candidates are the distinct
      # pixels (truncated) of the points 1 px of arc apart on the circle of radius r from
      # angle 0 (get_coords_cmf's np.arange(0, 360, 360 / (2 pi r)) degrees)
      step = (s.paddle_length + 2 * m) * np.stack([np.cos(heading), np.sin(heading)], -1)
      pivot = np.ceil(pivot + step).astype(np.float32)
      count = np.ceil(2 * np.pi * radius[:, 0] - 1e-6).astype(np.int64)  # (B,)
      k = int(count.max(initial=1))
      ang = np.arange(k, dtype=np.float32)[None, :] / radius  # (B, K)
      raw = np.stack([pivot[:, 0:1] + radius * np.cos(ang),
                      pivot[:, 1:2] + radius * np.sin(ang)], -1)  # (B, K, 2)
      head = np.floor(raw)
      valid = (np.arange(k)[None, :] < count[:, None]) & ((raw >= 0) & (raw < s.size)).all(-1)
      # A pixel counts once. Points 3 arc px apart (cyclically) are over sqrt(2) apart, so
      # a pixel repeats only within 2 samples: compare with those (not all K x K pairs).
      key = head[..., 1] * s.size + head[..., 0]
      dup = np.zeros((num_b, k), bool)
      for d in (1, 2):
        dup[:, d:] |= key[:, d:] == key[:, :-d]
      rows_b = np.arange(num_b)
      for back in (1, 2):  # the last two samples neighbour the first two
        i = count - back
        for j in range(min(2, k)):
          dup[rows_b, i] |= (key[rows_b, i] == key[:, j]) & (j < i)
      inside = valid & ~dup
    else:
      k = s.candidates
      ang = (heading[:, None] + np.float32(2 * np.pi / k)
             * (np.arange(k, dtype=np.float32) + rng.uniform(0, 1, (num_b, 1)).astype(np.float32)))
      # the original's candidates are whole pixels on the circle; the heading is that of
      # the pixel (so paths live on the pixel grid, which joins some diagonal gaps)
      head = np.rint(np.stack([pivot[:, 0:1] + radius * np.cos(ang),
                               pivot[:, 1:2] + radius * np.sin(ang)], -1))  # (B, K, 2)
      lo, hi = s.padding, s.size - 1 - s.padding
      inside = ((head >= lo) & (head <= hi)).all(-1)
    ang = np.arctan2(head[..., 1] - pivot[:, None, 1], head[..., 0] - pivot[:, None, 0])
    dx, dy = np.cos(ang), np.sin(ang)
    turn = np.abs(ang - heading[:, None])  # both in [-pi, pi]: as get_coords_cmf
    turn = np.minimum(turn, 2 * np.pi - turn).astype(np.float32)
    wt = np.cos(np.minimum(s.continuity * turn, np.pi / 2)) ** 2
    # "free" only where it can matter: turns past pi / (2c) weigh cos(pi / 2)^2 ~ 4e-33
    need = inside & (wt > 1e-12)
    free = np.zeros((num_b, k), np.float32)
    free[need] = np.maximum(self.end_free(head[need], np.broadcast_to(sel[:, None], (num_b, k))[need]), 0)
    wt = wt * free
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
    todo = np.flatnonzero(total > 1e-4)
    for t in range(tries):  # a try is tested only where the earlier ones failed
      if todo.size == 0:
        break
      ok[todo, t] = self.fits(a[todo, t], b[todo, t], sel[todo])
      todo = todo[~ok[todo, t]]
    first = ok.argmax(1)
    got = ok.any(1) & (total > 1e-4)
    new_ang = ang[rows, pick[rows, first]]
    b1 = b[rows, first]
    if s.grid == "original":
      new_pivot = pivot
    else:
      new_pivot = np.rint(b1 + m * np.stack([np.cos(new_ang), np.sin(new_ang)], -1))
    return a[rows, first], b1, new_pivot.astype(np.float32), new_ang.astype(np.float32), got

  def commit(self, rows, a, b):
    if rows.size == 0:
      return
    idx, val = self.footprint(a, b, rows)
    flat = (rows[:, None] * self.occ.shape[1] + idx).ravel()
    np.maximum.at(self.occ.reshape(-1), flat, val.ravel())


@functools.lru_cache(maxsize=None)
def _footprint_sparse(length: int, thickness: float, margin: int, aa: int = 2):
  """_window_table's footprints as their nonzero pixels: oy, ox (1x offsets from the
  anchor) int64 and values float32, each (2 aa L + 1, 2 aa L + 1, n), indexed [dy + aa L,
  dx + aa L]; n = the most nonzero pixels of any offset, the rest padded with value 0."""
  table = _window_table(length, thickness, margin, True, aa)
  half = table.shape[-1] // 2
  o = table.shape[0]
  nz = table > 0
  n = int(nz.sum((-1, -2)).max())
  oy = np.zeros((o, o, n), np.int64)
  ox = np.zeros((o, o, n), np.int64)
  val = np.zeros((o, o, n), np.float32)
  for i in range(o):
    for j in range(o):
      ys, xs = np.nonzero(nz[i, j])
      oy[i, j, :ys.size], ox[i, j, :ys.size] = ys - half, xs - half
      val[i, j, :ys.size] = table[i, j, ys, xs]
  for t in (oy, ox, val):
    t.setflags(write=False)
  return oy, ox, val


@functools.lru_cache(maxsize=None)
def _seed_kernels(length: int, thickness: float, margin: int, aa: int = 2):
  """The original's seed test per whole-degree heading d in [-180, 180) (index d + 180).

  Its seeds are tested with a dilation (cv2.dilate: dst(p) = max_k src(p + k)) of the
  mask by the seed dash's own footprint (its pixels at full value, the footprint's
  8-bit 255s), drawn one pixel down and right of the kernel's centre and cut to a
  window of 2 (L + m) + 1 px. Outside the image counts as -inf, and a dilated mask with
  any -inf pixel has "no free pixel": a heading passes only when its kernel reaches
  rows and columns <= 0 and >= 0 (about 1 in 10 headings at 32 px, all pointing up
  and left). Returns allowed (360,) bool, ky, kx (360, n) int kernel offsets (rows
  padded by repeating their first offset).
  """
  table = _window_table(length, thickness, margin, True, aa)
  half = length + int(math.ceil(thickness)) + margin
  lm = length + margin
  dx, dy = _window_offsets(np.deg2rad(np.arange(-180, 180)), length, aa)
  allowed, kys, kxs = [], [], []
  for i in range(360):
    ys, xs = np.nonzero(table[dy[i] + aa * length, dx[i] + aa * length] >= 1 - 1e-6)
    oy, ox = ys - half, xs - half
    keep = (oy >= -(lm + 1)) & (oy <= lm - 1) & (ox >= -(lm + 1)) & (ox <= lm - 1)
    ky, kx = oy[keep] + 1, ox[keep] + 1
    allowed.append(ky.size > 0 and ky.min() <= 0 <= ky.max() and kx.min() <= 0 <= kx.max())
    kys.append(ky if ky.size else np.zeros(1, np.int64))
    kxs.append(kx if kx.size else np.zeros(1, np.int64))
  n = max(k.size for k in kys)
  pad = lambda k: np.concatenate([k, np.full(n - k.size, k[0])])
  return np.array(allowed), np.stack([pad(k) for k in kys]), np.stack([pad(k) for k in kxs])


def _seed_original(g, rng, rows, tries: int = 3):
  """The original's seed_snake for images rows (R,): a whole-degree heading (its
  kernel must pass, see _seed_kernels), a start uniform among the pixels whose
  dilated mask is <= 0.3, and up to `tries` draws while the dash's end or pivot falls
  outside the image. Returns start (R, 2), heading (R,), ok (R,)."""
  s = g.s
  size, length = s.size, int(round(s.paddle_length))
  start = np.zeros((rows.size, 2), np.float32)
  heading = np.zeros(rows.size, np.float32)
  ok = np.zeros(rows.size, bool)
  retry = np.arange(rows.size)
  yy, xx = np.divmod(np.arange(size * size), size)
  for _ in range(tries):
    if retry.size == 0:
      break
    r = rows[retry]
    deg = rng.integers(-180, 180, retry.size)
    u = rng.uniform(0, 1, retry.size)
    good = np.zeros(retry.size, bool)
    free = np.zeros((retry.size, size * size), bool)
    for m in np.unique(g.margin[r]):
      sel = np.flatnonzero(g.margin[r] == m)
      allowed, ky, kx = _seed_kernels(length, float(s.paddle_thickness), int(m))
      py = yy[None, :, None] + ky[deg[sel] + 180][:, None, :]  # (S, P, n)
      px = xx[None, :, None] + kx[deg[sel] + 180][:, None, :]
      inside = (py >= 0) & (py < size) & (px >= 0) & (px < size)
      flat = np.clip(py, 0, size - 1) * size + np.clip(px, 0, size - 1)
      v = np.where(inside, g.occ[r[sel][:, None, None], flat], -np.inf)
      free[sel] = v.max(-1) <= 0.3
      raw = (g.occ[r[sel]] <= 0.3).mean(1)  # the original stops below 1% free pixels
      good[sel] = allowed[deg[sel] + 180] & (raw >= 0.01)
    count = free.sum(1)
    good &= count > 0
    pick = np.minimum((np.cumsum(free, 1) <= (u * count)[:, None]).sum(1), size * size - 1)
    tail = np.stack([xx[pick], yy[pick]], -1).astype(np.float32)
    th = np.deg2rad(deg).astype(np.float32)
    uu = np.stack([np.cos(th), np.sin(th)], -1)
    head = np.ceil(tail + s.paddle_length * uu)
    piv = np.ceil(head - (s.paddle_length + g.margin[r][:, None]) * uu)
    inb = (((head >= 0) & (head < size)).all(-1) & ((piv >= 0) & (piv < size)).all(-1))
    done = good & inb
    start[retry[done]], heading[retry[done]], ok[retry[done]] = tail[done], th[done], True
    retry = retry[good & ~inb]  # only an end or pivot outside is drawn again
  return start, heading, ok


def _headings(rng, s: SettingsV3, shape):
  """Seed headings: whole degrees in [-180, 180) (grid "original") or uniform."""
  if s.grid == "original":
    return np.deg2rad(rng.integers(-180, 180, shape)).astype(np.float32)
  return rng.uniform(-np.pi, np.pi, shape).astype(np.float32)


def _seed_pivot(g, start, heading, rows):
  """The pivot after a seed dash from start (..., 2) along heading (...) of images rows.

  grid "original": ceil(ceil(start + L u) - (L + m) u), as its seeds; "round": the
  point m beyond the dash's end, rounded."""
  s = g.s
  u = np.stack([np.cos(heading), np.sin(heading)], -1)
  m = g.margin[rows][..., None]
  if s.grid == "original":
    return np.ceil(np.ceil(start + s.paddle_length * u) - (s.paddle_length + m) * u)
  return np.rint(start + (s.paddle_length + m) * u)


def _first_dash(rng, s: SettingsV3, lo, hi, num_b: int, tries: int = 8):
  """Seed dashes from a uniform start in [lo, hi]^2 whose far end stays there too.

  Returns starts (B, 2), headings (B,), ok (B,)."""
  start = rng.uniform(lo, hi, (num_b, tries, 2)).astype(np.float32)
  head = _headings(rng, s, (num_b, tries))
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
  if s.grid == "original":
    # the original's first seed: a heading whose kernel passes (_seed_kernels), the
    # start uniform where the kernel stays inside [2 sd, size - 1 - 2 sd]
    # A heading that fails fails the whole pair before any other draw, so drawing it
    # among the passing ones gives the same pairs as the original's retries, faster.
    allowed, ky, kx = _seed_kernels(int(round(s.paddle_length)), float(s.paddle_thickness),
                                    int(g.margin[0]))
    hi = s.size - 1 - lo
    fits = allowed & (hi - lo - (kx.max(1) - kx.min(1)) >= 0) & (hi - lo - (ky.max(1) - ky.min(1)) >= 0)
    if not fits.any():
      raise ValueError(f"Pathfinder v3: no seed heading fits at size {s.size}")
    deg = rng.choice(np.flatnonzero(fits), num_b)
    ok = np.ones(num_b, bool)
    start0 = np.zeros((num_b, 2), np.float32)
    for axis, k in ((0, kx), (1, ky)):
      a_lo, a_hi = lo - k[deg].min(1), hi - k[deg].max(1)
      ok &= a_hi >= a_lo
      start0[:, axis] = a_lo + np.floor(rng.uniform(0, 1, num_b) * np.maximum(a_hi - a_lo + 1, 1))
    head0 = np.deg2rad(deg - 180).astype(np.float32)
  else:
    start0, head0, ok = _first_dash(rng, s, lo, s.size - 1 - lo, num_b)
    start0 = np.rint(start0)
  if s.grid == "original":
    phi = np.deg2rad(rng.integers(0, 360, num_b))
  else:
    phi = rng.uniform(0, 2 * np.pi, num_b)
  start1 = np.rint(start0 + round(s.seed_distance) * np.stack([np.cos(phi), np.sin(phi)], -1))
  head1 = _headings(rng, s, num_b)
  end1 = start1 + s.paddle_length * np.stack([np.cos(head1), np.sin(head1)], -1)
  ok &= ((start1 >= 0) & (start1 <= s.size - 1) & (end1 >= 0) & (end1 <= s.size - 1)).all(-1)
  dashes = np.zeros((num_b, 2, n, 2, 2), np.float32)
  heads = np.stack([head0, head1], 1)
  dashes[:, 0, 0] = np.stack([start0, start0 + s.paddle_length * np.stack(
      [np.cos(head0), np.sin(head0)], -1)], 1)
  dashes[:, 1, 0] = np.stack([start1, end1], 1)
  everyone = np.arange(num_b)
  pivot = _seed_pivot(g, dashes[:, :, 0, 0], heads, np.stack([everyone, everyone], 1))
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
    trial = np.zeros_like(dashes)
    if s.grid == "original":
      rows0 = np.flatnonzero(todo)
      st, hd, got = _seed_original(g, rng, rows0)
      start = np.zeros((num_b, 2), np.float32)
      head = np.zeros(num_b, np.float32)
      start[rows0], head[rows0] = st, hd
      cur = np.zeros(num_b, bool)
      cur[rows0] = got
      trial[:, 0, 0] = start
      trial[:, 0, 1] = start + s.paddle_length * np.stack([np.cos(head), np.sin(head)], -1)
    else:
      start = np.rint(rng.uniform(lo, hi, (num_b, seeds, 2))).astype(np.float32)
      head = _headings(rng, s, num_b)
      d = np.stack([np.cos(head), np.sin(head)], -1)[:, None]
      end = start + s.paddle_length * d
      ok = ((end >= lo) & (end <= hi)).all(-1) & todo[:, None]
      live = np.nonzero(ok)
      if live[0].size:
        idx, val = g.footprint(start[live], end[live], live[0])
        ok[live] = ~((g.occ[live[0][:, None], idx] > 0.3) & (val > 0)).any(-1)
      pick = ok.argmax(1)
      cur = ok.any(1)
      trial[:, 0, 0], trial[:, 0, 1] = start[everyone, pick], end[everyone, pick]
    pivot = _seed_pivot(g, trial[:, 0, 0], head, everyone)
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


def resize_matrix(n_in: int, n_out: int, a: int = 3) -> np.ndarray:
  """(n_out, n_in) float32: PIL's Lanczos-a resize weights along one axis (output pixel
  i centred at input (i + 0.5) n_in / n_out, support a times the ratio, renormalised at
  the borders). resize_matrix(2 n, n) == lanczos_matrix(n)."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    c = (i + 0.5) * scale
    lo, hi = max(int(c - a * scale + 0.5), 0), min(int(c + a * scale + 0.5), n_in)
    x = (np.arange(lo, hi) + 0.5 - c) / scale
    w = np.where(np.abs(x) < a, np.sinc(x) * np.sinc(x / a), 0.0)
    m[i, lo:hi] = w / w.sum()
  return m.astype(np.float32)


def _window_offsets(theta, length: int, aa: int = 2):
  """The far end of a dash along theta (x right, y down) in 2x px from its anchor:
  ceil(aa length (cos, sin)), as the original's translate_coord. Returns dx, dy int."""
  dx = np.ceil(aa * length * np.cos(theta)).astype(np.int64)
  dy = np.ceil(aa * length * np.sin(theta)).astype(np.int64)
  return dx, dy


@functools.lru_cache(maxsize=None)
def _window_table(length: int, thickness: float, margin: int, footprint: bool, aa: int = 2):
  """(2 aa L + 1, 2 aa L + 1, 2 R + 1, 2 R + 1) float32, indexed [dy + aa L, dx + aa L]:
  a dash to the 2x offset (dx, dy) drawn in its window and shrunk (R = L +
  ceil(thickness) + margin). footprint: dilated by a disk of radius aa * margin (2x
  px) and kept in 0..255 as the original's 8-bit masks (then / 255); else the line
  itself in float (contrast 1, the filter's overshoot and negative lobes kept)."""
  half = length + int(math.ceil(thickness)) + margin
  width = int(round(thickness * aa))
  o = np.arange(-aa * length, aa * length + 1)
  dy, dx = (v.ravel() for v in np.meshgrid(o, o, indexing="ij"))
  win = _dash_windows(dx, dy, width, half, aa)
  r = aa * margin
  if footprint and r > 0:
    grown = win.copy()
    n2 = win.shape[1]
    for oy in range(-r, r + 1):
      for ox in range(-r, r + 1):
        if ox * ox + oy * oy <= r * r and (ox or oy):
          sh = np.zeros_like(win)
          sh[:, max(oy, 0):n2 + min(oy, 0), max(ox, 0):n2 + min(ox, 0)] = \
              win[:, max(-oy, 0):n2 + min(-oy, 0), max(-ox, 0):n2 + min(-ox, 0)]
          np.maximum(grown, sh, out=grown)
    win = grown
  lz = resize_matrix(win.shape[1], 2 * half + 1)
  if footprint:
    # PIL's 8-bit resize: fixed-point weights (22 fraction bits), the horizontal pass
    # then the vertical one, each rounded and clipped to 0..255
    bits = 22
    lq = np.where(lz < 0, np.trunc(lz.astype(np.float64) * (1 << bits) - 0.5),
                  np.trunc(lz.astype(np.float64) * (1 << bits) + 0.5)).astype(np.int64)
    px = (win * 255).astype(np.int64)
    h = np.einsum("njk,lk->njl", px, lq) + (1 << (bits - 1))
    h = np.clip(h >> bits, 0, 255)
    v = np.einsum("ij,njl->nil", lq, h) + (1 << (bits - 1))
    small = np.clip(v >> bits, 0, 255).astype(np.float64) / 255
  else:
    small = np.einsum("ij,njk,lk->nil", lz, win, lz, optimize=True)
  small = small.astype(np.float32).reshape(o.size, o.size, 2 * half + 1, 2 * half + 1)
  small.setflags(write=False)
  return small


def _dash_windows(dx, dy, width: int, half: int, aa: int = 2):
  """(n, 2 aa half + 1, ...) float32 0/1: dashes drawn at aa x in their own window, as
  PIL's ImageDraw.line draws them (the original's draw_line_n_mask).

  Each runs from the window's centre pixel to the pixel (dx, dy) (n,) int from it.
  width (2x px) 1: PIL's Bresenham line, both ends included; wider: PIL's wide line, a
  4-vertex polygon filled by its scan-line rule (_pil_wide_line). Built once per table
  (Python loops over 441 offsets at most: milliseconds).
  """
  n = dx.shape[0]
  side = 2 * aa * half + 1
  c = aa * half
  win = np.zeros((n, side, side), np.float32)
  for i in range(n):
    x1, y1 = c + int(dx[i]), c + int(dy[i])
    if width <= 1:
      pts = _pil_bresenham(c, c, x1, y1)
    else:
      pts = _pil_wide_line(c, c, x1, y1, width)
    for x, y in pts:
      if 0 <= x < side and 0 <= y < side:
        win[i, y, x] = 1.0
  return win


def _round_up(f):  # PIL's ROUND_UP: halves away from zero
  return int(math.floor(f + 0.5)) if f >= 0 else -int(math.floor(abs(f) + 0.5))


def _round_down(f):  # PIL's ROUND_DOWN: halves towards zero
  return int(math.ceil(f - 0.5)) if f >= 0 else -int(math.ceil(abs(f) - 0.5))


def _pil_bresenham(x0: int, y0: int, x1: int, y1: int):
  """[(x, y)] of PIL's 1-px line (Draw.c line32 plus the end point _draw_lines adds)."""
  ddx, ddy = abs(x1 - x0), abs(y1 - y0)
  xs, ys = (1 if x1 >= x0 else -1), (1 if y1 >= y0 else -1)
  pts, x, y = [], x0, y0
  if ddx == 0 or ddy == 0:
    for _ in range(max(ddx, ddy)):
      pts.append((x, y))
      x, y = x + (xs if ddy == 0 else 0), y + (ys if ddx == 0 else 0)
  elif ddx > ddy:
    e = 2 * ddy - ddx
    for _ in range(ddx):
      pts.append((x, y))
      if e >= 0:
        y, e = y + ys, e - 2 * ddx
      e, x = e + 2 * ddy, x + xs
  else:
    e = 2 * ddx - ddy
    for _ in range(ddy):
      pts.append((x, y))
      if e >= 0:
        x, e = x + xs, e - 2 * ddy
      e, y = e + 2 * ddx, y + ys
  return pts + [(x1, y1)]


def _pil_wide_line(x0: int, y0: int, x1: int, y1: int, width: int):
  """[(x, y)] of PIL's line of `width` px, as Pillow 5.x-7.0 drew it (the Python 2 era
  of the original): Draw.c ImagingDrawWideLine's parallelogram beside the segment, its
  horizontal edges drawn as they are, the rest filled by polygon_generic's scan lines
  (from ROUND_UP of one crossing to ROUND_DOWN of the next). Later Pillows (9.2+) also
  "connect discontiguous corners"; on the offsets a dash takes here both give the same
  pixels (test_v3_dash_windows_are_pils_lines checks the installed Pillow)."""
  dx, dy = x1 - x0, y1 - y0
  if dx == 0 and dy == 0:
    return [(x0, y0)]
  big = math.hypot(dx, dy)
  small = (width - 1) / 2.0
  rmax, rmin = _round_up(small) / big, _round_down(small) / big
  dxmin, dxmax = _round_down(rmin * dy), _round_down(rmax * dy)
  dymin, dymax = _round_down(rmin * dx), _round_down(rmax * dx)
  v = [(x0 - dxmin, y0 + dymax), (x1 - dxmin, y1 + dymax), (x1 + dxmax, y1 - dymin),
       (x0 + dxmax, y0 - dymin)]
  f32 = np.float32
  edges, pts = [], []
  for (ax, ay), (bx, by) in zip(v, v[1:] + v[:1]):
    if ay == by:  # horizontal edges are drawn as they are
      pts += [(x, ay) for x in range(min(ax, bx), max(ax, bx) + 1)]
    else:  # (ymin, ymax, x0, y0, dx) with dx in float32 as the C code
      edges.append((min(ay, by), max(ay, by), ax, ay, f32(bx - ax) / f32(by - ay)))
  if not edges:
    return pts
  ymin = max(min(e[0] for e in edges), 0)
  ymax = max(e[1] for e in edges)
  for y in range(ymin, ymax + 1):
    xx = []
    for lo, hi, ex, ey, edx in edges:
      if lo <= y <= hi:
        xx.append(f32(y - ey) * edx + f32(ex))
        if y == hi and y < ymax:  # "needed to draw consistent polygons"
          xx.append(xx[-1])
    xx.sort()
    for i in range(1, len(xx), 2):
      pts += [(x, y) for x in range(_round_up(xx[i - 1]), _round_down(xx[i]) + 1)]
  return pts


def _draw_windowed(canvas, rows, anchor, theta, value, s: SettingsV3, margin):
  """canvas (B, size*size) at 1x = max(canvas, each dash drawn alone and shrunk).

  rows (R,) image of each dash; anchor (R, 2) integer (x, y) 1x pixel where it starts;
  theta (R,) its direction; value (R,) its contrast; margin (R,) the image's margin.
  """
  if rows.size == 0:
    return
  size, aa = s.size, 2
  length = int(round(s.paddle_length))
  dx, dy = _window_offsets(theta, length, aa)
  for m in np.unique(margin):
    sel = np.flatnonzero(margin == m)
    half = length + int(math.ceil(s.paddle_thickness)) + int(m)
    table = _window_table(length, float(s.paddle_thickness), int(m), False)
    small = table[dy[sel] + aa * length, dx[sel] + aa * length]
    small = small * np.asarray(value, np.float32)[sel, None, None]
    off = np.arange(-half, half + 1)
    px = np.rint(anchor[sel, 0]).astype(np.int64)[:, None, None] + off[None, None, :]
    py = np.rint(anchor[sel, 1]).astype(np.int64)[:, None, None] + off[None, :, None]
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    flat = rows[sel, None, None] * canvas.shape[1] + py * size + px
    np.maximum.at(canvas.reshape(-1), flat[inside], small[inside])


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
  lz = lanczos_matrix(size)

  def shrink(c):  # (B, 4 size^2) -> (B, size, size), float, overshoot kept
    return np.einsum("ij,bjk,lk->bil", lz, c.reshape(num_b, big, big), lz, optimize=True)

  def windowed(canvas, dashes, rr, contrast):
    """Dashes (B, n, 2, 2) of images rr, drawn alone into the 1x canvas: the first
    from its start (the seed), the others from their far end back (as extend_snake)."""
    n = dashes.shape[1]
    a, b = dashes[rr, :, 0], dashes[rr, :, 1]  # (R, n, 2)
    anchor = np.concatenate([a[:, :1], b[:, 1:]], 1)
    other = np.concatenate([b[:, :1], a[:, 1:]], 1)
    theta = np.arctan2(other[..., 1] - anchor[..., 1], other[..., 0] - anchor[..., 0])
    r = np.repeat(rr, n)
    _draw_windowed(canvas, r, anchor.reshape(-1, 2), theta.reshape(-1),
                   np.full(r.size, contrast, np.float32), s, np.repeat(g.margin[rr], n))

  def draw_main(canvas, only=None):
    for j in ((0, 1) if only is None else (only,)):
      if s.render == "window":
        windowed(canvas, main[:, j], rows, s.contrast_main)
        continue
      for t in range(s.contour_length):
        _stamp(canvas, rows, 2 * main[rows, j, t, 0], 2 * main[rows, j, t, 1], hw,
               s.contrast_main, big, s.hard_lines)

  if s.render == "window":
    # as the original: every dash filtered alone and combined by max at 1x (from 0, so
    # the filter's negative lobes vanish); the marker disks (hard at 2x, centred on the
    # 2x pixel 2c as its draw_circle) shrunk over the whole image, then max with the rest
    small = np.zeros((num_b, size * size), np.float32)
    draw_main(small)
    for dashes, placed in dis:
      windowed(small, dashes, np.flatnonzero(placed), s.contrast_distractor)
    mcanvas = np.zeros((num_b, big * big), np.float32)
    mk = np.repeat(rows, 2)
    mpts = 2 * markers[rows].reshape(-1, 2)
    _stamp(mcanvas, mk, mpts, mpts, 2 * s.marker_radius, s.contrast_marker, big, hard=True)
    small = np.maximum(small.reshape(num_b, size, size), shrink(mcanvas))
  else:
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
    small = np.maximum(shrink(canvas), 0.0)
  peak = np.maximum(small.reshape(num_b, -1).max(1), 1e-12)[:, None, None]
  images = np.rint(small / peak * 255).astype(np.uint8)
  if not parts:
    return images, ok, markers
  snakes = np.zeros((num_b, 2, size, size), np.float32)
  for j in range(2):
    if s.render == "window":
      c = np.zeros((num_b, size * size), np.float32)
      draw_main(c, j)
      snakes[:, j] = c.reshape(num_b, size, size) / peak
    else:
      c = np.zeros((num_b, big * big), np.float32)
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
