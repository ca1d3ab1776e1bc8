import cv2
import numpy as np
import pytest

from pg2_server import pose
from pg2_server.keypoints import MASK_LIMBS


def _points(**named):
    points = [None] * 18
    for index, value in named.items():
        points[int(index[1:])] = value
    return points


def _independent_disk(x, y, height, width, radius):
    """Per-pixel loop: +1 where the pixel centre is within `radius` of the rounded keypoint."""
    out = np.full((height, width), -1.0, np.float32)
    cx, cy = int(round(x)), int(round(y))
    for r in range(height):
        for c in range(width):
            if (r - cy) ** 2 + (c - cx) ** 2 <= radius ** 2:
                out[r, c] = 1.0
    return out


@pytest.mark.parametrize("x, y", [(10, 12), (0, 0), (15, 31), (7.4, 20.6), (2, 30)])
def test_disk_heatmaps_pixel_exact(x, y):
    maps = pose.heatmaps(_points(k3=(x, y)), (16, 32))
    assert maps.shape == (18, 32, 16) and maps.dtype == np.float32
    assert np.array_equal(maps[3], _independent_disk(x, y, 32, 16, 4))
    assert (maps[np.arange(18) != 3] == -1).all()
    # A disk of radius 4 fully inside has 49 pixels (i² + j² ≤ 16).
    if 4 <= x <= 11 and 4 <= y <= 27:
        assert (maps[3] == 1).sum() == 49


def test_heatmaps_ignore_missing_and_outside_keypoints():
    maps = pose.heatmaps(_points(k0=(-3, 5), k1=(16, 5), k2=(5, 32), k4=(2, 5)), (16, 32))
    assert (maps[:4] == -1).all()          # missing or outside: all -1
    # A keypoint 2 px from the edge: the disk is clipped (49 - 1 - 5 pixels beyond x = 0).
    assert (maps[4] == 1).sum() == 43
    assert np.array_equal(maps[4], _independent_disk(2, 5, 32, 16, 4))


def test_gaussian_heatmaps():
    maps = pose.heatmaps(_points(k5=(8, 10)), (16, 32), kind="gaussian", sigma=6)
    assert maps[5, 10, 8] == pytest.approx(1.0)
    assert maps[5, 10, 14] == pytest.approx(np.exp(-36 / 72), rel=1e-5)
    assert (maps[0] == 0).all() and maps.min() >= 0 and maps.max() <= 1
    with pytest.raises(ValueError, match="unknown heat-map kind"):
        pose.heatmaps(_points(), (4, 4), kind="square")


def test_pose_mask_single_limb_hand_made():
    # Neck (1) to right shoulder (2), horizontal, 16 px apart: disks at both ends and at
    # int(16/4) - 1 = 3 interior points (every 4 px) make a solid bar of height 9 (±4).
    mask = pose.pose_mask(_points(k1=(10, 20), k2=(26, 20)), (40, 40))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[20, 6:31].all() and not mask[20, 5] and not mask[20, 31]
    assert mask[16:25, 18].all() and not mask[15, 18] and not mask[25, 18]


def test_pose_mask_needs_both_ends_of_a_limb():
    assert pose.pose_mask(_points(k1=(10, 20)), (40, 40)).sum() == 0
    # Only limbs from MASK_LIMBS are drawn: wrist (4) - hip (8) is not a limb.
    assert (4, 8) not in MASK_LIMBS
    assert pose.pose_mask(_points(k4=(10, 20), k8=(30, 20)), (40, 40)).sum() == 0


def test_pose_mask_closing_fills_small_gaps():
    # Two parallel limbs 10 px apart leave a 1-px gap between their disks; closing fills it.
    points = _points(k2=(10, 10), k3=(10, 30), k5=(19, 10), k6=(19, 30), k1=(14, 5))
    mask = pose.pose_mask(points, (40, 40))
    assert mask[20, 10:20].all()


