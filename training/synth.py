"""`pg2-train synth`: render synthetic people with Blender into a PATN-format dataset.

    pg2-train synth --out data/synth --identities 400 --test-identities 70 \\
        --poses-per-identity 8 --seed 0            # DeepFashion style, 256x176
    python -m training.synth --out data/market-synth --identities 50 --poses-per-identity 6 --style market

Writes DIR/train/*.jpg, DIR/test/*.jpg, the annotation and pairs CSVs under PATN's names and
DIR/synth.json (the settings; a rerun with other settings into the same folder is refused).
Everything an image shows follows from (seed, identity number, pose number), so a rerun
skips images already written and reproduces the same files. See docs/synthetic.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pg2_server.atomic import write_bytes_atomic
from pg2_server.keypoints import INDEX, write_annotations
from pg2_server.wire.protocol import Size

from .pairs import write_pairs
from .synth_body import BodyModel, Phenotype, Pose, sample_phenotype, sample_pose
from .synth_clothing import Look, sample_look, vertex_colours
from .synth_garments import dress
from .synth_render import ENGINES, Camera, Renderer, Studio, frame_camera, visible_keypoints


@dataclass(frozen=True)
class Style:
    """What a dataset style fixes: default size, file names of a split, how much height the body fills."""
    size: Size
    annotations: str
    pairs: str
    fill: tuple[float, float]


STYLES = {
    "deepfashion": Style(Size(176, 256), "fasion-resize-annotation-{}.csv", "fasion-resize-pairs-{}.csv", (0.80, 0.93)),
    "market": Style(Size(64, 128), "market-annotation-{}.csv", "market-pairs-{}.csv", (0.82, 0.95)),
}
TORSO = tuple(INDEX[n] for n in ("right_shoulder", "left_shoulder", "right_hip", "left_hip"))
_VIEW_CHOICES = ("front", "side", "back")


class SynthError(ValueError):
    """Settings that cannot make a dataset; the message says which and what to use."""


@dataclass(frozen=True)
class SynthConfig:
    """What to render; saved as DIR/synth.json so that a resumed run renders the same dataset."""
    identities: int
    test_identities: int
    poses_per_identity: int
    seed: int
    size: Size  # (width, height); the --size flag reads HEIGHTxWIDTH, as the datasets are described
    style: str
    engine: str = "cycles"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", Size(*(int(v) for v in self.size)))

    def check(self) -> None:
        if self.style not in STYLES:
            raise SynthError(f"--style {self.style!r} is unknown; use one of {', '.join(STYLES)}")
        if self.engine not in ENGINES:
            raise SynthError(f"--engine {self.engine!r} is unknown; use one of {', '.join(ENGINES)}")
        if self.identities < 1:
            raise SynthError(f"--identities must be at least 1 (got {self.identities})")
        if self.test_identities < 1:
            raise SynthError(f"--test-identities must be at least 1 (got {self.test_identities})")
        if self.poses_per_identity < 3:
            # Each person's first three views are front, side and back, and a side view has no pair
            # (pairs need both shoulders and both hips): two images would make no pair at all.
            raise SynthError(f"--poses-per-identity must be at least 3 to make pairs: each person's second image "
                             f"is a side view, which pairs leave out (got {self.poses_per_identity})")
        if self.identities + self.test_identities > 99_999_999:
            raise SynthError("at most 99,999,999 identities fit DeepFashion's 8-digit ids")
        if self.style == "market" and self.identities + self.test_identities > 9998:
            raise SynthError("Market names hold at most 9998 identities (4 digits, 0000 means distractor)")
        w, h = self.size
        if h < 32 or w < 16:
            raise SynthError(f"--size {h}x{w} is too small to show a person; use at least 32x16 (HxW)")


def parse_size(text: str) -> Size:
    """'256x176' → Size(width=176, height=256): the flag is height × width, as the datasets are described."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 256x176")
    return Size(width=int(parts[1]), height=int(parts[0]))


def image_name(config: SynthConfig, identity: int, pose: int, view: str, female: bool) -> str:
    """A file name the shared identity rule (training/pairs.py) reads back as this identity."""
    if config.style == "market":
        camera = _VIEW_CHOICES.index(view) + 1
        return f"{identity + 1:04d}_c{camera}s1_{pose + 1:06d}_00.jpg"
    gender = "WOMEN" if female else "MEN"
    return f"fashion{gender}Synthid{identity:08d}01_{pose + 1}{view}.jpg"


