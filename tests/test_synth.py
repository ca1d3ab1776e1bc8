"""pg2-train synth: real Anny bodies rendered by real Blender into PATN-format files."""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pg2_server.keypoints import INDEX, read_annotations
from pg2_server.wire.protocol import Size
from training import synth
from training.synth_body import ARM, FOOT, HEAD, LEG, TORSO, BodyModel, Pose, VIEWS, sample_phenotype, sample_pose
from training.synth_clothing import PATTERNS, Garment, Look, sample_look, vertex_colours
from training.synth_garments import dress
from training.synth_render import Renderer, frame_camera, visible_keypoints

pytestmark = pytest.mark.timeout(300)

IDENTITY = re.compile(r"^(.*?id\d{8})")  # the shared DeepFashion identity rule (training/pairs.py)
CONFIG = synth.SynthConfig(identities=2, test_identities=1, poses_per_identity=3, seed=3, size=Size(64, 96),
                           style="deepfashion")
TORSO_JOINTS = [INDEX[n] for n in ("right_shoulder", "left_shoulder", "right_hip", "left_hip")]


@pytest.fixture(scope="module")
def body():
    return BodyModel()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, body):
    out = tmp_path_factory.mktemp("synth") / "ds"
    report = synth.render_dataset(out, CONFIG, progress=False, body=body)
    return out, report


