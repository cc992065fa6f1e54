"""
data.py -- reading what generate_spar.py wrote, for training and evaluation.

    DATA/scenes/<id>.safetensors   rgb uint8 (V,H,W,3), depth float16 (V,H,W), instance int16 (V,H,W),
                                   K float32 (V,3,3), pose float32 (V,4,4) camera-to-world (OpenCV axes)
    DATA/scenes/<id>.json          room, objects (category, oriented box), split, video_frames
    DATA/qa_{train,val}.jsonl      one question per line, SPAR-Bench field names
    DATA/tokenizer.json            byte-level BPE with the chat's special tokens

    OUT/<stage>/config.json + model.safetensors   a checkpoint (train.py writes it)

Every reader of the project lives here, and every error names the file and the field: JSON and JSONL, QA
records (ours, and SPAR-7M's conversations lines with their image files and markers), scenes and the scene store
that serves frames as tensors (or a record's image files); the datasets -- SceneViewsDataset for stages geo / psfm
(views, cameras, depth, semantics, PSFM's view mask) and QADataset for stage vlm (images, prompt, answer); the
oracle arm's true 3D tokens; checkpoints; the tokenizer. eval.py adds the benchmarks' own question files.
"""

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from generate_spar import (CATEGORY_NAMES, MARKER_RGB, SEMANTIC_CLASSES, SHELL_IDS, SPECIAL_TOKENS, draw_markers,
                           prompt, read_image)
from psfm import sample_context

# -----------------------------------------------------------------------------
# QA records

FORMATS = ("fill", "select")
IMG_TYPES = ("single_view", "multi_view", "video")


def check_record(record, where):
    """Raise ValueError('<file>:<line>: field ...') for anything the rest of the code could trip on."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
    for field in ("id", "scene", "task", "question", "answer"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field '{field}' must be a string, got {record.get(field)!r}")
    scene = record["scene"]
    if not scene or os.path.isabs(scene) or os.path.normpath(scene).split(os.sep)[0] == "..":
        raise ValueError(f"{where}: field 'scene' must name a scene inside the data folder's scenes/, got {scene!r}")
    if record.get("format_type") not in FORMATS:
        raise ValueError(f"{where}: field 'format_type' must be one of {FORMATS}, got {record.get('format_type')!r}")
    if record.get("img_type") not in IMG_TYPES:
        raise ValueError(f"{where}: field 'img_type' must be one of {IMG_TYPES}, got {record.get('img_type')!r}")
    image = record.get("image")
    # empty only in scoring-only records (eval.from_vsibench: VSI-Bench's videos are not our frames)
    if not (isinstance(image, list) and all(is_int(i) and i >= 0 for i in image)):
        raise ValueError(f"{where}: field 'image' must be a list of frame indices, got {image!r}")
    options = record.get("options")
    if record["format_type"] == "select":
        if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) for o in options)):
            raise ValueError(f"{where}: field 'options' must be a list of at least 2 strings for a select question")
        if record["answer"] not in "ABCDEFGH"[:len(options)] or len(record["answer"]) != 1:
            raise ValueError(f"{where}: field 'answer' must be an option letter, got {record['answer']!r}")
    markers = record.get("markers", [])
    if not isinstance(markers, list):
        raise ValueError(f"{where}: field 'markers' must be a list, got {markers!r:.60}")
    for marker in markers:
        check_marker(marker, len(image), where)


OPTION_LINE = re.compile(r"^\s*\(?([A-H])[.):]\s+(.*\S)\s*$", re.MULTILINE)  # "A. chair" / "(B) left" on its own line
OPTION_LETTER = re.compile(r"\(?([A-Ha-h])(?:[.):]|$)")  # an answer that is an option letter: "B", "b.", "(B) left"


SPAR7M_POINTS, SPAR7M_BOXES = ["red", "blue", "green"], ["red", "blue", "green", "yellow"]  # its marker fields


def from_conversations(row, where, image_root):
    """A SPAR-7M training line ({"id", "conversations": [human, gpt, ...], "image": [paths under image_root],
    "type": task, markers: "red_point": [[x, y]], "blue_bbox": [[x0, y0, x1, y1]], ... on the 0-1000 grid, on
    the images point_img_idx / bbox_img_idx name, in colour order}) as our record. The first human turn is the
    whole prompt ("<image>" tokens dropped: our chat template places the images), the gpt turn after it the
    answer (later turns are left out); an answer that is an option letter makes a multiple-choice question.
    The scene is the images' first folder (SPAR-7M: <scene>/image_color/<frame>.jpg)."""
    turns = row.get("conversations")
    if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2])
            and [t.get("from") for t in turns[:2]] == ["human", "gpt"]
            and all(isinstance(t.get("value"), str) for t in turns[:2])):
        raise ValueError(f"{where}: field 'conversations': expected a human turn, then a gpt turn, with string values")
    images = row.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not (isinstance(images, list) and images and all(isinstance(i, str) and i for i in images)):
        raise ValueError(f"{where}: field 'image': expected a list of image paths, got {images!r:.60}")
    if not isinstance(row.get("type"), str):
        raise ValueError(f"{where}: field 'type': expected the task's name, got {row.get('type')!r:.60}")
    text = re.sub(r"\s*<image>\s*", " ", turns[0]["value"]).strip()
    answer = turns[1]["value"].strip()
    letter = OPTION_LETTER.match(answer)
    record = {"id": str(row.get("id")), "scene": images[0].replace("\\", "/").split("/")[0], "task": row["type"],
              "format_type": "select" if letter else "fill", "question": text, "prompt": text,
              "answer": letter.group(1).upper() if letter else answer, "image": [],
              "options": [f"{k}. {v}" for k, v in OPTION_LINE.findall(text)] if letter else [],
              "image_files": [os.path.join(image_root, i) for i in images]}
    markers = spar7m_markers(row, where)
    for marker in markers:
        check_marker(marker, len(images), where)
    return record | ({"markers": markers} if markers else {})


