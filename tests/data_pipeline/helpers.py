"""Builders for data-pipeline tests: metadata parquets, and img2dataset-style download folders without a network."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import skimage.data
from PIL import Image

from data_pipeline.layout import SUMMARY, RunLayout

PHOTO_NAMES = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera"]


def photo(name: str, max_side: int | None = None) -> np.ndarray:
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    pil = Image.fromarray(image[..., :3])
    if max_side and max(pil.size) > max_side:
        s = max_side / max(pil.size)
        pil = pil.resize((round(pil.width * s), round(pil.height * s)))
    return np.asarray(pil)


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def laion_v2_frame(n: int, **overrides) -> pd.DataFrame:
    """n LAION-Aesthetics v2 rows that pass the default filter; columns overridable."""
    data = {
        "URL": [f"http://example.invalid/{i}.jpg" for i in range(n)],
        "TEXT": [f"caption {i}" for i in range(n)],
        "WIDTH": [1024.0] * n,
        "HEIGHT": [768.0] * n,
        "AESTHETIC_SCORE": [6.5] * n,
        "punsafe": [0.01] * n,
        "pwatermark": [0.05] * n,
        "similarity": [0.3] * n,
        "hash": list(range(1000, 1000 + n)),
    }
    data.update(overrides)
    return pd.DataFrame(data)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_download_unit(
    run_dir: Path, images: list[np.ndarray], name: str = "p00000", per_tar: int = 10_000
) -> list[str]:
    """What `download` leaves for part `name`: img2dataset webdataset tars (`<key>.jpg/.txt/.json`),
    `<shard>_stats.json`, the unit's state file, and a one-part filter output. Returns the source keys."""
    folder = Path(run_dir) / "download" / name
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard, start in enumerate(range(0, len(images), per_tar)):
        chunk = images[start : start + per_tar]
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
            for i, image in enumerate(chunk):
                key = f"{shard:05d}{i:04d}"
                keys.append(key)
                meta = {
                    "url": f"http://127.0.0.1/{key}.jpg",
                    "caption": f"photo {key}",
                    "key": key,
                    "status": "success",
                    "aesthetic_score": 6.5,
                    "punsafe": float("nan"),
                    "pwatermark": 0.1,
                }
                _add(tf, f"{key}.jpg", jpeg(image))
                _add(tf, f"{key}.txt", f"photo {key}".encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        (folder / f"{shard:05d}_stats.json").write_text(
            json.dumps({"count": len(chunk), "successes": len(chunk)})
        )
    part_index = int(name[1:6])
    RunLayout(run_dir).write_record("download", name, {"successes": len(images)})
    filtered = Path(run_dir) / "filtered"
    filtered.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"url": ["x"]}).to_parquet(filtered / f"part-{part_index:05d}.parquet")
    (filtered / SUMMARY).write_text(json.dumps({"kept": 1, "parts": part_index + 1}))
    return keys
