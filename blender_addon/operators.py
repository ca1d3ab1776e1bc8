"""Operators: generate the current frame or a frame range, test the server, add the pose rig.

In the UI the generation runs on a worker thread while a modal timer polls its events
(progress in the status bar and the panel, Esc cancels); in background mode (`blender -b`)
the same run blocks, so scripts can render a shot.
"""
from __future__ import annotations

import os
import queue
import threading
import traceback

import bpy
from bpy.app.handlers import persistent

from . import generation, occlusion, record, rig
from .generation import Batch, Framing, GenerationError
from .mapping import LIMBS, MappingError
from .preferences import connection, describe_info, preferences
from .projection import pixel_aspect
from .wire import client

RESULT_IMAGE = "PG2 Result"
_RUNS: set = set()  # runs of the modal operators now going


def running() -> bool:
    """Whether a generation is under way in this Blender session."""
    return bool(_RUNS)


def _scene_armature(context):
    settings = context.scene.pg2
    if settings.armature is not None:
        return settings.armature
    active = context.active_object
    return active if active is not None and active.type == "ARMATURE" else None


def missing_for_poses(context) -> str | None:
    """What the scene lacks to pose and project anything (None when nothing): the operators' poll
    greys their buttons out and says this."""
    if _scene_armature(context) is None:
        return "choose the armature to pose in the PG2 panel (3D Viewport sidebar, PG2 tab)"
    camera = context.scene.camera
    if camera is None:
        return "the scene has no active camera; add one and make it active"
    if getattr(camera.data, "type", None) == "PANO":
        return (f"the active camera {camera.name} is panoramic; make it Perspective or Orthographic "
                "(Camera properties › Lens › Type)")
    return None


class _NeedsPoses:
    """poll(): an armature and a camera, else the button is greyed out with the reason."""

    @classmethod
    def poll(cls, context):
        missing = missing_for_poses(context)
        if missing is not None:
            cls.poll_message_set(missing)
        return missing is None


def _framing(scene) -> Framing:
    settings, aspect = scene.pg2, pixel_aspect(scene)
    if settings.framing == "CAMERA":   # the Background setting is Person framing's (hidden here):
        return Framing("CAMERA", settings.margin, (1.0, 1.0, 1.0), aspect)   # blank frames are plain white
    background = {"TRANSPARENT": None, "RENDER": "RENDER"}.get(settings.background,
                                                                tuple(settings.background_color))
    return Framing(settings.framing, settings.margin, background, aspect)


def check_renders_are_images(scene) -> None:
    """Person framing over the Render reads each frame's render as an image file: a video output
    has no file per frame (and one rendered here would be written under the video's name)."""
    if scene.render.is_movie_format:
        raise GenerationError(
            f"the scene's output is a video ({scene.render.image_settings.file_format}), but Background "
            "Render needs each frame's render as an image file: set Output Properties › Output › File "
            "Format to PNG, render the animation, then generate")


def _render_paths(scene, frames, render_missing: bool) -> list[str]:
    """Each frame's rendered file; renders the frame first if allowed (one frame, blocking)."""
    check_renders_are_images(scene)
    paths = []
    for frame in frames:
        path = scene.render.frame_path(frame=frame)
        if not os.path.isfile(path) and render_missing:
            current = scene.frame_current
            scene.frame_set(frame)
            try:
                bpy.ops.render.render()
                # A still render does not expand the path's #, so save the result ourselves.
                bpy.data.images["Render Result"].save_render(path, scene=scene)
            finally:
                scene.frame_set(current)
        if not os.path.isfile(path):
            raise GenerationError(f"no render of frame {frame} at {path}: render the animation "
                                  "first (Render › Render Animation) or choose another background")
        paths.append(path)
    return paths


def check_output(pattern: str, paths) -> None:
    """Refuse output that would land somewhere unexpected or cannot be written, before any work."""
    if pattern.startswith("//") and not bpy.data.filepath:
        raise GenerationError(f"the output path {pattern} is relative to the .blend file, which is not "
                              "saved yet: save the file or choose an absolute output folder")
    for folder in sorted({os.path.dirname(p) for p in paths if p}):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise GenerationError(f"cannot create the output folder {folder}: {e.strerror}; "
                                  "choose another output path") from None
        if not os.access(folder, os.W_OK):
            raise GenerationError(f"the output folder {folder} is not writable; choose another output path")


