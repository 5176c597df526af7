"""A synthetic domain shift: procedural street scenes in two appearances, no files needed.

Both domains draw scenes from the same layout model (road towards a vanishing point,
sidewalks, a skyline of buildings and trees, terrain, walls and fences, poles carrying
signs and lights, cars, trucks, buses, a rare train, people, riders on bicycles and
motorcycles, sometimes the ego vehicle's bonnet as "ignore"), with the 19 Cityscapes
classes. They differ only in appearance, and by the global, low-frequency changes that
separate real cameras and renderers: the target's colours are the source's with every hue
rotated by the same moderate angle and desaturated (plus a small fixed per-class shift),
seen through a cold colour cast, lower contrast and a gamma curve, under dimmer light
that falls off towards the bottom, with finer, weaker textures, more sensor noise and
blur. Class identity stays recognisable from shape, layout and relative colour, so a
model trained on the source loses accuracy on the target, and domain-invariant features
can recover much of it.

Every frame is a deterministic function of (seed, domain, split, index); a 256x128 frame
renders in tens of milliseconds (numpy, vectorised).
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fada_jax.data import labels as labels_lib
from fada_jax.errors import UserError

IGNORE = labels_lib.IGNORE_LABEL
DOMAINS = ("source", "target")
SPLITS = ("train", "val")
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
 RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)

# Cityscapes label id of each 19-class train id (to write label-id files).
LABEL_IDS_19 = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33],
                        dtype=np.uint8)
_EGO_VEHICLE_LABEL_ID = 1

# Source appearance: plausible street colours (RGB 0..1).
_SOURCE_RGB = np.array([
    (0.42, 0.40, 0.42), (0.68, 0.62, 0.58), (0.62, 0.48, 0.36), (0.70, 0.68, 0.55),
    (0.50, 0.38, 0.25), (0.35, 0.35, 0.38), (0.20, 0.22, 0.18), (0.85, 0.75, 0.15),
    (0.22, 0.50, 0.18), (0.55, 0.60, 0.30), (0.50, 0.70, 0.92), (0.75, 0.30, 0.30),
    (0.85, 0.45, 0.15), (0.20, 0.30, 0.75), (0.60, 0.60, 0.62), (0.85, 0.80, 0.25),
    (0.45, 0.25, 0.55), (0.15, 0.15, 0.15), (0.25, 0.60, 0.60)])
# The target's appearance is the source's after global, low-frequency changes (the kind
# that a domain-invariant feature extractor can undo): all hues rotated by the same
# moderate angle and desaturated, a cold colour cast, lower contrast, a gamma curve,
# darker light falling off towards the bottom, finer and weaker textures, sensor noise
# and blur. Relative colours (sky brighter than road, vegetation greener than terrain,
# ...) survive, so class identity stays recognisable from colour, shape and layout.
_TARGET_HUE_SHIFT = 0.09       # Turns, the same for every class.
_TARGET_SATURATION = 0.7
# Small fixed per-class wobble (RGB units): real domains also differ in the materials.
_TARGET_CLASS_WOBBLE = 0.04


def _target_rgb() -> np.ndarray:
  wobble = np.random.default_rng(19).uniform(-1.0, 1.0, (19, 3)) * _TARGET_CLASS_WOBBLE
  out = []
  for (r, g, b) in _SOURCE_RGB:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    out.append(colorsys.hsv_to_rgb((h + _TARGET_HUE_SHIFT) % 1.0, _TARGET_SATURATION * s, v))
  return np.clip(np.array(out) + wobble, 0.0, 1.0)


# Per domain: class colours, texture strength per class, texture cell sizes (relative to
# the frame height), window period, lighting gain and falloff, then whole-image colour
# cast (RGB gains), contrast about mid-grey, gamma, pixel noise and blur passes.
_STYLE = {
    "source": dict(rgb=_SOURCE_RGB, fine=0.06, coarse=0.10, cell=(1 / 32, 1 / 8),
                   window=1 / 12, gain=1.0, falloff=0.0, cast=(1.0, 1.0, 1.0), contrast=1.0,
                   gamma=1.0, noise=0.015, blur=0),
    "target": dict(rgb=_target_rgb(), fine=0.09, coarse=0.05, cell=(1 / 56, 1 / 16),
                   window=1 / 16, gain=0.93, falloff=0.22, cast=(0.89, 0.97, 1.13),
                   contrast=0.8, gamma=1.22, noise=0.035, blur=1),
}
# Classes with coarse blotchy texture (vegetation, terrain) and with window grids.
_BLOTCHY = np.zeros(19, bool)
_BLOTCHY[[VEGETATION, TERRAIN]] = True
_WINDOWED = np.zeros(19, bool)
_WINDOWED[[BUILDING, BUS, TRAIN]] = True


def _check(domain: str, split: str) -> None:
  if domain not in DOMAINS:
    raise UserError(f"synthetic domain must be one of {DOMAINS}, got {domain!r}")
  if split not in SPLITS:
    raise UserError(f"synthetic split must be one of {SPLITS}, got {split!r}")


def _rng(seed: int, domain: str, split: str, index: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, DOMAINS.index(domain),
                                SPLITS.index(split), int(index), stream])


class _Canvas:
  """A label map and a per-pixel shade, painted back to front."""

  def __init__(self, height: int, width: int):
    self.h, self.w = height, width
    self.label = np.full((height, width), SKY, np.uint8)
    self.shade = np.ones((height, width), np.float32)

  def box(self, cls: int, x0: float, x1: float, y0: float, y1: float, shade: float = 1.0):
    xa, xb = max(0, int(round(x0))), min(self.w, max(int(round(x1)), int(round(x0)) + 1))
    ya, yb = max(0, int(round(y0))), min(self.h, max(int(round(y1)), int(round(y0)) + 1))
    if xa < xb and ya < yb:
      self.label[ya:yb, xa:xb] = cls
      self.shade[ya:yb, xa:xb] = shade

  def ellipse(self, cls: int, cx: float, cy: float, rx: float, ry: float, shade: float = 1.0):
    rx, ry = max(rx, 0.6), max(ry, 0.6)
    xa, xb = max(0, int(cx - rx)), min(self.w, int(cx + rx) + 2)
    ya, yb = max(0, int(cy - ry)), min(self.h, int(cy + ry) + 2)
    if xa >= xb or ya >= yb:
      return
    yy, xx = np.ogrid[ya:yb, xa:xb]
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    self.label[ya:yb, xa:xb][inside] = cls
    self.shade[ya:yb, xa:xb][inside] = shade


def _layout(rng: np.random.Generator, height: int, width: int) -> _Canvas:
  """Paints one scene's 19-class label map (and instance shades)."""
  canvas = _Canvas(height, width)
  h, w = float(height), float(width)
  horizon = h * rng.uniform(0.36, 0.5)
  vanish_x = w * rng.uniform(0.35, 0.65)
  road_slope = w * rng.uniform(0.35, 0.55)        # Road half-width at the bottom row.
  walk_ratio = rng.uniform(0.25, 0.5)             # Sidewalk width / road half-width.
  ys = np.arange(height, dtype=np.float32)[:, None]
  xs = np.arange(width, dtype=np.float32)[None, :]
  depth = np.clip((ys - horizon) / (h - horizon), 0.0, None)   # 0 at the horizon, 1 at bottom.
  dist = np.abs(xs - vanish_x)
  road_half = road_slope * depth + 0.5
  walk_outer = road_half * (1.0 + walk_ratio)

  # Skyline: blocks of buildings, trees or open sky along x, each with its own height.
  block_class = np.empty(width, np.uint8)
  block_top = np.empty(width, np.float32)
  block_shade = np.empty(width, np.float32)
  x = 0
  while x < width:
    size = max(2, int(w * rng.uniform(0.06, 0.22)))
    kind = rng.choice([BUILDING, VEGETATION, SKY], p=[0.7, 0.18, 0.12])
    block_class[x:x + size] = kind
    block_top[x:x + size] = horizon - h * rng.uniform(0.08, 0.42)
    block_shade[x:x + size] = rng.uniform(0.8, 1.2)
    x += size
  ground = ys >= horizon
  beyond = ground & (dist >= walk_outer)
  background = np.where(block_class == SKY, TERRAIN, block_class)[None, :]
  # Terrain strips between sidewalk and facades in part of the frames.
  verge = rng.uniform(0.0, 0.5) * road_half
  label = np.where(ys >= block_top[None, :], block_class[None, :], SKY)
  label = np.where(ground, np.where(beyond, np.where(dist < walk_outer + verge, TERRAIN,
                                                     background), SIDEWALK), label)
  label = np.where(ground & (dist < road_half), ROAD, label)
  canvas.label[:] = label
  canvas.shade[:] = np.where(label == BUILDING, block_shade[None, :], 1.0)

  # Per column, the row where the sidewalk's outer edge meets it (for fences and walls).
  def edge_row(column_x: np.ndarray) -> np.ndarray:
    t = np.abs(column_x - vanish_x) / (road_slope * (1.0 + walk_ratio))
    return horizon + t * (h - horizon)

  for _ in range(rng.poisson(1.2)):
    cls = WALL if rng.random() < 0.5 else FENCE
    x0 = rng.uniform(0, w)
    x1 = min(w, x0 + w * rng.uniform(0.08, 0.3))
    cols = np.arange(int(x0), int(x1))
    rows_base = edge_row(cols.astype(np.float32))
    for c, base in zip(cols, rows_base):
      if base < h:
        t = (base - horizon) / (h - horizon)
        canvas.label[max(0, int(base - (0.25 * h * t + 2))):int(base) + 1, c] = cls

  # Objects, far to near so that nearer ones occlude farther ones.
  objects = []
  for _ in range(rng.integers(1, 5)):
    objects.append(("pole", rng.uniform(0.08, 0.95)))
  for _ in range(rng.poisson(2.0)):
    objects.append(("tree", rng.uniform(0.05, 0.8)))
  for _ in range(rng.poisson(2.5) + 1):
    objects.append(("car", rng.uniform(0.05, 0.95)))
  for _ in range(rng.poisson(2.0)):
    objects.append(("person", rng.uniform(0.05, 0.95)))
  for name, p in (("truck", 0.35), ("bus", 0.25), ("train", 0.08), ("bicycle", 0.45),
                  ("motorcycle", 0.35)):
    if rng.random() < p:
      objects.append((name, rng.uniform(0.1, 0.9)))
  objects.sort(key=lambda o: o[1])
  span = h - horizon
  for name, t in objects:
    base = horizon + t * span
    scale = span * t                       # Pixels per "metre-ish" at this depth.
    half = road_slope * t
    side = 1.0 if rng.random() < 0.5 else -1.0
    shade = float(rng.uniform(0.75, 1.25))
    if name == "pole":
      px = vanish_x + side * half * (1.0 + walk_ratio * rng.uniform(0.5, 0.95))
      pw, ph = max(1.0, 0.02 * scale), 1.3 * scale + 4
      canvas.box(POLE, px - pw / 2, px + pw / 2, base - ph, base, shade)
      top = rng.random()
      if top < 0.45:
        canvas.box(SIGN, px - 2.5 * pw - 1, px + 2.5 * pw + 1, base - ph - 0.2 * scale - 1,
                   base - ph + 0.05 * scale + 1, shade)
      elif top < 0.8:
        canvas.box(LIGHT, px - 1.2 * pw - 0.5, px + 1.2 * pw + 0.5, base - ph - 0.25 * scale - 1,
                   base - ph + 0.02 * scale, shade)
    elif name == "tree":
      px = vanish_x + side * half * (1.0 + walk_ratio * rng.uniform(1.0, 1.6))
      canvas.box(VEGETATION, px - 0.03 * scale - 0.5, px + 0.03 * scale + 0.5,
                 base - 0.8 * scale, base, shade)
      canvas.ellipse(VEGETATION, px, base - 1.0 * scale, 0.45 * scale + 1, 0.4 * scale + 1, shade)
    elif name == "person":
      on_road = rng.random() < 0.2
      offset = rng.uniform(0, 0.9) if on_road else 1.0 + walk_ratio * rng.uniform(0.1, 0.9)
      px = vanish_x + side * half * offset
      canvas.ellipse(PERSON, px, base - 0.25 * scale, 0.07 * scale + 0.5, 0.25 * scale + 0.5, shade)
      canvas.ellipse(PERSON, px, base - 0.55 * scale, 0.05 * scale + 0.5, 0.06 * scale + 0.5, shade)
    else:
      px = vanish_x + side * half * rng.uniform(0.1, 0.85)
      if name in ("bicycle", "motorcycle"):
        cls = BICYCLE if name == "bicycle" else MOTORCYCLE
        wheel = (0.1 if cls == BICYCLE else 0.12) * scale + 0.5
        length = (0.45 if cls == BICYCLE else 0.55) * scale
        canvas.ellipse(cls, px - length / 2, base - wheel, wheel, wheel, shade)
        canvas.ellipse(cls, px + length / 2, base - wheel, wheel, wheel, shade)
        canvas.box(cls, px - length / 2, px + length / 2, base - 2.2 * wheel, base - 1.2 * wheel,
                   shade)
        canvas.ellipse(RIDER, px, base - 2.2 * wheel - 0.2 * scale, 0.08 * scale + 0.5,
                       0.2 * scale + 0.5, shade)
        canvas.ellipse(RIDER, px, base - 2.2 * wheel - 0.45 * scale, 0.05 * scale + 0.5,
                       0.06 * scale + 0.5, shade)
        continue
      cls, length, height, cabin = {
          "car": (CAR, 1.1, 0.45, 0.6), "truck": (TRUCK, 1.5, 0.85, 0.35),
          "bus": (BUS, 2.0, 0.9, 1.0), "train": (TRAIN, 3.5, 1.0, 1.0)}[name]
      length *= scale * rng.uniform(0.85, 1.15)
      height *= scale * rng.uniform(0.9, 1.1)
      body = 0.6 * height if cabin < 1.0 else height
      canvas.box(cls, px - length / 2, px + length / 2, base - body, base, shade)
      if cabin < 1.0:
        cab_length = length * cabin
        cab_x = px - length / 2 + (0.2 * length if cls == CAR else 0.0)
        canvas.box(cls, cab_x, cab_x + cab_length, base - height, base - body + 1, shade)
  if rng.random() < 0.3:
    # The ego vehicle's bonnet: unlabelled, as in Cityscapes.
    canvas.ellipse(IGNORE, w / 2, h * 1.05, w * 0.6, h * rng.uniform(0.08, 0.15))
  return canvas


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
  """Smooth noise in [-1, 1] with features about `cell` pixels wide (bilinear lattice)."""
  cell = max(1.0, cell)
  grid = rng.uniform(-1.0, 1.0, (int(height / cell) + 2, int(width / cell) + 2)
                     ).astype(np.float32)
  # Separable: along x on the few lattice rows first, then along y at full size.
  gx = np.arange(width, dtype=np.float32) / cell
  x0 = gx.astype(np.int32)
  fx = gx - x0
  rows = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx
  gy = np.arange(height, dtype=np.float32) / cell
  y0 = gy.astype(np.int32)
  fy = (gy - y0)[:, None]
  return rows[y0] * (1 - fy) + rows[y0 + 1] * fy