def spar7m_markers(row, where):
    """SPAR-7M's marker fields as our markers (a point; a box with its centre as the point)."""
    markers = []
    for kind, colors in (("point", SPAR7M_POINTS), ("bbox", SPAR7M_BOXES)):
        present = [c for c in colors if row.get(f"{c}_{kind}")]
        slots = (row.get(f"{kind}_img_idx") or [[0] * len(present)])[0]
        if len(slots) < len(present):
            raise ValueError(f"{where}: field '{kind}_img_idx': {len(slots)} image indices for {len(present)} markers")
        for color, slot in zip(present, slots):
            value = row[f"{color}_{kind}"][0]
            if kind == "point":
                markers.append({"image": slot, "color": color, "point": value})
            else:
                centre = [(value[0] + value[2]) / 2, (value[1] + value[3]) / 2] if is_numbers(value, 4) else None
                markers.append({"image": slot, "color": color, "box": value, "point": centre})
    return markers


def image_root_of(path, image_root=""):
    """Where the relative image names of a question file start: image_root if given, else the images/ folder
    beside the file (SPAR-7M's layout, and generate_spar --spar7m's), else the file's own folder."""
    beside = os.path.join(os.path.dirname(path), "images")
    return image_root or (beside if os.path.isdir(beside) else os.path.dirname(path))


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no frame index


def is_numbers(value, count, low=-math.inf, high=math.inf):
    """A list of `count` finite numbers in [low, high] (a NaN or off-grid marker point would be drawn as nothing
    while the question names it)."""
    def fine(v):
        try:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and low <= float(v) <= high
        except OverflowError:  # an int past float's range
            return False
    return isinstance(value, list) and len(value) == count and all(map(fine, value))


def check_marker(marker, num_images, where):
    """A marker: {"image": slot of the record's images, "point": [x, y] on the 0-1000 grid, "color", "box"?}."""
    if not isinstance(marker, dict):
        raise ValueError(f"{where}: field 'markers' holds {marker!r:.60}, not an object")
    if not (is_int(marker.get("image")) and 0 <= marker["image"] < num_images):
        raise ValueError(f"{where}: field 'markers.image' must be an image slot 0..{num_images - 1}, got {marker.get('image')!r}")
    if not is_numbers(marker.get("point"), 2, 0, 1000):
        raise ValueError(f"{where}: field 'markers.point' must be two numbers on the 0-1000 grid, got {marker.get('point')!r:.60}")
    if not (isinstance(marker.get("color"), str) and marker["color"] in MARKER_RGB):
        raise ValueError(f"{where}: field 'markers.color' must be one of {', '.join(MARKER_RGB)}, got {marker.get('color')!r:.60}")
    if "box" in marker and not is_numbers(marker["box"], 4, 0, 1000):
        raise ValueError(f"{where}: field 'markers.box' must be four numbers on the 0-1000 grid, got {marker['box']!r:.60}")


JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a string in JSON text (it never spans lines)


def parse_json(raw, path, first_line=1):
    """The bytes of a JSON file, or of one JSONL line numbered first_line -> its value. Bytes that are not UTF-8,
    text that is not JSON, and a lone surrogate escape ("\\ud800": json accepts it, but it is no character, so
    printing or tokenising it fails later) are a ValueError naming file and line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + raw[:error.start].count(b"\n")
        raise ValueError(f"{path}:{line}: not UTF-8 text ({error.reason})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{first_line + error.lineno - 1}: not valid JSON ({error.msg})") from None
    except ValueError as error:  # an integer of more digits than Python converts
        raise ValueError(f"{path}:{first_line}: not usable JSON ({error})") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        line = next(first_line + text.count("\n", 0, m.start()) for m in JSON_STRING.finditer(text)
                    if not is_utf8(json.loads(m.group())))
        raise ValueError(f"{path}:{line}: not UTF-8 text (a string holds a lone surrogate)") from None
    return value


def is_utf8(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def require_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found" + (" (it is a folder)" if os.path.isdir(path) else ""))


def read_json(path):
    require_file(path)
    with open(path, "rb") as f:
        return parse_json(f.read(), path)


def read_jsonl(path):
    """(line number, parsed JSON) for each non-blank line; a bad line is a ValueError naming file and line."""
    require_file(path)
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                yield line_number, parse_json(line.rstrip(b"\r\n"), path, line_number)


def load_qa_jsonl(path):
    """Validated QA records of one JSONL file, ours or SPAR-7M's (from_conversations; its images under images/
    beside the file); ids must be unique."""
    records, seen = [], set()
    for line_number, record in read_jsonl(path):
        where = f"{path}:{line_number}"
        if isinstance(record, dict) and "conversations" in record:
            record = from_conversations(record, where, image_root_of(path))
        else:
            check_record(record, where)
        if record["id"] in seen:
            raise ValueError(f"{where}: field 'id' {record['id']!r} is duplicated")
        seen.add(record["id"])
        records.append(record)
    return records


# -----------------------------------------------------------------------------
# Scenes


def load_scene(path):
    """One scene: numpy arrays rgb, depth (float32), instance, K, pose and `meta` (its json). `path` may end in
    .safetensors or name the scene without extension."""
    tensor_path, meta_path = scene_files(path)
    with open_tensors(tensor_path) as f:
        arrays = {key: f.get_tensor(key) for key in f.keys()}
    meta = read_json(meta_path)
    check_scene(arrays, meta, tensor_path, meta_path)
    scene = {key: arrays[key] for key in ("rgb", "instance", "K", "pose")}
    scene["depth"] = arrays["depth"].astype(np.float32)
    scene["meta"] = meta
    return scene


def check_scene(arrays, meta, tensor_path, meta_path, total_views=None):
    """A scene's tensors (all its views, or total_views of which these are some) and its json, every field checked."""
    expected = {"rgb": (np.uint8, 4), "depth": (np.float16, 3), "instance": (np.int16, 3), "K": (np.float32, 3),
                "pose": (np.float32, 3)}
    for key, (dtype, ndim) in expected.items():
        if key not in arrays:
            raise ValueError(f"{tensor_path}: tensor '{key}' is missing")
        if arrays[key].dtype != dtype or arrays[key].ndim != ndim:
            raise ValueError(f"{tensor_path}: tensor '{key}' must be {np.dtype(dtype).name} with {ndim} dims, "
                             f"got {arrays[key].dtype} {arrays[key].shape}")
    views, height, width, channels = arrays["rgb"].shape
    shapes = {"rgb": (views, height, width, 3), "depth": (views, height, width), "instance": (views, height, width),
              "K": (views, 3, 3), "pose": (views, 4, 4)}
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise ValueError(f"{tensor_path}: tensor '{key}' has shape {arrays[key].shape}, expected {shape}")
    if not np.all(np.isfinite(arrays["K"])):
        raise ValueError(f"{tensor_path}: tensor 'K' holds non-finite values")
    check_cameras(meta, arrays["pose"], tensor_path, meta_path, total_views or views)
    low, high = int(arrays["instance"].min()), int(arrays["instance"].max())
    if low < min(SHELL_IDS.values()) - 1 or high >= len(meta["objects"]):
        raise ValueError(f"{tensor_path}: tensor 'instance' holds ids {low}..{high}; allowed are "
                         f"{min(SHELL_IDS.values()) - 1}..-1 (room, unknown) and 0..{len(meta['objects']) - 1} (objects)")


