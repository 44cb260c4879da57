"""Real photographs for offline runs (demo, benchmarks, tests): `skimage.data` images saved as JPEGs, and
LAION-Aesthetics-v2 style metadata rows pointing at them on a loopback server."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import skimage.data
from PIL import Image

# (skimage.data name, caption): real photographs shipped with scikit-image (no download needed).
PHOTOS = [
    ("astronaut", "portrait of an astronaut in a spacesuit in front of the american flag"),
    ("coffee", "a cup of coffee on a saucer on a wooden table"),
    ("chelsea", "a tabby cat sitting and looking to the side"),
    ("rocket", "a rocket on the launch pad under a blue sky"),
    ("hubble_deep_field", "deep space galaxies photographed by the hubble telescope"),
    ("immunohistochemistry", "microscope image of stained tissue"),
    ("retina", "photograph of a human retina"),
    ("camera", "black and white photograph of a cameraman with a tripod"),
]


@dataclass
class DemoRow:
    """One metadata row in LAION-Aesthetics v2 columns."""

    url: str
    text: str
    width: int
    height: int
    aesthetic: float = 6.5
    punsafe: float = 0.01
    pwatermark: float = 0.05


def save_photo(name: str, path: Path, min_side: int = 512) -> tuple[int, int]:
    """Save an skimage.data photograph as JPEG, upscaled so its smaller side is >= min_side; returns (w, h)."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    pil = Image.fromarray(image[..., :3].astype(np.uint8))
    scale = min_side / min(pil.size)
    if scale > 1:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.LANCZOS)
    pil.save(path, format="JPEG", quality=95)
    return pil.size


def build_photo_site(site: Path, base_url_placeholder: str = "{base}") -> list[DemoRow]:
    """Write the demo photos into `site` and return their metadata rows (URLs use a `{base}` placeholder)."""
    site.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, caption in PHOTOS:
        w, h = save_photo(name, site / f"{name}.jpg")
        rows.append(DemoRow(f"{base_url_placeholder}/{name}.jpg", caption, w, h))
    return rows


def demo_filtered_rows(site: Path) -> list[DemoRow]:
    """Rows the filter stage must drop (one per filter), so the demo shows every counter at work."""
    w, h = save_photo("colorwheel", site / "colorwheel.jpg", min_side=1)  # 371x370: below min side
    return [
        DemoRow("{base}/astronaut.jpg", "duplicate url", 512, 512),
        DemoRow("{base}/coffee.jpg", "low aesthetic score", 768, 512, aesthetic=4.0),
        DemoRow("{base}/rocket.jpg", "likely unsafe", 768, 512, punsafe=0.9),
        DemoRow("{base}/chelsea.jpg", "likely watermarked", 768, 512, pwatermark=0.9),
        DemoRow("{base}/colorwheel.jpg", "too small", w, h),
    ]


def write_metadata(rows: list[DemoRow], base_url: str, path: Path) -> Path:
    """A LAION-Aesthetics v2 style parquet (`URL, TEXT, WIDTH, HEIGHT, AESTHETIC_SCORE, punsafe, ...`)."""
    df = pd.DataFrame(
        {
            "URL": [r.url.replace("{base}", base_url) for r in rows],
            "TEXT": [r.text for r in rows],
            "WIDTH": [float(r.width) for r in rows],
            "HEIGHT": [float(r.height) for r in rows],
            "similarity": [0.3] * len(rows),
            "hash": [zlib.crc32((r.url + r.text).encode()) for r in rows],
            "punsafe": [r.punsafe for r in rows],
            "pwatermark": [r.pwatermark for r in rows],
            "AESTHETIC_SCORE": [r.aesthetic for r in rows],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path
