"""Which encoded image format some bytes hold, from their first bytes."""
from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def sniff_format(data) -> str | None:
    """'png' or 'jpeg' from the file's magic bytes, else None."""
    head = bytes(data[:8])
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    return None