def check_cameras(meta, pose, tensor_path, meta_path, total_views):
    """A scene's json and poses: what choosing views, the probes and the oracle arm read without the images."""
    if not np.all(np.isfinite(pose)):
        raise ValueError(f"{tensor_path}: tensor 'pose' holds non-finite values")
    check_rigid(pose, tensor_path)
    check_split(meta, meta_path)
    if not isinstance(meta.get("objects"), list):
        raise ValueError(f"{meta_path}: field 'objects' must be a list")
    if not (isinstance(meta.get("room"), dict) and is_numbers(meta["room"].get("size"), 3, 0)):
        raise ValueError(f"{meta_path}: field 'room.size' must be three numbers (metres)")
    for i, obj in enumerate(meta["objects"]):
        if not (isinstance(obj, dict) and isinstance(obj.get("category"), str)):
            raise ValueError(f"{meta_path}: field 'objects[{i}].category' must be a string")
        for key in ("center", "size"):
            if not is_numbers(obj.get(key), 3):
                raise ValueError(f"{meta_path}: field 'objects[{i}].{key}' must be three finite numbers")
    frames = meta.get("video_frames")
    if not (is_int(frames) and 1 <= frames <= total_views):
        raise ValueError(f"{meta_path}: field 'video_frames' must be an integer in 1..{total_views}, got {frames!r}")


def scene_files(path):
    """(tensor file, json file) of a scene named with or without .safetensors; both must exist."""
    base = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    for p in (base + ".safetensors", base + ".json"):
        if not os.path.exists(p):
            raise ValueError(f"{p}: scene file not found")
    return base + ".safetensors", base + ".json"


def open_tensors(tensor_path):
    """safetensors' safe_open (numpy), a bad file being one line naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(tensor_path, "np")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{tensor_path}: unreadable safetensors file ({error})") from None


def scene_cameras(path):
    """A scene file's json and every view's pose (V, 4, 4), without reading its images: what choosing views needs."""
    tensor_path, meta_path = scene_files(path)
    meta = read_json(meta_path)
    with open_tensors(tensor_path) as f:
        pose = f.get_slice("pose")[:] if "pose" in f.keys() else None
    if pose is None or pose.dtype != np.float32 or pose.ndim != 3 or pose.shape[1:] != (4, 4):
        raise ValueError(f"{tensor_path}: tensor 'pose' must be float32 (V, 4, 4)")
    check_cameras(meta, pose, tensor_path, meta_path, len(pose))
    return meta, pose


def read_views(path, views, meta):
    """Some views of a scene file: rgb, depth (float16, as stored), instance, K and pose of those views alone, read
    through safetensors' slices, so the other views' bytes are never read; checked as load_scene checks a scene."""
    tensor_path, meta_path = scene_files(path)
    with open_tensors(tensor_path) as f:
        missing = [key for key in ("rgb", "depth", "instance", "K", "pose") if key not in f.keys()]
        if missing:
            raise ValueError(f"{tensor_path}: tensor '{missing[0]}' is missing")
        total = f.get_slice("pose").get_shape()[0]
        for key in ("rgb", "depth", "instance", "K"):  # before slicing: a short tensor would fail unnamed
            if f.get_slice(key).get_shape()[:1] != [total]:
                raise ValueError(f"{tensor_path}: tensor '{key}' has shape {f.get_slice(key).get_shape()}, "
                                 f"expected {total} views as 'pose'")
        arrays = {key: np.concatenate([f.get_slice(key)[int(v):int(v) + 1] for v in views])
                  for key in ("rgb", "depth", "instance", "K", "pose")}
    check_scene(arrays, meta, tensor_path, meta_path, total_views=total)
    return {**arrays, "meta": meta}


def check_split(meta, path):
    """A scene json is an object whose split is train or val (another split would drop the scene silently)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must be a JSON object, got a {type(meta).__name__}")
    if meta.get("split") not in ("train", "val"):
        raise ValueError(f"{path}: field 'split' must be 'train' or 'val', got {meta.get('split')!r}")