def _independent_mask(points, height, width, radius):
    """The original's mask rule written out disk by disk with per-pixel loops (before closing)."""
    mask = np.zeros((height, width), np.uint8)

    def disk(x, y):
        cx, cy = int(round(x)), int(round(y))
        for r in range(max(0, cy - radius), min(height, cy + radius + 1)):
            for c in range(max(0, cx - radius), min(width, cx + radius + 1)):
                if (r - cy) ** 2 + (c - cx) ** 2 <= radius ** 2:
                    mask[r, c] = 1

    for a, b in MASK_LIMBS:
        if points[a] is None or points[b] is None:
            continue
        (x0, y0), (x1, y1) = points[a], points[b]
        disk(x0, y0)
        disk(x1, y1)
        n = int(np.hypot(x1 - x0, y1 - y0) / radius)
        for i in range(1, n):
            disk(x0 + (x1 - x0) * (i / n), y0 + (y1 - y0) * (i / n))
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))


@pytest.mark.parametrize("seed", range(6))
def test_heatmaps_and_mask_equal_independent_loops_on_random_poses(seed):
    rng = np.random.default_rng(seed)
    height, width, radius = [(40, 24, 4), (32, 16, 2), (48, 30, 5)][seed % 3]
    points = [None if rng.random() < 0.2 else
              (float(rng.uniform(-6, width + 6)), float(rng.uniform(-6, height + 6))) for _ in range(18)]
    if seed % 2:  # exact halves: rounding must go half-to-even everywhere
        points = [None if p is None else (round(p[0]) + 0.5, round(p[1]) + 0.5) for p in points]
    maps = pose.heatmaps(points, (width, height), radius)
    for k, point in enumerate(points):
        inside = point is not None and 0 <= round(point[0]) < width and 0 <= round(point[1]) < height
        expected = _independent_disk(*point, height, width, radius) if inside else -np.ones((height, width))
        assert np.array_equal(maps[k], expected), k
    assert np.array_equal(pose.pose_mask(points, (width, height), radius),
                          _independent_mask(points, height, width, radius))


def test_framing_identity_when_sizes_match():
    fit = pose.fit_frame((64, 128), (64, 128))
    assert fit.is_identity and fit.offset == (0, 0) and fit.scaled == (64, 128)
    image = np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8)
    assert np.array_equal(fit.image_to_canvas(image), image)
    assert np.array_equal(fit.image_to_frame(image), image)
    points = np.array([[3.0, 4.0]] * 18)
    assert np.allclose(fit.keypoints_to_canvas(points), points)


@pytest.mark.parametrize("frame, canvas", [((1920, 1080), (176, 256)), ((50, 300), (88, 128)),
                                           ((176, 256), (64, 128)), ((64, 64), (256, 256))])
def test_framing_round_trip_within_half_pixel(frame, canvas):
    fit = pose.fit_frame(frame, canvas)
    w, h = frame
    rng = np.random.default_rng(1)
    points = np.stack([rng.uniform(0, w - 1, 18), rng.uniform(0, h - 1, 18)], axis=1)
    points[3] = np.nan
    on_canvas = fit.keypoints_to_canvas(points)
    assert np.isnan(on_canvas[3]).all()
    assert np.nanmax(np.abs(fit.keypoints_to_frame(on_canvas) - points)) < 0.5
    # Keypoints land inside the frame's area of the canvas, which is centred.
    cw, ch = canvas
    assert np.nanmin(on_canvas[:, 0]) >= fit.offset[0] - 0.5
    assert np.nanmax(on_canvas[:, 0]) <= fit.offset[0] + fit.scaled[0] - 0.5
    assert abs((cw - fit.scaled[0]) - 2 * fit.offset[0]) <= 1 and abs((ch - fit.scaled[1]) - 2 * fit.offset[1]) <= 1
    # Images: canvas-sized on the way in, frame-sized on the way out.
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert fit.image_to_canvas(image).shape == (ch, cw, 3)
    assert fit.image_to_frame(fit.image_to_canvas(image)).shape == (h, w, 3)


