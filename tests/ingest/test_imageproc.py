"""Decode, filter, resize and encode real photographs the way img2dataset does."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest.imageproc import ImageConfig, ImageError, ImageProcessor, sniff_format
from tests.conftest import HTML_PAGE, jpeg_bytes, png_bomb

# Output sizes img2dataset (albumentations SmallestMaxSize / LongestMaxSize, CenterCrop, PadIfNeeded)
# produces at image_size=64 for the `photos` fixture (320x240, 500x400, 800x600, 1024x700, 300x560),
# worked out by hand: e.g. keep_ratio on 1024x700 scales by 64/700, 1024 * 64/700 = 93.6 -> 94.
EXPECTED_64 = {
    "no": [(320, 240), (500, 400), (800, 600), (1024, 700), (300, 560)],
    "keep_ratio": [(85, 64), (80, 64), (85, 64), (94, 64), (64, 119)],
    "keep_ratio_largest": [(64, 48), (64, 51), (64, 48), (64, 44), (34, 64)],
    "center_crop": [(64, 64)] * 5,
    "border": [(64, 64)] * 5,
}
# resize_only_if_bigger at image_size=400: a side already <= 400 is not upscaled.
EXPECTED_400_ONLY_BIGGER = {
    "keep_ratio": [(320, 240), (500, 400), (533, 400), (585, 400), (300, 560)],
    "keep_ratio_largest": [(320, 240), (400, 320), (400, 300), (400, 273), (214, 400)],
}
EXPECTED_400_UPSCALE = {
    "keep_ratio": [(533, 400), (500, 400), (533, 400), (585, 400), (400, 747)],
    "keep_ratio_largest": [(400, 300), (400, 320), (400, 300), (400, 273), (214, 400)],
}


def process(data: bytes, **config) -> tuple:
    """(processed image, its pixels as RGB)."""
    out = ImageProcessor(ImageConfig(**config)).process(data)
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.size == (out.width, out.height)
        rgb = np.asarray(im.convert("RGB"))
    return out, rgb


def rejected(data: bytes, **config) -> ImageError:
    with pytest.raises(ImageError) as info:
        ImageProcessor(ImageConfig(**config)).process(data)
    return info.value


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- resize modes --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(EXPECTED_64))
def test_resize_mode_sizes_match_img2dataset(photos, mode):
    for photo, expected in zip(photos, EXPECTED_64[mode], strict=True):
        out, _ = process(photo.data, image_size=64, resize_mode=mode)
        assert (out.width, out.height) == expected, (photo.name, mode)
        assert (out.original_width, out.original_height) == (photo.width, photo.height)
        assert out.ext == "jpg" and out.data[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest"])
def test_resize_only_if_bigger(photos, mode):
    for photo, small, up in zip(photos, EXPECTED_400_ONLY_BIGGER[mode], EXPECTED_400_UPSCALE[mode], strict=True):
        out, _ = process(photo.data, image_size=400, resize_mode=mode, resize_only_if_bigger=True)
        assert (out.width, out.height) == small, photo.name
        out, _ = process(photo.data, image_size=400, resize_mode=mode)
        assert (out.width, out.height) == up, photo.name


def test_border_does_not_upscale_with_resize_only_if_bigger_but_still_pads(photos):
    out, rgb = process(photos[0].data, image_size=400, resize_mode="border", resize_only_if_bigger=True,
                       output_format="png")
    assert (out.width, out.height) == (400, 400)
    top = (400 - 240) // 2
    assert (rgb[:top] == 255).all() and (rgb[top + 240:] == 255).all()
    assert (rgb[:, :40] == 255).all() and (rgb[:, 360:] == 255).all()
    assert mean_abs_diff(rgb[top:top + 240, 40:360], photos[0].pixels) < 4


@pytest.mark.parametrize("index", range(5))
def test_resized_pixels_are_the_photo(photos, index):
    """Content, not just the size: colours in RGB order, no shift, the DCT-domain downscale exact enough."""
    photo = photos[index]
    out, rgb = process(photo.data, image_size=64, resize_mode="keep_ratio", output_format="png")
    reference = np.asarray(Image.fromarray(photo.pixels).resize((out.width, out.height), Image.Resampling.BOX))
    assert mean_abs_diff(rgb, reference) < 6
    swapped = reference[..., ::-1]
    assert mean_abs_diff(rgb, reference) < mean_abs_diff(rgb, swapped)


@pytest.mark.parametrize("image_size", [300, 340, 700])  # photo 0 (320x240) upscaled by 1.25, 1.42 and 2.92
def test_upscaled_pixels_are_a_lanczos_upscale_of_the_photo(photos, image_size):
    """An upscale below 2x is bicubic, beyond it Lanczos (img2dataset's): either way within what a JPEG encode
    costs (42 dB at q95) of a Lanczos upscale of the photo, where a nearest-neighbour or bilinear one is not."""
    import cv2

    photo = photos[0]
    out, rgb = process(photo.data, image_size=image_size, resize_mode="keep_ratio", output_format="png")
    assert out.height == image_size
    decoded = np.asarray(Image.open(io.BytesIO(photo.data)).convert("RGB"))
    size = (out.width, out.height)
    lanczos = cv2.resize(decoded, size, interpolation=cv2.INTER_LANCZOS4)
    assert cv2.PSNR(rgb, lanczos) > 45  # bicubic 49 dB, bilinear 41 dB, nearest 31-34 dB here
    for worse in (cv2.INTER_NEAREST, cv2.INTER_LINEAR):
        assert cv2.PSNR(cv2.resize(decoded, size, interpolation=worse), lanczos) < cv2.PSNR(rgb, lanczos)


def test_center_crop_takes_the_centre(photos):
    photo = photos[3]  # 1024x700 -> 94x64 -> crop columns 15..79
    _, rgb = process(photo.data, image_size=64, resize_mode="center_crop", output_format="png")
    resized = np.asarray(Image.fromarray(photo.pixels).resize((94, 64), Image.Resampling.BOX))
    centre, left_edge = resized[:, 15:79], resized[:, 0:64]
    assert mean_abs_diff(rgb, centre) < 6
    assert mean_abs_diff(rgb, centre) * 2 < mean_abs_diff(rgb, left_edge)


@pytest.mark.parametrize("index, pad_top, pad_bottom", [(0, 8, 8), (1, 6, 7)])
def test_border_pads_with_white_like_img2dataset(photos, index, pad_top, pad_bottom):
    # 320x240 -> 64x48 (16 rows of padding); 500x400 -> 64x51 (13 rows: 6 on top, 7 below)
    _, rgb = process(photos[index].data, image_size=64, resize_mode="border", output_format="png")
    assert (rgb[:pad_top] == 255).all() and (rgb[64 - pad_bottom:] == 255).all()
    assert not (rgb[pad_top] == 255).all() and not (rgb[63 - pad_bottom] == 255).all()


def test_portrait_border_pads_left_and_right(photos):
    _, rgb = process(photos[4].data, image_size=64, resize_mode="border", output_format="png")  # -> 34x64
    assert (rgb[:, :15] == 255).all() and (rgb[:, 49:] == 255).all()
    assert not (rgb[:, 15] == 255).all()


def test_exif_orientation_is_ignored_as_img2dataset_does():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    data = encode(Image.new("RGB", (60, 40), (200, 30, 30)), "JPEG", exif=exif)
    out, _ = process(data, image_size=20, resize_mode="keep_ratio")
    assert (out.width, out.height, out.original_width, out.original_height) == (30, 20, 60, 40)


# -- other input formats -------------------------------------------------------------------------
def test_png_with_alpha_gets_a_white_background():
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[:, :30] = (0, 0, 255, 0)  # fully transparent blue: must not show
    rgba[:, 30:] = (255, 0, 0, 255)  # opaque red
    rgba[:10, 30:] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    out, rgb = process(encode(Image.fromarray(rgba, "RGBA"), "PNG"), resize_mode="no", output_format="png")
    assert (out.width, out.height) == (60, 40)
    assert (rgb[:, :30] == 255).all()
    assert (rgb[10:, 30:] == (255, 0, 0)).all()
    assert np.abs(rgb[:10, 30:].astype(int) - 127).max() <= 1


def test_webp_with_alpha_gets_a_white_background():
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, 15:] = (0, 0, 255, 255)
    _, rgb = process(encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), resize_mode="no",
                     output_format="png")
    assert (rgb[:, :15] == 255).all() and (rgb[:, 15:] == (0, 0, 255)).all()


def test_gif_with_transparency_gets_a_white_background():
    im = Image.new("P", (30, 20), 0)
    im.putpalette([0, 255, 0] + [0, 0, 255] + [0] * 762)
    im.paste(1, (15, 0, 30, 20))
    data = encode(im, "GIF", transparency=0)
    assert sniff_format(data) == "gif"
    _, rgb = process(data, resize_mode="no", output_format="png")
    assert (rgb[:, :15] == 255).all()
    assert (rgb[:, 15:] == (0, 0, 255)).all()


def test_opaque_gif_keeps_its_colours():
    im = Image.new("RGB", (30, 20), (10, 200, 40)).convert("P", palette=Image.Palette.ADAPTIVE)
    _, rgb = process(encode(im, "GIF"), resize_mode="no", output_format="png")
    assert np.abs(rgb.astype(int) - (10, 200, 40)).max() <= 4


@pytest.mark.parametrize("fmt, params", [("WEBP", {"quality": 95}), ("BMP", {}), ("TIFF", {}), ("PNG", {}),
                                         ("JPEG", {"progressive": True, "quality": 95})])
def test_other_formats_decode(photos, fmt, params):
    source = Image.fromarray(photos[0].pixels)
    out, rgb = process(encode(source, fmt, **params), image_size=64, resize_mode="keep_ratio")
    assert (out.width, out.height, out.original_width, out.original_height) == (85, 64, 320, 240)
    reference = np.asarray(source.resize((85, 64), Image.Resampling.BOX))
    assert mean_abs_diff(rgb, reference) < 6


def test_grayscale_and_cmyk_jpegs_decode_to_colour():
    _, rgb = process(encode(Image.new("L", (40, 30), 90), "JPEG"), resize_mode="no", output_format="png")
    assert rgb.shape == (30, 40, 3) and np.abs(rgb.astype(int) - 90).max() <= 2
    cmyk = encode(Image.new("RGB", (40, 30), (220, 20, 20)).convert("CMYK"), "JPEG", quality=95)
    _, rgb = process(cmyk, resize_mode="no", output_format="png")
    assert np.abs(rgb.astype(int) - (220, 20, 20)).max() <= 12


def test_16_bit_png_keeps_its_tones():
    grey = np.full((20, 30), 32768, np.uint16)  # 50 % grey
    _, rgb = process(encode(Image.fromarray(grey), "PNG"), resize_mode="no", output_format="png")
    assert np.abs(rgb.astype(int) - 128).max() <= 1


# -- broken and hostile input --------------------------------------------------------------------
def test_truncated_jpeg_fails_to_decode(photos):
    e = rejected(photos[1].data[:len(photos[1].data) // 3])
    assert e.status == "failed_to_decode" and "truncated" in str(e)


def with_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """`jpeg` with `thumbnail` (a whole JPEG, with its own end marker) in an APP1 segment after its SOI, as EXIF
    carries one."""
    payload = b"Exif\x00\x00" + thumbnail
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def test_truncated_jpeg_is_found_past_a_thumbnails_end_marker(photos):
    thumbnail = encode(Image.fromarray(photos[0].pixels[:16, :16]), "JPEG")
    whole = with_thumbnail(photos[1].data, thumbnail)
    out, _ = process(whole, image_size=64)  # the whole one decodes...
    assert out.height == 64
    e = rejected(whole[:len(whole) - len(photos[1].data) // 2])  # ...and cut in its scan data, it is truncated
    assert e.status == "failed_to_decode" and "truncated" in str(e)


def test_a_jpeg_followed_by_data_with_end_markers_decodes(photos):
    trailer = b"\x00\x00\x00\x18ftypmp42" + b"\xff\xd9\x12\xff\xd9" * 50  # a motion photo's video, say
    out, _ = process(photos[0].data + trailer, image_size=64)
    assert (out.width, out.height) == (85, 64)


def test_truncated_png_fails_to_decode(photos):
    data = encode(Image.fromarray(photos[0].pixels), "PNG")
    e = rejected(data[:len(data) // 2])
    assert e.status == "failed_to_decode"


def test_jpeg_with_trailing_data_decodes(photos):
    trailer = bytes(range(1, 255)) * 100  # 25 KB without any 0xFF
    out, _ = process(photos[0].data + trailer, image_size=64)
    assert (out.width, out.height) == (85, 64)


def test_small_trailer_after_jpeg_is_tolerated(photos):
    out, _ = process(photos[0].data + b"\x00" * 100, image_size=64)
    assert (out.width, out.height) == (85, 64)


@pytest.mark.parametrize("data", [HTML_PAGE, b"", b"GIF", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                  b"%PDF-1.7\n", b"\x00\x00\x00\x20ftypavif"])
def test_non_images_are_not_an_image(data):
    assert rejected(data).status == "not_an_image"


def test_decompression_bomb_png_is_refused_from_its_header(bomb_png):
    assert len(bomb_png) < 200_000  # small on the wire, 400 megapixels declared
    start = time.perf_counter()
    e = rejected(bomb_png)
    assert e.status == "too_large" and "decompression bomb" in str(e)
    assert time.perf_counter() - start < 0.5  # decoding 400 Mpx would take seconds


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_over_max_decode_pixels_but_under_pillows_limit_is_refused():
    bomb = png_bomb(10000, 10000)  # 100 Mpx: Pillow only warns, the crawl's own limit must refuse it
    start = time.perf_counter()
    e = rejected(bomb)
    assert e.status == "too_large" and "10000x10000" in str(e) and "max_decode_pixels" in str(e)
    assert time.perf_counter() - start < 0.5


def _with_declared_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF0 frame header claiming another size."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def test_jpeg_declaring_huge_dimensions_is_refused_without_decoding(photos):
    bomb = _with_declared_size(photos[0].data, 65000, 65000)  # 4.2 Gpx: decoding would exhaust memory
    start = time.perf_counter()
    e = rejected(bomb)
    assert e.status == "too_large" and "65000x65000" in str(e)
    assert time.perf_counter() - start < 0.1


def test_max_decode_pixels_is_configurable(photos):
    e = rejected(photos[2].data, max_decode_pixels=800 * 600 - 1)
    assert e.status == "too_large" and "max_decode_pixels=479999" in str(e)
    out, _ = process(photos[2].data, image_size=64, max_decode_pixels=800 * 600)
    assert out.original_width == 800
    e = rejected(encode(Image.fromarray(photos[2].pixels), "PNG"), max_decode_pixels=1000)
    assert e.status == "too_large"


# -- filters -------------------------------------------------------------------------------------
def test_min_image_size_filters_on_the_smaller_side(photos):
    e = rejected(photos[0].data, min_image_size=241)  # 320x240
    assert e.status == "filtered" and "too small" in str(e)
    assert process(photos[0].data, image_size=64, min_image_size=240)[0].width == 85


def test_max_image_area(photos):
    e = rejected(photos[2].data, max_image_area=800 * 600 - 1)
    assert e.status == "filtered" and "area 480000" in str(e)
    assert process(photos[2].data, image_size=64, max_image_area=800 * 600)[0].height == 64


def test_max_aspect_ratio(photos):
    e = rejected(photos[4].data, max_aspect_ratio=1.8)  # 300x560: 1.87
    assert e.status == "filtered" and "aspect ratio 1.87" in str(e)
    assert process(photos[4].data, image_size=64, max_aspect_ratio=1.9)[0].width == 64


def test_filters_apply_to_non_jpeg_input_too(photos):
    png = encode(Image.fromarray(photos[0].pixels), "PNG")
    assert rejected(png, min_image_size=300).status == "filtered"


# -- output formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, magic", [("webp", b"RIFF"), ("png", b"\x89PNG")])
def test_output_formats(photos, fmt, magic):
    out, rgb = process(photos[1].data, image_size=64, output_format=fmt)
    assert out.ext == fmt and out.data.startswith(magic)
    assert sniff_format(out.data) == {"webp": "webp", "png": "png"}[fmt]
    assert (out.width, out.height) == (80, 64)
    reference = np.asarray(Image.fromarray(photos[1].pixels).resize((80, 64), Image.Resampling.BOX))
    assert mean_abs_diff(rgb, reference) < 6


def test_encode_quality_trades_size_for_fidelity(photos):
    low, low_rgb = process(photos[3].data, image_size=256, encode_quality=20)
    high, high_rgb = process(photos[3].data, image_size=256, encode_quality=95)
    assert len(low.data) < len(high.data) / 2
    reference = np.asarray(Image.fromarray(photos[3].pixels).resize((high.width, high.height), Image.Resampling.BOX))
    assert mean_abs_diff(high_rgb, reference) < mean_abs_diff(low_rgb, reference)


def test_jpeg_round_trip_keeps_most_detail(photos):
    data = jpeg_bytes(photos[0].pixels, quality=95)
    _, rgb = process(data, resize_mode="no", output_format="png")
    assert mean_abs_diff(rgb, photos[0].pixels) < 3


@pytest.mark.parametrize("data, fmt", [
    (b"\xff\xd8\xff\xe0rest", "jpeg"), (b"\x89PNG\r\n\x1a\nrest", "png"), (b"GIF89a..", "gif"),
    (b"GIF87a..", "gif"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"), (b"BM\x00\x00", "bmp"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (HTML_PAGE, None), (b"RIFF\x00\x00\x00\x00WAVE", None),
])
def test_sniff_format_trusts_magic_bytes_only(data, fmt):
    assert sniff_format(data) == fmt


def test_damaged_jpegs_are_an_image_error_or_an_image_never_a_crash(photos):
    """Bytes flipped, zeroed, cut and repeated anywhere in real JPEGs (headers, tables, scan data): each either
    decodes to an image of the header's size or is an ImageError with a row status, as OpenCV's decoder alone
    gave before (the same statuses, the same pixels)."""
    import random

    import cv2

    from pipelines.ingest.imageproc import _JPEG_FLAGS

    rng = random.Random(7)
    statuses, decoded = set(), 0
    for photo in photos[:3]:
        data = photo.data
        for _ in range(60):
            damaged = bytearray(data)
            how = rng.randrange(5)
            at = rng.randrange(2, len(data) - 2)
            if how == 0:  # bytes changed
                for i in rng.sample(range(2, len(data)), 8):
                    damaged[i] = rng.randrange(256)
            elif how == 1:  # a run of zeros
                damaged[at:at + 64] = bytes(len(damaged[at:at + 64]))
            elif how == 2:  # cut, but with an end marker
                damaged = damaged[:at] + data[-2:]
            elif how == 3:  # a run repeated
                damaged = damaged[:at] + data[max(2, at - 200):at] + damaged[at:]
            else:  # a run left out
                del damaged[at:at + rng.randrange(1, 400)]
            damaged = bytes(damaged)
            processor = ImageProcessor(ImageConfig(image_size=64, output_format="png"))
            try:
                pixels, width, height = processor.decode(damaged)
            except ImageError as exc:
                statuses.add(exc.status)
                continue
            assert pixels.ndim == 3 and pixels.shape[2] == 3
            f = 1
            while f < 8 and width // (2 * f) >= processor.target_size(width, height)[0] \
                    and height // (2 * f) >= processor.target_size(width, height)[1]:
                f *= 2
            reference = cv2.imdecode(np.frombuffer(damaged, np.uint8), _JPEG_FLAGS[f])
            if reference is not None:  # what OpenCV's decoder made of the same bytes
                assert reference.shape == pixels.shape and np.array_equal(reference, pixels)
            processor.process(damaged)  # and the rest of the way
            decoded += 1
    assert statuses <= {"failed_to_decode", "not_an_image", "too_large", "filtered"}
    assert "failed_to_decode" in statuses and decoded > 20  # both outcomes were met
