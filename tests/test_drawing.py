"""pg2_server/drawing.py: the skeleton drawn for grids and overlays."""
from pg2_server.drawing import draw_pose
from pg2_server.keypoints import COLORS, NAMES


def test_points_far_off_the_image_are_drawn_clipped_not_refused():
    """Keypoints may lie anywhere within ±1e9 px (the protocol's bound); OpenCV's int32 drawing
    calls raised on them."""
    points = [[40.0 + i, 60.0 + 3 * i] for i in range(18)]
    points[NAMES.index("left_ankle")] = [5e9, -5e9]
    image = draw_pose(points, (88, 128))
    assert image.shape == (128, 88, 3)
    x, y = (round(v) for v in points[NAMES.index("nose")])
    assert tuple(image[y, x]) == COLORS[NAMES.index("nose")]