def test_framing_places_a_marked_pixel_where_its_keypoint_goes():
    fit = pose.fit_frame((400, 200), (64, 128))   # wide frame: scaled 64×32, padded top/bottom
    assert fit.scaled == (64, 32) and fit.offset == (0, 48)
    image = np.zeros((200, 400, 3), np.uint8)
    image[90:110, 190:210] = 255
    canvas = fit.image_to_canvas(image, border="constant")
    (x, y), = fit.keypoints_to_canvas([(199.5, 99.5)] + [None] * 17)[:1]
    ys, xs = np.nonzero(canvas[..., 0] > 127)
    assert abs(xs.mean() - x) < 0.6 and abs(ys.mean() - y) < 0.6


def test_flip_horizontal_swaps_image_and_joints():
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, 0] = 255
    flipped, points = pose.flip_horizontal(image, _points(k2=(0, 1), k0=(2, 3)))
    assert (flipped[:, 5] == 255).all() and (flipped[:, 0] == 0).all()
    assert tuple(points[5]) == (5, 1) and np.isnan(points[2]).all() and tuple(points[0]) == (3, 3)


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((4, 4, 3), np.float32), TypeError, "uint8"),
    (np.zeros((0, 4, 3), np.uint8), ValueError, "non-empty"),
    (np.zeros((4, 4, 4), np.uint8), ValueError, "3 channels"),
    ([[1, 2, 3]], TypeError, "numpy uint8 array"),
])
def test_check_image_errors(bad, error, message):
    with pytest.raises(error, match=message):
        pose.check_image(bad)


def test_fit_frame_rejects_bad_sizes():
    with pytest.raises(ValueError, match="frame width must be a positive integer"):
        pose.fit_frame((0, 10), (16, 32))
    with pytest.raises(ValueError, match="frame height"):
        pose.fit_frame((10, 2.5), (16, 32))


def test_value_conversions_round_trip():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    unit = pose.to_unit_range(image)
    assert unit.shape == (3, 16, 16) and unit.min() == -1 and unit.max() == 1
    assert np.array_equal(pose.to_uint8(unit), image)


