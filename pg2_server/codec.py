"""Image payloads of the wire protocol: decode a source frame, encode a result frame.

The declared size of a PNG or JPEG is read from its header before decoding, so a small file
that claims a huge image is refused before OpenCV allocates anything for it.
"""
from __future__ import annotations

import re
import struct
import threading
import zlib
from collections import OrderedDict
from typing import Callable

import cv2
import numpy as np

from .wire.images import sniff_format
from .wire.protocol import BAD_REQUEST, TOO_LARGE, ImageSpec, OutputSpec, ProtocolError

# JPEG start-of-frame markers carry the image size (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_size(data) -> tuple[int, int] | None:
    if len(data) < 24 or bytes(data[12:16]) != b"IHDR":
        return None
    return struct.unpack(">II", bytes(data[16:24]))


def _jpeg_size(data) -> tuple[int, int] | None:
    view = memoryview(data)
    i, n = 2, len(view)
    while i + 4 <= n:
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7):  # no length field
            i += 2
            continue
        length = (view[i + 2] << 8) | view[i + 3]
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height = (view[i + 5] << 8) | view[i + 6]
            width = (view[i + 7] << 8) | view[i + 8]
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None


def declared_size(data, fmt: str) -> tuple[int, int] | None:
    """(W, H) that a PNG/JPEG header declares, or None if the header cannot be read."""
    return _png_size(data) if fmt == "png" else _jpeg_size(data)


MAX_JPEG_SCANS = 100   # scans a source JPEG may have (encoders write about ten)


def decode_image(data, spec: ImageSpec, max_side: int, request_id=None) -> np.ndarray:
    """A source payload → uint8 RGB (H, W, 3); raises ProtocolError (bad_request / too_large)."""
    if spec.format == "raw":
        # protocol.decode_request has checked len(data) == width*height*3.
        return np.frombuffer(data, dtype=np.uint8).reshape(spec.height, spec.width, 3)
    actual = sniff_format(data)
    if actual != spec.format:
        raise ProtocolError(BAD_REQUEST, f"the source frame is not a {spec.format.upper()} file"
                                         + (f" (it looks like {actual.upper()})" if actual else ""), request_id)
    size = declared_size(data, spec.format)
    if size is None:
        raise ProtocolError(BAD_REQUEST, f"the source {spec.format.upper()} header is unreadable "
                                         "(truncated or corrupt file)", request_id)
    width, height = size
    if width == 0 or height == 0:
        raise ProtocolError(BAD_REQUEST, f"the source image declares a size of {width}×{height}", request_id)
    if width > max_side or height > max_side:
        raise ProtocolError(TOO_LARGE, f"the source image is {width}×{height}, over the server's limit of "
                                       f"{max_side} px per side; scale it down", request_id)
    if (spec.width is not None and spec.width != width) or (spec.height is not None and spec.height != height):
        raise ProtocolError(BAD_REQUEST, f"the source header says {spec.width}×{spec.height} but the "
                                         f"{spec.format.upper()} file is {width}×{height}", request_id)
    if spec.format == "jpeg":
        # A progressive JPEG decodes every scan over the whole image: thousands of empty scans
        # in a small file hold the decoder for minutes. Encoders write ten or so (libjpeg).
        scans = jpeg_scans(bytes(data))
        if scans > MAX_JPEG_SCANS:
            raise ProtocolError(BAD_REQUEST, f"the source JPEG has {scans} scans, over {MAX_JPEG_SCANS}; save it "
                                             "again as a baseline or ordinary progressive JPEG", request_id)
    image = decode_photo(data)
    # A phone's portrait photo stores landscape pixels and an EXIF orientation; it is decoded
    # upright, as every photo viewer shows it, so its size is the header's transposed.
    if image is None or image.shape[:2] not in ((height, width), (width, height)):
        raise ProtocolError(BAD_REQUEST, f"the source {spec.format.upper()} file cannot be decoded "
                                         "(truncated or corrupt)", request_id)
    return image