def check_rigid(pose, path):
    """Camera-to-world matrices must be rigid: a rotation (orthonormal, det +1) and a last row 0 0 0 1."""
    R = pose[:, :3, :3].astype(np.float64)
    orthonormal = np.abs(R.transpose(0, 2, 1) @ R - np.eye(3)).max(axis=(1, 2)) < 1e-3
    bad = ~orthonormal | (np.linalg.det(R) < 0) | (np.abs(pose[:, 3] - [0, 0, 0, 1]).max(axis=1) > 1e-6)
    if bad.any():
        raise ValueError(f"{path}: tensor 'pose' of view {int(np.argmax(bad))} is not a rigid camera-to-world "
                         "matrix (rotation and translation, last row 0 0 0 1)")


def semantic_map(instance, objects):
    """Instance map (..., H, W) -> semantic class ids: shell surfaces, object categories, -1 = unknown."""
    object_class = np.array([3 + CATEGORY_NAMES.index(o["category"]) if o["category"] in CATEGORY_NAMES else -1
                             for o in objects] + [-1], dtype=np.int64)
    semantic = object_class[np.where(instance >= 0, instance, len(objects))]
    for name, shell_id in SHELL_IDS.items():
        semantic = np.where(instance == shell_id, SEMANTIC_CLASSES.index(name), semantic)
    return semantic


def resize_views(images, depth, semantic, K, res):
    """Resize (V,3,H,W) images (area; uint8 stays uint8), depth and semantic maps (nearest) to res x res, scaling K
    to match."""
    height, width = images.shape[-2:]
    if (height, width) == (res, res):
        return images, depth, semantic, K
    resized = F.interpolate(images.float(), size=(res, res), mode="area" if res < height else "bilinear")
    images = resized.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else resized
    # "nearest-exact" samples each output pixel's centre, as the scaled K assumes ("nearest" takes a corner)
    depth = F.interpolate(depth[:, None], size=(res, res), mode="nearest-exact")[:, 0]
    semantic = F.interpolate(semantic[:, None].float(), size=(res, res), mode="nearest-exact")[:, 0].to(semantic.dtype)
    scale = torch.tensor([res / width, res / height, 1.0], dtype=K.dtype)
    return images, depth, semantic, K * scale[None, :, None]


def as_images(rgb, res=None):
    """uint8 (N, H, W, 3) -> uint8 (N, 3, res, res) (area filter down, bilinear up, rounded back to 8 bits: the
    pixels training and evaluation show are the same; data.to_device makes them floats in [0, 1])."""
    images = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    if res is not None and images.shape[-2:] != (res, res):
        resized = F.interpolate(images.float(), size=(res, res), mode="area" if res < images.shape[-1] else "bilinear")
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images