@pytest.mark.parametrize("seed", range(4))
def test_mask_of_limbs_reaching_far_off_the_canvas_equals_independent_loops(seed):
    # Drawing only the part of a limb near the canvas must give exactly the original's pixels.
    rng = np.random.default_rng(100 + seed)
    height, width, radius = 40, 24, 4
    points = [(float(rng.uniform(-3000, 3000)), float(rng.uniform(-3000, 3000))) if rng.random() < 0.4 else
              (float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(18)]
    assert np.array_equal(pose.pose_mask(points, (width, height), radius),
                          _independent_mask(points, height, width, radius))


def test_keypoints_at_plus_minus_1e8_cost_memory_of_the_canvas_only():
    import time
    import tracemalloc

    points = [(12.0, 20.0)] * 18
    points[0], points[1], points[2], points[5], points[8] = (1e8, 1e8), (-1e8, -1e8), (1e8, -1e8), (5.0, -1e8), \
        (-1e8, 30.0)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        mask = pose.pose_mask(points, (64, 128))
        maps = pose.heatmaps(points, (64, 128))
        coordinates = pose.pose_coordinates(points, (64, 128))
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MiB"
    assert elapsed < 0.5, f"{elapsed:.2f} s"
    # The limbs still cross the canvas from the on-canvas joints towards the far ones.
    assert mask[20, 12] == 1 and mask[0, 5] == 1 and mask[20, 0] == 1
    assert (maps[[0, 1, 2, 5, 8]] == -1).all() and (maps[3] == 1).sum() > 0
    assert (coordinates.reshape(18, 2)[[0, 1, 2, 5, 8]] == -1).all()


def standing(height=100.0, x=300.0, top=150.0, ankles=True):
    """Keypoints of a person standing upright: eyes at `top`, ankles `height` below."""
    from pg2_server.keypoints import INDEX

    points = np.full((18, 2), np.nan)
    for name, dx, dy in (("nose", 0, 0.02), ("right_eye", -3, 0), ("left_eye", 3, 0), ("neck", 0, 0.15),
                         ("right_shoulder", -12, 0.16), ("left_shoulder", 12, 0.16), ("right_hip", -8, 0.55),
                         ("left_hip", 8, 0.55), ("right_knee", -8, 0.78), ("left_knee", 8, 0.78),
                         ("right_ankle", -10, 1.0), ("left_ankle", 10, 1.0)):
        points[INDEX[name]] = (x + dx, top + dy * height)
    if not ankles:
        points[[INDEX["right_ankle"], INDEX["left_ankle"]]] = np.nan
    return points


def test_a_small_person_is_framed_as_the_datasets_frame_people():
    aspect = 88 / 128
    # 100 px from eyes to ankles in a 600×400 photo: the box holds them with 15 % above and below
    x, y, w, h = pose.person_box(standing(), (600, 400), aspect)
    assert (h, w) == (130, round(130 * aspect)) and y == 150 - 15 and abs(x + w / 2 - 300) <= 1
    # the same person filling a 176×256 photo, as the datasets do: left as taken
    assert pose.person_box(standing(200, 88, 20), (176, 256), aspect) is None
    # cut at the knee (no ankles) in a wide photo: the photo's own cut stays at the bottom
    x, y, w, h = pose.person_box(standing(ankles=False), (600, 260), aspect)
    assert y + h == 260 and h == round((259 - 150) * 1.3)
    # fewer than two keypoints: nothing to frame by
    one = np.full((18, 2), np.nan)
    one[0] = (5, 5)
    assert pose.person_box(one, (600, 400), aspect) is None


def test_a_target_pose_small_in_its_frame_is_moved_into_a_frame_around_its_person():
    aspect = 88 / 128
    person = standing()
    size, moved, box = pose.person_framed_pose(person, (600, 400), aspect)
    x, y, w, h = box
    assert size == (w, h) == (round(130 * aspect), 130)
    assert np.allclose(moved, person - (x, y), equal_nan=True)
    assert np.isnan(moved[pose.INDEX["right_wrist"]]).all()          # unknown stays unknown
    eyes_to_ankles = moved[pose.INDEX["right_ankle"], 1] - moved[pose.INDEX["right_eye"], 1]
    assert eyes_to_ankles == 100 and 0 < moved[:, 0][~np.isnan(moved[:, 0])].min() < w
    # a pose that already fills its frame as the datasets do keeps it
    filling = standing(200, 88, 20)
    size, kept, box = pose.person_framed_pose(filling, (176, 256), aspect)
    assert box is None and size == (176, 256) and np.array_equal(kept, filling, equal_nan=True)


def test_crop_box_repeats_the_edge_where_the_box_leaves_the_photo():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1).repeat(3, axis=2)
    assert pose.crop_box(image, (1, 0, 2, 2))[:, :, 0].tolist() == [[1, 2], [5, 6]]
    assert pose.crop_box(image, (-1, 1, 3, 3))[:, :, 0].tolist() == [[4, 4, 5], [8, 8, 9], [8, 8, 9]]
    # far over one edge only: the other sides are not padded (a 24 MP photo padded on all four
    # sides by the largest overshoot cost 400 MB)
    assert pose.crop_box(image, (1, -5, 2, 6))[:, :, 0].tolist() == [[1, 2]] * 6
    assert pose.crop_box(image, (5, 5, 2, 1))[:, :, 0].tolist() == [[11, 11]]   # wholly outside: the corner
