"""Simulated nanoparticle (NP) fluorescence tissue tiles: the project's embedded default dataset.

Each tile has three co-registered channels, written as 16-bit PNGs (``np/``, ``vessel/``, ``nuclei/``) with a
MONAI datalist (``datalist.json``) and a preview montage (``preview.png``):

- ``vessel`` (CD31-like): smooth random tubular vessels of varying calibre; bright textured walls, dim lumen.
- ``nuclei`` (DAPI-like): textured elliptical nuclei, never inside vessel lumens, denser near vessels.
- ``np_signal`` (the target): nanoparticles extravasated from the vessels, decaying with the distance from the
  vessel wall on a per-tile length scale, excluded from nuclei, with shot noise. The vessel image explains the
  halo; only the nuclei image explains the holes in it.

A fraction of tiles is *divergent*: their nuclei channel does not belong to the tile (``swapped`` from another
tile, ``shifted`` by a large offset, or ``rotated`` by a large angle), as happens between separately scanned
stains. The datalist records ``divergent`` and ``divergence_kind`` for every item.

16-bit PNG is used so the exponential NP halo keeps its dynamic range (an 8-bit image quantises the tail of the
halo away); one fixed gain per channel for the whole dataset (``INTENSITY_GAIN``) keeps absolute NP intensity
comparable between tiles.

Run ``python -m data_prep.synthetic_np --out DIR [--n N --size S --divergent-fraction P --seed K]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import cKDTree

from ddcore.atomic import atomic_folder, atomic_path, remove_stale_temporaries
from ddcore.datalist import SPLITS, assign_splits, read_datalist, write_datalist

__all__ = [
    "DATALIST_NAME",
    "DIVERGENCE_KINDS",
    "FOLDERS",
    "GENERATOR_ID",
    "INTENSITY_GAIN",
    "MODALITIES",
    "SimulatedTile",
    "ensure_dataset",
    "generate",
    "main",
    "simulate",
    "simulate_tile",
]

GENERATOR_ID = "data_prep.synthetic_np"
GENERATOR_VERSION = 1
DATALIST_NAME = "datalist.json"
PREVIEW_NAME = "preview.png"
MODALITIES = ("np_signal", "vessel", "nuclei")
FOLDERS = {"np_signal": "np", "vessel": "vessel", "nuclei": "nuclei"}
DIVERGENCE_KINDS = ("swapped", "shifted", "rotated")
#: stored value = clip(simulated intensity * INTENSITY_GAIN, 0, 65535); simulated intensities are ~[0, 1.5].
INTENSITY_GAIN = 65535.0 / 1.5


@dataclass
class SimulatedTile:
    """One simulated tile: float images (photon-normalised intensity) and ground-truth masks.

    Attributes:
        np_signal, vessel, nuclei: float32 images ``[size, size]``; ``nuclei`` is the (possibly divergent) image
            written to disk.
        vessel_mask: inside any vessel (wall + lumen).
        lumen_mask: inside a vessel lumen.
        nuclei_mask: nuclei of *this* tile's tissue (what shaped ``np_signal``).
        shown_nuclei_mask: nuclei mask of the image in ``nuclei`` (differs from ``nuclei_mask`` when divergent).
        length_scale: NP halo decay length in pixels.
        divergence_kind: ``None`` or one of :data:`DIVERGENCE_KINDS`.
        divergence_params: how the nuclei channel was altered (source tile, shift, angle).
    """

    np_signal: np.ndarray
    vessel: np.ndarray
    nuclei: np.ndarray
    vessel_mask: np.ndarray
    lumen_mask: np.ndarray
    nuclei_mask: np.ndarray
    shown_nuclei_mask: np.ndarray
    length_scale: float
    divergence_kind: str | None = None
    divergence_params: dict[str, Any] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-smoothed white noise (a texture field)."""
    g = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return g / (g.std() + 1e-8)


def _shot_noise(rng: np.random.Generator, image: np.ndarray, photons: float, read_noise: float) -> np.ndarray:
    """Poisson photon noise at ``photons`` counts per unit intensity, plus Gaussian read noise."""
    counts = rng.poisson(np.clip(image, 0.0, None) * photons)
    return (counts / photons + read_noise * rng.standard_normal(image.shape)).astype(np.float32)