def check_frame_files(scene, path: str) -> None:
    """Refuse a frame file format the result cannot be written in: JPEG takes the server's own
    encoding as is, so a result composited (Person framing) or stretched to pixels that are not
    square is written as PNG."""
    if generation.file_format(path) == "png":
        return
    if scene.pg2.framing == "PERSON":
        raise GenerationError("Person framing composites the result and writes PNG files "
                              "(with transparency if chosen); make the output path end in .png")
    if pixel_aspect(scene) != 1.0:
        render = scene.render
        raise GenerationError(f"the frame's pixels are not square (Pixel Aspect {render.pixel_aspect_x:g}:"
                              f"{render.pixel_aspect_y:g}, Output Properties › Format): each result is stretched "
                              "to them and written as PNG; make the output path end in .png")


def check_not_renders(scene, frames, paths) -> None:
    """Refuse output files that are the scene's own renders (Output Properties › Output path):
    writing there would replace the renders, and with Person framing over the Render, the very
    frames it composites over. A video output is no frame file (and asking Blender for its name
    creates its folder)."""
    if scene.render.is_movie_format:
        return
    for frame, path in zip(frames, paths):
        if path and os.path.abspath(path) == os.path.abspath(bpy.path.abspath(scene.render.frame_path(frame=frame))):
            raise GenerationError(f"the PG2 output {path} is the scene's render of frame {frame}: choose another "
                                  "output path in the PG2 panel, so that the renders are kept")


def show_result(pixels, size, camera=None):
    """Put flat float RGBA pixels (Blender's bottom-up order, from the worker) of `size` (W, H)
    into the `PG2 Result` image, show it in open Image Editors and optionally behind the camera."""
    width, height = size
    image = bpy.data.images.get(RESULT_IMAGE)
    if image is None:
        image = bpy.data.images.new(RESULT_IMAGE, width, height, alpha=True)
    elif tuple(image.size) != (width, height):
        image.scale(width, height)
    image.pixels.foreach_set(pixels)
    image.update()
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = image
    if camera is not None:
        data = camera.data
        background = next((b for b in data.background_images if b.image == image), None)
        if background is None:
            background = data.background_images.new()
            background.image = image
        data.show_background_images = True
    return image


STRIP_NAME = "PG2 Frames"


def load_strip(scene, paths, frames):
    """Put the generated frame files into the scene's Video Sequencer as one image strip
    (replacing the previous PG2 strip) that shows each file at its own frame: with a frame
    step over 1, or a frame without a file, the last file before it is held. Files in the
    first file's folder only."""
    files = sorted((frame, path) for frame, path in zip(frames, paths) if os.path.isfile(path))
    if not files:
        return None
    folder = os.path.dirname(files[0][1])
    files = [(frame, path) for frame, path in files if os.path.dirname(path) == folder]
    editor = scene.sequence_editor or scene.sequence_editor_create()
    old = editor.strips.get(STRIP_NAME)
    channel = old.channel if old is not None else 1 + max((s.channel for s in editor.strips), default=0)
    if old is not None:
        editor.strips.remove(old)
    first, last = files[0][0], files[-1][0]
    strip = editor.strips.new_image(STRIP_NAME, files[0][1], channel, first)
    shown, following = files[0][1], iter(files[1:])
    upcoming = next(following, None)
    for frame in range(first + 1, last + 1):
        if upcoming is not None and upcoming[0] == frame:
            shown, upcoming = upcoming[1], next(following, None)
        strip.elements.append(os.path.basename(shown))
    return strip


def cancel_all() -> None:
    """Stop every run of this session (a new file is being loaded, or the add-on goes)."""
    for run in list(_RUNS):
        run.cancel()
    _RUNS.clear()