# The next marker inside a scan's coded data: 0xFF there is followed by 0x00 (a stuffed byte),
# a restart marker (D0-D7) or more 0xFF (fill); anything else ends the scan.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_scans(data: bytes) -> int:
    """The scans a decoder meets in a JPEG: its segments walked from the start to the end-of-image
    marker, as libjpeg reads them. Bytes after the end (a phone's motion-photo video) and inside
    other segments (an EXIF thumbnail in APP1) are not scans, whatever bytes they hold."""
    pos, scans, size = 2, 0, len(data)
    while pos < size and data[pos] == 0xFF:
        while pos < size and data[pos] == 0xFF:   # fill bytes before a marker
            pos += 1
        if pos + 1 > size:
            break
        marker = data[pos]
        pos += 1
        if marker == 0xD9:                         # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:   # markers without a length
            continue
        if pos + 2 > size:
            break
        pos += int.from_bytes(data[pos:pos + 2], "big")
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


BACKDROP = 255   # what a transparent background becomes: the white studio backdrop of the datasets


def decode_photo(data) -> np.ndarray | None:
    """Encoded image bytes → uint8 RGB (H, W, 3) as a person sees the photo; None if undecodable.

    Upright (the EXIF orientation of a JPEG, PNG, WebP or TIFF applied), in sRGB (an embedded colour
    profile such as a phone's Display P3 converted), 16-bit PNGs and TIFFs scaled to 8 bits (float TIFFs
    from 0–1), grey made RGB,
    and a transparent background — a person cut out of a photo — composited over white, the
    backdrop the models were trained on, instead of the colour its hidden pixels happen to hold
    (often black). The server, `pg2-server generate --local`, pose detection and training all
    read photos through this.
    """
    # PNGs, WebPs and TIFFs keep their alpha. OpenCV orients JPEGs only in colour mode and TIFFs
    # always; PNGs and WebPs read with their alpha are turned here as their EXIF says.
    head = bytes(data[:12])
    turned_here = sniff_format(data) == "png" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    with_alpha = turned_here or head[:4] in (b"II*\0", b"MM\0*")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8),
                             cv2.IMREAD_UNCHANGED if with_alpha else cv2.IMREAD_COLOR)
    except cv2.error:  # some corrupt files make the codec raise instead of returning None
        return None
    if image is None:
        return None
    orientation, profile = _photo_metadata(data)
    if turned_here and orientation in _ORIENT:
        image = np.ascontiguousarray(_ORIENT[orientation](image))
    # OpenCV's saturating uint8 arithmetic, no float copies: a 4096² 16-bit RGBA PNG took 1.1 GB
    # more memory through numpy's float64.
    if image.dtype == np.uint16:
        image = cv2.convertScaleAbs(image, alpha=1 / 257)
    elif image.dtype.kind == "f":   # a 32-bit float TIFF: 0–1 as OpenCV writes it, beyond that clipped
        image = cv2.convertScaleAbs(cv2.max(image, 0.0), alpha=255)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:   # colour × alpha + the backdrop × (1 − alpha), the backdrop being white
        alpha = cv2.cvtColor(np.ascontiguousarray(image[:, :, 3]), cv2.COLOR_GRAY2BGR)
        backdrop = cv2.convertScaleAbs(cv2.bitwise_not(alpha), alpha=BACKDROP / 255)   # 255 − alpha, scaled
        image = cv2.add(cv2.multiply(np.ascontiguousarray(image[:, :, :3]), alpha, scale=1 / 255), backdrop)
    return to_srgb(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), profile)


# EXIF orientation → what shows the image upright (2–8; 1 is upright already).
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)}


def _photo_metadata(data) -> tuple[int, bytes | None]:
    """(EXIF orientation, embedded ICC profile or None) from the file's headers (Pillow reads
    them without decoding the pixels); (1, None) when Pillow cannot read them."""
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(bytes(data))) as photo:
            return exif_orientation(photo), photo.info.get("icc_profile") or None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1, None


def exif_orientation(photo) -> int:
    """The EXIF orientation (1–8) of an opened Pillow image, from what was read at open: for a PNG
    without an eXIf chunk before its pixels Pillow's getexif would decode the whole image to look
    for one after them (and fail on a file cut short), so that counts as upright."""
    if photo.format == "PNG" and "exif" not in photo.info:
        return 1
    try:
        return int(photo.getexif().get(0x0112, 1) or 1)
    except (OSError, ValueError, SyntaxError):   # a file cut short: its pixels will say so
        return 1


