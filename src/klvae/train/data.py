"""Image-folder datasets for training and evaluation (numpy + Pillow; shared by both backends).

Batches are a pure function of ``(seed, step, rank)``: no iterator state has to be saved for an exact resume,
and each data-parallel process draws different crops.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from klvae.errors import KLVAEError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DatasetError(KLVAEError):
    """A dataset folder is missing or holds no readable image."""


def list_images(root: str) -> list[str]:
    """Image files under ``root`` (nested folders included), sorted, hidden files skipped."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a folder")
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(folder, f) for f in files
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def load_rgb(path: str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grey is repeated, alpha composited on white)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P") and ("A" in im.mode or "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, rgba)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _readable(paths: Sequence[str]) -> list[str]:
    """Paths whose files decode; the others are skipped with one warning each."""
    from PIL import Image

    good = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
            good.append(p)
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for bad files
            warnings.warn(f"skipping unreadable image {p}: {type(e).__name__}: {e}", stacklevel=3)
    return good


def to_model_input(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (clipped, rounded)."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5, 0, 255)
    return np.round(x).astype(np.uint8).transpose(0, 2, 3, 1)


class ImageFolder:
    """Random crops of the images under a folder: ``batch(index, rank)`` -> (B, 3, crop, crop) float32 in [-1, 1].

    ``crop_size`` may be several sizes, each dividing the largest: batch ``index`` then has size
    ``crop_sizes[index % n]`` and ``batch_size * (largest / size)^2`` crops (the pixels of ``batch_size`` crops of
    the largest size), and ``loss_scale(index)`` is the factor that turns a loss averaged over that batch into
    one averaged over ``batch_size`` images: every pixel weighs the same whatever the size of its crop. A model
    trained on one size can behave differently at others (GroupNorm statistics, zero padding near more of the
    positions of a small image); mixing sizes trains it for both.

    Each crop picks an image (uniformly, or grey images with ``grey_weight`` times a colour image's chance), scales
    it by a random factor in ``[min_scale, 1]`` (never below the crop size), takes a random ``crop_size`` square,
    flips it left-right with probability 1/2, optionally permutes its channels, and with ``color_jitter = j`` maps
    each channel to ``gain * x + offset`` (gain in ``[1 - j, 1]``, offset in ``[0, 1 - gain]`` of the range), which
    recolours colour crops and tints grey ones: on a small dataset of mostly grey images this is what teaches the
    model to carry colour at all. ``saturation_boost = b`` then scales each crop's distance from its per-pixel
    grey (the mean of R, G, B) by a random factor in ``[1, 1 + b]`` (clipped to the 8-bit range): more of the
    saturated colours that photographs have few of (a cat's olive eyes, a red nose), which an L2-trained model
    otherwise pulls toward grey.
    """

    def __init__(self, root: str, crop_size: int | Sequence[int], *, batch_size: int, seed: int = 0,
                 random_flip: bool = True, min_scale: float = 1.0, channel_shuffle: bool = False,
                 color_jitter: float = 0.0, saturation_boost: float = 0.0, grey_weight: float = 1.0,
                 cache: bool = True):
        paths = list_images(root)
        if not paths:
            raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.paths = _readable(paths)
        if not self.paths:
            raise DatasetError(f"{root}: none of the {len(paths)} image files could be read")
        self.crop_sizes = (crop_size,) if isinstance(crop_size, int) else tuple(crop_size)
        self.crop_size = max(self.crop_sizes)
        if any(self.crop_size % size for size in self.crop_sizes):
            raise DatasetError(f"crop sizes {list(self.crop_sizes)}: each must divide the largest")
        self.batch_size, self.seed = batch_size, seed
        self.random_flip, self.min_scale, self.cache = random_flip, min_scale, cache
        self.channel_shuffle, self.color_jitter = channel_shuffle, color_jitter
        self.saturation_boost = saturation_boost
        self._images: dict[int, np.ndarray] = {}
        self._probabilities = None if grey_weight == 1 else self._sampling_probabilities(grey_weight)

    @classmethod
    def from_config(cls, data, seed: int = 0) -> ImageFolder:
        """The training crops a TrainConfig's ``[data]`` section describes (both backends' trainers use this)."""
        return cls(data.train_dir, data.crop_size, batch_size=data.batch_size, seed=seed,
                   random_flip=data.random_flip, min_scale=data.min_scale, channel_shuffle=data.channel_shuffle,
                   color_jitter=data.color_jitter, saturation_boost=data.saturation_boost,
                   grey_weight=data.grey_weight, cache=data.cache_images)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        if index in self._images:
            return self._images[index]
        image = load_rgb(self.paths[index])
        if self.cache:
            self._images[index] = image
        return image

    def _sampling_probabilities(self, grey_weight: float) -> np.ndarray:
        """Per-image draw probabilities with grey images (all channels equal) weighted by ``grey_weight``
        (reads every image once)."""
        grey = np.array([_is_grey(self.image(i)) for i in range(len(self.paths))])
        weights = np.where(grey, grey_weight, 1.0)
        if weights.sum() == 0:
            raise DatasetError(f"every image under the dataset folder is grey and grey_weight is 0: nothing to draw "
                               f"({len(self.paths)} images)")
        return weights / weights.sum()

    def crop_size_of(self, index: int) -> int:
        return self.crop_sizes[index % len(self.crop_sizes)]

    def loss_scale(self, index: int) -> float:
        """``(largest / size)^2`` for batch ``index``: its loss, averaged over its images, times this weighs its
        pixels as the largest size's batch weighs its own."""
        return float((self.crop_size // self.crop_size_of(index)) ** 2)

    def batch(self, index: int, rank: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index, rank])
        size = self.crop_size_of(index)
        count = self.batch_size * (self.crop_size // size) ** 2
        return to_model_input(np.stack([self._crop(rng, size) for _ in range(count)]))

    def _crop(self, rng: np.random.Generator, c: int) -> np.ndarray:
        from PIL import Image

        if self._probabilities is None:
            index = int(rng.integers(len(self.paths)))
        else:
            index = int(rng.choice(len(self.paths), p=self._probabilities))
        image = self.image(index)
        h, w = image.shape[:2]
        scale = float(rng.uniform(self.min_scale, 1.0)) if self.min_scale < 1 else 1.0
        # Cut a window of c / scale pixels and resize it to c (cheaper than resizing the whole image); an image
        # smaller than the crop is upscaled.
        size = min(h, w, max(1, round(c / scale)))
        top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        crop = image[top:top + size, left:left + size]
        if size != c:
            resample = Image.Resampling.BICUBIC if size < c else Image.Resampling.LANCZOS
            crop = np.asarray(Image.fromarray(crop).resize((c, c), resample))
        if self.random_flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        if self.channel_shuffle:
            crop = crop[:, :, rng.permutation(3)]
        if self.color_jitter:
            gain = rng.uniform(1 - self.color_jitter, 1, 3)
            offset = rng.uniform(0, 1, 3) * (1 - gain) * 255
            crop = np.round(crop * gain + offset).astype(np.uint8)
        if self.saturation_boost:
            factor = rng.uniform(1, 1 + self.saturation_boost)
            pixels = crop.astype(np.float32)
            grey = pixels.mean(axis=-1, keepdims=True)
            crop = np.clip(np.round(grey + factor * (pixels - grey)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(crop)


def _is_grey(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def center_crop(image: np.ndarray, size: int | None, multiple: int = 8) -> np.ndarray:
    """Centre crop to ``size`` (or the largest multiple of ``multiple`` when None or larger than the image)."""
    h, w = image.shape[:2]
    th = min(size or h, h) // multiple * multiple
    tw = min(size or w, w) // multiple * multiple
    if th == 0 or tw == 0:
        raise DatasetError(f"image of {h}x{w} pixels is smaller than {multiple} pixels")
    top, left = (h - th) // 2, (w - tw) // 2
    return image[top:top + th, left:left + tw]


def load_eval_images(root: str, size: int | None, multiple: int = 8, limit: int | None = None
                     ) -> tuple[list[str], list[np.ndarray]]:
    """Readable images under ``root``, centre-cropped (see :func:`center_crop`): (paths, uint8 HWC arrays)."""
    paths = list_images(root)
    if not paths:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    paths = _readable(paths)[:limit]
    if not paths:
        raise DatasetError(f"{root}: no readable images")
    return paths, [center_crop(load_rgb(p), size, multiple) for p in paths]