def _blur(image: np.ndarray) -> np.ndarray:
  """3x3 box blur with edge replication."""
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  rows = padded[:-2] + padded[1:-1] + padded[2:]
  return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _render(rng: np.random.Generator, canvas: _Canvas, domain: str) -> np.ndarray:
  """The RGB uint8 image of a label map in a domain's appearance."""
  style = _STYLE[domain]
  h, w = canvas.h, canvas.w
  label = canvas.label
  cls = np.where(label == IGNORE, 0, label)
  # Per-frame colour variation within the domain: class colours and brightness wobble.
  colours = np.clip(style["rgb"] * rng.uniform(0.85, 1.15, (19, 1))
                    + rng.normal(0, 0.03, (19, 3)), 0, 1).astype(np.float32)
  colours = np.concatenate([colours, np.full((1, 3), 0.08, np.float32)])  # Ego bonnet.
  cls = np.where(label == IGNORE, 19, cls)
  fine = _value_noise(rng, h, w, h * style["cell"][0])
  coarse = _value_noise(rng, h, w, h * style["cell"][1])
  texture = np.where(_BLOTCHY[np.minimum(cls, 18)], 2.5 * style["coarse"] * np.sign(coarse)
                     + style["fine"] * fine, style["fine"] * fine + style["coarse"] * coarse)
  # Windows on buildings, buses and trains: a grid of darker cells.
  period = max(3.0, h * style["window"])
  ys = np.arange(h, dtype=np.float32)[:, None]
  xs = np.arange(w, dtype=np.float32)[None, :]
  windows = ((ys % period) < 0.5 * period) & ((xs % period) < 0.5 * period)
  texture = texture - 0.3 * (windows & _WINDOWED[np.minimum(cls, 18)])
  # Sky: brighter towards the top.
  texture = np.where(label == SKY, 0.25 * (1 - ys / h) + 0.02 * fine, texture)
  lighting = style["gain"] * rng.uniform(0.85, 1.15) * (1 - style["falloff"] * ys / h)
  intensity = canvas.shade * (1 + texture) * lighting
  image = colours[cls] * intensity[..., None]
  if (style["cast"], style["contrast"], style["gamma"]) != ((1.0, 1.0, 1.0), 1.0, 1.0):
    # Camera response: colour cast, contrast about mid-grey, gamma (skipped when identity).
    image = np.clip(0.5 + style["contrast"] * (image * np.float32(style["cast"]) - 0.5), 0, 1)
    image = image ** np.float32(style["gamma"])
  for _ in range(style["blur"]):
    image = _blur(image)
  # Sensor noise, the same in the three channels (cheaper, and enough to differ).
  image += (style["noise"] * rng.standard_normal((h, w), dtype=np.float32))[..., None]
  return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _to_num_classes(label19: np.ndarray, num_classes: int) -> np.ndarray:
  if num_classes == 19:
    return label19
  lut = np.full(256, IGNORE, np.uint8)
  lut[:19] = labels_lib.label_lookup("cityscapes", num_classes)[LABEL_IDS_19]
  return lut[label19]


