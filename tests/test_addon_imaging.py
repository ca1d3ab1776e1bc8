"""Result pixels: PNG encoding read back by Blender, compositing, frame file names, sources."""
from __future__ import annotations

import os

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from blender_addon import generation, imaging  # noqa: E402


def test_png_reads_back_in_blender(tmp_path):
    rng = np.random.default_rng(0)
    for channels in (3, 4):
        pixels = rng.integers(0, 256, (7, 5, channels), dtype=np.uint8)
        path = tmp_path / f"p{channels}.png"
        imaging.write_atomic(str(path), imaging.encode_png(pixels))
        back = generation.render_pixels(str(path))
        assert back.shape == (7, 5, 4)
        assert np.array_equal(back[..., :channels], pixels)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pg2-")] == []


def test_composite_blends_by_alpha_and_clips():
    frame = imaging.background(6, 4, (0.0, 0.0, 1.0))
    person = np.zeros((2, 3, 4), np.uint8)
    person[..., 0] = 255
    person[0, 0, 3], person[0, 1, 3], person[0, 2, 3] = 255, 128, 0
    out = imaging.composite(frame, person, 4, -1)  # reaches past the right and top edges
    assert out.shape == frame.shape and np.array_equal(frame[..., 2], np.full((4, 6), 255))
    assert tuple(out[0, 4]) == (0, 0, 255)  # person row 1 has alpha 0 everywhere
    clipped = imaging.composite(frame, person, 4, 0)
    assert tuple(clipped[0, 4]) == (255, 0, 0)
    assert tuple(clipped[0, 5]) == (128, 0, 127)
    transparent = imaging.composite(imaging.background(6, 4, None), person, 4, 0)
    assert tuple(transparent[0, 4]) == (255, 0, 0, 255) and transparent[0, 5, 3] == 128
    assert transparent[3, 0, 3] == 0
    assert np.array_equal(imaging.composite(frame, person, 50, 50), frame)


def test_raw_image_checks_its_size():
    assert imaging.raw_image(bytes(24), 2, 4, 3).shape == (4, 2, 3)
    with pytest.raises(ValueError, match="needs 24 bytes"):
        imaging.raw_image(bytes(23), 2, 4, 3)


def test_frame_paths_follow_blenders_hash_pattern(tmp_path):
    assert generation.frame_path(str(tmp_path / "f_####.png"), 7) == str(tmp_path / "f_0007.png")
    assert generation.frame_path(str(tmp_path / "a##_b###"), 12) == str(tmp_path / "a##_b012.png")
    assert generation.frame_path(str(tmp_path / "shot.jpg"), 3) == str(tmp_path / "shot0003.jpg")
    assert generation.frame_path(str(tmp_path) + os.sep, 5) == str(tmp_path / "0005.png")
    # A dot in the name is not an extension unless letters follow it.
    assert generation.frame_path(str(tmp_path / "shot_v1.2_####"), 5) == str(tmp_path / "shot_v1.2_0005.png")
    assert generation.frame_path(str(tmp_path / "shot_v1.2"), 5) == str(tmp_path / "shot_v1.20005.png")
    assert generation.frame_path(str(tmp_path / "v1.5_####.JPG"), 5) == str(tmp_path / "v1.5_0005.JPG")
    # Frames before 0: the sign before the zero-padded digits, as Blender names its renders.
    assert generation.frame_path(str(tmp_path / "f_####.png"), -3) == str(tmp_path / "f_-0003.png")
    scene = bpy.context.scene
    scene.render.image_settings.file_format = "PNG"
    for pattern in ("f_####", "f_##", "f_", "v##_f####", "f_#"):
        scene.render.filepath = str(tmp_path / pattern)
        for frame in (-3, -123, 0, 7, 12345):
            assert generation.frame_path(str(tmp_path / pattern), frame) == scene.render.frame_path(frame=frame)


def test_sequence_files_are_found_by_their_pattern(tmp_path):
    for name in ("f_0001.png", "f_-0003.png", "f_12345.png", "f_001.png", "f_00010.png", "f_0002.jpg", "g_0004.png"):
        (tmp_path / name).write_bytes(b"")
    assert generation.sequence_files(str(tmp_path / "f_####.png")) == {   # the names frame_path gives
        1: str(tmp_path / "f_0001.png"), -3: str(tmp_path / "f_-0003.png"), 12345: str(tmp_path / "f_12345.png")}
    assert generation.sequence_files(str(tmp_path / "missing" / "f_####.png")) == {}