def read_image_file(path):
    """An image file as uint8 (H, W, 3): PNG with the standard library, JPEG with Pillow (a one-line error without)."""
    require_file(path)
    image = read_image(path)
    if image.dtype == np.uint16:  # a 16-bit PNG: to the 8 bits the rest of the code reads
        image = (image.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


class SceneStore:
    """A question's frames from DATA/scenes: only the frames it shows are read (safetensors slices, as
    SceneViewsDataset reads views); each scene's json and poses, small, are kept once read."""

    def __init__(self, data_dir):
        self.scene_dir, self.cameras = os.path.join(data_dir, "scenes"), {}

    def scene_cameras(self, scene_id, frame_indices=()):
        """The scene's json and poses, kept once read; frame_indices must be among its frames."""
        if scene_id not in self.cameras:
            self.cameras[scene_id] = scene_cameras(os.path.join(self.scene_dir, scene_id))
        meta, pose = self.cameras[scene_id]
        bad = [i for i in frame_indices if not 0 <= i < len(pose)]
        if bad:
            raise ValueError(f"{self.scene_dir}/{scene_id}.safetensors: frame {bad[0]} out of range (0..{len(pose) - 1})")
        return meta, pose

    def frames(self, scene_id, frame_indices, res=None, markers=None):
        """Frames as uint8 (N, 3, H, W) (as_images); markers (a record's) are drawn on their images first."""
        meta, _ = self.scene_cameras(scene_id, frame_indices)
        rgb = read_views(os.path.join(self.scene_dir, scene_id), frame_indices, meta)["rgb"]  # (N, H, W, 3)
        if markers:
            rgb = [draw_markers(image, markers, slot) for slot, image in enumerate(rgb)]
        return as_images(np.stack(rgb), res)

    def record_frames(self, record, res=None, markers=True):
        """A question's images: its image files (benchmark and SPAR-7M records), else its scene's frames."""
        if record.get("image_files"):
            return torch.cat([as_images(read_image_file(path)[None], res) for path in record["image_files"]])
        return self.frames(record["scene"], record["image"], res, record.get("markers") if markers else None)

    def oracle(self, record):
        """The oracle arm's true 3D tokens of a record (oracle_tokens, defined with the oracle arm below)."""
        return oracle_tokens(*self.scene_cameras(record["scene"], record["image"]), record)


def scene_ids(data_dir, split):
    """Scene ids of a split, sorted, read from the scene jsons."""
    scene_dir = os.path.join(data_dir, "scenes")
    if not os.path.isdir(scene_dir):
        raise ValueError(f"{scene_dir}: no scenes folder (run generate_spar.py first)")
    ids = []
    for name in sorted(os.listdir(scene_dir)):
        if name.endswith(".json"):
            path = os.path.join(scene_dir, name)
            meta = read_json(path)
            check_split(meta, path)
            if meta["split"] == split:
                ids.append(name[:-len(".json")])
    return ids


# -----------------------------------------------------------------------------
# Stages geo and psfm: a few views of one scene, with cameras, depth and semantics


class SceneViewsDataset(torch.utils.data.Dataset):
    """Item i: `num_views` distinct views of scene i % n_scenes, chosen by a generator seeded with
    (seed, epoch, i), so the same seed and epoch give the same samples on any machine and any rank:
    any of the scene's views (view_sampling="random"), or a random view 0 and others among the 2 (V - 1) views
    nearest to it by camera distance (m) + angle between the optical axes (rad) ("near": views that overlap, so
    relative pose can be learnt from them, as VGGT samples its training frames).
    View 0 of a sample is the reference view whose camera frame the models use as the scene frame. With
    mask_ratio (stage psfm) the sample also holds "context" (V,) bool: view 0 and the other views Spa3R sees.
    Every random choice comes from the sample's own generator, so resume and any world size draw the same."""

    def __init__(self, data_dir, split="train", num_views=4, res=None, seed=0, samples_per_scene=1,
                 view_sampling="random", mask_ratio=None):
        self.store = SceneStore(data_dir)  # keeps each scene's json and poses: choosing views needs every pose
        self.scene_dir = self.store.scene_dir
        self.ids = scene_ids(data_dir, split)
        if not self.ids:
            raise ValueError(f"{data_dir}: no scenes in split '{split}'")
        self.num_views, self.res, self.seed, self.epoch = num_views, res, seed, 0
        self.samples_per_scene, self.view_sampling, self.mask_ratio = samples_per_scene, view_sampling, mask_ratio

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.ids) * self.samples_per_scene

    def __getitem__(self, index):
        scene_id = self.ids[index % len(self.ids)]
        meta, pose = self.store.scene_cameras(scene_id)
        total = len(pose)
        if total < self.num_views:
            raise ValueError(f"{scene_id}: has {total} views, {self.num_views} requested")
        generator = torch.Generator().manual_seed(hash_seed(self.seed, self.epoch, index))
        views = torch.randperm(total, generator=generator)[:self.num_views].numpy()
        if self.view_sampling == "near":  # view 0, then views among its 2 (V - 1) nearest: views that overlap
            gap = np.linalg.norm(pose[:, :3, 3] - pose[views[0], :3, 3], axis=1)  # metres between the cameras
            gap += np.arccos(np.clip(pose[:, :3, 2] @ pose[views[0], :3, 2], -1, 1))  # + radians between their axes
            nearest = np.argsort(gap, kind="stable")[1:2 * self.num_views - 1]
            pick = torch.randperm(len(nearest), generator=generator)[:self.num_views - 1].numpy()
            views = np.concatenate([views[:1], nearest[pick]])
        scene = read_views(os.path.join(self.scene_dir, scene_id), views, meta)  # only these views are read
        # uint8 images, float16 depth (as stored: exact) and int16 class ids travel to the training process (a
        # third of the bytes of float32 and int64: the DataLoader's shared memory was its bottleneck);
        # data.to_device widens them on the device
        images = torch.from_numpy(scene["rgb"]).permute(0, 3, 1, 2)  # (V, 3, H, W) uint8
        depth = torch.from_numpy(scene["depth"])  # (V, H, W) float16; resize_views keeps values (nearest)
        semantic = torch.from_numpy(semantic_map(scene["instance"], meta["objects"]).astype(np.int16))
        K = torch.from_numpy(scene["K"].copy())
        if self.res is not None:
            images, depth, semantic, K = resize_views(images, depth, semantic, K, self.res)
        item = {"images": images, "depth": depth, "K": K, "pose": torch.from_numpy(scene["pose"].copy()),
                "semantic": semantic, "scene": scene_id, "views": torch.from_numpy(views)}
        if self.mask_ratio is not None:
            item["context"] = sample_context(1, self.num_views, self.mask_ratio, generator)[0]  # (V,)
        return item


