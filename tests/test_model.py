import pytest
import torch

from pg2_server.model import PRESETS, Generator1, Generator2, ModelConfig, count_flops, parameter_count, preset
from pg2_server.wire.protocol import Size


@pytest.mark.parametrize("name, g1_params, g2_params", [
    # The analytic counts of the official TensorFlow release of PG2, layer by layer.
    ("market", 70_795_075, 6_058_883),
    ("deepfashion", 122_103_235, 12_696_067),
])
def test_official_presets_match_the_original_parameter_counts(name, g1_params, g2_params):
    config = PRESETS[name]
    with torch.device("meta"):
        assert parameter_count(Generator1(config)) == g1_params
        assert parameter_count(Generator2(config)) == g2_params


def test_official_flops_per_image():
    # ≈ 95 GFLOP (Market) and ≈ 806 GFLOP (DeepFashion) for G1 + G2, as docs/performance.md states.
    assert sum(count_flops(PRESETS["market"]).values()) / 1e9 == pytest.approx(95.15, abs=0.05)
    assert sum(count_flops(PRESETS["deepfashion"]).values()) / 1e9 == pytest.approx(806.28, abs=0.05)


@pytest.mark.parametrize("name", list(PRESETS))
def test_output_shapes_for_every_preset(name):
    config = PRESETS[name]
    w, h = config.canvas
    with torch.device("meta"):
        g1, g2 = Generator1(config), Generator2(config)
        source, pose = torch.zeros(2, 3, h, w), torch.zeros(2, 18, h, w)
        coarse = g1(source, pose)
        assert coarse.shape == (2, 3, h, w)
        assert g2(coarse, source).shape == (2, 3, h, w)


@pytest.mark.parametrize("embedding", ["heatmaps", "ce", "hme"])
def test_pose_embedding_variants_run_and_use_the_pose(embedding):
    torch.manual_seed(0)
    config = preset("tiny", pose_embedding=embedding)
    g1 = Generator1(config).eval()
    source = torch.randn(1, 3, 32, 16)
    pose_a, pose_b = -torch.ones(1, 18, 32, 16), -torch.ones(1, 18, 32, 16)
    pose_b[0, 3, 10:14, 5:9] = 1
    coords_a, coords_b = -torch.ones(1, 36), torch.full((1, 36), 0.5)
    with torch.no_grad():
        out_a = g1(source, pose_a, coords_a)
        out_b = g1(source, pose_b, coords_b)
    assert out_a.shape == (1, 3, 32, 16)
    assert not torch.allclose(out_a, out_b)      # the target pose changes the output


def test_ce_needs_coordinates():
    g1 = Generator1(preset("tiny", pose_embedding="ce"))
    with pytest.raises(ValueError, match="coordinates"):
        g1(torch.zeros(1, 3, 32, 16), torch.zeros(1, 18, 32, 16))


def test_market_g2_skips_the_finest_skip_and_deepfashion_does_not():
    with torch.device("meta"):
        market, fashion = Generator2(PRESETS["market"]), Generator2(PRESETS["deepfashion"])
    assert market.decoder[-1][0].in_channels == 128          # no concatenated skip
    assert fashion.decoder[-1][0].in_channels == 256         # 128 + finest skip


def test_glorot_init_and_zero_bias():
    g1 = Generator1(PRESETS["tiny"])
    assert torch.count_nonzero(g1.encoder.stem.bias) == 0
    fan_in, fan_out = 21 * 9, 8 * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert g1.encoder.stem.weight.abs().max() <= bound