def test_image_sizes_are_read_from_png_and_jpeg_headers(tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(imaging.encode_png(np.zeros((7, 5, 3), np.uint8)))
    assert imaging.file_image_size(str(path)) == (5, 7)
    image = bpy.data.images.new("jpeg", 9, 4)
    image.filepath_raw, image.file_format = str(tmp_path / "j.jpg"), "JPEG"
    image.save()
    bpy.data.images.remove(image)
    assert imaging.file_image_size(str(tmp_path / "j.jpg")) == (9, 4)
    (tmp_path / "t.txt").write_text("hello")
    assert imaging.file_image_size(str(tmp_path / "t.txt")) is None
    assert imaging.file_image_size(str(tmp_path / "none.png")) is None


def test_source_from_an_image_datablock(tmp_path):
    image = bpy.data.images.new("person", 4, 3)
    pixels = np.zeros((3, 4, 4), np.float32)
    pixels[..., 0], pixels[..., 3] = 1.0, 1.0
    pixels[0, 0] = (0, 1, 0, 1)  # Blender's first row is the bottom one
    pixels[0, 1] = (0, 0, 0, 0)  # a transparent background: white, not its hidden black
    pixels[0, 2] = (0, 0, 1, 0.5)
    image.pixels.foreach_set(pixels.ravel())

    class Settings:
        source_kind, source_image, source_path = "IMAGE", image, ""
    data, size = generation.read_source(Settings)
    rgb = np.frombuffer(data, np.uint8).reshape(3, 4, 3)
    assert size == (4, 3) and tuple(rgb[2, 0]) == (0, 255, 0) and tuple(rgb[0, 0]) == (255, 0, 0)
    assert tuple(rgb[2, 1]) == (255, 255, 255)
    assert np.abs(rgb[2, 2].astype(int) - (128, 128, 255)).max() <= 1  # half transparent, 8-bit alpha
    png = tmp_path / "p.png"
    png.write_bytes(imaging.encode_png(np.zeros((3, 4, 3), np.uint8)))
    Settings.source_image = bpy.data.images.load(str(png))
    data, size = generation.read_source(Settings)
    assert size is None and data == png.read_bytes()  # a file's own bytes travel as they are
    edited = np.ones(3 * 4 * 4, np.float32)           # painted white in Blender, not saved
    Settings.source_image.pixels.foreach_set(edited)
    assert Settings.source_image.is_dirty
    data, size = generation.read_source(Settings)
    assert size == (4, 3) and data == bytes([255]) * 36
    Settings.source_image = None
    with pytest.raises(generation.GenerationError, match="choose a source image"):
        generation.read_source(Settings)


def test_a_large_raw_source_is_shrunk_to_fit_a_request():
    """An unsaved 24 MP image would be 72 MB raw, past the server's message limit: it goes as
    box averages over whole blocks, at most RAW_SOURCE_SIDE a side."""
    width, height = 2 * generation.RAW_SOURCE_SIDE + 5, 7
    image = bpy.data.images.new("big", width, height)
    pixels = np.zeros((height, width, 4), np.float32)
    pixels[..., 3] = 1.0
    pixels[:, 0::3, 0] = 1.0                    # red in every third column: 1/3 red after a 3-block
    image.pixels.foreach_set(pixels.ravel())

    class Settings:
        source_kind, source_image, source_path = "IMAGE", image, ""
    data, size = generation.read_source(Settings)
    assert size == (width // 3, height // 3) and max(size) <= generation.RAW_SOURCE_SIDE
    rgb = np.frombuffer(data, np.uint8).reshape(size[1], size[0], 3)
    assert (rgb[..., 0] == 85).all() and (rgb[..., 1:] == 0).all()
    bpy.data.images.remove(image)


def test_renders_of_every_depth_read_as_their_8_bit_look(tmp_path):
    """16-bit PNG and TIFF renders come back from Blender in linear light, premultiplied: they
    are composited under the person as the 8-bit render of the same frame would be. Linear
    EXR is refused with what to do (its look depends on the view transform)."""
    scene = bpy.context.scene
    scene.view_settings.view_transform = "Standard"
    image = bpy.data.images.new("frame", 4, 2, alpha=True, float_buffer=True)
    rgba = np.zeros((2, 4, 4), np.float32)
    rgba[..., :3] = np.linspace(0.02, 0.9, 8, dtype=np.float32).reshape(2, 4, 1)
    rgba[..., 3] = 1.0
    rgba[0, 0, 3] = 0.5
    image.pixels.foreach_set(rgba.ravel())
    settings = scene.render.image_settings
    read = {}
    for name, fmt, depth in (("8.png", "PNG", "8"), ("16.png", "PNG", "16"), ("16.tif", "TIFF", "16")):
        settings.file_format, settings.color_mode, settings.color_depth = fmt, "RGBA", depth
        image.save_render(str(tmp_path / name), scene=scene)
        read[name] = generation.render_pixels(str(tmp_path / name)).astype(int)
    assert read["8.png"][..., :3].std() > 50 and read["8.png"][1, 0, 3] == 128   # the half-transparent pixel
    for name in ("16.png", "16.tif"):
        assert np.abs(read[name] - read["8.png"]).max() <= 1, name
    settings.file_format = "OPEN_EXR"
    image.save_render(str(tmp_path / "f.exr"), scene=scene)
    with pytest.raises(generation.GenerationError, match="float image in Linear.*save it as 8- or 16-bit PNG"):
        generation.render_pixels(str(tmp_path / "f.exr"))
    settings.file_format, settings.color_depth = "PNG", "8"


def test_resize_matches_opencv_bilinear():
    import cv2
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for width, height in ((5, 14), (12, 7), (11, 19)):
        ours = imaging.resize(image, width, height).astype(int)
        theirs = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR).astype(int)
        assert ours.shape == (height, width, 3) and np.abs(ours - theirs).max() <= 1


def test_resize_keeps_uncovered_colour_out_of_edges():
    """An RGBA person over nothing: the edge keeps the person's colour, fading in alpha only."""
    image = np.zeros((2, 2, 4), np.uint8)
    image[:, 0] = (200, 40, 10, 255)   # covered, left column; right column transparent black
    out = imaging.resize(image, 8, 2)
    edge = out[0, 3:6]
    assert list(edge[:, 3]) == sorted(edge[:, 3], reverse=True) and 0 < edge[1, 3] < 255
    assert (edge[edge[:, 3] > 0, :3] == (200, 40, 10)).all()
