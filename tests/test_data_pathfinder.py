"""Pathfinder / Path-X: generator, the LRA release layout, PNG, reader, load_task, configs."""

import collections
import io

import numpy as np
import pytest

import data
from configs.lra import pathfinder as pathfinder_config
from configs.lra import pathx as pathx_config
from data import pathfinder as pf

N = 40
CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
              "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the two tiny runs share programs."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  old = {k: getattr(jax.config, k) for k in CACHE_KEYS}
  for k, v in zip(CACHE_KEYS, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
    jax.config.update(k, v)
  cc.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A tiny generated set written in the release layout; returns its root."""
  root = tmp_path_factory.mktemp("lra_release")
  pf.write_dataset(root, num_examples=N, seed=1, size=32, num_workers=1)
  return root


def _components_touching(img, seeds):
  """Flood fill (8-connectivity) over lit pixels from seeds; the set of pixels reached."""
  lit = img > 0
  seen, queue = set(seeds), collections.deque(seeds)
  while queue:
    r, c = queue.popleft()
    for dr in (-1, 0, 1):
      for dc in (-1, 0, 1):
        q = (r + dr, c + dc)
        if (0 <= q[0] < img.shape[0] and 0 <= q[1] < img.shape[1] and lit[q]
            and q not in seen):
          seen.add(q)
          queue.append(q)
  return seen


def _marker_cores(img):
  """Groups of full-intensity pixels (at 32x32 only the markers reach 255)."""
  full = img == 255
  groups, done = [], set()
  for p in zip(*np.nonzero(full)):
    p = (int(p[0]), int(p[1]))
    if p in done:
      continue
    group = _components_touching(np.where(full, img, 0), [p])
    done |= group
    groups.append(group)
  return groups


def test_release_layout_on_disk(release):
  folder = release / "pathfinder32" / "curv_contour_length_14"
  lines = (folder / "metadata" / "0.npy").read_text().splitlines()
  assert len(lines) == N
  fields = lines[5].split()
  assert fields[:3] == ["imgs/0", "sample_5.png", "5"] and fields[3] in ("0", "1")
  assert (folder / fields[0] / fields[1]).is_file()
  assert len(list((folder / "imgs" / "0").glob("sample_*.png"))) == N


def test_generated_labels_are_balanced_and_match_connectivity(release):
  folder = release / "pathfinder32" / "curv_contour_length_14"
  images, labels = pf.read_images(folder, 32)
  assert images.shape == (N, 32, 32) and images.dtype == np.uint8
  assert labels.sum() == N // 2
  for img, label in zip(images, labels):
    cores = _marker_cores(img)
    assert len(cores) == 2, "expected exactly two markers"
    reached = _components_touching(img, [next(iter(cores[0]))])
    assert bool(cores[1] & reached) == bool(label)
    assert (img > 0).mean() < 0.5  # paths, not blobs


def test_generator_is_deterministic_and_seeded():
  s = pf.settings_for(32)
  a, la = pf.generate_chunk(7, 0, 6, s)
  b, lb = pf.generate_chunk(7, 0, 6, s)
  c, _ = pf.generate_chunk(8, 0, 6, s)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", [32, 128])
def test_markers_joined_exactly_when_label_is_one(size):
  s = pf.settings_for(size)
  labels = np.arange(24) % 2  # about 40% of first draws place both snakes at 32x32
  images, ok, markers = pf.generate_images(np.random.default_rng(size), labels, s)
  assert images.shape == (24, size, size)
  assert labels[ok].sum() >= 2 and (1 - labels[ok]).sum() >= 2  # failures are redrawn
  for img, label, m in zip(images[ok], labels[ok], markers[ok]):
    (c0, r0), (c1, r1) = np.rint(m).astype(int)
    assert img[r0, c0] == 255 and img[r1, c1] == 255  # markers at full intensity
    reached = _components_touching(img, [(r0, c0)])
    assert ((r1, c1) in reached) == bool(label)
    assert 0.01 < (img > 0).mean() < 0.5


def test_the_picture_does_not_depend_on_the_label():
  """As in Linsley's generator: the same draws give the same snakes and distractors for
  both labels; only the second marker moves (A's far tip for 1, B's for 0), so nothing
  but the marked path tells the classes apart."""
  s = pf.settings_for(32)
  ones, ok1, m1 = pf.generate_images(np.random.default_rng(5), np.ones(16, int), s)
  zeros, ok0, m0 = pf.generate_images(np.random.default_rng(5), np.zeros(16, int), s)
  np.testing.assert_array_equal(ok1, ok0)
  assert ok1.sum() >= 2
  np.testing.assert_array_equal(m1[:, 0], m0[:, 0])  # the first marker: A's start
  rows, cols = np.mgrid[:32, :32]
  for a, b, far1, far0 in zip(ones[ok1], zeros[ok1], m1[ok1, 1], m0[ok1, 1]):
    # outside the two far-tip marker disks the pictures are equal, pixel for pixel
    near = np.zeros((32, 32), bool)
    for x, y in (far1, far0):
      near |= np.hypot(cols - x, rows - y) < s.marker_radius + 0.5
    assert np.linalg.norm(far1 - far0) >= 2 * s.marker_radius
    np.testing.assert_array_equal(a[~near], b[~near])
    assert (a[near] != b[near]).any()
    # both far tips carry a path end whatever the label: the unmarked one is lit too
    for x, y in (far1, far0):
      assert a[int(round(y)), int(round(x))] > 0 and b[int(round(y)), int(round(x))] > 0


def test_written_set_does_not_depend_on_worker_count(tmp_path):
  one = pf.write_dataset(tmp_path / "a", num_examples=10, seed=4, num_workers=1,
                         images_per_folder=4)
  two = pf.write_dataset(tmp_path / "b", num_examples=10, seed=4, num_workers=2,
                         images_per_folder=4)
  assert sorted(p.name for p in (one / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
  for x, y in zip(pf.read_images(one, 32), pf.read_images(two, 32)):
    np.testing.assert_array_equal(x, y)


def test_png_round_trip_and_foreign_png(tmp_path):
  img = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint8)
  np.testing.assert_array_equal(pf.decode_png(pf.encode_png(img)), img)
  PIL = pytest.importorskip("PIL.Image")
  np.testing.assert_array_equal(np.asarray(PIL.open(io.BytesIO(pf.encode_png(img)))), img)
  buf = io.BytesIO()
  PIL.fromarray(img).save(buf, format="PNG", optimize=True)  # filtered rows: Pillow path
  np.testing.assert_array_equal(pf.decode_png(buf.getvalue()), img)
  with pytest.raises(ValueError, match="not a PNG"):
    pf.decode_png(b"GIF89a....")


def test_load_task_reads_the_release(release):
  spec, splits = data.load_task(dict(task="pathfinder", data_dir=str(release)))
  assert (spec.kind, spec.input_kind, spec.seq_len, spec.num_classes) == (
      "classification", "pixels", 1024, 2)
  assert [len(splits[k]) for k in ("train", "validation", "test")] == [32, 4, 4]
  batch = splits["train"].take(np.arange(3))
  assert batch["inputs"].shape == (3, 1024, 1) and batch["inputs"].dtype == np.float32
  assert 0.0 <= batch["inputs"].min() and batch["inputs"].max() == 1.0
  assert batch["mask"].shape == (3, 1024) and batch["mask"].all()
  assert batch["targets"].dtype == np.int32 and set(batch["targets"]) <= {0, 1}
  # Deterministic 80/10/10 split, S4 normalisation, the contour folder itself accepted.
  folder = release / "pathfinder32" / "curv_contour_length_14"
  _, again = data.load_task(dict(task="pathfinder", data_dir=str(folder), normalize="s4"))
  np.testing.assert_array_equal(again["test"]["targets"], splits["test"]["targets"])
  np.testing.assert_allclose(again["test"]["inputs"], 2 * splits["test"]["inputs"] - 1,
                             atol=1e-6)
  loader = data.make_loader(splits["validation"], batch_size=8, shuffle=False, seed=0,
                            drop_remainder=False)
  b = next(loader)
  assert b["inputs"].shape == (8, 1024, 1) and b["weights"].sum() == 4


def test_empty_images_are_skipped(tmp_path):
  pf.write_dataset(tmp_path, num_examples=12, seed=2, size=32, num_workers=1)
  folder = tmp_path / "pathfinder32" / "curv_contour_length_14"
  (folder / "imgs" / "0" / "sample_3.png").write_bytes(b"")
  images, labels = pf.read_images(folder, 32)
  assert len(images) == len(labels) == 11


def test_missing_files_name_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="curv_contour_length_14/metadata"):
    data.load_task(dict(task="pathfinder", data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match="pathfinder128"):
    data.load_task(dict(task="pathx", data_dir=str(tmp_path)))


@pytest.mark.parametrize("cfg,match", [
    (dict(task="pathfinder", seq_len=1000), "seq_len"),
    (dict(task="pathfinder", size=48, seq_len=48 * 48), "size"),
    (dict(task="pathfinder", normalize="zscore"), "normalize"),
    (dict(task="pathfinder", nosuch=1), "nosuch"),
    (dict(task="pathx", seq_len=1024), "seq_len"),
])
def test_bad_options(cfg, match):
  with pytest.raises(ValueError, match=match):
    data.load_task(cfg)


def test_generates_into_the_cache_when_no_data_dir(tmp_path):
  cfg = dict(task="pathfinder", cache_dir=str(tmp_path), num_examples=20, num_workers=1)
  spec, splits = data.load_task(cfg)
  assert sum(len(v) for v in splits.values()) == 20
  _, again = data.load_task(cfg)  # from the cache
  np.testing.assert_array_equal(again["train"]["inputs"], splits["train"]["inputs"])


def test_published_recipes():
  c = pathfinder_config.get_config("s4")
  assert (c.model.num_layers, c.model.d_model, c.model.mixer.d_state) == (6, 256, 64)
  assert (c.optim.lr, c.optim.ssm_lr, c.optim.weight_decay) == (0.004, 1e-3, 0.05)
  assert (c.train.batch_size, c.train.num_steps, c.optim.warmup_steps) == (64, 500_000, 50_000)
  assert c.model.prenorm and c.model.norm == "batch" and c.model.bidirectional
  assert c.data.seq_len == 1024 == c.model.mixer.l_max and c.data.num_examples == 200_000
  x = pathx_config.get_config("s4")
  assert (x.optim.lr, x.train.batch_size, x.model.mixer.dt_min) == (0.001, 16, 1e-4)
  assert x.data.seq_len == 16384 == x.model.mixer.l_max and x.data.task == "pathx"
  for get in (pathfinder_config.get_config, pathx_config.get_config):
    for arg in ("s4d", "s4,local", "s4d,tiny"):
      assert get(arg).is_locked


@pytest.mark.parametrize("get_config", [pathfinder_config.get_config, pathx_config.get_config],
                         ids=["pathfinder", "pathx"])
def test_tiny_config_trains(get_config, tmp_path, jax_cache):
  from train import trainer
  config = get_config("s4d,tiny")
  config.data.cache_dir = str(tmp_path / "cache")
  results = trainer.run(config, str(tmp_path / "work"))
  assert results["steps"] == config.train.num_steps
  assert all(np.isfinite(v) for v in results.values() if isinstance(v, float))


# ---------------------------------------------------------------------------------------
# Version 3 (data/pathfinder_v3.py): the release's construction.

from data import pathfinder_v3 as v3  # noqa: E402

# Per-image statistics (pixel values / 255) from /work/shared/PATHFINDER.md "Statistics to
# check a generator against": 32 px the original generator re-run (ranges as given there),
# 128 px the Path-X re-run and the release (8 images); the band is the union of both.
# "blobs" = 8-connected components of pixels >= 32 (the threshold at which our Path-X
# count matches the release's 82-87, about one per dash).
V3_TARGETS = {
    # blobs: PATHFINDER.md's "~16"; a re-run of the original here (cv2.dilate emulated
    # with scipy, 300 images) gave 13.5, the low end of this band
    32: dict(mean=(0.080, 0.087), lit=(0.38, 0.41), ge32=(0.14, 0.15), ge128=(0.08, 0.09),
             blobs=(13.5, 16)),
    # 64 px: the release (8 images; PATHFINDER.md lists no re-run there)
    64: dict(mean=(0.063, 0.063), lit=(0.266, 0.266), ge32=(0.137, 0.137),
             ge128=(0.058, 0.058), marker=(219 / 255, 219 / 255), blobs=(16, 16)),
    128: dict(mean=(0.037, 0.040), lit=(0.161, 0.185), ge32=(0.074, 0.074),
              ge128=(0.039, 0.042), marker=(225 / 255, 225 / 255), blobs=(82, 87)),
}
# Measured misses of v3: these are expected to fail (none since the 32 px preset follows
# the original's seeds, integer steps and per-dash windows).
V3_KNOWN_MISSES = set()
# draws per size (64 px: about 1 in 5 draws places its snakes: ~45 images, ~20 s)
V3_SAMPLES = {32: 600, 64: 224, 128: 32}


def _v3_stats(images, markers):
  from scipy import ndimage
  x = images.astype(np.float64) / 255
  m = np.rint(markers).astype(int)
  plateau = [x[i, m[i, j, 1], m[i, j, 0]] for i in range(len(x)) for j in range(2)]
  blobs = [ndimage.label(im >= 32, structure=np.ones((3, 3)))[1] for im in images]
  return dict(mean=x.mean(), lit=(images > 0).mean(), ge32=(images >= 32).mean(),
              ge128=(images >= 128).mean(), marker=float(np.mean(plateau)),
              blobs=float(np.mean(blobs)))


class _V3Samples(dict):
  """{size: (images, ok, markers, snakes)}, each size drawn when first asked for."""

  def __missing__(self, size):
    rng = np.random.default_rng(size)
    self[size] = v3.generate_images(rng, rng.integers(0, 2, V3_SAMPLES[size]),
                                    v3.settings_v3(size), parts=True)
    return self[size]


@pytest.fixture(scope="module")
def v3_samples():
  """A few hundred images at 32 px, a few dozen at 64 and 128 (_V3Samples)."""
  return _V3Samples()


@pytest.mark.parametrize("size,stat", [
    pytest.param(size, stat, marks=[pytest.mark.xfail(strict=True, reason="known v3 miss")]
                 if (size, stat) in V3_KNOWN_MISSES else [])
    for size, targets in V3_TARGETS.items() for stat in targets])
def test_v3_statistics_within_15_percent_of_the_release(v3_samples, size, stat):
  images, ok, markers, _ = v3_samples[size]
  assert ok.sum() >= 8
  got = _v3_stats(images[ok], markers[ok])[stat]
  lo, hi = V3_TARGETS[size][stat]
  assert 0.85 * lo <= got <= 1.15 * hi, f"{size} px {stat}: {got:.4f} vs {lo}-{hi}"


def test_v3_snakes_touch_as_often_as_the_original(v3_samples):
  """The two main snakes share a pixel above half their peak in 22-29% of the original's
  32 px images (PATHFINDER.md, re-run); v2 never lets them touch."""
  images, ok, _, snakes = v3_samples[32]
  a, b = snakes[ok, 0], snakes[ok, 1]
  half_a = a.max((1, 2), keepdims=True) / 2
  half_b = b.max((1, 2), keepdims=True) / 2
  touch = ((a > half_a) & (b > half_b)).any((1, 2)).mean()
  assert 0.15 <= touch <= 0.35, touch  # the original's 22-29%, with slack for ~160 images


def test_v3_labels_are_iid_fair_coins():
  _, labels = v3.generate_chunk(3, 0, 400, v3.settings_v3(32))
  assert 0.42 < labels.mean() < 0.58
  runs = 1 + int((labels[1:] != labels[:-1]).sum())  # Wald-Wolfowitz: about n / 2 runs
  n1, n0 = labels.sum(), len(labels) - labels.sum()
  mu = 2 * n1 * n0 / len(labels) + 1
  sd = np.sqrt((mu - 1) * (mu - 2) / (len(labels) - 1))
  assert abs(runs - mu) < 3.5 * sd
  np.testing.assert_array_equal(labels, v3.generate_chunk(3, 0, 400, v3.settings_v3(32))[1])


def test_v3_picture_does_not_depend_on_the_label():
  """Same draws, other labels: only the far marker moves; and a logistic regression on
  global pixel statistics does no better than chance."""
  s = v3.settings_v3(32)
  ones, ok1, m1 = v3.generate_images(np.random.default_rng(9), np.ones(32, int), s)
  zeros, ok0, m0 = v3.generate_images(np.random.default_rng(9), np.zeros(32, int), s)
  np.testing.assert_array_equal(ok1, ok0)
  np.testing.assert_array_equal(m1[:, 0], m0[:, 0])
  assert (m1[ok1, 1] != m0[ok1, 1]).any(1).all()
  images, labels = v3.generate_chunk(5, 0, 600, s)
  x = images.reshape(len(images), -1).astype(np.float64) / 255
  feats = np.stack([x.mean(1), x.std(1), (x > 0).mean(1), (x >= 0.5).mean(1),
                    (x >= 0.125).mean(1)], 1)
  feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
  feats = np.concatenate([feats, np.ones((len(feats), 1))], 1)
  tr, te = slice(0, 400), slice(400, None)
  w = np.zeros(feats.shape[1])
  for _ in range(300):  # plain gradient descent on the logistic loss
    p = 1 / (1 + np.exp(-feats[tr] @ w))
    w -= 0.5 * feats[tr].T @ (p - labels[tr]) / 400
  acc = ((feats[te] @ w > 0) == labels[te]).mean()
  assert acc < 0.6, acc  # chance is 0.5; 200 test images: sd 0.035


def test_v3_written_set_and_cache_key(tmp_path):
  one = pf.write_dataset(tmp_path / "a", num_examples=10, seed=4, num_workers=1,
                         images_per_folder=4, version=3)
  two = pf.write_dataset(tmp_path / "b", num_examples=10, seed=4, num_workers=2,
                         images_per_folder=4, version=3)
  for x, y in zip(pf.read_images(one, 32), pf.read_images(two, 32)):
    np.testing.assert_array_equal(x, y)
  images, _ = pf.read_images(one, 32)
  assert (images.reshape(10, -1).max(1) == 255).all()  # stretched per image
  cfg = dict(task="pathfinder", cache_dir=str(tmp_path / "c"), num_examples=20,
             num_workers=1, generator_version=3)
  _, splits = data.load_task(cfg)
  assert sum(len(v) for v in splits.values()) == 20
  assert list((tmp_path / "c").rglob(f"gen-n20-v3r{v3.REVISION}-*"))  # v3 (and its revision) keyed
  with pytest.raises(ValueError, match="generator_version"):
    data.load_task(dict(cfg, generator_version=7))


def test_a_pack_is_the_generated_set(tmp_path, capsys):
  """`python -m data.pathfinder pack` of a generated v3 set; a config with generated_pack
  reads the same splits (through TFDS and the direct reader) without generating; a pack
  of another set, a damaged one, a foreign file and a missing one fail clearly."""
  cfg = dict(task="pathfinder", cache_dir=str(tmp_path / "gen"), num_examples=20, seed=3,
             num_workers=1, generator_version=3)
  _, want = data.load_task(cfg)
  pack = tmp_path / "set.pack"
  pf.main(["pack", str(pack), "--num_examples=20", "--seed=3", "--num_workers=1",
           f"--cache_dir={tmp_path / 'gen'}"])        # found in the cache, not generated again
  assert "20 images" in capsys.readouterr().out
  packed = dict(cfg, cache_dir=str(tmp_path / "fresh"), generated_pack=str(pack))
  for load in (data.load_task, pf.load_task):
    _, got = load(packed)
    for split in want:
      np.testing.assert_array_equal(got[split]["inputs"], want[split]["inputs"])
      np.testing.assert_array_equal(got[split]["targets"], want[split]["targets"])
  assert not list((tmp_path / "fresh").glob("pathfinder32-*"))  # nothing was generated
  with pytest.raises(pf.DataError, match="was generated with .* asks for"):
    data.load_task(dict(packed, seed=4, cache_dir=str(tmp_path / "other")))
  damaged = tmp_path / "damaged.pack"
  raw = bytearray(pack.read_bytes())
  raw[-40] ^= 0xFF
  damaged.write_bytes(bytes(raw))
  with pytest.raises(pf.DataError, match="damaged"):
    pf.read_pack(damaged, pf.generator_identity(num_examples=20, seed=3, size=32,
                                                contour_length=14, generator_version=3))
  (tmp_path / "foreign").write_bytes(b"PK\x03\x04")
  with pytest.raises(pf.DataError, match="not a Pathfinder pack"):
    data.load_task(dict(packed, generated_pack=str(tmp_path / "foreign")))
  with pytest.raises(FileNotFoundError, match="is not a file"):
    data.load_task(dict(packed, generated_pack=str(tmp_path / "missing")))


@pytest.mark.parametrize("length,thickness,margin", [(2, 0.5, 1), (5, 1.0, 1), (5, 1.5, 2)],
                         ids=["32px", "64px", "128px"])
def test_v3_dash_windows_are_pils_lines(length, thickness, margin):
  """Given every 2x end offset a dash can take (_window_offsets), when its window is drawn
  (_dash_windows), then it holds the pixels PIL's ImageDraw.line sets in a mode-F
  window, as the original's draw_line_n_mask draws it."""
  Image = pytest.importorskip("PIL.Image")
  from PIL import ImageDraw
  aa = 2
  half = length + int(np.ceil(thickness)) + margin
  side, c, width = 2 * aa * half + 1, aa * half, int(round(thickness * aa))
  dx, dy = v3._window_offsets(np.linspace(-np.pi, np.pi, 7201), length, aa)
  dx, dy = np.unique(np.stack([dx, dy], 1), axis=0).T
  ours = v3._dash_windows(dx, dy, width, half, aa)
  for i in range(dx.size):
    im = Image.new("F", (side, side), "black")
    ImageDraw.Draw(im).line([(c, c), (c + int(dx[i]), c + int(dy[i]))], fill="white",
                            width=width)
    np.testing.assert_array_equal(ours[i], np.asarray(im) > 0,
                                  err_msg=f"offset ({dx[i]}, {dy[i]})")


def test_usable_cpus_follow_the_affinity_mask():
  """num_workers=0 sizes the pool from the CPUs this process may run on (a container's
  or a SLURM job's cpuset), never more than the host has."""
  import os
  n = pf.usable_cpus()
  assert 1 <= n <= (os.cpu_count() or n)
  if hasattr(os, "sched_getaffinity"):
    assert n == len(os.sched_getaffinity(0))