_TRANSFORMS: OrderedDict = OrderedDict()   # ICC profile bytes → its transform to sRGB (or None: it is sRGB)
_TRANSFORMS_LOCK = threading.Lock()


def to_srgb(image: np.ndarray, profile: bytes | None) -> np.ndarray:
    """RGB pixels encoded in an embedded colour profile (a phone's Display P3, Adobe RGB) as sRGB,
    the space every model here was trained in; unchanged without a profile or with an sRGB one."""
    if not profile:
        return image
    import io

    from PIL import Image, ImageCms
    with _TRANSFORMS_LOCK:
        known = profile in _TRANSFORMS
        transform = _TRANSFORMS.get(profile)
    if not known:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            srgb = "srgb" in ImageCms.getProfileDescription(source).lower().replace(" ", "").replace("-", "")
            transform = None if srgb else ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), "RGB", "RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            transform = None   # a profile LittleCMS cannot read (or not an RGB one): the pixels as they are
        with _TRANSFORMS_LOCK:
            _TRANSFORMS[profile] = transform
            while len(_TRANSFORMS) > 8:
                _TRANSFORMS.popitem(last=False)
    if transform is None:
        return image
    return np.asarray(ImageCms.applyTransform(Image.fromarray(image, "RGB"), transform))


class SourceCache:
    """Recently decoded sources by content: an animation sends the same photo with every frame.

    A CRC-32 of the payload finds a candidate and a byte-for-byte comparison with the payload it
    was decoded from confirms it: a quarter of blake2b's cost on a 100 KB PNG, and a collision,
    even a crafted one, can never answer one client's request with another's photo. Holds at
    most `max_bytes` of payloads and decoded pixels, least recently used out first; the arrays
    are read-only, since every request that hits the cache shares them.
    """

    def __init__(self, max_bytes: int, finish: Callable[[np.ndarray], np.ndarray] | None = None):
        self.max_bytes = max_bytes
        self.finish = finish   # applied to a freshly decoded source before it is kept (framing it)
        self._entries: OrderedDict[tuple, tuple[bytes, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def decode(self, data, spec: ImageSpec, max_side: int, request_id=None) -> np.ndarray:
        """decode_image, answered from the cache when these exact bytes were decoded recently."""
        if self.max_bytes <= 0:
            return self._decode(data, spec, max_side, request_id)
        view = memoryview(data)
        key = (spec.format, spec.width, spec.height, view.nbytes, zlib.crc32(view))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == view:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self.misses += 1
        image = self._decode(data, spec, max_side, request_id)
        size = image.nbytes + view.nbytes
        if size > self.max_bytes:
            return image
        image = image if spec.format != "raw" else image.copy()  # raw views the request's frame
        image.flags.writeable = False
        with self._lock:
            replaced = self._entries.pop(key, None)   # a CRC collision: the newer payload stays
            if replaced is not None:
                self._bytes -= replaced[1].nbytes + len(replaced[0])
            self._entries[key] = (view.tobytes(), image)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (payload, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes + len(payload)
        return image

    def _decode(self, data, spec: ImageSpec, max_side: int, request_id) -> np.ndarray:
        image = decode_image(data, spec, max_side, request_id)
        return self.finish(image) if self.finish is not None else image


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None, output: OutputSpec, stage: str) -> tuple[bytes, ImageSpec]:
    """uint8 RGB (H, W, 3) and optional alpha (H, W) → payload bytes and their description."""
    height, width = rgb.shape[:2]
    if alpha is not None:
        pixels = np.dstack([rgb, alpha.reshape(height, width)])
    else:
        pixels = rgb
    channels = pixels.shape[2]
    if output.format == "raw":
        return np.ascontiguousarray(pixels).tobytes(), ImageSpec("raw", width, height, channels, stage)
    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA if channels == 4 else cv2.COLOR_RGB2BGR)
    if output.format == "png":
        # Every result is encoded once, on the request's critical path: zlib level 1 with run-length
        # matching is ~25% faster than the default strategy here and no larger on generated images.
        ok, encoded = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                                 cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    else:
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, output.quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {width}×{height} {output.format} image")
    return encoded.tobytes(), ImageSpec(output.format, width, height, channels, stage)


def read_image_file(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes → uint8 RGB; for clients of this package that hold numpy (CLI, bench)."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("not a decodable PNG/JPEG image")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