def read_pairs(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["from", "to"]
    return [tuple(r) for r in rows[1:]]


def test_dataset_has_patn_layout_and_formats(dataset):
    out, report = dataset
    assert report.rendered == 9 and report.skipped == 0 and report.images_per_minute > 0
    people = {}
    for split, count in (("train", 6), ("test", 3)):
        images = sorted(p.name for p in (out / split).glob("*.jpg"))
        assert len(images) == count
        annotations, problems = read_annotations(out / f"fasion-resize-annotation-{split}.csv", strict=True)
        assert problems == [] and sorted(annotations) == images
        header = (out / f"fasion-resize-annotation-{split}.csv").read_text().splitlines()[0]
        assert header == "name:keypoints_y:keypoints_x"
        for name in images:
            assert re.fullmatch(r"fashion(WO)?MENSynthid\d{8}01_\d(front|side|back)\.jpg", name)
            image = cv2.imread(str(out / split / name))
            assert image.shape == (96, 64, 3)
            kps = annotations[name]
            present = ~np.isnan(kps[:, 0])
            assert present.sum() >= 8  # a full body in frame shows most joints
            assert (kps[present] >= 0).all() and (kps[present, 0] < 64).all() and (kps[present, 1] < 96).all()
        people[split] = {IDENTITY.match(n)[1] for n in images}
        pairs = read_pairs(out / f"fasion-resize-pairs-{split}.csv")
        assert len(pairs) == report.pairs[split] > 0
        for a, b in pairs:
            assert a != b and IDENTITY.match(a)[1] == IDENTITY.match(b)[1]
            for name in (a, b):
                assert not np.isnan(annotations[name][TORSO_JOINTS]).any()
        # every ordered pair of torso-complete images of a person is there
        complete = [n for n in images if not np.isnan(annotations[n][TORSO_JOINTS]).any()]
        expected = sum(k * (k - 1) for k in np.unique([IDENTITY.match(n)[1] for n in complete],
                                                      return_counts=True)[1])
        assert len(pairs) == expected
    assert len(people["train"]) == 2 and len(people["test"]) == 1
    assert not people["train"] & people["test"]


def test_same_seed_same_bytes_and_resume(dataset, tmp_path, body):
    out, _ = dataset
    again = tmp_path / "again"
    synth.render_dataset(again, CONFIG, progress=False, body=body)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    # resume: a missing image is rendered again, identical; the others are skipped
    victim = next((again / "train").glob("*.jpg"))
    victim.unlink()
    (again / "fasion-resize-pairs-train.csv").unlink()
    report = synth.render_dataset(again, CONFIG, progress=False, body=body)
    assert (report.rendered, report.skipped) == (1, 8)
    assert victim.read_bytes() == (out / "train" / victim.name).read_bytes()
    assert (again / "fasion-resize-pairs-train.csv").read_bytes() == (out / "fasion-resize-pairs-train.csv").read_bytes()


def test_other_seed_other_people():
    a = synth.sample_person(1, 0, 3)
    b = synth.sample_person(2, 0, 3)
    assert a.phenotype != b.phenotype and a.look != b.look
    assert synth.sample_person(1, 0, 3) == a


def test_keypoints_land_on_the_rendered_body(body):
    config = synth.SynthConfig(identities=1, test_identities=1, poses_per_identity=6, seed=11,
                               size=Size(88, 128), style="deepfashion")
    w, h = config.size
    renderer = Renderer(body.faces, body.vertex_count, (w, h))
    checked = 0
    for identity in (0, 1):
        person = synth.sample_person(config.seed, identity, config.poses_per_identity)
        bodies = body.pose(person.phenotype, person.poses)
        renderer.set_colours(vertex_colours(person.look, bodies.rest_vertices, body.parts, bodies.rest_joints))
        for k in range(config.poses_per_identity):
            camera = synth.shot_camera(config, bodies.vertices[k], synth.shot_generator(config, identity, k))
            kps = visible_keypoints(camera, bodies.vertices[k], body.faces, bodies.joints[k])
            alpha = renderer.render(bodies.vertices[k], camera)[..., 3]
            # the whole body is in frame: its silhouette touches no border
            assert alpha[0].max() == 0 and alpha[-1].max() == 0
            rows, cols = np.nonzero(alpha > 127)
            assert rows.max() - rows.min() > 0.6 * h  # wide poses (arms out) are framed smaller
            for j, (x, y) in enumerate(kps):
                if np.isnan(x):
                    continue
                assert alpha[int(y), int(x)] > 0, (identity, k, j, x, y)
                checked += 1
            # occlusion: in a back view the face points are hidden and the ears may stay
            if person.poses[k].view == "back":
                assert np.isnan(kps[[INDEX["nose"], INDEX["right_eye"], INDEX["left_eye"]]]).all()
            if person.poses[k].view == "front":
                assert not np.isnan(kps[[INDEX["nose"], INDEX["right_eye"], INDEX["left_eye"]]]).any()
    assert checked > 100


def test_photo_renders_show_the_person_where_the_keypoints_are(body):
    """Cycles with garments, hair and the studio: keypoints on the person's rendered mask (body and
    garment meshes), a light seamless backdrop around them, the cut framings cut the legs."""
    config = synth.SynthConfig(identities=1, test_identities=1, poses_per_identity=4, seed=5,
                               size=Size(88, 128), style="deepfashion")
    w, h = config.size
    renderer = Renderer(body.faces, body.vertex_count, (w, h), engine="cycles", uvs=body.uvs, samples=2)
    framings = set()
    for identity in (0, 1):
        person = synth.sample_person(config.seed, identity, config.poses_per_identity)
        bodies = body.pose(person.phenotype, person.poses)
        renderer.set_colours(vertex_colours(person.look, bodies.rest_vertices, body.parts, bodies.rest_joints))
        renderer.set_person(person.look, dress(person.look, bodies.rest_vertices, bodies.vertices, body.faces,
                                               body.parts, bodies.rest_joints, bodies.joints))
        for k in range(config.poses_per_identity):
            shot = synth.shot_generator(config, identity, k)
            framing = synth.shot_framing(config, shot)
            framings.add(framing)
            camera = synth.shot_camera(config, bodies.vertices[k], shot, bodies.joints[k], framing)
            kps = visible_keypoints(camera, bodies.vertices[k], body.faces, bodies.joints[k])
            studio = synth.shot_studio(shot, bodies.vertices[k])
            image = renderer.render(bodies.vertices[k], camera, pose=k, studio=studio)
            mask = renderer.mask(bodies.vertices[k], camera, pose=k) > 127
            assert image.shape == (h, w, 4) and (image[..., 3] == 255).all()
            assert mask[0].sum() == 0  # the head is in frame
            if framing == "full":
                assert mask[-1].sum() == 0
            else:  # cut at the thigh or below the knee: the cut on the bottom edge, the head in the top part
                # (lower when arms held wide make the frame wider, and so taller, than the cut needs)
                assert mask[-1].sum() > 0
                assert np.nonzero(mask.any(1))[0].min() < (0.12 if np.nonzero(mask.any(0))[0].ptp() < 0.6 * w
                                                           else 0.3) * h
            for x, y in kps[~np.isnan(kps[:, 0])]:
                assert mask[int(y), int(x)], (identity, k, x, y)
            backdrop = image[..., :3][~mask].astype(float)
            assert np.median(backdrop) > 150  # white or light grey paper, not a dark studio
            # the person stands out of the paper
            assert np.abs(image[..., :3][mask].astype(float).mean(0) - np.median(backdrop, 0)).max() > 10
    assert framings >= {"full"}


def test_white_garments_on_white_paper_keep_their_shading(body):
    """Exposed as a shop photo: a person in white under the brightest studio is not clipped to the
    paper's white (the earlier, stronger lights washed 61 % of this person out), the paper stays white."""
    white = Garment((0.92, 0.92, 0.92), (0.92, 0.92, 0.92), "plain", 0.05, 0.0)  # sample_look: 0.82–0.98
    look = Look(skin=(0.95, 0.8, 0.7), hair=(0.9, 0.8, 0.6), hair_style="bob", upper=white, lower=white,
                shoes=white, sleeve=0.9, leg_length=0.95, lower_kind="trousers", leg_width=0.3)
    person = synth.sample_person(0, 0, 1)
    bodies = body.pose(person.phenotype, person.poses)
    renderer = Renderer(body.faces, body.vertex_count, (88, 128), engine="cycles", uvs=body.uvs, samples=2)
    renderer.set_colours(vertex_colours(look, bodies.rest_vertices, body.parts, bodies.rest_joints))
    renderer.set_person(look, dress(look, bodies.rest_vertices, bodies.vertices, body.faces, body.parts,
                                    bodies.rest_joints, bodies.joints))
    config = synth.SynthConfig(1, 1, 1, 0, Size(88, 128), "deepfashion")
    camera = synth.shot_camera(config, bodies.vertices[0], synth.shot_generator(config, 0, 0))
    floor, wall = float(bodies.vertices[0][:, 2].min()), float(bodies.vertices[0][:, 1].max() + 2.0)
    studio = synth.Studio((1.0, 1.0, 1.0), 1.35, 1.0, 1.25, floor, wall)  # the brightest shot_studio draws
    image = renderer.render(bodies.vertices[0], camera, studio=studio)[..., :3].astype(int)
    mask = renderer.mask(bodies.vertices[0], camera) > 127
    person_white = (image[mask] >= 250).all(1).mean()
    assert person_white < 0.1, person_white
    assert np.median(image[~mask]) >= 245  # the paper is white
    assert np.median(image[mask]) < 235    # the white clothes are shaded, not paper-white


def test_garment_meshes_enclose_the_body_and_follow_it(body):
    plain = lambda c, p="plain": Garment(c, c, p, 0.05, 0.0)  # noqa: E731
    look = Look(skin=(0.8, 0.6, 0.5), hair=(0.1, 0.1, 0.1), hair_style="long", upper=plain((1.0, 1.0, 1.0)),
                lower=plain((0.2, 0.2, 0.6), "floral"), shoes=plain((0.1, 0.1, 0.1)), sleeve=0.98,
                leg_length=0.72, lower_kind="skirt", skirt_flare=0.3, sleeve_flare=0.3,
                accessories=("bag", "sunglasses", "necklace", "beanie"))
    person = synth.sample_person(0, 0, 3)
    bodies = body.pose(person.phenotype, person.poses)
    layers = {layer.name: layer for layer in dress(look, bodies.rest_vertices, bodies.vertices, body.faces,
                                                   body.parts, bodies.rest_joints, bodies.joints)}
    assert {"skirt", "briefs", "top", "sleeve2", "sleeve5", "shoes", "hair-cap", "hair-fall", "strap", "bag",
            "sunglasses", "necklace", "beanie"} <= set(layers)
    for layer in layers.values():
        assert layer.vertices.shape == (3, len(layer.rest), 3) and layer.faces.max() < len(layer.rest)
        assert np.isfinite(layer.vertices).all()
    skirt = layers["skirt"].vertices.reshape(3, 14, 40, 3)
    for k in range(3):
        hips = (bodies.joints[k, INDEX["right_hip"]] + bodies.joints[k, INDEX["left_hip"]]) / 2
        radius = np.linalg.norm((skirt[k] - hips)[..., :2], axis=-1)
        assert radius[-1].mean() > radius[0].mean() + 0.05  # flared: wider at the hem than at the waist
        legs = bodies.vertices[k][np.isin(body.parts, (LEG,))]
        for ring, r in zip(skirt[k], radius):
            near = legs[np.abs(legs[:, 2] - ring[0, 2]) < 0.01]
            if len(near):  # the legs stay inside the skirt: no point further out than the ring
                assert np.linalg.norm((near - hips)[:, :2], axis=1).max() <= r.max() + 1e-6
    # the shells move with the body: a top vertex keeps its distance to the body vertex it came from
    top = layers["top"].vertices
    assert not np.allclose(top[0], top[1])
    assert (np.abs(np.linalg.norm(top[1] - top[0], axis=1)) > 0).any()


def test_projection_matches_blender(body):
    renderer = Renderer(body.faces, body.vertex_count, (88, 128))
    person = synth.sample_person(0, 0, 2)
    bodies = body.pose(person.phenotype, person.poses)
    config = synth.SynthConfig(1, 1, 2, 0, Size(88, 128), "deepfashion")
    camera = synth.shot_camera(config, bodies.vertices[0], synth.shot_generator(config, 0, 0))
    renderer.camera.location = camera.position
    renderer.camera.data.lens = camera.lens
    ours = camera.project(bodies.joints[0])
    blender = renderer.blender_projection(bodies.joints[0])
    np.testing.assert_allclose(ours, blender, atol=1e-3)


def test_right_is_the_subjects_right(body):
    """Facing the camera, the subject's right shoulder is on the image's left."""
    front = Pose({"root": (0.0, 0.0, 0.0)}, "front", 0.0)
    bodies = body.pose(sample_phenotype(np.random.default_rng(0)), [front])
    j = bodies.joints[0]
    assert j[INDEX["right_shoulder"], 0] < j[INDEX["left_shoulder"], 0]
    assert j[INDEX["right_hip"], 0] < j[INDEX["left_hip"], 0]
    assert j[INDEX["nose"], 1] < j[INDEX["neck"], 1]  # the face is towards −Y, the camera
    np.testing.assert_allclose(j[INDEX["neck"]], (j[INDEX["right_shoulder"]] + j[INDEX["left_shoulder"]]) / 2)


def test_garments_are_separate_regions(body):
    plain = lambda c: Garment(c, c, "plain", 0.05, 0.0)  # noqa: E731
    look = Look(skin=(0.8, 0.6, 0.5), hair=(0.1, 0.1, 0.1), hair_style="short", upper=plain((1.0, 0.0, 0.0)),
                lower=plain((0.0, 1.0, 0.0)), shoes=plain((0.0, 0.0, 1.0)), sleeve=0.4, leg_length=0.97)
    person = synth.sample_person(0, 0, 2)
    bodies = body.pose(person.phenotype, person.poses)
    rgba = vertex_colours(look, bodies.rest_vertices, body.parts, bodies.rest_joints)
    red, green, blue = (np.all(np.isclose(rgba[:, :3], c), axis=1) for c in ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    z = bodies.rest_vertices[:, 2]
    hip_z = bodies.rest_joints[INDEX["right_hip"], 2]
    ankle_z = bodies.rest_joints[INDEX["right_ankle"], 2]
    assert red.sum() > 1000 and green.sum() > 1000 and blue.sum() > 300
    assert z[red].min() > hip_z - 0.05 and set(np.unique(body.parts[red])) <= {TORSO, ARM}
    assert z[green].max() < hip_z + 0.2 and set(np.unique(body.parts[green])) <= {TORSO, LEG}
    assert z[blue].max() < ankle_z + 0.1 and set(np.unique(body.parts[blue])) <= {FOOT, LEG}
    assert not (red & green).any() and not (green & blue).any()
    hands_and_head = np.isin(body.parts, (HEAD,))
    assert not red[hands_and_head].any()


def test_looks_and_poses_vary_across_identities():
    rng = np.random.default_rng(0)
    looks = [sample_look(rng, female=bool(i % 2)) for i in range(60)]
    assert {g.pattern for lk in looks for g in (lk.upper, lk.lower)} == set(PATTERNS)
    assert len({lk.upper.colour for lk in looks}) == 60
    assert len({lk.skin for lk in looks}) > 30 and len({lk.hair_style for lk in looks}) >= 2
    assert len({lk.sleeve for lk in looks}) >= 3 and len({lk.leg_length for lk in looks}) >= 2
    for view, (lo, hi) in (("front", (-0.8, 0.8)), ("back", (np.pi - 0.72, np.pi + 0.72))):
        yaws = [sample_pose(rng, view).yaw for _ in range(50)]
        assert lo <= min(yaws) and max(yaws) <= hi
    sides = [abs(sample_pose(rng, "side").yaw) for _ in range(50)]
    assert all(np.pi / 2 - 0.4 <= s <= np.pi / 2 + 0.4 for s in sides)
    # joints stay within limits: no bone but the root (the view) turns further than 110 degrees
    for _ in range(100):
        for bone, angles in sample_pose(rng, str(rng.choice(VIEWS))).rotations.items():
            assert bone == "root" or max(abs(a) for a in angles) <= np.radians(110), (bone, angles)


def test_market_style_names_and_size(tmp_path, body):
    config = synth.SynthConfig(identities=1, test_identities=1, poses_per_identity=3, seed=0, size=Size(64, 128),
                               style="market")
    synth.render_dataset(tmp_path, config, progress=False, body=body)
    annotations, problems = read_annotations(tmp_path / "market-annotation-train.csv", strict=True)
    assert problems == [] and len(annotations) == 3
    for name in annotations:
        assert re.fullmatch(r"0001_c[123]s1_00000[123]_00\.jpg", name)
        image = cv2.imread(str(tmp_path / "train" / name))
        assert image.shape == (128, 64, 3)
        # a street backdrop, not a plain studio wall: the top row varies
        assert image[0].std() > 1.0 or image[:, 0].std() > 5.0
    assert (tmp_path / "market-pairs-test.csv").read_text().startswith("from,to\n")
    assert [p.name for p in (tmp_path / "test").glob("*.jpg")][0].startswith("0002_")


def run_main(argv, capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    code = synth.main(parser.parse_args(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--identities", "0"], "--identities must be at least 1"),
    (["--identities", "2", "--test-identities", "0"], "--test-identities must be at least 1"),
    (["--identities", "2", "--poses-per-identity", "2"], "at least 3 to make pairs"),
    (["--identities", "2", "--size", "20x10"], "too small"),
    (["--identities", "10000", "--style", "market"], "Market names hold at most 9998"),
    (["--identities", "2", "--size", "20x10", "--engine", "workbench"], "too small"),
])
def test_bad_arguments_say_what_to_fix(argv, message, tmp_path, capsys):
    code, err = run_main(["--out", str(tmp_path / "x")] + argv, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "x").exists()


def test_unparseable_size_is_refused(capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--identities", "1", "--size", "big"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_out_that_is_a_file_or_holds_other_settings(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, err = run_main(["--out", str(a_file), "--identities", "1"], capsys)
    assert code == 2 and "is a file" in err
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "synth.json").write_text('{"identities": 5, "test_identities": 1, "poses_per_identity": 8, '
                                       '"seed": 0, "size": [256, 176], "style": "deepfashion"}')
    code, err = run_main(["--out", str(folder), "--identities", "1", "--seed", "4"], capsys)
    assert code == 2 and "other settings" in err and "seed: 0 there, 4 now" in err


def test_the_frame_holds_the_body_as_planned_at_its_middle_depth():
    """A body 1.8 m tall and 0.2 m deep: full shots fill the planned share of the height, and a
    cut framing puts the cut on the bottom edge with the head (1 - fill) below the top."""
    rng = np.random.default_rng(0)
    body = np.column_stack([rng.uniform(-0.2, 0.2, 2000), rng.uniform(-0.1, 0.1, 2000), rng.uniform(0, 1.8, 2000)])
    body = np.vstack([body, [[0, 0, 0], [0, 0, 1.8]]])
    w, h = 176, 256
    full = frame_camera(body, (w, h), 0.85, (0.0, 0.0))
    feet, head = full.project(np.array([[0, 0, 0.0], [0, 0, 1.8]]))[:, 1]
    assert (feet - head) / h == pytest.approx(0.85, abs=0.01)
    cut = frame_camera(body, (w, h), 0.85, (0.0, 0.0), cut=0.9)
    at_cut, head = cut.project(np.array([[0, 0, 0.9], [0, 0, 1.8]]))[:, 1]
    assert at_cut == pytest.approx(h, abs=1.0) and head / h == pytest.approx(0.15, abs=0.01)


def test_the_bags_strap_is_one_band_from_shoulder_to_hip(body):
    """The strap's band is narrower than the body's triangles: it takes every triangle touching it,
    so that it does not fall apart into patches (at most its front and back halves meet over the
    shoulder, where the band ends)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from training.synth_clothing import garment_regions
    from training.synth_garments import shell

    worn = [i for i in range(60) if "bag" in synth.sample_person(0, i, 3).look.accessories][:3]
    assert worn
    for identity in worn:
        person = synth.sample_person(0, identity, 3)
        bodies = body.pose(person.phenotype, person.poses[:1])
        mask = garment_regions(person.look, bodies.rest_vertices, body.parts, bodies.rest_joints)["strap"]
        strap = shell("strap", "leather", mask, body.faces, bodies.rest_vertices, bodies.vertices,
                      np.zeros_like(bodies.vertices), 0.0, band=True)
        edges = np.concatenate([strap.faces[:, [0, 1]], strap.faces[:, [1, 2]], strap.faces[:, [2, 0]]])
        count = len(strap.rest)
        pieces, _ = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                                                   shape=(count, count)), directed=False)
        assert pieces <= 2, (identity, pieces)