def render_frame(domain: str, split: str, index: int, seed: int,
                 image_size: tuple[int, int] = (256, 128)) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [H, W, 3], 19-class train ids uint8 [H, W]) of one synthetic frame."""
  _check(domain, split)
  width, height = image_size
  canvas = _layout(_rng(seed, domain, split, index, 0), height, width)
  image = _render(_rng(seed, domain, split, index, 1), canvas, domain)
  return image, canvas.label


class SyntheticSource:
  """A random-access source of synthetic frames (the folder sources' interface)."""

  def __init__(self, domain: str, split: str, num_classes: int, size: int, seed: int,
               image_size: tuple[int, int] = (256, 128)):
    _check(domain, split)
    if num_classes not in (16, 19):
      raise UserError(f"num_classes must be 16 or 19, got {num_classes!r}")
    if size < 1:
      raise UserError(f"synthetic dataset size must be positive, got {size}")
    self.dataset = f"synthetic_{domain}"
    self.domain, self.split = domain, split
    self.num_classes, self.size, self.seed = num_classes, int(size), int(seed)
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.names = [f"synthetic_{domain}/{split}_{i:06d}" for i in range(self.size)]

  def __len__(self) -> int:
    return self.size

  def __repr__(self) -> str:
    return f"SyntheticSource({self.domain}, {self.split}, {self.size} frames)"

  def label19(self, index: int) -> np.ndarray:
    """The 19-class train ids of a frame (layout only: no rendering)."""
    return _layout(_rng(self.seed, self.domain, self.split, index, 0), self.image_size[1],
                   self.image_size[0]).label

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self!r}")
    image, label = render_frame(self.domain, self.split, index, self.seed, self.image_size)
    return {"image": image, "label": _to_num_classes(label, self.num_classes),
            "name": self.names[index]}

  def classes_per_example(self) -> list[np.ndarray]:
    """Per frame, the sorted train ids it contains (uint8): the label-info table."""
    out = []
    for index in range(self.size):
      counts = np.bincount(_to_num_classes(self.label19(index), self.num_classes).ravel(),
                           minlength=256)
      out.append(np.flatnonzero(counts[:self.num_classes]).astype(np.uint8))
    return out

  def class_presence(self, progress: bool = False) -> np.ndarray:
    """bool [N, K]: which classes each frame holds."""
    del progress  # Layouts alone are fast to compute.
    table = np.zeros((self.size, self.num_classes), bool)
    for row, classes in zip(table, self.classes_per_example()):
      row[classes] = True
    return table