@pytest.mark.parametrize("changes, message", [
    ({"canvas": (30, 16)}, "divisible"),
    ({"pose_embedding": "xyz"}, "pose_embedding"),
    ({"heatmap_kind": "box"}, "heatmap_kind"),
    ({"keypoints": ("a",) * 18}, "keypoint order"),
    ({"heatmap_radius": 0}, "^heatmap_radius must be ≥ 1, got 0$"),
    ({"heatmap_radius": -3}, "^heatmap_radius must be ≥ 1, got -3$"),
    ({"heatmap_radius": "4"}, "^heatmap_radius must be an integer, got '4'$"),
    ({"heatmap_radius": 4.5}, "^heatmap_radius must be an integer, got 4.5$"),
    ({"heatmap_radius": True}, "^heatmap_radius must be an integer, got True$"),
    ({"heatmap_sigma": 0}, "^heatmap_sigma must be a positive number, got 0$"),
    ({"heatmap_sigma": -6.0}, "^heatmap_sigma must be a positive number, got -6.0$"),
    ({"heatmap_sigma": float("nan")}, "^heatmap_sigma must be a positive number, got nan$"),
    ({"heatmap_sigma": "6"}, "^heatmap_sigma must be a number, got '6'$"),
    ({"base_width": "32"}, "^base_width must be an integer, got '32'$"),
    ({"base_width": 0}, "^base_width must be ≥ 1, got 0$"),
    ({"g1_levels": "4"}, "^g1_levels must be an integer, got '4'$"),
    ({"g2_levels": 0}, "^g2_levels must be ≥ 1, got 0$"),
    ({"z_dim": None}, "^z_dim must be an integer, got None$"),
    ({"g2_skip_finest": "yes"}, "^g2_skip_finest must be true or false, got 'yes'$"),
    ({"pose_embedding": 3}, "^pose_embedding must be a string, got 3$"),
    ({"preset": None}, "^preset must be a string, got None$"),
    ({"canvas": ("16", 32)}, "^canvas must be two positive integers \\(width, height\\), got \\('16', 32\\)$"),
    ({"canvas": (16, 0)}, "^canvas must be two positive integers"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        PRESETS["tiny"].replace(**changes)


def test_valid_heatmap_settings_still_load():
    assert PRESETS["tiny"].replace(heatmap_radius=1, heatmap_sigma=2).heatmap_sigma == 2
    assert PRESETS["tiny"].replace(heatmap_sigma=0.5, heatmap_kind="gaussian").heatmap_sigma == 0.5


def test_a_config_missing_a_field_is_named_not_filled_with_a_default():
    data = preset("demo").to_dict()
    for name in ("base_width", "heatmap_kind"):
        partial = {k: v for k, v in data.items() if k != name}
        with pytest.raises(ValueError, match=f"^model config lacks \\['{name}'\\]: every field is saved with "
                                             "the weights"):
            ModelConfig.from_dict(partial)
    with pytest.raises(ValueError, match="^the model config must be a JSON object, got list$"):
        ModelConfig.from_dict([1, 2])


def test_config_dict_round_trip_and_unknown_keys():
    config = preset("demo", pose_embedding="hme")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys \\['colour'\\]"):
        ModelConfig.from_dict({**config.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_fashion_preset_is_the_deepfashion_frame_in_a_bundleable_size():
    config = preset("fashion")
    assert config.canvas == (176, 256)  # (width, height): DeepFashion's 176 × 256 frame, no padding
    with torch.device("meta"):
        params = parameter_count(Generator1(config)) + parameter_count(Generator2(config))
    assert params == 7_299_206
    assert 2 * params < 16 * 2 ** 20  # fp16: fits what a GPU machine returns and the 25 MB bundle
    wider = preset("fashion", base_width=40)
    with torch.device("meta"):
        assert parameter_count(Generator1(wider)) > parameter_count(Generator1(config))


def test_config_canvas_is_width_height_and_old_layouts_still_read():
    config = preset("demo")
    assert config.canvas == Size(width=88, height=128) and config.canvas.width == 88
    data = config.to_dict()
    assert data["canvas"] == {"width": 88, "height": 128}
    assert ModelConfig.from_dict(data) == config
    older = dict(data, canvas=[128, 88])  # checkpoints and run states before: a list [height, width]
    assert ModelConfig.from_dict(older) == config
    with pytest.raises(ValueError, match="canvas must be"):
        ModelConfig.from_dict(dict(data, canvas={"w": 88, "h": 128}))