@persistent
def _on_load_pre(*_args) -> None:
    # File › Open drops the modal handlers without calling them again: without this the
    # workers would run on and "already generating" would stay until Blender restarts.
    cancel_all()


def check_evaluated(context, armatures, occlusion_on: bool) -> None:
    """Blender poses and deforms only what is enabled in viewports (the monitor icon, on an object
    or its collection): an armature or bound mesh turned off there would keep a stale pose."""
    evaluated = [i.original for i in context.evaluated_depsgraph_get().ids if isinstance(i, bpy.types.Object)]
    for armature in armatures:
        off = [armature] if armature not in evaluated else []
        if occlusion_on:
            off += [m for m in occlusion.bound_meshes(armature) if m not in evaluated]
        if off:
            names = ", ".join(o.name for o in off)
            raise GenerationError(f"{names} is disabled in viewports (the monitor icon, on the object or its "
                                  "collection), so Blender does not pose it: enable it in viewports"
                                  + (" or turn Occlusion off" if armature not in off else ""))


def _more_people(context, settings) -> list[tuple]:
    """(row, armature, mapping, occluder or None) of each row of the People list, checked."""
    rows = []
    for person in settings.people:
        body = person.armature
        if body is None:
            raise GenerationError("a row of the People list has no armature; choose one or remove the row")
        try:
            body_mapping = settings.bone_mapping(body)
        except MappingError as e:
            raise GenerationError(f"{body.name} (People list): {e}") from None
        if all(n in body_mapping.missing() for n in LIMBS):
            raise GenerationError(f"no limb of {body.name} (People list) is mapped with the Rig preset "
                                  f"{settings.preset!r}; set the Rig preset to Automatic or to {body.name}'s rig")
        rows.append((person, body, body_mapping,
                     occlusion.Occluder(body, body_mapping) if settings.occlusion else None))
    check_evaluated(context, [row[1] for row in rows], settings.occlusion)
    return rows


def prepare_run(context, frames, paths, on_result=None, export: bool = False,
                expect_model: str | None = None) -> generation.Run:
    """Validate the scene's settings and start a Run (its worker starts at once); `export`
    writes pose files instead of asking a server. `expect_model`: the model frames kept in
    the output folder were made with; a server running another is refused.

    Raises GenerationError / MappingError / ValueError with what to fix.
    """
    scene = context.scene
    settings = scene.pg2
    missing = missing_for_poses(context)
    if missing is not None:
        raise GenerationError(missing)
    armature = _scene_armature(context)
    mapping = settings.bone_mapping(armature)
    unmapped = mapping.missing()   # warned about after the run: neck and face points too
    if all(n in unmapped for n in LIMBS):
        raise GenerationError(f"no limb of {armature.name} is mapped; pick the rig preset "
                              "or map the bones by hand in the PG2 panel")
    if not export and settings.framing == "PERSON" and settings.background == "RENDER":
        check_renders_are_images(scene)
    check_not_renders(scene, frames, paths)
    check_evaluated(context, [armature], settings.occlusion)
    if export:
        check_output(settings.pose_output_path, paths)
        occluder = occlusion.Occluder(armature, mapping) if settings.occlusion else None
        people = None
        if len(settings.people):   # every person's pose in each file, as OpenPose lists them
            people = [(armature, mapping, occluder, b"", None)] + [
                (body, body_mapping, body_occluder, b"", None)
                for _, body, body_mapping, body_occluder in _more_people(context, settings)]
        run = generation.Run(scene, armature, mapping, frames, paths, generation.PoseExport(),
                             unprojectable=settings.unprojectable, occlusion=occluder, people=people)
        run.unmapped = unmapped
        return run
    conn = connection(context)
    if paths and paths[0] is not None:
        check_output(settings.output_path, paths)
    source, source_size = generation.read_source(settings)
    people = None
    if len(settings.people):
        if settings.framing != "PERSON":
            raise GenerationError("several people need Person framing (each is generated in its own crop)")
        # The main armature with the panel's source (a file or an image), then each row's photo.
        people = [(armature, mapping, occlusion.Occluder(armature, mapping) if settings.occlusion else None,
                   source, source_size)]
        for person, body, body_mapping, body_occluder in _more_people(context, settings):
            people.append((body, body_mapping, body_occluder, generation.read_photo(person.source_path)[0], None))
    renders = None
    if settings.framing == "PERSON" and settings.background == "RENDER":
        renders = _render_paths(scene, frames, render_missing=len(frames) == 1 and paths[0] is None)
    occluder = occlusion.Occluder(armature, mapping) if settings.occlusion else None
    batch = Batch(conn, source, source_size, _framing(scene), settings.in_flight, expect_model=expect_model)
    run = generation.Run(scene, armature, mapping, frames, paths, batch,
                         keep_outside=settings.framing == "PERSON", unprojectable=settings.unprojectable,
                         renders=renders, occlusion=occluder, on_result=on_result, people=people)
    run.unmapped = unmapped
    return run