def hash_seed(*values):
    """A 63-bit seed from a few integers (stable across processes, unlike Python's hash())."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def to_device(batch, device):
    """A batch on the device as the models take it: batches travel compact (data.collate_views, vlm.collate) and
    are widened there, uint8 images to floats in [0, 1], float16 depth to float32 and int16 class ids to int64.
    "num_images" stays on the host: how a batch's images split into records decides the shapes of the
    computation, and reading it back from the GPU would stall every step."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "num_images" else v
             for k, v in batch.items()}
    if torch.is_tensor(batch.get("images")) and batch["images"].dtype == torch.uint8:
        batch["images"] = batch["images"].float() / 255
    if "depth" in batch:
        batch["depth"] = batch["depth"].float()
    if "semantic" in batch:
        batch["semantic"] = batch["semantic"].long()
    return batch


def collate_views(items):
    """Stack SceneViewsDataset items: images (B,V,3,H,W) uint8, depth (B,V,H,W) float16, K (B,V,3,3), pose
    (B,V,4,4), semantic (B,V,H,W) int16, views (B,V) and with a mask context (B,V); `scene` stays a list.
    to_device makes the images floats in [0, 1], depth float32 and the class ids int64, as the models take them."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "scene"}
    batch["scene"] = [item["scene"] for item in items]
    return batch


# -----------------------------------------------------------------------------
# The oracle arm of the ablation: the true 3D quantities a perfect spatial encoder could hand the VLM, as
# tokens in the first image's camera frame (the frame Spa3R's latent lives in). If a VLM given these cannot
# beat the baseline, the setup cannot detect a useful latent at all.

ORACLE_CAMERAS, ORACLE_OBJECTS = 32, 32
# per token: kind (room, camera, object), position (3), direction or size (3), slot or area, marker, category
ORACLE_DIM = 3 + 3 + 3 + 2 + len(CATEGORY_NAMES)


def oracle_tokens(meta, poses, record):
    """(1 + ORACLE_CAMERAS + ORACLE_OBJECTS, ORACLE_DIM) float32: a room token (its size and floor area / 10 m²),
    a token per image (camera centre, optical axis and image slot / 8), a token per object (centre, size,
    category, and 1 + the index of the record's marker on it, else 0); positions in the first image's camera
    frame (OpenCV axes, metres); unused rows are zero."""
    tokens = np.zeros((1 + ORACLE_CAMERAS + ORACLE_OBJECTS, ORACLE_DIM), np.float32)
    to_first = np.linalg.inv(poses[record["image"][0]].astype(np.float64))
    tokens[0, 0], tokens[0, 6:9], tokens[0, 9] = 1, meta["room"]["size"], meta["room"]["floor_area"] / 10
    for slot, frame in enumerate(record["image"][:ORACLE_CAMERAS]):
        pose = to_first @ poses[frame]
        tokens[1 + slot, 1], tokens[1 + slot, 3:6], tokens[1 + slot, 6:9] = 1, pose[:3, 3], pose[:3, 2]
        tokens[1 + slot, 9] = slot / 8
    marker_of = {m["object"]: i for i, m in enumerate(record.get("markers", [])) if "object" in m}
    for k, obj in enumerate(meta["objects"][:ORACLE_OBJECTS]):
        row = tokens[1 + ORACLE_CAMERAS + k]
        row[2], row[3:6], row[6:9] = 1, (to_first @ [*obj["center"], 1.0])[:3], obj["size"]
        row[10] = marker_of.get(k, -1) + 1
        if obj["category"] in CATEGORY_NAMES:
            row[11 + CATEGORY_NAMES.index(obj["category"])] = 1
    return torch.from_numpy(tokens)


# -----------------------------------------------------------------------------
# Stage vlm: the images of a question, the question and its answer


class QADataset(torch.utils.data.Dataset):
    """Item: {"id", "task", "images" (N,3,H,W) uint8 with the question's markers drawn, "question", "answer",
    "record"}, and with oracle=True "oracle" (oracle_tokens); "latent" once `latents` (records, L, Ds) is set
    (train.py --cache_latent). The chat template and tokenisation belong to vlm.py."""

    def __init__(self, data_dir, split="train", res=None, markers=True, oracle=False, tasks=()):
        self.path = os.path.join(data_dir, f"qa_{split}.jsonl")
        self.records = [r for r in load_qa_jsonl(self.path) if not tasks or r["task"] in tasks]
        self.store, self.res, self.markers, self.oracle = SceneStore(data_dir), res, markers, oracle
        self.latents = None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        if not record["image"] and not record.get("image_files"):
            raise ValueError(f"{self.path}: record {record['id']!r} field 'image' is empty: nothing to train on")
        try:
            images = self.store.record_frames(record, self.res, self.markers)
        except ValueError as error:
            raise ValueError(f"{self.path}: record {record['id']!r} (field 'scene' / 'image'): {error}") from None
        item = {"id": record["id"], "task": record["task"], "images": images, "question": prompt(record),
                "answer": record["answer"], "record": record}
        if self.oracle:  # the ablation's oracle arm: true 3D tokens (see oracle_tokens)
            if record.get("image_files"):
                raise ValueError(f"{self.path}: record {record['id']!r}: the oracle arm needs a scene's ground truth; "
                                 f"this record has only image files")
            item["oracle"] = self.store.oracle(record)
        if self.latents is not None:
            item["latent"] = self.latents[index]
        return item


# -----------------------------------------------------------------------------
# Checkpoints: a folder with config.json (the model's config) and model.safetensors. Nothing is pickled.


def read_weights(path):
    """{name: tensor} of a safetensors file; a missing, truncated or corrupt one is a one-line error naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own kinds for each way a file can be broken
        raise ValueError(f"{path}: unreadable safetensors file ({error})") from None


def load_weights(module, path, state=None):
    """Load strictly: torch names every missing, unexpected and mis-shaped tensor; we add the file, on one line."""
    try:
        module.load_state_dict(read_weights(path) if state is None else state)
    except RuntimeError as error:
        raise ValueError(f"{path}: {' '.join(str(error).split())[:400]}") from None
    return module


def load_checkpoint(folder, build):
    """A checkpoint folder -> build(its config.json as a dict), the module, with its weights loaded strictly.
    build raises TypeError / ValueError / KeyError on a config it cannot use; the error then names the file."""
    path = os.path.join(folder, "config.json")
    config = read_json(path)
    try:
        module = build(config)
    except (TypeError, ValueError, KeyError, AttributeError) as error:  # what a config of the wrong shape raises
        raise ValueError(f"{path}: not a usable config ({type(error).__name__}: {error})") from None
    return load_weights(module, os.path.join(folder, "model.safetensors"))


def best_device():
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


# -----------------------------------------------------------------------------
# Tokenizer: generate_spar.train_tokenizer made it; SPECIAL_TOKENS are the contract


def load_tokenizer(path, add_special=False):
    """tokenizer.json -> tokenizers.Tokenizer with the chat template's special tokens (looked up by name, any
    id). add_special: a pretrained LM's tokenizer gains those it lacks, at the end of its vocabulary."""
    from tokenizers import Tokenizer

    if not os.path.exists(path):
        raise ValueError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path}: unreadable tokenizer ({error})") from None
    tokenizer.no_truncation()  # a pretrained tokenizer.json may carry its own: it would cut questions silently
    tokenizer.no_padding()
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing and add_special:
        tokenizer.add_special_tokens(missing)
    elif missing:
        raise ValueError(f"{path}: special token {missing[0]!r} is missing (a pretrained LM's tokenizer: "
                         f"train.py --init_lm adds them)")
    return tokenizer
