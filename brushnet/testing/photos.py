"""The colour photographs shipped with scikit-image, split into training and held-out photos, as random crops.

The tiny generating base (:mod:`brushnet.testing.tiny_base`) and ``make demo``'s branch train only on
:data:`TRAIN_PHOTOS`; every held-out number (VAE PSNR, masked-region PSNR of the demo) uses :data:`HELD_OUT_PHOTOS`.
"""

from __future__ import annotations

import numpy as np

# name -> caption. `skimage.data.cat` is the same picture as `chelsea`. The held-out photos are the two views of
# `stereo_motorcycle`: the only colour photographs that neither these training photos nor the data pipeline's
# demo set (data_pipeline/tools/demo.py, what `make demo` trains the branch on) contain.
TRAIN_PHOTOS: dict[str, str] = {
    "astronaut": "an astronaut in a white suit",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a tabby cat",
    "rocket": "a rocket on a launch pad",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained cells under a microscope",
    "retina": "a photograph of a retina",
    "colorwheel": "a colour wheel",
}
HELD_OUT_PHOTOS: dict[str, str] = {
    "motorcycle_left": "a red motorcycle in a garage",
    "motorcycle_right": "a red motorcycle in a garage",
}


def load_photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from ``skimage.data`` (``motorcycle_left/right``: the views of ``stereo_motorcycle``)."""
    import skimage.data

    if name.startswith("motorcycle_"):
        arr = skimage.data.stereo_motorcycle()[name == "motorcycle_right"]
    else:
        arr = getattr(skimage.data, name)()
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def resize_short_side(rgb: np.ndarray, size: int) -> np.ndarray:
    import PIL.Image

    image = PIL.Image.fromarray(rgb)
    scale = size / min(image.size)
    new = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    return np.asarray(image.resize(new, PIL.Image.BICUBIC))


def center_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """The centre square of a photo at ``size`` x ``size``."""
    small = resize_short_side(rgb, size)
    h, w = small.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return small[top : top + size, left : left + size]


class PhotoCrops:
    """Random ``size`` px crops of photos: a random scale (short side 1x-``max_zoom``x the crop), position
    and horizontal flip; each photo equally likely. Deterministic given the generator's seed."""

    def __init__(self, names: dict[str, str], size: int, scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)):
        self.size = size
        self.captions = list(names.values())
        photos = [load_photo(n) for n in names]
        self.pyramids = [[resize_short_side(p, round(size * s)) for s in scales] for p in photos]

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """``n`` crops as float32 NCHW in [-1, 1] and their captions."""
        out = np.empty((n, self.size, self.size, 3), np.uint8)
        captions = []
        for i in range(n):
            p = int(rng.integers(len(self.pyramids)))
            level = self.pyramids[p][int(rng.integers(len(self.pyramids[p])))]
            h, w = level.shape[:2]
            top, left = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
            crop = level[top : top + self.size, left : left + self.size]
            out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
            captions.append(self.captions[p])
        return to_tensor_range(out), captions


def to_tensor_range(rgb: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return (rgb.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


def image_statistics(x: np.ndarray) -> dict[str, float]:
    """Statistics that tell photo crops from noise, on float images in [-1, 1] (NCHW).

    ``std``: pixel standard deviation; ``roughness``: mean |difference of horizontal/vertical neighbours|
    divided by the pixel std (about 1.13 for i.i.d. Gaussian noise, well below 0.5 for photo crops).
    """
    std = float(x.std())
    dx = np.abs(np.diff(x, axis=-1)).mean()
    dy = np.abs(np.diff(x, axis=-2)).mean()
    return {
        "mean": float(x.mean()),
        "std": std,
        "roughness": float((dx + dy) / 2 / max(std, 1e-8)),
    }


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), optionally only where ``mask`` is true."""
    err = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(err[np.broadcast_to(mask, err.shape)].mean()) if mask is not None else float(err.mean())
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))
