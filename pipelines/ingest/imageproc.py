"""Decode, check, resize and re-encode one downloaded image.

Resize modes and filters have img2dataset's meanings. JPEGs (nearly all of the web's photos) are
decoded by libjpeg-turbo (simplejpeg's TurboJPEG; OpenCV's decoder where TurboJPEG cannot give BGR) with DCT-domain
downscaling: the decoder produces the image at 1/2, 1/4 or 1/8 of its size directly when the target allows it
(about twice as fast as a full decode followed by a resize, measured in benchmarks/crawl_images.py). The header
is read first, so the decompression-bomb limit and the size filters cost no pixel work. Other formats go
through Pillow. Resizing and encoding are OpenCV's. Both decoders and OpenCV release the GIL while they work,
so a thread pool uses every core. Pixels are BGR, OpenCV's order, throughout.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile

from pipelines.ingest.config import ImageConfig, ResizeMode  # noqa: F401

cv2.setNumThreads(1)  # parallelism comes from the caller's thread pool, one image per thread
ImageFile.LOAD_TRUNCATED_IMAGES = False

# EXIF orientation is ignored, as img2dataset does, so stored sizes match the header's.
_JPEG_FLAGS = {f: flag | cv2.IMREAD_IGNORE_ORIENTATION for f, flag in {
    1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8}.items()}


def _has_jpeg_end(data: bytes) -> bool:
    """Whether the main image's entropy-coded data is followed by EOI (FFD9).

    libjpeg only warns on a truncated stream and OpenCV returns the image padded with grey, so
    truncation is checked here. The marker segments are walked up to the first start-of-scan, past
    any EXIF thumbnail (which has its own EOI); FFD9 cannot occur inside entropy-coded data (0xFF is
    stuffed), and bytes after EOI (motion photos append a video) are allowed.
    """
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan; an EOI is normally the last two bytes: looked for from the end
            return data.rfind(b"\xff\xd9", i) != -1  # (a forward search took 38 us an image, holding the GIL)
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


class ImageError(Exception):
    """An image that cannot be stored; `status` is the row status to record."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def sniff_format(data: bytes) -> str | None:
    """The image format from its magic bytes; servers' Content-Type headers are not trusted."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


class ImageProcessor:
    """Turns downloaded bytes into a stored image, or raises ImageError with the row status."""

    def __init__(self, config: ImageConfig):
        self.config = config
        self.ext = config.output_format

    # -- sizes -------------------------------------------------------------------------------
    def check_size(self, width: int, height: int) -> None:
        c = self.config
        if width <= 0 or height <= 0:
            raise ImageError("failed_to_decode", f"invalid dimensions {width}x{height}")
        if width * height > c.max_decode_pixels:
            raise ImageError("too_large", f"decompression bomb: {width}x{height} pixels exceeds "
                                          f"max_decode_pixels={c.max_decode_pixels}")
        if min(width, height) < c.min_image_size:
            raise ImageError("filtered", f"image too small: {width}x{height} < min_image_size={c.min_image_size}")
        if c.max_image_area is not None and width * height > c.max_image_area:
            raise ImageError("filtered", f"image area {width * height} > max_image_area={c.max_image_area:g}")
        if c.max_aspect_ratio is not None and max(width, height) / min(width, height) > c.max_aspect_ratio:
            raise ImageError("filtered", f"aspect ratio {max(width, height) / min(width, height):.2f} > "
                                         f"max_aspect_ratio={c.max_aspect_ratio:g}")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, before any crop or border."""
        c = self.config
        if c.resize_mode == "no":
            return width, height
        side = min(width, height) if c.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
        if c.resize_only_if_bigger and side <= c.image_size:
            return width, height
        scale = c.image_size / side
        return max(1, round(width * scale)), max(1, round(height * scale))

    # -- decode ------------------------------------------------------------------------------
    def decode(self, data: bytes) -> tuple[np.ndarray, int, int]:
        """BGR pixels (possibly already downscaled towards the target) and the original size."""
        fmt = sniff_format(data)
        if fmt is None:
            raise ImageError("not_an_image", f"not an image: content starts with {data[:16]!r}")
        if fmt == "jpeg":
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                return self._decode_pillow(data)
            self.check_size(width, height)
            if not _has_jpeg_end(data):
                raise ImageError("failed_to_decode", "truncated JPEG: no end-of-image marker")
            tw, th = self.target_size(width, height)
            f = 1  # largest power-of-two DCT scale-down that keeps both sides >= the target
            while f < 8 and width // (2 * f) >= tw and height // (2 * f) >= th:
                f *= 2
            try:  # the same libjpeg-turbo decode as OpenCV's, to the same pixels, in 17% less time (0.81 vs 0.97 ms)
                pixels = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=False,
                                                min_width=-(-width // f), min_height=-(-height // f))
            except ValueError:  # what TurboJPEG does not decode to BGR (CMYK, YCCK): OpenCV's full decoder
                pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _JPEG_FLAGS[f])
            if pixels is None:
                raise ImageError("failed_to_decode", "corrupt JPEG")
            return pixels, width, height
        return self._decode_pillow(data)

    def _decode_pillow(self, data: bytes) -> tuple[np.ndarray, int, int]:
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                self.check_size(width, height)
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    # 16/32-bit greyscale: scale to 8 bits (convert("RGB") would clip at 255).
                    wide = np.asarray(im, dtype=np.float32)
                    sixteen_bit = im.mode.startswith("I;16") or wide.max() > 255
                    grey = (wide / 257.0 if sixteen_bit else wide).clip(0, 255).astype(np.uint8)
                    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), width, height
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    canvas.alpha_composite(rgba)
                    rgb = canvas.convert("RGB")
                else:
                    rgb = im.convert("RGB")
                return cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR), width, height
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError("too_large", f"decompression bomb: {exc}") from exc
        except Exception as exc:  # Pillow raises many types for corrupt input (OSError, SyntaxError, ...)
            raise ImageError("failed_to_decode", f"{type(exc).__name__}: {exc}") from exc

    # -- resize and encode -------------------------------------------------------------------
    def resize(self, pixels: np.ndarray, width: int, height: int) -> np.ndarray:
        c = self.config
        tw, th = self.target_size(width, height)
        h, w = pixels.shape[:2]
        if (w, h) != (tw, th):
            # After the DCT scale-down the remaining factor is below 2, where bilinear is within
            # 45 dB PSNR of an exact area resize (less than the JPEG encode's own error) and 4x faster
            # than INTER_AREA at non-integer factors. Larger factors (non-JPEG input) get INTER_AREA.
            # Upscaling by less than 2 is bicubic: within 47.6-51.1 dB PSNR of Lanczos4 (medians, 41.8 dB at
            # worst) where the JPEG q95 encode after it is within 41.8-43.4 dB, and 0.1-0.2 ms an image against
            # OpenCV's Lanczos4 at 1.3-2.3 ms (unvectorised), which made the 9% of a crawl's photos that are
            # upscaled a sixth of its decode threads' time. Larger factors get Lanczos4, as in img2dataset.
            if tw > w or th > h:
                interp = cv2.INTER_CUBIC if tw < 2 * w and th < 2 * h else cv2.INTER_LANCZOS4
            elif w >= 2 * tw or h >= 2 * th:
                interp = cv2.INTER_AREA
            else:
                interp = cv2.INTER_LINEAR
            pixels = cv2.resize(pixels, (tw, th), interpolation=interp)
        if c.resize_mode == "center_crop":
            s = c.image_size
            top, left = max(0, (th - s) // 2), max(0, (tw - s) // 2)
            pixels = pixels[top:top + s, left:left + s]
        elif c.resize_mode == "border":
            s = c.image_size
            dh, dw = max(0, s - th), max(0, s - tw)
            if dh or dw:
                pixels = cv2.copyMakeBorder(pixels, dh // 2, dh - dh // 2, dw // 2, dw - dw // 2,
                                            cv2.BORDER_CONSTANT, value=(255, 255, 255))
        return np.ascontiguousarray(pixels)

    def encode(self, pixels: np.ndarray) -> bytes:
        c = self.config
        if c.output_format == "jpg":
            params = [cv2.IMWRITE_JPEG_QUALITY, c.encode_quality]  # 4:2:0, as img2dataset writes
        elif c.output_format == "webp":
            params = [cv2.IMWRITE_WEBP_QUALITY, max(1, c.encode_quality)]
        else:
            params = [cv2.IMWRITE_PNG_COMPRESSION, min(9, c.encode_quality // 10)]
        ok, buf = cv2.imencode("." + c.output_format, pixels, params)
        if not ok:
            raise ImageError("failed_to_decode", f"could not encode as {c.output_format}")
        return buf.tobytes()

    def process(self, data: bytes) -> ProcessedImage:
        pixels, width, height = self.decode(data)
        out = self.resize(pixels, width, height)
        return ProcessedImage(self.encode(out), self.ext, int(out.shape[1]), int(out.shape[0]), width, height)