def _views(rng: np.random.Generator, count: int) -> list[str]:
    """DeepFashion's mix: a front, a side and a back view first, then mostly front views."""
    first = list(_VIEW_CHOICES[:count])
    rest = rng.choice(_VIEW_CHOICES, size=max(0, count - 3), p=(0.5, 0.3, 0.2))
    return first + [str(v) for v in rest]


def background(rng: np.random.Generator, style: str, size: Size) -> np.ndarray:
    """A backdrop (H, W, 3) float in 0–255: a light studio wall or a Market-like street scene."""
    w, h = size
    ys = np.linspace(0, 1, h)[:, None, None]
    if style == "deepfashion":
        top = rng.uniform(225, 255) - rng.uniform(0, 12, 3) * rng.random()
        return np.broadcast_to(top - ys * rng.uniform(0, 25), (h, w, 3)).copy()
    def muted() -> np.ndarray:  # campus walls, pavement, foliage: greys with a slight tint
        return rng.uniform(40, 210) + rng.normal(0, 18, 3)

    wall, ground = muted(), muted()
    horizon = rng.uniform(0.55, 0.85)
    image = np.where(ys < horizon, wall * (1.1 - 0.3 * ys), ground * (0.8 + 0.3 * ys)) * np.ones((h, w, 3))
    for _ in range(int(rng.integers(2, 7))):  # windows, doors, bikes, passers-by: blocks of colour
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(3, max(4, w // 2))), y0 + int(rng.integers(3, max(4, h // 2)))
        image[y0:y1, x0:x1] = muted()
    image += rng.normal(0, 6, image.shape)
    return cv2.GaussianBlur(np.clip(image, 0, 255), (0, 0), 1.5)


def composite(rgba: np.ndarray, backdrop: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """The render over its backdrop as uint8 RGB; Market's camera blur and noise on top."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    image = rgba[..., :3] * alpha + backdrop * (1 - alpha)
    if style == "market":
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.8)) + rng.normal(0, 3, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


@dataclass
class SynthReport:
    """What a run did: images rendered and skipped, pairs per split, wall and CPU seconds of the
    loop over people (after loading Anny and Blender, a few seconds)."""
    rendered: int = 0
    skipped: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    pairs: dict | None = None

    @property
    def images_per_minute(self) -> float:
        return 60 * self.rendered / self.seconds if self.seconds > 0 else 0.0


FLUSH_EVERY = 25  # people between rewrites of a split's CSVs during a run


def _write_split(out: Path, style: Style, split: str, rows: list, pairs: list) -> None:
    """A split's annotation and pairs CSVs for the images so far (each replaced atomically)."""
    write_annotations(out / style.annotations.format(split), rows)
    write_pairs(out / style.pairs.format(split), pairs)


def _check_folder(out: Path, config: SynthConfig) -> None:
    meta = out / "synth.json"
    wanted = asdict(config)
    wanted["size"] = config.size._asdict()  # {"width": W, "height": H}
    if meta.exists():
        try:
            found = json.loads(meta.read_text())
        except json.JSONDecodeError as error:
            raise SynthError(f"{meta} is not valid JSON ({error}); remove it or use another --out") from None
        if isinstance(found, dict) and isinstance(found.get("size"), list) and len(found["size"]) == 2:
            found["size"] = {"width": found["size"][1], "height": found["size"][0]}  # older folders: [H, W]
        if found != wanted:
            diff = ", ".join(f"{k}: {found.get(k)!r} there, {v!r} now" for k, v in wanted.items() if found.get(k) != v)
            raise SynthError(f"{out} holds a synthetic dataset made with other settings ({diff}); "
                             "use another --out or the same settings to resume")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(meta, (json.dumps(wanted, indent=2) + "\n").encode())   # a cut-off run can resume


@dataclass(frozen=True)
class Person:
    """One identity: body shape, look and the poses it is shown in."""
    phenotype: Phenotype
    look: Look
    poses: list[Pose]


def sample_person(seed: int, identity: int, poses_per_identity: int) -> Person:
    """Identity number `identity` of the dataset with this seed (independent of all others)."""
    rng = np.random.default_rng([seed, identity])
    phenotype = sample_phenotype(rng)
    look = sample_look(rng, phenotype.female)
    poses = [sample_pose(rng, view) for view in _views(rng, poses_per_identity)]
    return Person(phenotype, look, poses)


FRAMINGS = ("full", "three-quarter", "thigh")


def shot_framing(config: SynthConfig, shot: np.random.Generator) -> str:
    """How much of the person an image shows: DeepFashion's photo-like sets mix in shots cut
    below the knee and at mid-thigh; the flat look and Market style always show all of it."""
    if config.style != "deepfashion" or config.engine != "cycles":
        return "full"
    return str(shot.choice(FRAMINGS, p=(0.7, 0.15, 0.15)))


def shot_camera(config: SynthConfig, vertices: np.ndarray, shot: np.random.Generator,
                joints: np.ndarray | None = None, framing: str = "full") -> Camera:
    """The camera of one image: framing drawn from the shot's own generator."""
    w, h = config.size
    fill = shot.uniform(*STYLES[config.style].fill)
    offset = (shot.uniform(-0.03, 0.03), shot.uniform(-0.02, 0.02))
    cut = None
    if framing != "full" and joints is not None:
        hip = (joints[INDEX["right_hip"], 2] + joints[INDEX["left_hip"], 2]) / 2
        knee = (joints[INDEX["right_knee"], 2] + joints[INDEX["left_knee"], 2]) / 2
        ankle = (joints[INDEX["right_ankle"], 2] + joints[INDEX["left_ankle"], 2]) / 2
        cut = hip - 0.5 * (hip - knee) if framing == "thigh" else knee - 0.45 * (knee - ankle)
        fill = shot.uniform(0.86, 0.92)
    return frame_camera(vertices, (w, h), fill, offset, cut=cut)


def shot_studio(shot: np.random.Generator, vertices: np.ndarray) -> Studio:
    """A DeepFashion-like studio: white (most often) or light grey seamless paper, soft key light
    from one side, the floor under the lowest point of the body."""
    white = shot.random() < 0.6
    level = shot.uniform(0.93, 1.0) if white else shot.uniform(0.72, 0.9)
    paper = tuple(float(c) for c in np.clip(level + shot.normal(0, 0.01, 3), 0, 1))
    glow = shot.uniform(0.9, 1.35) if white else shot.uniform(0.3, 0.65)
    return Studio(paper, float(glow), float(shot.choice((-1.0, 1.0))), float(shot.uniform(0.75, 1.25)),
                  float(vertices[:, 2].min()), float(vertices[:, 1].max() + shot.uniform(1.5, 3.0)))


def _graphic_panel(rest_joints: np.ndarray) -> tuple[float, float, float, float, float]:
    """Where a graphic print sits on a top (rest coordinates): a chest panel, front side."""
    neck = rest_joints[INDEX["neck"]]
    return (float(neck[0] - 0.085), float(neck[0] + 0.085), float(neck[2] - 0.3), float(neck[2] - 0.1),
            float(neck[1]))


def shot_generator(config: SynthConfig, identity: int, pose: int) -> np.random.Generator:
    """Random numbers of one image (framing, backdrop, noise): a rerun redraws exactly these."""
    return np.random.default_rng([config.seed, identity, pose])


def render_dataset(out: str | Path, config: SynthConfig, progress: bool = True,
                   body: BodyModel | None = None) -> SynthReport:
    """Render (or finish rendering) the dataset `config` describes into folder `out`.

    `body` may pass an already loaded BodyModel (loading Anny takes seconds)."""
    config.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file; give a folder")
    _check_folder(out, config)
    style = STYLES[config.style]
    w, h = config.size
    body = body or BodyModel()
    renderer = Renderer(body.faces, body.vertex_count, (w, h), engine=config.engine, uvs=body.uvs)
    photo = config.engine == "cycles"
    # the (small) test split first, so that a long run has its evaluation set early
    splits = {"test": range(config.identities, config.identities + config.test_identities),
              "train": range(config.identities)}
    report = SynthReport(pairs={})
    total = (config.identities + config.test_identities) * config.poses_per_identity
    bar = tqdm(total=total, unit="img", desc="synth", disable=not progress, dynamic_ncols=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for split, identities in splits.items():
        folder = out / split
        folder.mkdir(exist_ok=True)
        rows, pairs = [], []
        for identity in identities:
            person = sample_person(config.seed, identity, config.poses_per_identity)
            bodies = body.pose(person.phenotype, person.poses)
            coloured = False
            with_torso = []
            for k, pose in enumerate(person.poses):
                name = image_name(config, identity, k, pose.view, person.phenotype.female)
                shot = shot_generator(config, identity, k)
                framing = shot_framing(config, shot)
                camera = shot_camera(config, bodies.vertices[k], shot, bodies.joints[k], framing)
                keypoints = visible_keypoints(camera, bodies.vertices[k], body.faces, bodies.joints[k])
                rows.append((name, keypoints))
                if not np.isnan(keypoints[list(TORSO)]).any():
                    with_torso.append(name)
                path = folder / name
                if path.exists():
                    report.skipped += 1
                else:
                    if not coloured:
                        renderer.set_colours(vertex_colours(person.look, bodies.rest_vertices, body.parts,
                                                            bodies.rest_joints))
                        if photo:
                            renderer.graphic_panel = _graphic_panel(bodies.rest_joints)
                            renderer.set_person(person.look, dress(person.look, bodies.rest_vertices,
                                                                   bodies.vertices, body.faces, body.parts,
                                                                   bodies.rest_joints, bodies.joints))
                        coloured = True
                    studio = shot_studio(shot, bodies.vertices[k]) if photo and config.style == "deepfashion" else None
                    rgba = renderer.render(bodies.vertices[k], camera, pose=k, studio=studio)
                    if studio is None:
                        image = composite(rgba, background(shot, config.style, config.size), config.style, shot)
                    else:
                        image = rgba[..., :3]
                    quality = 95
                    if photo:  # a camera's sensor noise and a shop's JPEG compression
                        image = np.clip(image + shot.normal(0, shot.uniform(0.8, 2.5), image.shape), 0, 255)
                        image = np.round(image).astype(np.uint8)
                        quality = int(shot.integers(82, 96))
                    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                            [cv2.IMWRITE_JPEG_QUALITY, quality])
                    if not ok:
                        raise RuntimeError(f"OpenCV could not encode {name} as JPEG")
                    write_bytes_atomic(path, jpeg.tobytes())
                    report.rendered += 1
                bar.update(1)
            pairs += [(a, b) for a in with_torso for b in with_torso if a != b]
            if (identity - identities.start) % FLUSH_EVERY == FLUSH_EVERY - 1:
                _write_split(out, style, split, rows, pairs)  # a long run's CSVs cover what is rendered
        _write_split(out, style, split, rows, pairs)
        report.pairs[split] = len(pairs)
    bar.close()
    report.seconds = time.perf_counter() - start
    report.cpu_seconds = time.process_time() - cpu_start
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `synth` command's flags (shared by `pg2-train synth` and `python -m training.synth`)."""
    parser.add_argument("--out", required=True, help="dataset folder (created; rerun to resume)")
    parser.add_argument("--identities", type=int, required=True, help="people in the train split")
    parser.add_argument("--test-identities", type=int,
                        help="people in the test split, never in train (default: 15%% of --identities, at least 1)")
    parser.add_argument("--poses-per-identity", type=int, default=8, help="images per person (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="everything rendered follows from it (default 0)")
    parser.add_argument("--size", type=parse_size,
                        help="HEIGHTxWIDTH (default 256x176 for deepfashion, 128x64 for market)")
    parser.add_argument("--style", choices=sorted(STYLES), default="deepfashion",
                        help="file names, size and backgrounds of which dataset (default deepfashion)")
    parser.add_argument("--engine", choices=ENGINES, default="cycles",
                        help="cycles: photo-like (path traced, denoised; default); workbench: the flat, fast look")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(sub) -> None:
    """Register `pg2-train synth`."""
    p = sub.add_parser("synth", help="render a synthetic training set (see docs/synthetic.md)")
    add_arguments(p)
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    """Map the flags onto a SynthConfig, filling the style's defaults."""
    style = args.style
    if style not in STYLES:
        raise SynthError(f"--style {style!r} is unknown; use one of {', '.join(STYLES)}")
    test = args.test_identities
    if test is None:
        test = max(1, round(0.15 * args.identities))
    size = args.size or STYLES[style].size
    return SynthConfig(identities=args.identities, test_identities=test,
                       poses_per_identity=args.poses_per_identity, seed=args.seed, size=size, style=style,
                       engine=getattr(args, "engine", "cycles"))


def main(args: argparse.Namespace) -> int:
    """Run `synth`; prints the rate and what was written. Returns the exit status."""
    try:
        config = config_from_args(args)
        config.check()
        report = render_dataset(args.out, config, progress=not getattr(args, "quiet", False))
    except SynthError as error:
        print(f"synth: error: {error}", file=sys.stderr)
        return 2
    w, h = config.size
    cpu = f", {report.cpu_seconds / report.rendered:.2f} CPU s each" if report.rendered else ""
    print(f"{args.out}: {report.rendered} images rendered in {report.seconds:.0f} s "
          f"({report.images_per_minute:.1f} images/min{cpu}, {w}x{h} {config.style}, {config.engine}), "
          f"{report.skipped} already there; "
          f"pairs: {report.pairs['train']} train, {report.pairs['test']} test")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