def _redraw(context) -> None:
    screen = context.screen
    for area in (screen.areas if screen else ()):
        area.tag_redraw()


class _GenerationRun:
    """The shared start / poll / finish of both generation operators."""
    _timer = None
    _run: generation.Run | None = None

    def _start(self, context, frames, paths):
        settings = context.scene.pg2
        if running():
            self.report({"ERROR"}, "PG2 is already generating; wait for it or press Esc")
            return {"CANCELLED"}
        self._camera = context.scene.camera if settings.set_camera_background else None
        self._run = None
        try:
            self._run = prepare_run(context, frames, paths, on_result=self._show, **self._run_options())
            self._prepared(context)
        except (GenerationError, MappingError, ValueError, OSError) as e:
            self._stop_prepared()
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        except Exception as e:   # one line for the artist; the traceback goes to the console
            self._stop_prepared()
            return self._unexpected(e)
        return self._go(context)

    def _stop_prepared(self) -> None:
        if self._run is not None:
            self._run.cancel()

    def _run_options(self) -> dict:
        """More arguments of prepare_run (the range operator: the model of the frames kept)."""
        return {}

    def _prepared(self, context) -> None:
        """The run is prepared and its worker started (the range operator records its sequence here)."""

    def _unexpected(self, error: Exception):
        traceback.print_exc()
        self.report({"ERROR"}, f"PG2 failed unexpectedly: {type(error).__name__}: {error} "
                               "(details in the system console)")
        return {"CANCELLED"}

    def _go(self, context):
        """Run the prepared `self._run`: blocking in background mode, else from a modal timer.
        Progress and results go to the run's scene, whichever scene is shown meanwhile."""
        settings = self._run.scene.pg2
        if self._run.unmapped:
            self.report({"WARNING"}, "unmapped keypoints (left out): " + ", ".join(self._run.unmapped))
        settings.progress, settings.status = 0.0, self._run.progress_text()
        if bpy.app.background or context.window is None:
            # Blocking, but the worker still overlaps the network with the main thread's work.
            while not self._run.step(budget=0.1, wait=0.1):
                pass
            return self._end(context)
        _RUNS.add(self._run)
        wm = context.window_manager
        wm.progress_begin(0, max(1, self._run.total))
        self._timer = wm.event_timer_add(0.05, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def _show(self, event) -> None:
        show_result(event.pixels, event.size, self._camera)

    def _update(self, context) -> None:
        settings = self._run.scene.pg2
        run = self._run
        settings.progress = run.done / max(1, run.total)
        settings.status = run.progress_text()

    def _cleanup(self, context) -> None:
        _RUNS.discard(self._run)
        if self._timer is not None:
            context.window_manager.event_timer_remove(self._timer)
            context.window_manager.progress_end()
            if context.workspace is not None:
                context.workspace.status_text_set(None)
            self._timer = None
        _redraw(context)

    def _end(self, context):
        settings = self._run.scene.pg2
        self._update(context)
        self._cleanup(context)
        run = self._run
        self._ended(context)
        for line in run.report.lines():
            self.report({"WARNING"}, "PG2: " + line)
        if run.error:
            settings.status = run.error + self._kept()
            self.report({"ERROR"}, settings.status)
            return {"CANCELLED"}
        if run.batch.cancelled.is_set():
            settings.status = f"cancelled after {run.done} / {run.total}"
            self.report({"WARNING"}, "PG2: " + settings.status)
            return {"CANCELLED"}
        self._finished(context)
        summary = self._summary()
        settings.status = "; ".join([summary.removeprefix("PG2: ")] + run.report.lines())
        self.report({"INFO"}, summary)
        return {"FINISHED"}

    def _ended(self, context) -> None:
        """After the run, however it ended (the range operator updates its record here)."""

    def _kept(self) -> str:
        """What an error message adds about the frames kept so far."""
        return ""

    def _finished(self, context) -> None:
        """After a successful run (the range operator loads the Sequencer strip here)."""

    def _summary(self) -> str:
        return f"PG2: generated {self._run.done} frame(s)"

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS":
            self._run.cancel()
            return self._end(context)
        if event.type == "TIMER":
            try:
                ended = self._run.step()
            except Exception as e:   # never leave a run behind that says "already generating"
                self._run.error = self._run.error or f"{type(e).__name__}: {e}"
                self._run.cancel()
                return self._end(context)
            self._update(context)
            context.window_manager.progress_update(self._run.done)
            if context.workspace is not None:
                context.workspace.status_text_set(f"PG2: {self._run.progress_text()}  (Esc cancels)")
            _redraw(context)
            if ended:
                return self._end(context)
        return {"PASS_THROUGH"}

    def cancel(self, context):
        """Blender ends the modal operator (window closed, file loaded): stop the worker."""
        if self._run is not None:
            self._run.cancel()
            self._cleanup(context)


class PG2_OT_generate(_NeedsPoses, _GenerationRun, bpy.types.Operator):
    """Generate the person in the armature's pose at the current frame (image "PG2 Result")"""
    bl_idname = "pg2.generate"
    bl_label = "Generate Frame"
    bl_options = {"REGISTER"}

    def execute(self, context):
        scene = context.scene
        return self._start(context, [scene.frame_current], [None])

    def _summary(self) -> str:
        return f"PG2: result in the image {RESULT_IMAGE!r}"


class PG2_OT_generate_frames(_NeedsPoses, _GenerationRun, bpy.types.Operator):
    """Generate every frame of the range into numbered files; existing files are skipped"""
    bl_idname = "pg2.generate_frames"
    bl_label = "Generate Frames"
    bl_options = {"REGISTER"}

    def execute(self, context):
        scene, settings = context.scene, context.scene.pg2
        if settings.use_scene_range:
            start, end, step = scene.frame_start, scene.frame_end, scene.frame_step
        else:
            start, end, step = settings.frame_start, settings.frame_end, settings.frame_step
        if end < start:
            self.report({"ERROR"}, f"the frame range ends ({end}) before it starts ({start})")
            return {"CANCELLED"}
        if not settings.output_path:
            self.report({"ERROR"}, "choose an output path for the frames in the PG2 panel")
            return {"CANCELLED"}
        frames = list(range(start, end + 1, step))
        paths = [generation.frame_path(settings.output_path, f) for f in frames]
        try:
            check_frame_files(scene, paths[0])
            self._resume = record.plan(settings.output_path, frames, paths,
                                       record.settings_of(scene, _scene_armature(context)), settings.overwrite)
        except GenerationError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        except Exception as e:
            return self._unexpected(e)
        self._all_frames, self._all_paths = frames, paths
        todo = [(frames[i], paths[i]) for i in self._resume.todo]
        self._skipped = len(frames) - len(todo)
        if not todo:
            message = f"PG2: all {len(frames)} frame files exist; tick Overwrite to generate them again"
            if settings.load_into_sequencer and load_strip(scene, paths, frames) is not None:
                message += f"; loaded them into the Sequencer as the strip {STRIP_NAME!r}"
            settings.status = message.removeprefix("PG2: ")
            self.report({"INFO"}, message)
            return {"FINISHED"}
        return self._start(context, [f for f, _ in todo], [p for _, p in todo])

    def _run_options(self) -> dict:
        return {"expect_model": self._resume.expect_model}

    def _prepared(self, context) -> None:
        self._resume.start()

    def _ended(self, context) -> None:
        try:
            self._resume.finish(self._run.written, self._run.batch.model)
        except OSError as e:
            self.report({"WARNING"}, f"PG2: could not update the record of the frames in {self._resume.folder}: "
                                     f"{e.strerror}")

    def _finished(self, context) -> None:
        scene = self._run.scene
        if scene.pg2.load_into_sequencer:
            load_strip(scene, self._all_paths, self._all_frames)

    def _summary(self) -> str:
        skipped = f", skipped {self._skipped} existing" if self._skipped else ""
        folder = os.path.dirname(self._run.paths[0]) if self._run.paths else ""
        return f"PG2: wrote {self._run.done} frame(s){skipped} to {folder}"

    def _kept(self) -> str:
        kept = sum(os.path.exists(p) for p in self._all_paths)
        if not kept:
            return ""
        return (f"; {kept} of {len(self._all_paths)} frames are kept in {os.path.dirname(self._all_paths[0])}: "
                "Generate Frames again resumes there (Overwrite off)")


class PG2_OT_export_poses(_NeedsPoses, _GenerationRun, bpy.types.Operator):
    """Write the armature's pose as OpenPose JSON and a skeleton image per frame (no server)"""
    bl_idname = "pg2.export_poses"
    bl_label = "Export Poses"
    bl_options = {"REGISTER"}

    frames: bpy.props.EnumProperty(name="Frames", items=[
        ("CURRENT", "Current Frame", "Only the current frame"),
        ("RANGE", "Frame Range", "The frame range of the Frames panel")], default="RANGE")

    def execute(self, context):
        scene, settings = context.scene, context.scene.pg2
        if self.frames == "CURRENT":
            frames = [scene.frame_current]
        elif settings.use_scene_range:
            frames = list(range(scene.frame_start, scene.frame_end + 1, scene.frame_step))
        else:
            frames = list(range(settings.frame_start, settings.frame_end + 1, settings.frame_step))
        if not frames:
            self.report({"ERROR"}, "the frame range is empty")
            return {"CANCELLED"}
        if not settings.pose_output_path:
            self.report({"ERROR"}, "choose an output path for the poses in the PG2 panel")
            return {"CANCELLED"}
        paths = [os.path.splitext(generation.frame_path(settings.pose_output_path, f))[0] + ".png"
                 for f in frames]
        todo = [(f, p) for f, p in zip(frames, paths) if settings.overwrite or not os.path.exists(p)]
        if not todo:
            self.report({"INFO"}, f"PG2: all {len(frames)} pose files exist; tick Overwrite to "
                                  "write them again")
            return {"FINISHED"}
        frames, paths = [f for f, _ in todo], [p for _, p in todo]
        if running():
            self.report({"ERROR"}, "PG2 is already generating; wait for it or press Esc")
            return {"CANCELLED"}
        try:
            self._run = prepare_run(context, frames, paths, export=True)
        except (GenerationError, MappingError, ValueError) as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        except Exception as e:
            return self._unexpected(e)
        self._camera = None
        return self._go(context)

    def _summary(self) -> str:
        return f"PG2: wrote {self._run.done} pose(s) to {os.path.dirname(self._run.paths[0])}"


class PG2_OT_test_connection(bpy.types.Operator):
    """Ask the server for its description (model, canvas, devices)"""
    bl_idname = "pg2.test_connection"
    bl_label = "Test Connection"

    def execute(self, context):
        try:
            conn = connection(context)
        except ValueError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        self._answer: queue.Queue = queue.Queue()
        worker = threading.Thread(target=self._ask, args=(conn,), daemon=True)
        worker.start()
        if bpy.app.background or context.window is None:
            worker.join()
            return self._show(context, self._answer.get())
        self._timer = context.window_manager.event_timer_add(0.1, window=context.window)
        context.window_manager.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def _ask(self, conn) -> None:
        try:
            with conn.open() as server:
                self._answer.put(("ok", server.info()))
        except client.ServerError as e:
            self._answer.put(("error", generation.describe_server_error(e)))
        except Exception as e:  # shown to the user instead of dying on the thread
            self._answer.put(("error", f"{type(e).__name__}: {e}"))

    def modal(self, context, event):
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        try:
            answer = self._answer.get_nowait()
        except queue.Empty:
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        return self._show(context, answer)

    def _show(self, context, answer):
        kind, body = answer
        prefs = preferences(context)
        if kind == "error":
            if prefs:
                prefs.server_info = "Not connected: " + body
            self.report({"ERROR"}, body)
            return {"CANCELLED"}
        text = describe_info(body)
        if prefs:
            prefs.server_info = text
        self.report({"INFO"}, text.replace("\n", "; "))
        return {"FINISHED"}


class PG2_OT_add_pose_rig(bpy.types.Operator):
    """Add an OpenPose-style armature: one bone per COCO-18 keypoint"""
    bl_idname = "pg2.add_pose_rig"
    bl_label = "PG2 Pose Rig"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        if context.mode != "OBJECT":
            bpy.ops.object.mode_set(mode="OBJECT")
        obj = rig.create_pose_rig(context.collection, context.view_layer,
                                  location=tuple(context.scene.cursor.location))
        for other in context.view_layer.objects:
            other.select_set(False)
        obj.select_set(True)
        context.view_layer.objects.active = obj
        if context.scene.pg2.armature is None:
            context.scene.pg2.armature = obj
        return {"FINISHED"}


class _ListAdd:
    """Append an item to one of the scene settings' lists and select it."""
    collection = index = ""
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        settings = context.scene.pg2
        items = getattr(settings, self.collection)
        items.add()
        setattr(settings, self.index, len(items) - 1)
        return {"FINISHED"}


class _ListRemove:
    """Remove the selected item of one of the scene settings' lists."""
    collection = index = what = ""
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        settings = context.scene.pg2
        return 0 <= getattr(settings, cls.index) < len(getattr(settings, cls.collection))

    def execute(self, context):
        settings = context.scene.pg2
        items, selected = getattr(settings, self.collection), getattr(settings, self.index)
        if not 0 <= selected < len(items):
            self.report({"ERROR"}, f"select {self.what} to remove")
            return {"CANCELLED"}
        items.remove(selected)
        setattr(settings, self.index, max(0, selected - 1))
        return {"FINISHED"}


class PG2_OT_override_add(_ListAdd, bpy.types.Operator):
    """Take one keypoint from a bone of your choice"""
    bl_idname = "pg2.override_add"
    bl_label = "Add Bone Override"
    collection, index = "overrides", "override_index"


class PG2_OT_override_remove(_ListRemove, bpy.types.Operator):
    """Remove the selected bone override"""
    bl_idname = "pg2.override_remove"
    bl_label = "Remove Bone Override"
    collection, index, what = "overrides", "override_index", "an override"


class PG2_OT_person_add(_ListAdd, bpy.types.Operator):
    """Add a person: another armature with its own photo"""
    bl_idname = "pg2.person_add"
    bl_label = "Add Person"
    collection, index = "people", "person_index"


class PG2_OT_person_remove(_ListRemove, bpy.types.Operator):
    """Remove the selected person"""
    bl_idname = "pg2.person_remove"
    bl_label = "Remove Person"
    collection, index, what = "people", "person_index", "a person"


def add_menu(self, context):
    self.layout.operator(PG2_OT_add_pose_rig.bl_idname, icon="OUTLINER_OB_ARMATURE")


CLASSES = (PG2_OT_generate, PG2_OT_generate_frames, PG2_OT_export_poses, PG2_OT_test_connection, PG2_OT_add_pose_rig,
           PG2_OT_override_add, PG2_OT_override_remove, PG2_OT_person_add, PG2_OT_person_remove)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_armature_add.append(add_menu)
    bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    cancel_all()
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    bpy.types.VIEW3D_MT_armature_add.remove(add_menu)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
