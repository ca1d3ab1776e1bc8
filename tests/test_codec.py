"""Image payloads: declared sizes read before decoding, decode/encode round trips, bad files."""
import struct
import zlib

import cv2
import numpy as np
import pytest

from pg2_server.codec import SourceCache, declared_size, decode_image, decode_photo, encode_image, sniff_format
from pg2_server.detection import read_photo
from pg2_server.drawing import read_rgb
from pg2_server.wire.protocol import ImageSpec, OutputSpec, ProtocolError


def rgb(width=20, height=12):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 10 % 256, y * 20 % 256, (x + y) * 5 % 256], axis=2).astype(np.uint8)


def encoded(image, ext):
    ok, data = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def png_header_only(width, height):
    """A PNG signature and IHDR chunk that declare a size, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_declared_sizes_of_png_and_jpeg():
    image = rgb(37, 23)
    assert sniff_format(encoded(image, ".png")) == "png"
    assert declared_size(encoded(image, ".png"), "png") == (37, 23)
    assert sniff_format(encoded(image, ".jpg")) == "jpeg"
    assert declared_size(encoded(image, ".jpg"), "jpeg") == (37, 23)
    assert sniff_format(b"GIF89a") is None


def test_png_round_trip_is_exact_and_jpeg_is_close():
    image = rgb()
    assert np.array_equal(decode_image(encoded(image, ".png"), ImageSpec("png"), 4096), image)
    jpeg = decode_image(encoded(image, ".jpg"), ImageSpec("jpeg", 20, 12), 4096)
    assert jpeg.shape == (12, 20, 3) and np.abs(jpeg.astype(int) - image).mean() < 12


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF segment holding only an Orientation tag, as a phone writes it."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:]


def test_a_portrait_phone_photo_is_decoded_upright():
    # stored 20×12 (landscape) with orientation 6: shown, and decoded, 12×20 turned clockwise
    stored = encoded(rgb(), ".jpg")
    upright = decode_image(with_exif_orientation(stored, 6), ImageSpec("jpeg", 20, 12), 4096)
    plain = decode_image(stored, ImageSpec("jpeg", 20, 12), 4096)
    assert upright.shape == (20, 12, 3)
    assert np.array_equal(upright, cv2.rotate(plain, cv2.ROTATE_90_CLOCKWISE))


def cut_out_png() -> bytes:
    """A 4×2 RGBA PNG: an opaque red person, a half-transparent edge, a transparent black background."""
    bgra = np.zeros((2, 4, 4), np.uint8)
    bgra[:, 0] = (0, 0, 200, 255)
    bgra[:, 1] = (0, 0, 200, 128)
    ok, data = cv2.imencode(".png", bgra)
    assert ok
    return data.tobytes()


def test_a_cut_out_persons_transparent_background_becomes_the_white_backdrop():
    image = decode_image(cut_out_png(), ImageSpec("png", 4, 2), 4096)
    assert image.shape == (2, 4, 3)
    assert image[0, 0].tolist() == [200, 0, 0]                            # the person as it is
    assert image[0, 1].tolist() == [round(200 * 128 / 255 + 255 * 127 / 255), 127, 127]
    assert (image[:, 2:] == 255).all()                                     # not the hidden black


def test_a_transparent_webp_is_over_the_white_backdrop_too():
    bgra = cv2.imdecode(np.frombuffer(cut_out_png(), np.uint8), cv2.IMREAD_UNCHANGED)
    ok, webp = cv2.imencode(".webp", bgra, [cv2.IMWRITE_WEBP_QUALITY, 101])   # lossless
    assert ok
    assert np.array_equal(decode_photo(webp.tobytes()), decode_photo(cut_out_png()))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "JPEG"])
def test_every_exif_orientation_is_applied_in_every_format(fmt):
    """A phone saves portraits sideways with an orientation tag: decoded as a viewer shows them."""
    import io

    from PIL import Image, ImageOps
    stored = np.zeros((40, 20, 3), np.uint8)
    stored[:5, :5] = 255                      # a corner that shows which way round it is
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
        with Image.open(io.BytesIO(buffer.getvalue())) as photo:
            shown = np.asarray(ImageOps.exif_transpose(photo).convert("RGB")).astype(int)
        decoded = decode_photo(buffer.getvalue())
        assert decoded.shape == shown.shape and np.abs(decoded - shown).mean() < 10, (fmt, orientation)


def test_a_transparent_tiff_is_over_the_white_backdrop_too():
    bgra = cv2.imdecode(np.frombuffer(cut_out_png(), np.uint8), cv2.IMREAD_UNCHANGED)
    ok, tiff = cv2.imencode(".tiff", bgra)
    assert ok
    assert np.array_equal(decode_photo(tiff.tobytes()), decode_photo(cut_out_png()))


def test_16_bit_and_float_tiffs_are_read_as_8_bit_rgb():
    bgr = np.zeros((6, 8, 3), np.float32)
    bgr[..., 2], bgr[..., 1] = 0.8, 0.2           # red 0.8, green 0.2
    bgr[0, 0] = (0.5, 2.0, -1.0)                  # out of 0–1: clipped
    # (OpenCV's float TIFFs read back a level or two off what was written)
    for stored in (bgr, (np.clip(bgr, 0, 1) * 65535).astype(np.uint16)):
        ok, tiff = cv2.imencode(".tiff", stored)
        assert ok
        rgb = decode_photo(tiff.tobytes())
        assert rgb.dtype == np.uint8 and rgb.shape == (6, 8, 3), stored.dtype
        assert np.abs(rgb[1, 1].astype(int) - (204, 51, 0)).max() <= 3, (stored.dtype, rgb[1, 1])
        assert np.abs(rgb[0, 0].astype(int) - (0, 255, 128)).max() <= 3, (stored.dtype, rgb[0, 0])
    ok, tiff = cv2.imencode(".tiff", np.dstack([bgr, np.full((6, 8), 0.5, np.float32)]))   # half transparent
    assert np.abs(decode_photo(tiff.tobytes())[1, 1].astype(int) - (229, 153, 127)).max() <= 2


def test_a_photo_in_a_phones_display_p3_is_read_in_srgb():
    """The same colours saved in Display P3 with its profile (as iPhones do) decode as sRGB."""
    import importlib.util
    import io
    from pathlib import Path

    from PIL import Image, ImageCms
    spec = importlib.util.find_spec("bpy")   # Blender ships the profile; nothing is downloaded
    icc = Path(spec.origin).parent / "5.0/datafiles/colormanagement/icc/srgb_p3d65_display.icc" if spec else None
    if icc is None or not icc.is_file():
        pytest.skip("needs a Display P3 profile (bpy's)")
    colours = np.array([[[200, 30, 30], [224, 172, 140], [40, 160, 60], [40, 70, 140]]], np.uint8)
    srgb = Image.fromarray(np.repeat(np.repeat(colours, 16, 0), 16, 1))
    p3 = ImageCms.ImageCmsProfile(str(icc))
    in_p3 = ImageCms.profileToProfile(srgb, ImageCms.createProfile("sRGB"), p3, outputMode="RGB")
    buffer = io.BytesIO()
    in_p3.save(buffer, "PNG", icc_profile=p3.tobytes())
    assert np.abs(np.asarray(in_p3)[8, 8::16].astype(int) - colours[0]).max() > 15   # P3 numbers differ
    decoded = decode_photo(buffer.getvalue())[8, 8::16].astype(int)
    assert np.abs(decoded - colours[0]).max() <= 2


@pytest.mark.parametrize("read", [read_rgb, read_photo], ids=["read_rgb", "detection.read_photo"])
def test_every_photo_reader_sees_a_file_as_the_server_does(read, tmp_path):
    path = tmp_path / "cut-out.png"
    path.write_bytes(cut_out_png())
    assert np.array_equal(read(path), decode_photo(cut_out_png()))
    path = tmp_path / "portrait.jpg"
    path.write_bytes(with_exif_orientation(encoded(rgb(), ".jpg"), 6))
    assert read(path).shape == (20, 12, 3)


def test_sixteen_bit_and_grey_pngs_become_8_bit_rgb():
    ok, data = cv2.imencode(".png", np.full((3, 5, 3), 40000, np.uint16))
    assert ok
    assert np.array_equal(decode_photo(data.tobytes()), np.full((3, 5, 3), round(40000 / 257), np.uint8))
    bgra = np.zeros((2, 4, 4), np.uint16)             # the cut-out person, 16 bits a channel
    bgra[:, 0], bgra[:, 1] = (0, 0, 200 * 257, 65535), (0, 0, 200 * 257, 128 * 257)
    ok, data = cv2.imencode(".png", bgra)
    assert np.array_equal(decode_photo(data.tobytes()), decode_photo(cut_out_png()))
    ok, data = cv2.imencode(".png", np.arange(15, dtype=np.uint8).reshape(3, 5))
    assert ok
    grey = decode_photo(data.tobytes())
    assert grey.shape == (3, 5, 3) and (grey[:, :, 0] == np.arange(15).reshape(3, 5)).all()
    assert decode_photo(b"\x89PNG\r\n\x1a\nnot really") is None


def test_raw_source_is_viewed_without_copying_rules():
    image = rgb(4, 3)
    decoded = decode_image(image.tobytes(), ImageSpec("raw", 4, 3), 4096)
    assert np.array_equal(decoded, image)


def test_a_huge_declared_png_is_refused_before_decoding():
    with pytest.raises(ProtocolError) as caught:
        decode_image(png_header_only(100_000, 100_000), ImageSpec("png"), 4096)
    assert caught.value.code == "too_large" and "100000×100000" in caught.value.message


@pytest.mark.parametrize("data, spec, words", [
    (b"\x89PNG\r\n\x1a\nnot really", ImageSpec("png"), "header is unreadable"),
    (png_header_only(20, 12), ImageSpec("png"), "cannot be decoded"),
    (b"GIF89a" + b"\x00" * 30, ImageSpec("png"), "not a PNG"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 30, ImageSpec("png"), "looks like JPEG"),
    (png_header_only(0, 12), ImageSpec("png"), "declares a size of 0×12"),
])
def test_undecodable_sources_are_bad_requests(data, spec, words):
    with pytest.raises(ProtocolError) as caught:
        decode_image(data, spec, 4096, request_id=3)
    assert (caught.value.code, caught.value.id) == ("bad_request", 3)
    assert words in caught.value.message


def test_declared_width_must_match_the_file():
    with pytest.raises(ProtocolError, match="says 30×12 but the PNG file is 20×12"):
        decode_image(encoded(rgb(), ".png"), ImageSpec("png", 30, 12), 4096)


def test_truncated_png_is_a_bad_request():
    data = encoded(rgb(64, 64), ".png")
    with pytest.raises(ProtocolError) as caught:
        decode_image(data[: len(data) // 2], ImageSpec("png"), 4096)
    assert caught.value.code == "bad_request"


@pytest.mark.parametrize("fmt", ["png", "raw", "jpeg"])
def test_encode_with_and_without_alpha(fmt):
    image = rgb()
    alpha = np.zeros((12, 20), np.uint8)
    alpha[:, 10:] = 255
    with_alpha = fmt != "jpeg"
    data, spec = encode_image(image, alpha if with_alpha else None, OutputSpec(fmt, with_alpha), "g1")
    assert (spec.format, spec.width, spec.height, spec.stage) == (fmt, 20, 12, "g1")
    assert spec.channels == (4 if with_alpha else 3)
    if fmt == "raw":
        pixels = np.frombuffer(data, np.uint8).reshape(12, 20, 4)
    else:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        pixels = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA if with_alpha else cv2.COLOR_BGR2RGB)
    if fmt != "jpeg":
        assert np.array_equal(pixels[:, :, :3], image)
        assert np.array_equal(pixels[:, :, 3], alpha)
    else:
        assert np.abs(pixels.astype(int) - image).mean() < 12


def test_source_cache_decodes_each_distinct_source_once():
    first, second, third = encoded(rgb(), ".png"), encoded(rgb()[::-1].copy(), ".png"), encoded(rgb() // 2, ".png")
    # room for two of them: decoded pixels and the payloads they came from
    cache = SourceCache(max_bytes=2 * 20 * 12 * 3 + len(first) + max(len(second), len(third)))
    a = cache.decode(first, ImageSpec("png"), 4096)
    assert cache.decode(memoryview(bytes(first)), ImageSpec("png"), 4096) is a and (cache.hits, cache.misses) == (1, 1)
    assert not a.flags.writeable and np.array_equal(a, rgb())
    cache.decode(second, ImageSpec("png"), 4096)
    cache.decode(third, ImageSpec("png"), 4096)  # over two images' worth: the least recent goes
    assert cache.decode(first, ImageSpec("png"), 4096) is not a and cache.misses == 4
    raw = rgb().tobytes()
    assert np.array_equal(cache.decode(raw, ImageSpec("raw", 20, 12), 4096), rgb())
    with pytest.raises(ProtocolError):
        cache.decode(first[:40], ImageSpec("png"), 4096)  # errors are never cached


def test_source_cache_never_answers_with_another_payload_of_the_same_checksum(monkeypatch):
    from pg2_server import codec

    monkeypatch.setattr(codec.zlib, "crc32", lambda data: 7)   # every payload collides
    cache = SourceCache(max_bytes=1 << 20)
    one, other = rgb(), rgb()[::-1].copy()
    assert np.array_equal(cache.decode(one.tobytes(), ImageSpec("raw", 20, 12), 4096), one)
    assert np.array_equal(cache.decode(other.tobytes(), ImageSpec("raw", 20, 12), 4096), other)
    assert np.array_equal(cache.decode(one.tobytes(), ImageSpec("raw", 20, 12), 4096), one)
    assert (cache.hits, cache.misses) == (0, 3)
    assert np.array_equal(cache.decode(one.tobytes(), ImageSpec("raw", 20, 12), 4096), one) and cache.hits == 1


def test_source_cache_off_decodes_every_time():
    first = encoded(rgb(), ".png")
    off = SourceCache(0)
    assert off.decode(first, ImageSpec("png"), 4096) is not off.decode(first, ImageSpec("png"), 4096)


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    image = rgb(64, 48)
    ok, progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    progressive = progressive.tobytes()
    assert 1 < progressive.count(b"\xff\xda") <= 20                # an encoder's own progressive file
    assert decode_image(progressive, ImageSpec("jpeg"), 4096).shape == (48, 64, 3)
    # empty scans repeated before the end: each would be decoded over the whole image
    scan = progressive[progressive.rindex(b"\xff\xda"):-2]
    bomb = progressive[:-2] + scan * 200 + b"\xff\xd9"
    with pytest.raises(ProtocolError, match="has 2.. scans, over 100") as refused:
        decode_image(bomb, ImageSpec("jpeg"), 4096)
    assert refused.value.code == "bad_request"


def test_bytes_after_the_end_or_inside_a_segment_are_not_scans():
    """A phone's motion photo appends its video after the JPEG's end; an EXIF thumbnail sits in an
    APP1 segment: scan markers in either are not scans, and the photo decodes."""
    from pg2_server.codec import jpeg_scans

    image = rgb(64, 48)
    _, progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    progressive = progressive.tobytes()
    own = jpeg_scans(progressive)
    assert own == progressive.count(b"\xff\xda") and own > 1
    video = np.random.default_rng(0).integers(0, 256, 10 * 2**20, dtype=np.uint8).tobytes()
    assert video.count(b"\xff\xda") > 100
    motion = progressive + video
    assert jpeg_scans(motion) == own
    assert decode_image(motion, ImageSpec("jpeg"), 4096).shape == (48, 64, 3)
    thumbnail = b"Exif\x00\x00" + b"\xff\xda\x00\x02" * 300
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_exif = progressive[:2] + app1 + progressive[2:]
    assert jpeg_scans(with_exif) == own
    assert decode_image(with_exif, ImageSpec("jpeg"), 4096).shape == (48, 64, 3)