def make_synthetic_source(domain: str, split: str, num_classes: int, size: int, seed: int,
                          image_size: tuple[int, int] = (256, 128)) -> SyntheticSource:
  """`size` synthetic frames of `domain` ('source' | 'target') and `split` ('train' | 'val')."""
  return SyntheticSource(domain, split, num_classes, size, seed, image_size)


def label_ids(train_ids19: np.ndarray) -> np.ndarray:
  """Cityscapes label ids of a 19-class train-id map (ignore -> the ego-vehicle id)."""
  lut = np.full(256, _EGO_VEHICLE_LABEL_ID, np.uint8)
  lut[:19] = LABEL_IDS_19
  return lut[train_ids19]


def write_synthetic_folders(root: str | os.PathLike, num_source: int, num_target_train: int,
                            num_target_val: int, image_size: tuple[int, int] = (256, 128),
                            seed: int = 0, city: str = "synthetic",
                            target_image_size: tuple[int, int] | None = None) -> Path:
  """Writes the source domain in the GTA5 layout and the target in the Cityscapes layout.

  Source frames are `image_size` (width, height), target frames `target_image_size`
  (default the same): (1914, 1052) and (2048, 1024) give the real datasets' frame sizes.

  root/gta5/images/<i:05d>.png + root/gta5/labels/<i:05d>.png (source train frames), and
  root/cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_<i:06d>_leftImg8bit.png +
  root/cityscapes/gtFine/.../<city>_000000_<i:06d>_gtFine_labelIds.png (target frames).
  Labels hold Cityscapes label ids, so the folders read like the real datasets.
  """
  root = Path(root).expanduser()
  gta_images, gta_labels = root / "gta5" / "images", root / "gta5" / "labels"
  for folder in (gta_images, gta_labels):
    folder.mkdir(parents=True, exist_ok=True)
  for i in range(num_source):
    image, label = render_frame("source", "train", i, seed, image_size)
    Image.fromarray(image).save(gta_images / f"{i:05d}.png")
    Image.fromarray(label_ids(label)).save(gta_labels / f"{i:05d}.png")
  for split, count in (("train", num_target_train), ("val", num_target_val)):
    image_dir = root / "cityscapes" / "leftImg8bit" / split / city
    label_dir = root / "cityscapes" / "gtFine" / split / city
    for folder in (image_dir, label_dir):
      folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
      image, label = render_frame("target", split, i, seed, target_image_size or image_size)
      stem = f"{city}_000000_{i:06d}"
      Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
      Image.fromarray(label_ids(label)).save(label_dir / f"{stem}_gtFine_labelIds.png")
  return root