def _vessel_geometry(
    rng: np.random.Generator, size: int, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance to the nearest vessel wall, wall thickness, vessel id and per-vessel leakiness.

    Vessels are smooth random curves (angle random walk through a random point of the tile) whose radius varies
    slowly along the curve. Returns ``sd`` (distance from the outer wall, negative inside), ``wall`` (wall
    thickness at the nearest vessel), ``vid`` (index of the nearest vessel) and ``leak`` (per vessel).
    """
    yy, xx = np.mgrid[0:size, 0:size]
    grid = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64) + 0.5
    n_vessels = max(1, round(rng.integers(1, 4) * (size / 64.0) ** 0.5 * 1.0))
    step = 0.5
    half = math.ceil(1.5 * size / step)
    sd = np.full(size * size, np.inf)
    wall = np.ones(size * size)
    vid = np.zeros(size * size, dtype=np.int64)
    for v in range(n_vessels):
        centre = rng.uniform(0.15 * size, 0.85 * size, size=2)
        theta0 = rng.uniform(0, 2 * np.pi)
        # curvature: smoothed random angular increments, in radians per step
        dtheta = ndimage.gaussian_filter1d(rng.standard_normal(2 * half + 1), 8.0) * 0.12 * rng.uniform(0.3, 1.2)
        theta = theta0 + np.cumsum(dtheta) - np.cumsum(dtheta)[half]
        steps = np.stack([np.sin(theta), np.cos(theta)], axis=1) * step
        pts = np.cumsum(steps, axis=0)
        pts = pts - pts[half] + centre
        r0 = rng.uniform(1.3, 4.0) * scale
        radius = r0 * (1.0 + 0.2 * ndimage.gaussian_filter1d(rng.standard_normal(2 * half + 1), 20.0) * 4.0)
        radius = np.clip(radius, 0.8 * scale, 6.0 * scale)
        keep = np.all((pts > -8 * scale) & (pts < size + 8 * scale), axis=1)
        if not keep.any():
            continue
        dist, idx = cKDTree(pts[keep]).query(grid)
        r = radius[keep][idx]
        sd_v = dist - r
        better = sd_v < sd
        sd[better] = sd_v[better]
        wall[better] = np.maximum(0.8, 0.35 * r[better])
        vid[better] = v
    leak = rng.uniform(0.5, 1.0, size=n_vessels)
    return sd.reshape(size, size), wall.reshape(size, size), vid.reshape(size, size), leak


def _nuclei(
    rng: np.random.Generator, size: int, scale: float, sd: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place and draw textured elliptical nuclei outside lumens, denser near vessels.

    Returns the noiseless nuclei image, the binary mask and a soft (anti-aliased) occupancy map.
    """
    rn = 2.4 * scale  # mean nucleus radius
    near_length = 6.0 * scale
    # candidate centres, thinned by a density that is high near vessels and zero in/at the vessels
    n_cand = int(6 * size * size / (np.pi * rn * rn))
    cand = rng.uniform(0, size, size=(n_cand, 2))
    ci = np.clip(cand.astype(int), 0, size - 1)
    d_out = sd[ci[:, 0], ci[:, 1]]
    density = np.where(d_out > 0.6 * rn, 0.35 + 0.65 * np.exp(-np.maximum(d_out, 0) / near_length), 0.0)
    cand = cand[rng.uniform(size=n_cand) < density]
    # greedy hard-core thinning: no two centres closer than 1.7 rn
    min_d2 = (1.7 * rn) ** 2
    kept = np.empty_like(cand)
    k = 0
    for c in cand:
        if k and np.min(np.sum((kept[:k] - c) ** 2, axis=1)) < min_d2:
            continue
        kept[k] = c
        k += 1
    centres = kept[:k]
    image = np.zeros((size, size), dtype=np.float64)
    soft = np.zeros((size, size), dtype=np.float64)
    for cy, cx in centres:
        a = rn * rng.uniform(0.85, 1.3)
        b = rn * rng.uniform(0.6, 0.9)
        phi = rng.uniform(0, np.pi)
        brightness = rng.uniform(0.55, 1.0)
        h = math.ceil(max(a, b)) + 2
        y0, y1 = max(0, int(cy) - h), min(size, int(cy) + h + 1)
        x0, x1 = max(0, int(cx) - h), min(size, int(cx) + h + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        ly, lx = np.mgrid[y0:y1, x0:x1]
        dy, dx = ly + 0.5 - cy, lx + 0.5 - cx
        u = dx * np.cos(phi) + dy * np.sin(phi)
        w = -dx * np.sin(phi) + dy * np.cos(phi)
        rho = np.sqrt((u / a) ** 2 + (w / b) ** 2)
        occ = np.clip((1.0 - rho) * min(a, b) + 0.5, 0.0, 1.0)  # ~1 px anti-aliased edge
        value = occ * brightness * (1.0 - 0.2 * rho**2)
        np.maximum(image[y0:y1, x0:x1], value, out=image[y0:y1, x0:x1])
        np.maximum(soft[y0:y1, x0:x1], occ, out=soft[y0:y1, x0:x1])
    texture = np.clip(1.0 + 0.3 * _smooth_noise(rng, size, 0.7 * scale), 0.2, None)
    return image * texture, soft > 0.5, soft


def _diverge(
    nuclei: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Misregister a nuclei image (and its mask) by a large shift or rotation."""
    if kind == "shifted":
        mag = rng.uniform(0.3, 0.5) * size
        ang = rng.uniform(0, 2 * np.pi)
        dy, dx = round(mag * np.sin(ang)), round(mag * np.cos(ang))
        return np.roll(nuclei, (dy, dx), axis=(0, 1)), np.roll(mask, (dy, dx), axis=(0, 1)), {"shift": [dy, dx]}
    if kind == "rotated":
        angle = float(rng.uniform(60.0, 300.0))
        rot = ndimage.rotate(nuclei, angle, reshape=False, order=1, mode="reflect")
        rmask = ndimage.rotate(mask.astype(np.float32), angle, reshape=False, order=1, mode="reflect") > 0.5
        return rot, rmask, {"angle_deg": round(angle, 3)}
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")


def simulate_tile(rng: np.random.Generator, size: int = 64) -> SimulatedTile:
    """Simulate one consistent tile (all three channels from the same tissue).

    Feature sizes (vessel calibre, nucleus radius, halo length) scale with ``sqrt(size / 64)``, so a larger
    tile shows both finer detail and a larger field of view.

    Args:
        rng: numpy random generator (all randomness is drawn from it).
        size: tile side in pixels (>= 16).

    Returns:
        The simulated tile.
    """
    scale = (size / 64.0) ** 0.5
    sd, wall, vid, leak = _vessel_geometry(rng, size, scale)
    vessel_mask = sd < 0
    lumen_mask = sd < -wall
    nuclei_img, nuclei_mask, nuclei_soft = _nuclei(rng, size, scale, sd)

    # vessel (CD31-like): membrane-stained wall peaking mid-wall, dim lumen, autofluorescent background
    wall_profile = np.clip(1.0 - np.abs(sd + wall / 2) / (wall / 2 + 0.7), 0.0, 1.0)
    stain = rng.uniform(0.6, 1.0)
    vessel = stain * wall_profile * np.clip(1.0 + 0.35 * _smooth_noise(rng, size, 1.0 * scale), 0.1, None)
    vessel = vessel + 0.1 * lumen_mask + 0.04 + 0.015 * _smooth_noise(rng, size, 3.0 * scale)

    # np_signal: circulating pool in the vessel, exponential extravasation halo outside, holes at nuclei
    length_scale = float(rng.uniform(2.0, 8.0) * scale)
    dose = rng.uniform(0.6, 1.0)
    amp = dose * leak[vid]
    conc = np.where(sd < 0, 0.6 * amp, amp * np.exp(-np.maximum(sd, 0.0) / length_scale))
    conc = conc * (1.0 - 0.92 * nuclei_soft)
    conc = conc * np.clip(1.0 + 0.4 * _smooth_noise(rng, size, 0.8 * scale), 0.0, None)  # NP aggregates
    np_signal = _shot_noise(rng, conc + 0.01, photons=120.0, read_noise=0.004)
    vessel = _shot_noise(rng, vessel, photons=250.0, read_noise=0.004)
    nuclei = _shot_noise(rng, nuclei_img + 0.02, photons=250.0, read_noise=0.004)
    return SimulatedTile(
        np_signal=np_signal,
        vessel=vessel,
        nuclei=nuclei,
        vessel_mask=vessel_mask,
        lumen_mask=lumen_mask,
        nuclei_mask=nuclei_mask,
        shown_nuclei_mask=nuclei_mask,
        length_scale=length_scale,
    )


def _check_args(n: int, size: int, divergent_fraction: float, kinds: Sequence[str]) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (number of tiles) must be a positive integer, got {n!r}")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size (tile side in pixels) must be an integer >= 16, got {size!r}")
    if not 0.0 <= divergent_fraction <= 1.0:
        raise ValueError(f"divergent_fraction must be in [0, 1], got {divergent_fraction!r}")
    bad = [k for k in kinds if k not in DIVERGENCE_KINDS]
    if bad or not kinds:
        raise ValueError(f"divergence kinds {list(kinds)!r} invalid; expected a non-empty subset of {DIVERGENCE_KINDS}")
    if n < 2 and divergent_fraction > 0 and "swapped" in kinds and set(kinds) == {"swapped"}:
        raise ValueError("'swapped' divergence needs at least 2 tiles")


def simulate(
    n: int = 512,
    size: int = 64,
    divergent_fraction: float = 0.3,
    seed: int = 0,
    divergence_kinds: Sequence[str] = DIVERGENCE_KINDS,
) -> list[SimulatedTile]:
    """Simulate ``n`` tiles in memory (what :func:`generate` writes).

    Tile ``i``'s tissue depends only on ``(seed, i, size)``; exactly ``round(n * divergent_fraction)`` tiles are
    made divergent, the kind cycling through ``divergence_kinds`` in random order.

    Args:
        n: number of tiles.
        size: tile side in pixels.
        divergent_fraction: fraction of divergent tiles in [0, 1].
        seed: random seed.
        divergence_kinds: kinds to use, a subset of :data:`DIVERGENCE_KINDS`.

    Returns:
        The tiles.

    Raises:
        ValueError: invalid arguments.
    """
    _check_args(n, size, divergent_fraction, divergence_kinds)
    tiles = [simulate_tile(np.random.default_rng([seed, i, size]), size) for i in range(n)]
    rng = np.random.default_rng([seed, 7919, n, size])
    n_div = round(n * divergent_fraction)
    chosen = np.sort(rng.permutation(n)[:n_div])
    kinds = [divergence_kinds[j % len(divergence_kinds)] for j in rng.permutation(n_div)]
    originals = [(t.nuclei, t.nuclei_mask) for t in tiles]
    for i, kind in zip(chosen.tolist(), kinds):
        tile = tiles[i]
        if kind == "swapped" and n < 2:
            kind = "shifted"
        if kind == "swapped":
            j = int(rng.integers(0, n - 1))
            j = j + 1 if j >= i else j
            tile.nuclei, tile.shown_nuclei_mask = originals[j]
            tile.divergence_params = {"source": _tile_id(j)}
        else:
            tile.nuclei, tile.shown_nuclei_mask, tile.divergence_params = _diverge(
                originals[i][0], originals[i][1], kind, rng, size
            )
        tile.divergence_kind = kind
    return tiles


def _tile_id(i: int) -> str:
    return f"tile_{i:05d}"


def _to_uint16(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * INTENSITY_GAIN), 0, 65535).astype(np.uint16)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image / 1.2 * 255.0), 0, 255).astype(np.uint8)


def _write_png16(image: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(_to_uint16(image)).save(tmp, format="PNG")


def _preview(tiles: Sequence[SimulatedTile], path: Path, per_group: int = 4) -> None:
    """Montage: rows of consistent and divergent tiles; columns vessel | nuclei | np_signal | merge."""
    consistent = [i for i, t in enumerate(tiles) if t.divergence_kind is None][:per_group]
    divergent = [i for i, t in enumerate(tiles) if t.divergence_kind is not None][:per_group]
    rows = consistent + divergent
    size = tiles[0].vessel.shape[0]
    zoom = max(1, 128 // size)
    cell = size * zoom
    label_w, header_h, pad = 150, 18, 4
    width = label_w + 4 * (cell + pad)
    height = header_h + len(rows) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(["vessel", "nuclei", "np_signal", "merge (R=np G=vessel B=nuclei)"]):
        draw.text((label_w + c * (cell + pad), 3), title[: max(8, cell // 6)], fill=(0, 0, 0))
    for r, i in enumerate(rows):
        t = tiles[i]
        y = header_h + r * (cell + pad)
        label = f"{_tile_id(i)}\n" + ("consistent" if t.divergence_kind is None else f"DIVERGENT: {t.divergence_kind}")
        draw.text((4, y + 4), label + f"\nL = {t.length_scale:.1f} px", fill=(0, 0, 0))
        greys = [_to_uint8(t.vessel), _to_uint8(t.nuclei), _to_uint8(t.np_signal)]
        merge = np.stack([greys[2], greys[0], greys[1]], axis=-1)
        for c, arr in enumerate([*greys, merge]):
            img = Image.fromarray(arr).convert("RGB").resize((cell, cell), Image.NEAREST)
            canvas.paste(img, (label_w + c * (cell + pad), y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _params(n: int, size: int, divergent_fraction: float, seed: int, val_fraction: float, test_fraction: float):
    return {
        "n": int(n),
        "size": int(size),
        "divergent_fraction": float(divergent_fraction),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
    }


def _is_generated(folder: Path) -> bool:
    """Whether ``folder`` holds a dataset written by this generator (safe to replace)."""
    try:
        return read_datalist(folder / DATALIST_NAME).get("generator", {}).get("id") == GENERATOR_ID
    except (OSError, ValueError, AttributeError):
        return False


def generate(
    out_dir: str | os.PathLike,
    n: int = 512,
    size: int = 64,
    divergent_fraction: float = 0.3,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    preview: bool = True,
) -> Path:
    """Generate the synthetic NP dataset into ``out_dir`` (atomically) and return the datalist path.

    The dataset is built in a temporary sibling folder and renamed onto ``out_dir`` when complete. An existing
    ``out_dir`` is replaced only if it is empty or was written by this generator.

    Args:
        out_dir: destination folder.
        n: number of tiles.
        size: tile side in pixels (>= 16; 64 is CPU-friendly, 256 matches the paper).
        divergent_fraction: fraction of tiles whose nuclei channel does not belong to the tile.
        seed: random seed; output is identical for identical arguments.
        val_fraction: fraction of tiles for validation (stratified by divergence).
        test_fraction: fraction of tiles for test (stratified by divergence).
        preview: also write ``preview.png``.

    Returns:
        Path of ``datalist.json`` inside ``out_dir``.

    Raises:
        ValueError: invalid arguments.
        FileExistsError: ``out_dir`` exists, is not empty and does not hold a dataset of this generator.
    """
    out_dir = Path(out_dir)
    params = _params(n, size, divergent_fraction, seed, val_fraction, test_fraction)
    _check_args(n, size, divergent_fraction, DIVERGENCE_KINDS)
    assign_splits([0], val_fraction, test_fraction)  # validates the fractions early
    remove_stale_temporaries(out_dir.parent, out_dir.name)  # a killed generation's half-built folders
    with atomic_folder(out_dir, _is_generated) as tmp:
        tiles = simulate(n, size, divergent_fraction, seed)
        ids = [_tile_id(i) for i in range(n)]
        strata = {ids[i]: t.divergence_kind is not None for i, t in enumerate(tiles)}
        split_of = assign_splits(ids, val_fraction, test_fraction, seed=seed, strata=strata)
        datalist: dict[str, Any] = {
            "name": "synthetic_np",
            "description": "Simulated nanoparticle fluorescence tiles (vessel, nuclei -> np_signal); "
            "see data_prep/synthetic_np.py",
            "generator": {"id": GENERATOR_ID, "version": GENERATOR_VERSION, **params},
            "modalities": list(MODALITIES),
            "target": "np_signal",
            "conditions": ["vessel", "nuclei"],
            "folders": dict(FOLDERS),
            "format": {"file": "png", "dtype": "uint16", "intensity_gain": INTENSITY_GAIN},
            "tensorImageSize": "2D",
            **{s: [] for s in SPLITS},
        }
        for folder in FOLDERS.values():
            (tmp / folder).mkdir()
        for tid, tile in zip(ids, tiles):
            item: dict[str, Any] = {"id": tid}
            for key in MODALITIES:
                rel = f"{FOLDERS[key]}/{tid}.png"
                _write_png16(getattr(tile, key), tmp / rel)
                item[key] = rel
            item["divergent"] = tile.divergence_kind is not None
            item["divergence_kind"] = tile.divergence_kind
            item["divergence_detail"] = ", ".join(f"{k}={v}" for k, v in tile.divergence_params.items())
            item["np_length_scale_px"] = round(tile.length_scale, 4)
            datalist[split_of[tid]].append(item)
        for s in SPLITS:
            datalist[f"num_{s}"] = len(datalist[s])
            datalist[f"num_{s}_divergent"] = sum(i["divergent"] for i in datalist[s])
        if preview:
            _preview(tiles, tmp / PREVIEW_NAME)
        write_datalist(datalist, tmp / DATALIST_NAME)
    return out_dir / DATALIST_NAME


def _is_complete(out_dir: Path, params: dict[str, Any]) -> bool:
    try:
        data = read_datalist(out_dir / DATALIST_NAME)
    except (OSError, ValueError):
        return False
    gen = data.get("generator", {})
    if gen.get("id") != GENERATOR_ID or gen.get("version") != GENERATOR_VERSION:
        return False
    if any(gen.get(k) != v for k, v in params.items()):
        return False
    items = [i for s in SPLITS for i in data.get(s, [])]
    if len(items) != params["n"]:
        return False
    return all((out_dir / item[k]).is_file() for item in items for k in MODALITIES if k in item)


def ensure_dataset(
    out_dir: str | os.PathLike,
    n: int = 512,
    size: int = 64,
    divergent_fraction: float = 0.3,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    preview: bool = True,
) -> Path:
    """Return the datalist of the dataset in ``out_dir``, generating it only if absent or incomplete.

    A dataset counts as present when its datalist was written by this generator with the same parameters and
    every referenced file exists. Otherwise :func:`generate` is called (atomic; see there).

    Args:
        out_dir: dataset folder.
        n, size, divergent_fraction, seed, val_fraction, test_fraction, preview: as for :func:`generate`.

    Returns:
        Path of ``datalist.json`` inside ``out_dir``.

    Raises:
        ValueError: invalid arguments.
        FileExistsError: ``out_dir`` holds something that is not a dataset of this generator.
    """
    out_dir = Path(out_dir)
    params = _params(n, size, divergent_fraction, seed, val_fraction, test_fraction)
    if _is_complete(out_dir, params):
        return out_dir / DATALIST_NAME
    return generate(out_dir, n, size, divergent_fraction, seed, val_fraction, test_fraction, preview)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m data_prep.synthetic_np``).

    Args:
        argv: arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic_np",
        description="Simulate fluorescence tissue tiles with three co-registered channels (vessel, nuclei, "
        "np_signal) as 16-bit PNGs in np/, vessel/, nuclei/, plus datalist.json (training/validation/test, "
        "stratified by divergence) and preview.png. Deterministic for a seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder (replaced if it holds an earlier generated set)")
    parser.add_argument("--n", type=int, default=512, help="number of tiles")
    parser.add_argument("--size", type=int, default=64, help="tile side in pixels (>= 16)")
    parser.add_argument(
        "--divergent-fraction", type=float, default=0.3, help="fraction of tiles whose nuclei channel is divergent"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="test fraction")
    parser.add_argument("--no-preview", action="store_true", help="do not write preview.png")
    parser.add_argument(
        "--if-absent", action="store_true", help="keep an existing complete dataset with the same parameters"
    )
    args = parser.parse_args(argv)
    fn = ensure_dataset if args.if_absent else generate
    t0 = time.perf_counter()
    try:
        path = fn(
            args.out,
            n=args.n,
            size=args.size,
            divergent_fraction=args.divergent_fraction,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            preview=not args.no_preview,
        )
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    data = read_datalist(path)
    counts = ", ".join(f"{s}={len(data[s])} ({data[f'num_{s}_divergent']} divergent)" for s in SPLITS)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
