"""
generate_spar.py -- the SPAR-style data engine: 3D scenes in, spatial question-answer data out.

SPAR ("From Flatland to Space") turns 3D ground truth -- geometry, cameras, object boxes -- into spatial QA at
scale; its generator was never released, this one is open. It is the pipeline's first step and its ground floor:
it imports no other project file, and owns the data contract (the files below, the 28 tasks, the tokenizer) and
the command-line parser every script uses.

    generate_spar.py -> DATA/scenes/<id>.safetensors + <id>.json, qa_train.jsonl, qa_val.jsonl, tokenizer.json
    train.py --stage=geo | psfm | vlm  (reads DATA through data.py);  eval.py  (scores qa_val.jsonl)

Read top to bottom: 1. objects and tasks, 2. cameras, 3. procedural scenes, 4. camera trajectories, 5. the
renderer, 6. visibility and markers, 7. the QA engine (in the benchmarks' own wording), 8. real scans (and
ScanNet's annotations to boxes), 9. files, tokenizer, SPAR-7M export and command line.

    python generate_spar.py --out=data/spar --scenes=64 --val_scenes=8 --seed=0 --workers=2 [--preview=2] [--spar7m]
    python generate_spar.py --scannet_boxes=SCANS --from_scans=DIR  # ScanNet annotations -> DIR/<scene>/boxes.json
    python generate_spar.py --from_scans=DIR --out=data/real   # real RGBD scans instead of procedural rooms
    python generate_spar.py --bench                            # renderer frames/s per core at 224x224
    python generate_spar.py --help                             # every option with its default and meaning
"""

import inspect
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, fields

import numpy as np
from safetensors.numpy import load_file as read_safetensors  # path -> {name: array}

# -----------------------------------------------------------------------------
# 1. What a scene is made of, and what we ask about it

# name: (size x, y, z in metres before yaw, primitive, placement, can support others)
# placement: "floor" anywhere, "wall" on the floor with its back to a wall, "mounted" on a wall above the
# floor, "top" stacked on a supporting object. Sizes are typical real furniture; each is jittered +-15 %.
CATEGORIES = {
    "chair":           ((0.50, 0.50, 0.90), "box", "floor", False),
    "stool":           ((0.40, 0.40, 0.50), "cylinder", "floor", False),
    "armchair":        ((0.85, 0.80, 0.90), "box", "floor", False),
    "sofa":            ((2.00, 0.90, 0.85), "box", "wall", False),
    "table":           ((1.40, 0.80, 0.75), "box", "floor", True),
    "desk":            ((1.20, 0.60, 0.75), "box", "wall", True),
    "bed":             ((2.00, 1.60, 0.55), "box", "wall", False),
    "nightstand":      ((0.50, 0.40, 0.55), "box", "wall", True),
    "cabinet":         ((1.00, 0.50, 0.90), "box", "wall", True),
    "bookshelf":       ((0.90, 0.35, 1.80), "box", "wall", False),
    "wardrobe":        ((1.20, 0.60, 2.00), "box", "wall", False),
    "fridge":          ((0.70, 0.70, 1.80), "box", "wall", False),
    "washing machine": ((0.60, 0.60, 0.85), "box", "wall", True),
    "trash can":       ((0.35, 0.35, 0.60), "cylinder", "floor", False),
    "plant":           ((0.50, 0.50, 0.50), "sphere", "floor", False),
    "lamp":            ((0.35, 0.35, 1.50), "cylinder", "floor", False),
    "box":             ((0.50, 0.40, 0.40), "box", "floor", False),
    "tv":              ((1.10, 0.10, 0.65), "box", "top", False),
    "monitor":         ((0.55, 0.20, 0.40), "box", "top", False),
    "microwave":       ((0.50, 0.35, 0.30), "box", "top", False),
    "door":            ((0.90, 0.06, 2.00), "box", "wall", False),
    "window":          ((1.20, 0.06, 1.20), "box", "mounted", False),
    "picture":         ((0.80, 0.04, 0.60), "box", "mounted", False),
    "mirror":          ((0.60, 0.04, 1.00), "box", "mounted", False),
}
CATEGORY_NAMES = list(CATEGORIES)
# Semantic classes (data.py's "sem" field): the room shell first, then the object categories.
SHELL_IDS = {"floor": -1, "ceiling": -2, "wall": -3}  # values in the instance map; -4 = unknown (real scans)
SEMANTIC_CLASSES = ["floor", "ceiling", "wall"] + CATEGORY_NAMES

# task -> (benchmark level, image type). SPAR-Bench's 20 tasks with its evaluator's levels (middle: view change,
# position matching, camera motion; high: every other multiple-choice task), then VSI-Bench's 8 with its groups.
TASKS = {
    "depth_prediction_oc": ("low", "single_view"), "depth_prediction_oc_mv": ("low", "multi_view"),
    "depth_prediction_oo": ("low", "single_view"), "depth_prediction_oo_mv": ("low", "multi_view"),
    "distance_prediction_oc": ("low", "single_view"), "distance_prediction_oc_mv": ("low", "multi_view"),
    "distance_prediction_oo": ("low", "single_view"), "distance_prediction_oo_mv": ("low", "multi_view"),
    "view_change_infer": ("middle", "multi_view"), "position_matching": ("middle", "multi_view"),
    "camera_motion_infer": ("middle", "multi_view"), "obj_spatial_relation_oo": ("high", "single_view"),
    "obj_spatial_relation_oc_mv": ("high", "multi_view"), "obj_spatial_relation_oo_mv": ("high", "multi_view"),
    "spatial_imagination_oc": ("high", "single_view"), "spatial_imagination_oo": ("high", "single_view"),
    "spatial_imagination_oc_mv": ("high", "multi_view"), "spatial_imagination_oo_mv": ("high", "multi_view"),
    "distance_infer_center_oo": ("high", "single_view"), "distance_infer_center_oo_mv": ("high", "multi_view"),
    "object_counting": ("configuration", "video"), "object_rel_distance": ("configuration", "video"),
    "object_rel_direction": ("configuration", "video"), "route_planning": ("configuration", "video"),
    "object_abs_distance": ("measurement", "video"), "object_size_estimation": ("measurement", "video"),
    "room_size_estimation": ("measurement", "video"), "obj_appearance_order": ("spatiotemporal", "video"),
}
SPAR_TASKS = list(TASKS)[:20]
VSI_TASKS = list(TASKS)[20:]

# -----------------------------------------------------------------------------
# 2. Cameras. OpenCV convention: x right, y down, z forward. World: z up, metres.
# A pose is camera-to-world (4, 4): its columns 0..2 are the camera axes in world, column 3 the camera centre.

def intrinsics(width, height, fov_x_deg):
    """Pinhole K for square pixels with the principal point at the image centre."""
    fx = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return np.array([[fx, 0, width / 2], [0, fx, height / 2], [0, 0, 1]], dtype=np.float64)


def look_pose(position, yaw, pitch):
    """Camera-to-world pose at `position`, heading `yaw` (radians from +x, counter-clockwise), tilted by `pitch`."""
    forward = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, position
    return pose


def camera_center(pose):
    """The translation column (not -R.T @ t: that is for world-to-camera extrinsics, see VLM-3R's erratum)."""
    return np.asarray(pose, dtype=np.float64)[:3, 3]


def heading_frame(pose):
    """Floor-plane (forward, right) unit vectors of a camera: 'left', 'front', ... in questions ignore its tilt."""
    forward = np.asarray(pose, dtype=np.float64)[:3, 2].copy()
    forward[2] = 0.0
    forward /= max(np.linalg.norm(forward), 1e-9)
    right = np.array([forward[1], -forward[0], 0.0])  # forward x up
    return forward, right


def world_to_camera(pose, points):
    """World points (..., 3) -> camera coordinates (..., 3) for a camera-to-world pose."""
    pose = np.asarray(pose, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) - pose[:3, 3]) @ pose[:3, :3]


def project(K, pose, points):
    """World points (N, 3) -> pixel coordinates (N, 2) and z-depth (N,)."""
    cam = world_to_camera(pose, points)
    z = cam[:, 2]
    uv = (cam @ np.asarray(K, dtype=np.float64).T)[:, :2] / np.where(np.abs(z) < 1e-9, 1e-9, z)[:, None]
    return uv, z


def yaw_matrix(yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def box_corners(obj):
    """The 8 corners (8, 3) of an object's oriented box."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    local = signs * np.asarray(obj["size"], dtype=np.float64) / 2
    return local @ yaw_matrix(obj["yaw"]).T + np.asarray(obj["center"], dtype=np.float64)

# -----------------------------------------------------------------------------
# 3. Procedural scenes: an axis-aligned rectangular room centred on the origin, floor at z = 0.

def sample_room(rng):
    width, depth, height = rng.uniform(3, 10), rng.uniform(3, 8), rng.uniform(2.4, 3.2)
    half_w, half_d = width / 2, depth / 2
    return {"size": [round(width, 3), round(depth, 3), round(height, 3)],
            "floor": [[-half_w, -half_d], [half_w, -half_d], [half_w, half_d], [-half_w, half_d]],
            "floor_area": round(width * depth, 4), "floor_color": rng.integers(90, 200, 3).tolist(),
            "ceiling_color": rng.integers(200, 250, 3).tolist(), "wall_colors": rng.integers(120, 230, (4, 3)).tolist()}


def category_color(rng, category):
    """Each category has its own hue (so a model can learn what a 'bed' looks like); instances vary a little."""
    hue = CATEGORY_NAMES.index(category) / len(CATEGORY_NAMES)
    base = np.array([math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * 80 + 140
    return np.clip(base + rng.uniform(-20, 20, 3), 0, 255).astype(int).tolist()


def footprints_overlap(a, b, gap=0.05):
    """Separating-axis test of two objects' floor rectangles (each grown by gap / 2) and their z-ranges."""
    if abs(a["center"][2] - b["center"][2]) >= (a["size"][2] + b["size"][2]) / 2:
        return False
    corners = []
    for obj in (a, b):
        half = np.array(obj["size"][:2]) / 2 + gap / 2
        local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        corners.append(local @ yaw_matrix(obj["yaw"])[:2, :2].T + np.array(obj["center"][:2]))
    for obj in (a, b):
        for axis in yaw_matrix(obj["yaw"])[:2, :2].T:  # the rectangle's two edge directions
            pa, pb = corners[0] @ axis, corners[1] @ axis
            if pa.max() <= pb.min() or pb.max() <= pa.min():
                return False
    return True


def against_wall(rng, room, size, height_range=None):
    """Centre and yaw of an object standing (or mounted) with its back to a random wall, facing the room."""
    half_w, half_d = room["size"][0] / 2, room["size"][1] / 2
    wall = rng.integers(4)
    normal = [(1, 0), (-1, 0), (0, 1), (0, -1)][wall]  # inward normal of walls x-, x+, y-, y+
    along_half = half_d if wall < 2 else half_w
    if along_half <= size[0] / 2 + 0.05:
        return None
    along = rng.uniform(-along_half + size[0] / 2 + 0.05, along_half - size[0] / 2 - 0.05)
    offset = size[1] / 2 + 0.01
    x = -normal[0] * half_w + normal[0] * offset if wall < 2 else along
    y = -normal[1] * half_d + normal[1] * offset if wall >= 2 else along
    z = size[2] / 2 if height_range is None else rng.uniform(*height_range)
    yaw = math.atan2(-normal[0], normal[1])  # the object's local +y points into the room
    return [x, y, z], yaw


def place_object(rng, room, category, objects):
    """Try once to place an object of `category`; returns the object dict or None if it does not fit."""
    prior, shape, placement, _ = CATEGORIES[category]
    size = np.array(prior) * rng.uniform(0.85, 1.15, 3)
    if shape != "box":
        size[1] = size[0]  # round in plan
    if shape == "sphere":
        size[2] = size[0]
    size = [round(float(s), 3) for s in size]
    half_w, half_d, height = room["size"][0] / 2, room["size"][1] / 2, room["size"][2]
    parent = None
    if placement == "floor":
        yaw = math.radians(rng.choice([0, 90, 180, 270]) + (rng.uniform(-40, 40) if rng.random() < 0.3 else 0))
        margin = math.hypot(size[0], size[1]) / 2 + 0.05
        if half_w <= margin or half_d <= margin:
            return None
        center = [rng.uniform(-half_w + margin, half_w - margin), rng.uniform(-half_d + margin, half_d - margin),
                  size[2] / 2]
    elif placement in ("wall", "mounted"):
        top = height - 0.1 - size[2] / 2
        spot = against_wall(rng, room, size, None if placement == "wall" else (min(1.0 + size[2] / 2, top), top))
        if spot is None:
            return None
        center, yaw = spot
    else:  # "top": stacked on a supporting object, facing the same way
        supports = [o for o in objects if CATEGORIES[o["category"]][3] and o["parent"] is None]
        if not supports:
            return None
        parent = supports[rng.integers(len(supports))]
        room_x, room_y = (np.array(parent["size"][:2]) - size[:2]) / 2
        if room_x < 0 or room_y < 0:
            return None
        offset = yaw_matrix(parent["yaw"])[:2, :2] @ [rng.uniform(-room_x, room_x), rng.uniform(-room_y, room_y)]
        top_z = parent["center"][2] + parent["size"][2] / 2
        center = [parent["center"][0] + offset[0], parent["center"][1] + offset[1], top_z + size[2] / 2]
        yaw = parent["yaw"]
        if top_z + size[2] > height - 0.1:
            return None
    obj = {"id": len(objects), "category": category, "shape": shape, "center": [round(float(c), 4) for c in center],
           "size": size, "yaw": round(float(yaw), 5), "color": category_color(rng, category),
           "parent": None if parent is None else parent["id"]}
    for other in objects:
        if other["id"] != obj["parent"] and footprints_overlap(obj, other):
            return None
    return obj


def sample_scene(rng, scene_id, min_objects=6, max_objects=30):
    room = sample_room(rng)
    wanted = int(rng.integers(min_objects, max_objects + 1))
    objects = []
    for _ in range(wanted * 15):
        if len(objects) == wanted:
            break
        obj = place_object(rng, room, CATEGORY_NAMES[rng.integers(len(CATEGORY_NAMES))], objects)
        if obj is not None:
            objects.append(obj)
    return {"id": scene_id, "source": "procedural", "room": room, "objects": objects}


def inside_any_object(point, objects, margin):
    """Is `point` within `margin` of an object's footprint, at any height (a person stands beside a bed)?"""
    for obj in objects:
        local = yaw_matrix(obj["yaw"]).T @ (np.asarray(point) - obj["center"])
        if np.all(np.abs(local[:2]) <= np.asarray(obj["size"][:2]) / 2 + margin):
            return True
    return False

# -----------------------------------------------------------------------------
# 4. Camera trajectories. The "video" is an ordered walk at eye height through free floor space; random views
# stand somewhere free and look at an object, so multi-view questions have overlapping views to work with.

def free_floor_point(rng, scene, eye_height, margin=0.35):
    """A camera position at eye height outside every footprint: `margin` to spare, else less (crowded rooms)."""
    half_w, half_d = scene["room"]["size"][0] / 2 - margin, scene["room"]["size"][1] / 2 - margin
    for clearance in (margin, margin / 3, 0.0):
        for _ in range(100):
            point = np.array([rng.uniform(-half_w, half_w), rng.uniform(-half_d, half_d), eye_height])
            if not inside_any_object(point, scene["objects"], clearance):
                return point
    return np.array([0.0, 0.0, eye_height])


def sample_walk(rng, scene, frames, eye_height):
    """An ordered walk through 3 free waypoints with a slow sideways pan; in a crowded room, standing and panning."""
    for _ in range(30):  # a path whose every 5 cm stays off the furniture
        waypoints = np.stack([free_floor_point(rng, scene, eye_height) for _ in range(3)])
        path = np.concatenate([np.linspace(a, b, int(np.linalg.norm(b - a) / 0.05) + 2)
                               for a, b in zip(waypoints[:-1], waypoints[1:])])
        if not any(inside_any_object(p, scene["objects"], 0.05) for p in path):
            break
    else:
        waypoints = np.stack([waypoints[0]] * 3)
    segments = np.linalg.norm(np.diff(waypoints, axis=0), axis=1) + 1e-6
    arc = np.concatenate([[0.0], np.cumsum(segments)])
    pitch = math.radians(rng.uniform(-25, -8))
    pan_phase, pan_amp = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(20, 50))
    poses = []
    pan_cycles = max(arc[-1] / 4.0, 1.0)  # one sideways sweep per 4 m walked, at least one per video
    for frame, s in enumerate(np.linspace(0, arc[-1], frames)):
        k = min(int(np.searchsorted(arc, s, side="right")) - 1, len(segments) - 1)
        position = waypoints[k] + (waypoints[k + 1] - waypoints[k]) * (s - arc[k]) / segments[k]
        direction = waypoints[k + 1] - waypoints[k]
        progress = frame / max(frames - 1, 1)
        pan = pan_amp * math.sin(pan_phase + 2 * math.pi * pan_cycles * progress)
        yaw = math.atan2(direction[1], direction[0]) + pan
        poses.append(look_pose(position, yaw, pitch))
    return poses


def sample_view_of_object(rng, scene, eye_height):
    """A random free camera position aimed at a random object (with a little jitter)."""
    position = free_floor_point(rng, scene, eye_height + rng.uniform(-0.15, 0.15))
    objects = scene["objects"]
    target = np.array(objects[rng.integers(len(objects))]["center"]) if objects else np.zeros(3)
    delta = target - position
    yaw = math.atan2(delta[1], delta[0]) + math.radians(rng.uniform(-15, 15))
    pitch = math.atan2(delta[2], math.hypot(delta[0], delta[1])) + math.radians(rng.uniform(-8, 8))
    return look_pose(position, yaw, float(np.clip(pitch, math.radians(-45), math.radians(5))))


def sample_cameras(rng, scene, video_frames, random_views, res):
    """K (V, 3, 3) and camera-to-world poses (V, 4, 4) of a scene; views 0..video_frames-1 are the walk."""
    eye_height = rng.uniform(1.2, 1.7)
    poses = sample_walk(rng, scene, video_frames, eye_height)
    poses += [sample_view_of_object(rng, scene, eye_height) for _ in range(random_views)]
    K = intrinsics(res, res, rng.uniform(55, 75))
    return np.stack([K] * len(poses)), np.stack(poses)

# -----------------------------------------------------------------------------
# 5. The renderer: analytic ray casting, vectorised in numpy float32.
# A pixel (u, v) is the square [u, u+1) x [v, v+1); its ray goes through its centre (u + 0.5, v + 0.5).
# Rays are scaled so their camera-space z is 1: the ray parameter t of a hit *is* its z-depth.
# Each primitive is intersected in its own unit frame (box = [-1, 1]^3, cylinder = unit disc x [-1, 1] along z,
# sphere = unit ball): p_unit = R_yaw^T (p - centre) / half_size is affine, so t is the same in both frames.
# Rays are three (H, W) planes (x, y, z): elementwise numpy beats reductions over a trailing axis of 3.
# Objects resolve only depth and instance; normals come once, at the end, for the pixels each won.

LIGHT = np.array([0.35, 0.55, 0.76], dtype=np.float32)  # unit vector towards the light, from above


def camera_rays(K, pose, height, width):
    """Ray directions in world as three float32 planes (3, H, W), with camera-space z = 1."""
    K = np.asarray(K, dtype=np.float64)
    u = ((np.arange(width) + 0.5 - K[0, 2]) / K[0, 0]).astype(np.float32)
    v = ((np.arange(height) + 0.5 - K[1, 2]) / K[1, 1]).astype(np.float32)
    R = np.asarray(pose, dtype=np.float32)[:3, :3]
    return R[:, 0, None, None] * u[None, None, :] + R[:, 1, None, None] * v[None, :, None] + R[:, 2, None, None]


def intersect_unit(shape, o, d):
    """Nearest hit in front of origin o (3 floats) of rays d (3 arrays) with a unit primitive: t, inf on a miss."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if shape == "box":  # slab test
            t_near, t_far = np.float32(0), np.float32(np.inf)
            for k in range(3):
                inv = 1.0 / d[k]
                t1, t2 = (-1.0 - o[k]) * inv, (1.0 - o[k]) * inv
                t_near = np.maximum(t_near, np.minimum(t1, t2))
                t_far = np.minimum(t_far, np.maximum(t1, t2))
            return np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
        if shape == "sphere":
            a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
            b = 2 * (d[0] * o[0] + d[1] * o[1] + d[2] * o[2])
            disc = b * b - 4 * a * (o[0] ** 2 + o[1] ** 2 + o[2] ** 2 - 1.0)
            t = (-b - np.sqrt(disc)) / (2 * a)
            return np.where((disc >= 0) & (t > 0), t, np.inf)
        # cylinder: the curved side x^2 + y^2 = 1 with |z| <= 1, or the cap the ray enters through
        a = d[0] * d[0] + d[1] * d[1]
        b = 2 * (d[0] * o[0] + d[1] * o[1])
        disc = b * b - 4 * a * (o[0] ** 2 + o[1] ** 2 - 1.0)
        t_side = (-b - np.sqrt(disc)) / (2 * a)
        t_side = np.where((disc >= 0) & (t_side > 0) & (np.abs(o[2] + t_side * d[2]) <= 1), t_side, np.inf)
        t_cap = (-np.sign(d[2]) - o[2]) / d[2]
        x, y = o[0] + t_cap * d[0], o[1] + t_cap * d[1]
        t_cap = np.where((t_cap > 0) & (x * x + y * y <= 1), t_cap, np.inf)
        return np.minimum(t_side, t_cap)


def unit_normal(shape, p):
    """Outward normal (3 arrays, unnormalised) at points p (3 arrays) on a unit primitive's surface."""
    if shape == "sphere":
        return p
    ax, ay, az = np.abs(p[0]), np.abs(p[1]), np.abs(p[2])
    zero = np.zeros_like(p[0])
    if shape == "cylinder":
        on_cap = az >= np.maximum(np.sqrt(p[0] ** 2 + p[1] ** 2), 1e-3) * 0.999
        return np.where(on_cap, zero, p[0]), np.where(on_cap, zero, p[1]), np.where(on_cap, np.sign(p[2]), zero)
    x_max, y_max = (ax >= ay) & (ax >= az), (ay > ax) & (ay >= az)  # box: the face of the largest coordinate
    return (np.where(x_max, np.sign(p[0]), zero), np.where(y_max, np.sign(p[1]), zero),
            np.where(~x_max & ~y_max, np.sign(p[2]), zero))


def object_pixel_bounds(K, pose, obj, height, width):
    """Pixel rectangle (v0, v1, u0, u1) that holds the object's projection, or None if it is out of view."""
    uv, z = project(K, pose, box_corners(obj))
    if np.all(z <= 1e-3):
        return None
    if np.any(z <= 1e-3):  # straddles the camera plane: no safe bound, test every pixel
        return 0, height, 0, width
    u0, v0 = np.floor(uv.min(axis=0)).astype(int)
    u1, v1 = np.ceil(uv.max(axis=0)).astype(int) + 1
    u0, u1, v0, v1 = max(u0, 0), min(u1, width), max(v0, 0), min(v1, height)
    return None if u0 >= u1 or v0 >= v1 else (v0, v1, u0, u1)


def to_unit_frame(obj, origin, d):
    """Ray origin and directions in an object's unit frame."""
    c, s = math.cos(obj["yaw"]), math.sin(obj["yaw"])
    hx, hy, hz = (np.float32(v / 2) for v in obj["size"])
    ox, oy, oz = (origin - np.asarray(obj["center"], dtype=np.float64))
    o = (np.float32((c * ox + s * oy) / hx), np.float32((-s * ox + c * oy) / hy), np.float32(oz / hz))
    cf, sf = np.float32(c), np.float32(s)
    return o, ((cf * d[0] + sf * d[1]) / hx, (cf * d[1] - sf * d[0]) / hy, d[2] / hz)


def room_hits(room, origin, d):
    """Each ray leaves the (convex) room through the nearest of its 6 planes. Returns z-depth (H, W) and the
    surface id (H, W): a SHELL_IDS value for floor and ceiling, -10 - k for wall k (x-, x+, y-, y+)."""
    half_w, half_d, height = room["size"][0] / 2, room["size"][1] / 2, room["size"][2]
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(d[0] > 0, (half_w - origin[0]) / d[0], (-half_w - origin[0]) / d[0])
        ty = np.where(d[1] > 0, (half_d - origin[1]) / d[1], (-half_d - origin[1]) / d[1])
        tz = np.where(d[2] > 0, (height - origin[2]) / d[2], (0.0 - origin[2]) / d[2])
    tx, ty, tz = (np.where(np.isfinite(t) & (t > 0), t, np.inf).astype(np.float32) for t in (tx, ty, tz))
    depth = np.minimum(np.minimum(tx, ty), tz)
    surface = np.where(d[2] > 0, SHELL_IDS["ceiling"], SHELL_IDS["floor"])
    surface = np.where(ty <= depth, np.where(d[1] > 0, -13, -12), surface)
    surface = np.where(tx <= depth, np.where(d[0] > 0, -11, -10), surface)
    return depth, surface.astype(np.int16)


def texture_noise(x, y, z, cell=0.05):
    """A fixed value in [-1, 1] per 5 cm cell of world space (an integer hash: the same on every machine)."""
    h = ((np.floor(x / cell).astype(np.int32) * 73856093) ^ (np.floor(y / cell).astype(np.int32) * 19349663)
         ^ (np.floor(z / cell).astype(np.int32) * 83492791))
    return (h & 1023).astype(np.float32) / 511.5 - 1.0


def render(scene, K, pose, height, width, with_room=True):
    """One view: RGB uint8 (H, W, 3), z-depth (H, W) metres, instance int16 (H, W): object, SHELL_IDS or -4 (none)."""
    origin = camera_center(pose).astype(np.float32)  # float32 throughout: a float64 scalar would promote arrays
    d = camera_rays(K, pose, height, width)  # (3, H, W)
    if with_room:
        depth, surface = room_hits(scene["room"], origin, d)
    else:
        depth, surface = np.full((height, width), np.inf, np.float32), np.full((height, width), -4, np.int16)
    rects = {}
    for index, obj in enumerate(scene["objects"]):
        if (bounds := object_pixel_bounds(K, pose, obj, height, width)) is None:
            continue
        v0, v1, u0, u1 = rects[index] = bounds
        o, local_d = to_unit_frame(obj, origin, d[:, v0:v1, u0:u1])
        t = intersect_unit(obj["shape"], o, local_d)
        closer = t < depth[v0:v1, u0:u1]
        depth[v0:v1, u0:u1][closer] = t[closer]
        surface[v0:v1, u0:u1][closer] = index
    rgb = shade(scene, origin, d, depth, surface, rects)
    instance = np.where(surface <= -10, SHELL_IDS["wall"], surface).astype(np.int16)
    return rgb, depth, instance


def shade(scene, origin, d, depth, surface, rects):
    """Lambert shading (a fixed light from above, both faces lit), a floor checkerboard and a little texture."""
    room = scene["room"]
    finite = np.where(np.isfinite(depth), depth, 0)
    x, y, z = origin[0] + d[0] * finite, origin[1] + d[1] * finite, origin[2] + d[2] * finite
    # room shell: axis-aligned normals; the palette is indexed by -surface (1 floor, 2 ceiling, 10..13 walls)
    palette = np.zeros((14 + len(scene["objects"]), 3), dtype=np.float32)
    gray = [128, 128, 128]  # scanned rooms have no colours: their shell is never rendered
    palette[1], palette[2] = room.get("floor_color", gray), room.get("ceiling_color", gray)
    palette[10:14] = room.get("wall_colors", [gray] * 4)
    palette[14:] = np.reshape([o["color"] for o in scene["objects"]], (-1, 3))
    light_of = np.zeros(14, dtype=np.float32)
    light_of[[1, 2, 10, 11, 12, 13]] = np.abs(LIGHT[[2, 2, 0, 0, 1, 1]])
    lookup = np.where(surface >= 0, 14 + surface, np.clip(-surface, 0, 13))
    light = light_of[np.clip(-surface, 0, 13)]
    for index, (v0, v1, u0, u1) in rects.items():  # objects: normals only where the object won
        mine = surface[v0:v1, u0:u1] == index
        if not mine.any():
            continue
        obj = scene["objects"][index]
        point = [c[v0:v1, u0:u1][mine] for c in (x, y, z)]
        o, local = to_unit_frame(obj, np.zeros(3), point)  # unit-frame hit point = local + o
        nx, ny, nz = unit_normal(obj["shape"], [local[k] + o[k] for k in range(3)])
        c, s = math.cos(obj["yaw"]), math.sin(obj["yaw"])
        hx, hy, hz = (v / 2 for v in obj["size"])
        nx, ny, nz = nx / hx, ny / hy, nz / hz  # back to world: R_yaw (n / half_size)
        wx, wy = c * nx - s * ny, s * nx + c * ny
        norm = np.sqrt(wx * wx + wy * wy + nz * nz) + 1e-9
        light[v0:v1, u0:u1][mine] = np.abs(wx * LIGHT[0] + wy * LIGHT[1] + nz * LIGHT[2]) / norm
    checker = (np.floor(x * 2) + np.floor(y * 2)) % 2  # 0.5 m floor tiles
    tiles = np.where(surface == SHELL_IDS["floor"], 0.85 + 0.15 * checker, 1.0)
    # every factor is <= 1, so the product of a colour <= 255 needs no clipping
    factor = (0.45 + 0.55 * light) * tiles * (0.95 + 0.05 * texture_noise(x, y, z))  # (H, W)
    return (palette[lookup] * factor[..., None].astype(np.float32)).astype(np.uint8)

# -----------------------------------------------------------------------------
# PNG files with the standard library (zlib): preview images, and the real-scan colour/depth frames.

def write_png(path, image):
    """Write uint8 (H, W, 3) RGB or uint16 (H, W) gray as a PNG, atomically."""
    image = np.ascontiguousarray(image)
    height, width = image.shape[:2]
    depth, color = (16, 0) if image.dtype == np.uint16 else (8, 2)
    rows = image.astype(">u2").tobytes() if depth == 16 else image.tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[r * stride:(r + 1) * stride] for r in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    blob = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    write_atomic(path, blob)


def read_png(path):
    """Read a non-interlaced 8-bit gray/RGB/RGBA or 16-bit gray PNG -> numpy array (RGB drops alpha)."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(blob):
        length, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", blob[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat.append(blob[pos + 8:pos + 8 + length])
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 6: 4}.get(color)
    if channels is None or interlace or depth not in (8, 16):
        raise ValueError(f"{path}: unsupported PNG (color type {color}, bit depth {depth}, interlace {interlace})")
    bpp = channels * depth // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height + 1, bpp + width * bpp), dtype=np.int32)  # a zero row above, a zero pixel to the left
    for r in range(height):  # undo the per-row filters
        kind, line, prev, row = raw[r, 0], raw[r, 1:].astype(np.int32), out[r], out[r + 1]
        if kind in (0, 2):  # none, up: the whole row at once
            row[bpp:] = (line + prev[bpp:] * (kind == 2)) & 255
        elif kind == 1:  # sub: a running sum along the row, per channel
            row[bpp:] = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 255
        else:  # average and Paeth depend on the pixel to the left, just decoded: walk the row
            for i in range(bpp, len(row)):
                left, up, up_left = row[i - bpp], prev[i], prev[i - bpp]
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                paeth = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                row[i] = (line[i - bpp] + ((left + up) // 2 if kind == 3 else paeth)) & 255
    data = out[1:, bpp:].astype(np.uint8)
    if depth == 16:
        data = data.reshape(height, width * channels, 2)
        data = (data[..., 0].astype(np.uint16) << 8) | data[..., 1]
    data = data.reshape(height, width, channels)
    return data[..., 0] if channels == 1 else data[..., :3]


def write_atomic(path, blob):
    """Write bytes to `path` through a temporary name and a rename: a crash leaves the old file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# 6. Visibility and markers. An object is asked about in a view only if enough of its pixels are visible in
# that view's instance map, so every question is answerable from its images. Markers use SPAR's 0-1000 grid.

MARKER_COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
MARKER_RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
              "magenta": (255, 0, 255), "cyan": (0, 255, 255)}


@dataclass
class SceneViews:
    """Everything the QA engine knows about one scene: ground truth plus, per view, what is visible."""
    scene: dict            # room, objects (the scene json)
    K: np.ndarray          # (V, 3, 3)
    poses: np.ndarray      # (V, 4, 4) camera-to-world
    video_frames: int      # views 0..video_frames-1 are the ordered walk
    pixels: np.ndarray     # (V, n_objects) visible pixel count per view and object
    points: np.ndarray     # (V, n_objects, 2) marker point (grid 0-1000): the visible pixel nearest the centroid
    boxes: np.ndarray      # (V, n_objects, 4) visible bounding box on the grid: x0, y0, x1, y1
    min_pixels: int        # how many visible pixels make an object visible
    image_size: tuple      # (H, W) of the views

    def visible(self, view):
        return [int(o) for o in np.flatnonzero(self.pixels[view] >= self.min_pixels)]


def scene_views(scene, K, poses, instance, video_frames):
    """SceneViews of a scene: per view and object, the visible pixel count, marker point and box (0-1000 grid)."""
    views, height, width = instance.shape
    n_objects = len(scene["objects"])
    pixels = np.zeros((views, n_objects), dtype=np.int64)
    points = np.zeros((views, n_objects, 2), dtype=np.int64)
    boxes = np.zeros((views, n_objects, 4), dtype=np.int64)
    to_grid = np.array([1000 / width, 1000 / height])
    for view in range(views):
        v, u = np.nonzero(instance[view] >= 0)
        ids = instance[view][v, u].astype(np.int64)
        order = np.argsort(ids, kind="stable")
        v, u, ids = v[order], u[order], ids[order]
        starts = np.searchsorted(ids, np.arange(n_objects + 1))
        for obj in range(n_objects):
            ou, ov = u[starts[obj]:starts[obj + 1]], v[starts[obj]:starts[obj + 1]]
            if len(ou) == 0:
                continue
            nearest = np.argmin((ou - ou.mean()) ** 2 + (ov - ov.mean()) ** 2)
            pixels[view, obj] = len(ou)
            points[view, obj] = np.round((np.array([ou[nearest], ov[nearest]]) + 0.5) * to_grid)
            boxes[view, obj] = np.round(np.array([ou.min(), ov.min(), ou.max() + 1, ov.max() + 1]) * np.tile(to_grid, 2))
    unnamed = [o for o, obj in enumerate(scene["objects"]) if obj["category"] == "other"]
    pixels[:, unnamed] = 0  # a scan's unmapped objects occlude, but no question is asked about them
    return SceneViews(scene, np.asarray(K, np.float64), np.asarray(poses, np.float64), video_frames, pixels,
                      points, boxes, max(24, int(0.004 * height * width)), (height, width))

# -----------------------------------------------------------------------------
# 7. The QA engine. Every answer is computed from ground truth (boxes, cameras), never from the render alone.
# Geometry first, then one small function per task family, then `make_questions` that runs them all.
# Directions ("left", "front-right", ...) are measured on the floor plane, in a gravity-aligned frame.

FILL_METRES = "Answer with a single number in meters."
# The evaluators' own prompt parts (lmms-eval tasks vsibench and sparbench, see prompt() below)
SELECT_LETTER = "Answer with the option's letter from the given choices directly."
VSI_PRE_PROMPT = "These are frames of a video."
NUMBER_POST_PROMPT = "Please answer the question using a single word or phrase."
GRID_NOTE = ("The values represent the bounding box coordinates normalized to a 0-1000 scale, with the top-left "
             "corner as the origin of the image.")
QUADRANTS = ["front-left", "front-right", "back-left", "back-right"]
RELATIONS = ["left of", "right of", "in front of", "behind"]


def center(obj):
    return np.asarray(obj["center"], dtype=np.float64)


def planar_direction(origin, facing, target):
    """Floor-plane angle (degrees) of `target` from `origin` facing `facing`: 0 ahead, +90 right, +-180 behind."""
    f = np.asarray(facing, dtype=np.float64)[:2]
    f = f / max(np.linalg.norm(f), 1e-9)
    rel = (np.asarray(target, dtype=np.float64) - origin)[:2]
    forward, right = rel @ f, rel @ np.array([f[1], -f[0]])
    return math.degrees(math.atan2(right, forward))


def quadrant(angle, margin=15.0):
    """front-left / front-right / back-left / back-right, or None if within `margin` degrees of a boundary."""
    if min(abs(angle), abs(abs(angle) - 90), abs(abs(angle) - 180)) < margin:
        return None
    return ("back-" if abs(angle) > 90 else "front-") + ("right" if angle > 0 else "left")


def camera_relative(pose, point):
    """(right, forward) metres of a world point from a camera, in its gravity-aligned heading frame."""
    forward, right = heading_frame(pose)
    rel = np.asarray(point, dtype=np.float64) - camera_center(pose)
    return float(rel @ right), float(rel @ forward)


def camera_motion(pose_from, pose_to):
    """Motion between two views in the first's heading frame: right, forward (m) and turn (degrees, + = right)."""
    right, forward = camera_relative(pose_from, camera_center(pose_to))
    yaw = planar_direction(np.zeros(3), heading_frame(pose_from)[0], heading_frame(pose_to)[0])
    return right, forward, yaw


def closest_box_distance(a, b, iterations=200):
    """Closest-point distance (m) of two oriented boxes by alternating projections (convex sets); 0 if touching."""
    def project_onto(obj, p):
        rot, half = yaw_matrix(obj["yaw"]), np.asarray(obj["size"]) / 2
        return rot @ np.clip(rot.T @ (p - center(obj)), -half, half) + center(obj)

    p = center(a)
    for _ in range(iterations):
        q = project_onto(b, p)
        p_next = project_onto(a, q)
        if np.linalg.norm(p_next - p) < 1e-9:
            break
        p = p_next
    return float(np.linalg.norm(project_onto(b, p) - p))


def relation_word(right_a, forward_a, right_b, forward_b, min_gap=0.3, margin=15.0):
    """A relative to B seen from a camera: left of / right of / in front of / behind, or None if unclear (closer
    than min_gap, or within `margin` degrees of a diagonal, where the classes meet)."""
    d_right, d_forward = right_a - right_b, forward_a - forward_b
    ratio = math.tan(math.radians(45 + margin))
    if abs(d_right) >= max(ratio * abs(d_forward), min_gap):
        return "right of" if d_right > 0 else "left of"
    if abs(d_forward) >= max(ratio * abs(d_right), min_gap):
        return "behind" if d_forward > 0 else "in front of"
    return None


def turn_word(heading, new_heading, margin=15.0):
    """The turn between two walking directions: 'Turn Left' / 'Turn Right' / 'Turn Back' (at least 135 degrees,
    as VSI-Bench's "back"), or None within `margin` degrees of 135 or for a turn under 30 (going on ahead)."""
    angle = planar_direction(np.zeros(3), heading, new_heading)
    if abs(angle) >= 135 + margin:
        return "Turn Back"
    if 30 <= abs(angle) <= 135 - margin:
        return "Turn Right" if angle > 0 else "Turn Left"
    return None


def numeric_distractors(rng, truth, decimals, count=3):
    """`count` values from U(0.25, 1.75) * truth, rounded, 20 % of the truth away from it and each other."""
    values = [round(truth, decimals)]
    for _ in range(1000):
        if len(values) == count + 1:
            break
        candidate = round(truth * rng.uniform(0.25, 1.75), decimals)
        if all(abs(candidate - v) >= 0.2 * abs(truth) for v in values):
            values.append(candidate)
    return None if len(values) < count + 1 else [f"{v:.{decimals}f}" for v in values[1:]]


class Asker:
    """Draws views and objects for questions about one scene and phrases the references and answers."""

    def __init__(self, views, rng, numeric_select=0.25):
        self.views, self.rng, self.numeric_select = views, rng, numeric_select
        self.objects, self.n_views = views.scene["objects"], len(views.poses)
        self.video = list(range(views.video_frames))  # the frames of the ordered walk, as a question's images

    def pick(self, items, count):
        items = list(items)
        return None if len(items) < count else [items[i] for i in self.rng.choice(len(items), count, replace=False)]

    def view_with(self, count):
        """A random view showing at least `count` objects, and `count` of them."""
        for _ in range(10):
            view = int(self.rng.integers(self.n_views))
            chosen = self.pick(self.views.visible(view), count)
            if chosen is not None:
                return view, chosen
        return None, None

    def view_pair(self, shared=1):
        """Two different views that show at least `shared` common objects (so they can be related)."""
        for _ in range(10):
            a, b = (int(v) for v in self.rng.choice(self.n_views, 2, replace=False))
            if len(set(self.views.visible(a)) & set(self.views.visible(b))) >= shared:
                return a, b
        return None, None

    def mark(self, obj, view, slot, markers, multi):
        """Reference text for an object in one of the question's images, and its marker (SPAR style)."""
        color = MARKER_COLORS[len(markers) % len(MARKER_COLORS)]
        x, y = (int(c) for c in self.views.points[view, obj])
        markers.append({"image": slot, "object": obj, "color": color, "point": [x, y],
                        "box": [int(c) for c in self.views.boxes[view, obj]]})
        where = f" in image {slot + 1}" if multi else ""
        return f"the {self.objects[obj]['category']} at the {color} point ({x}, {y}){where}"

    def numeric(self, value, decimals, unit_text):
        """A numeric answer, as `fill` or (with probability numeric_select) as `select` with distractors."""
        text = f"{value:.{decimals}f}"
        if self.rng.random() < self.numeric_select and (distractors := numeric_distractors(self.rng, value, decimals)):
            return self.choice(text, distractors)
        return {"format_type": "fill", "answer": text, "instruction": unit_text}

    def choice(self, correct, distractors):
        """A multiple-choice answer: the correct option shuffled among the distractors, answered by its letter."""
        choices = [correct] + list(distractors)
        order = self.rng.permutation(len(choices))
        options = [f"{'ABCDEFGH'[i]}. {choices[k]}" for i, k in enumerate(order)]
        return {"format_type": "select", "answer": "ABCDEFGH"[int(np.flatnonzero(order == 0)[0])], "options": options}


def finish(question, answer, images, markers=None):
    """Assemble a SPAR task's output: as in SPAR-Bench, the question text carries its options and instruction."""
    if answer["format_type"] == "select":
        question += "\nOptions:\n" + "\n".join(answer["options"]) + "\n" + SELECT_LETTER
    elif answer.get("instruction"):
        question += "\n" + answer["instruction"]
    return finish_vsi(question, answer, images, markers)


def finish_vsi(question, answer, images, markers=None):
    """Assemble a VSI-Bench task's output as its rows read: the bare question, the options apart."""
    out = {"image": [int(i) for i in images], "question": question, "format_type": answer["format_type"],
           "answer": answer["answer"]}
    if "options" in answer:
        out["options"] = answer["options"]
    if markers:
        out["markers"] = markers
    return out


def prompt(record):
    """The text a model reads for a question record, assembled as the benchmark's lmms-eval task does it: a
    VSI-Bench question gets the pre-prompt, its options and the post-prompt (thinking-in-space, vsibench's
    doc_to_text); a SPAR question carries its own. A record read from another layout may bring its "prompt"."""
    if "prompt" in record:
        return record["prompt"]
    if record.get("task") not in VSI_TASKS:
        return record["question"]
    if record["format_type"] == "select":
        return "\n".join([VSI_PRE_PROMPT, record["question"], "Options:", *record["options"], SELECT_LETTER])
    return "\n".join([VSI_PRE_PROMPT, record["question"], NUMBER_POST_PROMPT])


# --- SPAR-Bench tasks. `multi` picks the _mv variant: objects marked in different images, the camera that
# distances and directions refer to is image 1's. Each function returns one question or None (try again).

def one_object_in_second_view(a):
    """Views (v1, v2) and an object marked in v2, preferably one that v1 does not show (truly multi-view)."""
    v1, v2 = a.view_pair()
    if v1 is None:
        return None
    unseen = [o for o in a.views.visible(v2) if o not in a.views.visible(v1)]
    chosen = a.pick(unseen, 1) or a.pick(a.views.visible(v2), 1)
    return v1, v2, chosen[0]


def marked_objects(a, multi, count):
    """(camera view, images, objects, each one's view): `count` objects in one view; _mv: 1 in image 1, rest in 2."""
    if not multi:
        view, chosen = a.view_with(count)
        return None if view is None else (view, [view], chosen, [view] * count)
    v1, v2 = a.view_pair()
    if v1 is None:
        return None
    first = a.pick(a.views.visible(v1), 1)
    others = first and a.pick([o for o in a.views.visible(v2) if o != first[0]], count - 1)
    return (v1, [v1, v2], first + others, [v1] + [v2] * (count - 1)) if others else None


def one_object(a, multi):
    """(camera view, images, object, its reference, markers): one object; _mv: marked in image 2, image 1's camera."""
    if multi:
        if (picked := one_object_in_second_view(a)) is None:
            return None
        cam, view, obj = picked
        images, slot = [cam, view], 1
    else:
        cam, chosen = a.view_with(1)
        if cam is None:
            return None
        view, obj, images, slot = cam, chosen[0], [cam], 0
    markers = []
    return cam, images, obj, a.mark(obj, view, slot, markers, multi), markers


def ask_depth_oc(a, multi=False):
    if (picked := one_object(a, multi)) is None:
        return None
    cam, images, obj, ref, markers = picked
    camera = "the camera of image 1" if multi else "the camera"
    question = f"What is the depth of {ref} from {camera} (its distance along that camera's viewing direction)?"
    depth = world_to_camera(a.views.poses[cam], center(a.objects[obj]))[2]
    return None if depth < 0.3 else finish(question, a.numeric(depth, 2, FILL_METRES), images, markers)


def ask_depth_oo(a, multi=False):
    if (picked := marked_objects(a, multi, 2)) is None:
        return None
    cam, images, objs, views = picked
    depths = [world_to_camera(a.views.poses[cam], center(a.objects[o]))[2] for o in objs]
    if depths[0] < depths[1]:
        objs, views, depths = objs[::-1], views[::-1], depths[::-1]
    if depths[0] - depths[1] < 0.2 or depths[1] < 0.3:
        return None
    markers = []
    refs = [a.mark(o, v, images.index(v), markers, multi) for o, v in zip(objs, views)]
    camera = "the camera of image 1" if multi else "the camera"
    question = (f"How much farther from {camera} than {refs[1]} is {refs[0]}, measured along the viewing "
                f"direction (difference of their depths)?")
    return finish(question, a.numeric(depths[0] - depths[1], 2, FILL_METRES), images, markers)


def ask_distance_oc(a, multi=False):
    if (picked := one_object(a, multi)) is None:
        return None
    cam, images, obj, ref, markers = picked
    camera = "the camera of image 1" if multi else "the camera"
    question = f"How far is {ref} from {camera} (straight-line distance to its center)?"
    distance = np.linalg.norm(center(a.objects[obj]) - camera_center(a.views.poses[cam]))
    return finish(question, a.numeric(distance, 2, FILL_METRES), images, markers)


def ask_distance_oo(a, multi=False):
    if (picked := marked_objects(a, multi, 2)) is None:
        return None
    cam, images, objs, views = picked
    distance = np.linalg.norm(center(a.objects[objs[0]]) - center(a.objects[objs[1]]))
    if distance < 0.2:
        return None
    markers = []
    refs = [a.mark(o, v, images.index(v), markers, multi) for o, v in zip(objs, views)]
    question = f"What is the distance between the centers of {refs[0]} and {refs[1]}?"
    return finish(question, a.numeric(distance, 2, FILL_METRES), images, markers)


def view_change_answer(right, forward, yaw):
    """SPAR's view_change_infer answer: named components, each positive, the name giving the direction
    ("move_left:0.52,move_forward:1.20,rotate_right:30"; metres and degrees)."""
    return ",".join([f"move_{'right' if right >= 0 else 'left'}:{abs(right):.2f}",
                     f"move_{'forward' if forward >= 0 else 'backward'}:{abs(forward):.2f}",
                     f"rotate_{'right' if yaw >= 0 else 'left'}:{abs(yaw):.0f}"])


def ask_view_change(a):
    v1, v2 = a.view_pair()
    if v1 is None:
        return None
    right, forward, yaw = camera_motion(a.views.poses[v1], a.views.poses[v2])
    if abs(right) < 0.15 or abs(forward) < 0.15 or abs(yaw) < 8:
        return None
    question = ("The camera moved from image 1 to image 2. On the floor plane and in image 1's heading, how far did "
                "it move right or left and forward or backward (meters), and by how many degrees did it turn?\n"
                "Answer in the form move_right:x,move_forward:y,rotate_left:z, naming each direction "
                "(move_right or move_left, move_forward or move_backward, rotate_right or rotate_left).")
    answer = {"format_type": "fill", "answer": view_change_answer(right, forward, yaw)}  # the question says how
    return finish(question, answer, [v1, v2])


def grid_point(K, pose, point, height, width):
    """(x, y) of a world point on the 0-1000 grid of a camera's image and its depth (m); None if not in view."""
    uv, z = project(K, pose, np.asarray(point, dtype=np.float64)[None])
    (u, v), depth = uv[0], z[0]
    if depth < 0.3 or not (0 <= u < width and 0 <= v < height):
        return None
    return int(u / width * 1000), int(v / height * 1000), float(depth)


def ask_camera_motion(a):
    """Where is camera 2, seen from camera 1: its position in image 1 on SPAR's 0-1000 grid and its depth."""
    v1, v2 = a.view_pair()
    if v1 is None:
        return None
    height, width = a.views.image_size
    truth = grid_point(a.views.K[v1], a.views.poses[v1], camera_center(a.views.poses[v2]), height, width)
    if truth is None:
        return None
    distractors = []
    for _ in range(100):  # other places in image 1, well apart on the grid or in depth
        if len(distractors) == 3:
            break
        x, y, depth = int(a.rng.integers(1000)), int(a.rng.integers(1000)), truth[2] * a.rng.uniform(0.4, 1.8)
        if all(max(abs(x - p[0]), abs(y - p[1])) >= 150 or abs(depth - p[2]) >= 0.3 * truth[2]
               for p in [truth] + distractors):
            distractors.append((x, y, depth))
    if len(distractors) < 3:
        return None
    as_text = [f"({x}, {y}), {depth:.1f}" for x, y, depth in [truth] + distractors]
    question = ("Where is the camera of image 2, seen from the camera of image 1? Each option gives its position "
                "in image 1 as (x, y) and its depth in meters.\n" + GRID_NOTE)
    return finish(question, a.choice(as_text[0], as_text[1:]), [v1, v2])


def ask_position_matching(a):
    v1, v2 = a.view_pair()
    if v1 is None:
        return None
    obj = a.pick(set(a.views.visible(v1)) & set(a.views.visible(v2)), 1)[0]
    truth = a.views.points[v2, obj]
    candidates = [a.views.points[v2, o] for o in a.views.visible(v2) if o != obj]
    chosen = []
    for i in a.rng.permutation(len(candidates)):  # distractor points well apart from the truth and each other
        if all(np.abs(candidates[i] - p).max() >= 100 for p in [truth] + chosen):
            chosen.append(candidates[i])
    if len(chosen) < 3:
        return None
    markers = []
    ref = a.mark(obj, v1, 0, markers, True)
    question = f"Which point in image 2 shows the same object as {ref}?"
    as_text = [f"({int(p[0])}, {int(p[1])})" for p in [truth] + chosen[:3]]
    return finish(question, a.choice(as_text[0], as_text[1:]), [v1, v2], markers)


def ask_relation_oo(a, multi=False):
    if (picked := marked_objects(a, multi, 2)) is None:
        return None
    cam, images, objs, views = picked
    pose = a.views.poses[cam]
    (ra, fa), (rb, fb) = (camera_relative(pose, center(a.objects[o])) for o in objs)
    if (correct := relation_word(ra, fa, rb, fb)) is None:
        return None
    markers = []
    refs = [a.mark(o, v, images.index(v), markers, multi) for o, v in zip(objs, views)]
    camera = "the camera of image 1" if multi else "the camera"
    question = f"Seen from {camera}, where is {refs[0]} relative to {refs[1]}?"
    return finish(question, a.choice(correct, [r for r in RELATIONS if r != correct]), images, markers)


def ask_relation_oc_mv(a):
    if (picked := one_object_in_second_view(a)) is None:
        return None
    cam, other, obj = picked
    pose = a.views.poses[cam]
    correct = quadrant(planar_direction(camera_center(pose), heading_frame(pose)[0], center(a.objects[obj])))
    if correct is None:
        return None
    markers = []
    ref = a.mark(obj, other, 1, markers, True)
    question = f"Standing at the camera of image 1 and facing its viewing direction, where is {ref}?"
    return finish(question, a.choice(correct, [q for q in QUADRANTS if q != correct]), [cam, other], markers)


def ask_imagination_oc(a, multi=False):
    """Perspective taking: stand at object A, face the camera; where is object B?"""
    if (picked := marked_objects(a, multi, 2)) is None:
        return None
    cam, images, objs, views = picked
    if multi:  # A is marked in image 2, B in image 1; the camera is image 1's
        objs, views = objs[::-1], views[::-1]
    stand, other = center(a.objects[objs[0]]), center(a.objects[objs[1]])
    camera = camera_center(a.views.poses[cam])
    if np.linalg.norm((camera - stand)[:2]) < 0.5:
        return None
    if (correct := quadrant(planar_direction(stand, camera - stand, other))) is None:
        return None
    markers = []
    refs = [a.mark(o, v, images.index(v), markers, multi) for o, v in zip(objs, views)]
    which = "the camera of image 1" if multi else "the camera"
    question = f"Imagine you stand at {refs[0]}, facing {which}. Where is {refs[1]} relative to you?"
    return finish(question, a.choice(correct, [q for q in QUADRANTS if q != correct]), images, markers)


def ask_imagination_oo(a, multi=False):
    """Perspective taking: stand at object A, face object B; where is object C? (_mv: B and C in image 2)"""
    if (picked := marked_objects(a, multi, 3)) is None:
        return None
    _, images, objs, views = picked
    stand, face, other = (center(a.objects[o]) for o in objs)
    if np.linalg.norm((face - stand)[:2]) < 0.5:
        return None
    if (correct := quadrant(planar_direction(stand, face - stand, other))) is None:
        return None
    markers = []
    refs = [a.mark(o, v, images.index(v), markers, multi) for o, v in zip(objs, views)]
    question = f"Imagine you stand at {refs[0]}, facing {refs[1]}. Where is {refs[2]} relative to you?"
    return finish(question, a.choice(correct, [q for q in QUADRANTS if q != correct]), images, markers)


def ask_distance_infer_center(a, multi=False):
    """Which of three marked objects is closest (centre to centre) to a reference one? (_mv: the three in image 2)"""
    if (picked := marked_objects(a, multi, 4)) is None:
        return None
    _, images, objs, views = picked
    distances = [np.linalg.norm(center(a.objects[o]) - center(a.objects[objs[0]])) for o in objs[1:]]
    ranked = np.argsort(distances)
    if distances[ranked[1]] < max(1.15 * distances[ranked[0]], distances[ranked[0]] + 0.15):
        return None
    markers = []
    refs = [a.mark(o, v, images.index(v), markers, multi) for o, v in zip(objs, views)]
    question = f"Which of these objects is closest to {refs[0]} (measured between their centers)?"
    correct = refs[1 + ranked[0]]
    return finish(question, a.choice(correct, [r for r in refs[1:] if r != correct]), images, markers)


# --- VSI-Bench tasks, over the ordered video (frames 0..T-1). As in VSI-Bench, objects are named by category
# alone, so only categories with a single instance in the room are referenced; all must appear in the video.

def video_objects(a):
    """(objects seen in the video, those whose category is unique in the room)."""
    frames = range(a.views.video_frames)
    seen = [o for o in range(len(a.objects)) if any(a.views.pixels[f, o] >= a.views.min_pixels for f in frames)]
    counts = Counter(obj["category"] for obj in a.objects)
    return seen, [o for o in seen if counts[a.objects[o]["category"]] == 1]


def name(a, obj):
    return a.objects[obj]["category"]


def fill_answer(text):
    return {"format_type": "fill", "answer": text}


# The question templates word for word as VSI-Bench's rows read (nyu-visionx/VSI-Bench, checked against rows
# printed in vision-x-nyu/test-set-training; tests/test_generate_spar.py holds the table). Numbers are written
# as the rows write them: counts and centimetres whole, metres and square metres with one decimal.

def ask_counting(a):
    seen, _ = video_objects(a)
    counts = Counter(name(a, o) for o in seen)
    if (chosen := a.pick(sorted(c for c, n in counts.items() if n >= 2), 1)) is None:
        return None  # VSI-Bench asks only about categories with two or more instances
    return finish_vsi(f"How many {chosen[0]}(s) are in this room?", fill_answer(str(counts[chosen[0]])), a.video)


def ask_abs_distance(a):
    if (pair := a.pick(video_objects(a)[1], 2)) is None:
        return None
    distance = closest_box_distance(a.objects[pair[0]], a.objects[pair[1]])
    if distance < 0.2:
        return None
    question = (f"Measuring from the closest point of each object, what is the distance between the "
                f"{name(a, pair[0])} and the {name(a, pair[1])} (in meters)?")
    return finish_vsi(question, fill_answer(f"{distance:.1f}"), a.video)


def ask_object_size(a):
    if (chosen := a.pick(video_objects(a)[1], 1)) is None:
        return None
    longest = 100 * max(a.objects[chosen[0]]["size"])
    question = (f"What is the length of the longest dimension (length, width, or height) of the "
                f"{name(a, chosen[0])}, measured in centimeters?")
    return finish_vsi(question, fill_answer(f"{longest:.0f}"), a.video)


def ask_room_size(a):
    area = a.views.scene["room"].get("floor_area")
    if not area:
        return None
    question = ("What is the size of this room (in square meters)? \n"
                "If multiple rooms are shown, estimate the size of the combined space.")
    return finish_vsi(question, fill_answer(f"{area:.1f}"), a.video)


def listed_choice(choices, correct):
    """Options in the order the question lists them (VSI-Bench's relative distance), answered by letter."""
    return {"format_type": "select", "answer": "ABCDEFGH"[choices.index(correct)],
            "options": [f"{'ABCDEFGH'[i]}. {c}" for i, c in enumerate(choices)]}


def ask_rel_distance(a):
    if (chosen := a.pick(video_objects(a)[1], 5)) is None:
        return None
    target, candidates = chosen[0], chosen[1:]
    distances = [closest_box_distance(a.objects[target], a.objects[o]) for o in candidates]
    ranked = np.argsort(distances)
    if distances[ranked[1]] < max(1.15 * distances[ranked[0]], distances[ranked[0]] + 0.15):
        return None
    names = [name(a, o) for o in candidates]
    question = (f"Measuring from the closest point of each object, which of these objects ({', '.join(names)}) "
                f"is the closest to the {name(a, target)}?")
    return finish_vsi(question, listed_choice(names, names[ranked[0]]), a.video)


def rel_direction_answer(angle, difficulty, margin=15.0):
    """The answer to 'by A facing B, where is C?' at an angle (degrees, + = right); None within `margin` of a
    class boundary (easy: ahead and behind; medium: also 135, where "back" begins; hard: the quadrants' axes)."""
    if difficulty == "hard":
        return quadrant(angle, margin)
    if difficulty == "medium" and abs(angle) >= 135 + margin:
        return "back"
    limit = 135 - margin if difficulty == "medium" else 180 - margin
    return None if abs(angle) < margin or abs(angle) > limit else ("right" if angle > 0 else "left")


REL_DIRECTION_ASKS = {
    "easy": "to the left or the right of the {b}?",
    "medium": "to my left, right, or back?\nAn object is to my back if I would have to turn at least 135 degrees "
              "in order to face it.",
    "hard": "to my front-left, front-right, back-left, or back-right?\nThe directions refer to the quadrants of a "
            "Cartesian plane (if I am standing at the origin and facing along the positive y-axis).",
}


def ask_rel_direction(a):
    if (chosen := a.pick(video_objects(a)[1], 3)) is None:
        return None
    stand, face, other = (center(a.objects[o]) for o in chosen)
    if np.linalg.norm((face - stand)[:2]) < 0.5:
        return None
    difficulty = ["easy", "medium", "hard"][int(a.rng.integers(3))]
    if (correct := rel_direction_answer(planar_direction(stand, face - stand, other), difficulty)) is None:
        return None
    words = {"easy": ["left", "right"], "medium": ["left", "right", "back"], "hard": QUADRANTS}[difficulty]
    a_name, b_name, c_name = (name(a, o) for o in chosen)
    question = (f"If I am standing by the {a_name} and facing the {b_name}, is the {c_name} "
                + REL_DIRECTION_ASKS[difficulty].format(b=b_name))
    out = finish_vsi(question, a.choice(correct, [w for w in words if w != correct]), a.video)
    out["difficulty"] = difficulty
    return out


def ask_route(a):
    if (chosen := a.pick(video_objects(a)[1], 4)) is None:
        return None
    points = [center(a.objects[o]) for o in chosen]
    legs = [points[k + 1] - points[k] for k in range(3)]
    if min(np.linalg.norm(leg[:2]) for leg in legs) < 0.5:
        return None
    turns = [turn_word(legs[0], legs[1]), turn_word(legs[1], legs[2])]
    if None in turns:
        return None
    names = [name(a, o) for o in chosen]
    question = (f"You are a robot beginning at the {names[0]} facing the {names[1]}. You want to navigate to the "
                f"{names[3]}. You will perform the following actions (Note: for each [please fill in], choose either "
                f"'turn back,' 'turn left,' or 'turn right.'): 1. Go forward until the {names[1]} 2. [please fill in] "
                f"3. Go forward until the {names[2]} 4. [please fill in] 5. Go forward until the {names[3]}. "
                f"You have reached the final destination.")
    every = [f"{t1}, {t2}" for t1 in ("Turn Left", "Turn Right", "Turn Back") for t2 in ("Turn Left", "Turn Right", "Turn Back")]
    correct = ", ".join(turns)
    return finish_vsi(question, a.choice(correct, a.pick([w for w in every if w != correct], 3)), a.video)


def ask_appearance_order(a):
    frames = a.video
    first = {o: next(f for f in frames if a.views.pixels[f, o] >= a.views.min_pixels) for o in video_objects(a)[1]}
    by_frame = {}
    for obj, frame in first.items():  # one object per first-appearance frame, so the order is unambiguous
        by_frame.setdefault(frame, obj)
    if (chosen := a.pick(sorted(by_frame.values()), 4)) is None:
        return None
    names = [name(a, o) for o in chosen]
    correct_order = [name(a, o) for o in sorted(chosen, key=lambda o: first[o])]
    distractors = set()
    for _ in range(100):
        if len(distractors) == 3:
            break
        order = [correct_order[i] for i in a.rng.permutation(4)]
        if order != correct_order:
            distractors.add(", ".join(order))
    question = f"What will be the first-time appearance order of the following categories in the video: {', '.join(names)}?"
    return finish_vsi(question, a.choice(", ".join(correct_order), sorted(distractors)), frames)


# task -> its question function; each _mv task is its single-view task's function with multi=True
ASK = {
    "depth_prediction_oc": ask_depth_oc, "depth_prediction_oc_mv": lambda a: ask_depth_oc(a, True),
    "depth_prediction_oo": ask_depth_oo, "depth_prediction_oo_mv": lambda a: ask_depth_oo(a, True),
    "distance_prediction_oc": ask_distance_oc, "distance_prediction_oc_mv": lambda a: ask_distance_oc(a, True),
    "distance_prediction_oo": ask_distance_oo, "distance_prediction_oo_mv": lambda a: ask_distance_oo(a, True),
    "view_change_infer": ask_view_change, "position_matching": ask_position_matching,
    "camera_motion_infer": ask_camera_motion, "obj_spatial_relation_oo": ask_relation_oo,
    "obj_spatial_relation_oc_mv": ask_relation_oc_mv, "obj_spatial_relation_oo_mv": lambda a: ask_relation_oo(a, True),
    "spatial_imagination_oc": ask_imagination_oc, "spatial_imagination_oo": ask_imagination_oo,
    "spatial_imagination_oc_mv": lambda a: ask_imagination_oc(a, True),
    "spatial_imagination_oo_mv": lambda a: ask_imagination_oo(a, True),
    "distance_infer_center_oo": ask_distance_infer_center,
    "distance_infer_center_oo_mv": lambda a: ask_distance_infer_center(a, True),
    "object_counting": ask_counting, "object_rel_distance": ask_rel_distance, "object_rel_direction": ask_rel_direction,
    "route_planning": ask_route, "object_abs_distance": ask_abs_distance, "object_size_estimation": ask_object_size,
    "room_size_estimation": ask_room_size, "obj_appearance_order": ask_appearance_order,
}
assert list(ASK) == list(TASKS)


def make_questions(views, rng, per_task=3, numeric_select=0.25, tasks=None):
    """Up to `per_task` distinct questions of every task about one scene, as QA records."""
    asker, records = Asker(views, rng, numeric_select), []
    scene_id = views.scene["id"]
    for task in tasks or TASKS:
        wanted = 1 if task == "room_size_estimation" else per_task
        questions = set()  # (text, images): the same words about other images is another question
        for _ in range(30 * wanted):
            if len(questions) == wanted:
                break
            out = ASK[task](asker)
            if out is None or (out["question"], tuple(out["image"])) in questions:
                continue
            questions.add((out["question"], tuple(out["image"])))
            level, img_type = TASKS[task]
            records.append({"id": f"{scene_id}-{task}-{len(questions) - 1}", "scene": scene_id, "task": task,
                            "level": level, "img_type": img_type, **out})
    return records

# -----------------------------------------------------------------------------
# 8. Real scans: a directory per scene in SPAR's RGBD layout (its ScanNet export), plus the objects' boxes.
#   <scene>/image_color/<frame>.jpg|png   colour frames, named by number (0.jpg, 20.jpg, ...; JPEG needs Pillow)
#   <scene>/image_depth/<frame>.png       16-bit depth in millimetres (0 = no measurement)
#   <scene>/intrinsic/intrinsic_color.txt 3x3 or 4x4 pinhole matrix for the colour frames (or <frame>.txt each)
#   <scene>/intrinsic/intrinsic_depth.txt the depth camera's, if its images differ (ScanNet: 640x480 vs 1296x968)
#   <scene>/pose/<frame>.txt              4x4 camera-to-world, OpenCV axes, world z up, metres (-inf: tracking lost)
#   <scene>/video_idx.txt                 SPAR's video: frame numbers, one per line (else all frames, by number)
#   <scene>/boxes.json                    {"objects": [{"category", "center": [x,y,z], "size": [sx,sy,sz],
#                                          "yaw": radians | "rotation": 3x3}], "room": {"floor_area": m2}?}
#                                         (from ScanNet's annotations: generate_spar.py --scannet_boxes)
# Frames with a pose that is not finite or not rigid are skipped (and counted); of the rest, --scan_frames evenly
# spaced along the video are read and resized to res x res (intrinsics scaled to match): that order is the video.
# Instances come from the boxes: a pixel belongs to an object if the box ray-cast from the same camera
# is the nearest box and agrees with the measured depth; everything else is unknown (-4).

def read_image(path):
    if path.lower().endswith(".png"):
        return read_png(path)
    try:
        from PIL import Image  # only real JPEG frames need Pillow
    except ImportError:
        raise ValueError(f"{path}: reading JPEG frames needs Pillow (pip install pillow), or convert them to PNG")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:  # Pillow's UnidentifiedImageError is one: a truncated or foreign file
        raise ValueError(f"{path}: unreadable image ({error})") from None


def resize_area(image, height, width):
    """Resize (H, W[, C]) by averaging each output pixel's footprint (box filter); exact for integer factors."""
    image = np.asarray(image, dtype=np.float64)
    for axis, size in ((0, height), (1, width)):
        edges = np.round(np.linspace(0, image.shape[axis], size + 1)).astype(int)
        total = np.concatenate([np.zeros_like(image.take([0], axis)), np.cumsum(image, axis=axis)], axis=axis)
        span = np.maximum(edges[1:] - edges[:-1], 1).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
        image = (total.take(np.maximum(edges[1:], edges[:-1] + 1), axis) - total.take(edges[:-1], axis)) / span
    return image


def read_matrix(path, field, shape):
    try:
        matrix = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read {field}: {error}") from None
    if matrix.shape not in [shape, (4, 4)] or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{path}: {field} must be a finite {shape[0]}x{shape[1]} matrix, got shape {matrix.shape}")
    return matrix[:shape[0], :shape[1]]


def read_boxes(path):
    """boxes.json -> (objects in our scene format, room dict); errors name the file and the field."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read boxes: {error}") from None
    items = data.get("objects") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: field 'objects' must be a list of boxes")
    objects = []
    for index, item in enumerate(items):
        for field, length in (("center", 3), ("size", 3)):
            value = item.get(field) if isinstance(item, dict) else None
            if not (isinstance(value, list) and len(value) == length and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)):
                raise ValueError(f"{path}: objects[{index}].{field} must be {length} finite numbers")
        if not isinstance(item.get("category"), str):
            raise ValueError(f"{path}: objects[{index}].category must be a string")
        if "yaw" in item:
            yaw = float(item["yaw"])
        elif "rotation" in item and np.shape(item["rotation"]) == (3, 3):
            yaw = math.atan2(item["rotation"][1][0], item["rotation"][0][0])  # gravity-aligned boxes assumed
        else:
            raise ValueError(f"{path}: objects[{index}] needs a 'yaw' (radians) or a 3x3 'rotation'")
        objects.append({"id": index, "category": item["category"], "shape": "box",
                        "center": [float(v) for v in item["center"]], "size": [float(v) for v in item["size"]],
                        "yaw": yaw, "color": [128, 128, 128], "parent": None})
    return objects, data.get("room", {}) if isinstance(data, dict) else {}


def frame_number(name):
    """The number a frame file is named by ("20.jpg", "000020.png", "frame-000020.color.jpg" -> 20), else None."""
    digits = re.findall(r"\d+", name.split(".")[0])
    return int(digits[-1]) if digits else None


def numbered_files(folder, extensions):
    """{frame number: path} of a folder's files with these extensions: the colour, depth and pose files of one
    frame share its number, whatever else their names say."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: missing folder")
    names = [n for n in os.listdir(folder) if n.lower().endswith(extensions) and frame_number(n) is not None]
    return {frame_number(n): os.path.join(folder, n) for n in sorted(names)}


def scan_video(scene_dir, colors):
    """Frame numbers of a scan's video: video_idx.txt's, in its order, else every colour frame's, in numeric order
    (text order would run 0, 100, 120, ..., 20, 200)."""
    listed = os.path.join(scene_dir, "video_idx.txt")
    if os.path.exists(listed) and open(listed).read().strip():
        lines = [line.strip() for line in open(listed) if line.strip()]
        bad = next((line for line in lines if not line.isdigit()), None)
        if bad is not None:
            raise ValueError(f"{listed}: {bad!r} is not a frame number")
        return [int(line) for line in lines]
    return sorted(colors)


def rigid_pose(path):
    """A frame's camera-to-world pose, or None where it is not finite (ScanNet writes -inf when tracking was
    lost) or not rigid; a file that is not a 4 x 4 matrix of numbers is an error naming it."""
    try:
        pose = np.loadtxt(path, dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"{path}: cannot read pose: {error}") from None
    if pose.shape != (4, 4):
        raise ValueError(f"{path}: pose must be a 4x4 matrix, got shape {pose.shape}")
    rigid = np.allclose(pose[3], [0, 0, 0, 1], atol=1e-4) and abs(np.linalg.det(pose[:3, :3]) - 1) < 1e-2
    return pose if np.all(np.isfinite(pose)) and rigid else None


def check_intrinsics(K, image, path):
    """A pinhole matrix must belong to its image: a principal point far from the image's centre means the
    intrinsics of another resolution (ScanNet's depth is 640 x 480, its colour 1296 x 968)."""
    height, width = image.shape[:2]
    if not (0.3 < K[0, 2] / width < 0.7 and 0.3 < K[1, 2] / height < 0.7):
        raise ValueError(f"{path}: principal point ({K[0, 2]:.1f}, {K[1, 2]:.1f}) is far from the centre of the "
                         f"{width}x{height} image it describes: intrinsics of another resolution?")
    return K


def depth_on_color_grid(depth_mm, K_depth, K_color, res):
    """Depth (m) for each pixel of the res x res colour image: its ray through the depth camera's intrinsics
    (ScanNet registers both cameras to one pose), nearest sample (never mixing depths across an edge); 0 outside."""
    centres = (np.arange(res) + 0.5)
    u, v = np.meshgrid(centres, centres)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K_color).T  # (res, res, 3), z = 1
    uv = rays @ np.asarray(K_depth, dtype=np.float64).T
    cols, rows = np.floor(uv[..., 0]).astype(int), np.floor(uv[..., 1]).astype(int)
    inside = (rows >= 0) & (rows < depth_mm.shape[0]) & (cols >= 0) & (cols < depth_mm.shape[1])
    depth = np.zeros((res, res), dtype=np.float32)
    depth[inside] = depth_mm[rows[inside], cols[inside]] / 1000
    return depth


# --- ScanNet v2 annotations -> boxes.json (generate_spar.py --scannet_boxes=SCANS --from_scans=SPAR_SCENES).
# A ScanNet scene folder <scans>/<scene>/ holds a mesh (PLY, z up), its over-segmentation (segs.json: a segment
# id per vertex), the annotation (aggregation.json: segGroups, each an object made of segments, with a raw label)
# and <scene>.txt, whose axisAlignment 4x4 turns the mesh about z (and shifts it) so the walls line up with the
# axes. Boxes are fitted in that aligned frame, then given back in the raw mesh frame, where ScanNet's camera
# poses live. Structured3D's bbox_3d.json (centroid, coeffs = half sizes in mm, basis) is close to boxes.json
# already: centre and size / 1000, yaw from its basis.

PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
# ScanNet's raw labels are free text; these frequent ones name one of our categories differently.
SCANNET_TO_CATEGORY = {
    "office chair": "chair", "folded chair": "chair", "sofa chair": "armchair", "couch": "sofa",
    "refridgerator": "fridge", "coffee table": "table", "end table": "table", "dining table": "table",
    "side table": "table",
    "round table": "table", "kitchen cabinet": "cabinet", "kitchen cabinets": "cabinet", "cabinets": "cabinet",
    "file cabinet": "cabinet", "bathroom cabinet": "cabinet", "refrigerator": "fridge", "mini fridge": "fridge",
    "trashcan": "trash can", "trash bin": "trash can", "recycling bin": "trash can", "garbage bin": "trash can",
    "bookshelves": "bookshelf", "bookcase": "bookshelf", "television": "tv", "potted plant": "plant",
    "night stand": "nightstand", "closet": "wardrobe", "washer": "washing machine", "computer monitor": "monitor",
    "monitors": "monitor", "doors": "door", "closet door": "door", "windows": "window", "pictures": "picture",
    "painting": "picture", "table lamp": "lamp", "desk lamp": "lamp", "floor lamp": "lamp", "boxes": "box",
    "cardboard box": "box"}
SHELL_WORDS = {"wall", "walls", "floor", "ceiling"}  # "wall", "shower wall", "closet floor": the room, not objects
MIN_VERTICES = 10  # smaller groups are annotation slivers, too few points for a meaningful box
# (annotation, the segmentation it groups, that segmentation's mesh): the decimated mesh first, else the hi-res one
SCANNET_FILES = [(".aggregation.json", "_vh_clean_2.0.010000.segs.json", "_vh_clean_2.ply"),
                 ("_vh_clean.aggregation.json", "_vh_clean.segs.json", "_vh_clean.ply")]


def ply_header(data):
    """-> (format, [(element, count, properties)], offset of the body). A property is the words after
    'property': ['float', 'x'] or ['list', 'uchar', 'int', 'vertex_indices']."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError("not a PLY file: no 'ply' ... 'end_header'")
    fmt, elements = None, []
    for words in (line.split() for line in data[:end].decode("ascii", "replace").splitlines()):
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            elements.append((words[1], int(words[2]), []))
        elif words[:1] == ["property"]:
            elements[-1][2].append(words[1:])
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"format {fmt}, expected ascii or binary_little/big_endian")
    return fmt, elements, (data.find(b"\n", end) + 1) or len(data)


def ply_element(data, cursor, count, props, kind):
    """One element -> ({property: values}, cursor after it). kind(ply type) gives the numpy type in `data`.
    First guess: every list is a triangle, so all rows share one layout and one np.frombuffer reads them."""
    layout = np.dtype([field for p in props for field in ([(p[3] + "#", kind(p[1])), (p[3], kind(p[2]), 3)]
                                                          if p[0] == "list" else [(p[1], kind(p[0]))])])
    if len(data) >= cursor + count * layout.itemsize:
        rows = np.frombuffer(data, layout, count, cursor)
        if all(np.all(rows[p[3] + "#"] == 3) for p in props if p[0] == "list"):
            return {p[-1]: rows[p[-1]] for p in props}, cursor + rows.nbytes
    columns = {p[-1]: [] for p in props}  # other polygons (or a short file): row by row

    def take(ply_type, n):
        nonlocal cursor
        values = np.frombuffer(data, kind(ply_type), n, cursor)  # raises ValueError past the end
        cursor += values.nbytes
        return values
    for _ in range(count):
        for p in props:
            columns[p[-1]].append(take(p[2], int(take(p[1], 1)[0])) if p[0] == "list" else take(p[0], 1)[0])
    return columns, cursor


def read_ply(path):
    """PLY mesh (ascii or binary) -> vertices (N, 3) float64, triangles (M, 3) int64 (polygons fanned out)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the mesh: {error}") from None
    table, name = {}, "header"  # name: what is being read, for the error message
    try:
        fmt, elements, cursor = ply_header(data)
        kind, name = lambda ply_type: (">" if fmt == "binary_big_endian" else "<") + PLY_TYPES[ply_type], "body"
        if fmt == "ascii":  # parse every number up front: the body becomes a binary file of doubles
            data, cursor, kind = np.array(data[cursor:].split(), dtype=np.float64), 0, lambda ply_type: "<f8"
        for name, count, props in elements:
            table[name], cursor = ply_element(data, cursor, count, props, kind)
    except (ValueError, KeyError, IndexError) as error:
        raise ValueError(f"{path}: field '{name}' cannot be read ({error})") from None
    faces = table.get("face", {}).get("vertex_indices", table.get("face", {}).get("vertex_index"))
    if not {"x", "y", "z"} <= set(table.get("vertex", {})) or faces is None:
        raise ValueError(f"{path}: field 'vertex' x y z or 'face' vertex_indices missing")
    if isinstance(faces, list):  # fan each polygon into triangles (0, k, k + 1)
        faces = [(face[0], face[k], face[k + 1]) for face in faces for k in range(1, len(face) - 1)]
    vertices = np.stack([table["vertex"][axis] for axis in "xyz"], axis=1).astype(np.float64)
    triangles = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if triangles.size and (triangles.min() < 0 or triangles.max() >= len(vertices)):
        raise ValueError(f"{path}: field 'vertex_indices' has a vertex index outside 0..{len(vertices) - 1}")
    return vertices, triangles


def read_json_list(path, field):
    """The list in a JSON file's top-level `field`; errors name the file and the field."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read field '{field}': {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise ValueError(f"{path}: field '{field}' missing (or not a list)")
    return data[field]


def read_axis_alignment(path):
    """<scene>.txt's 'axisAlignment = m00 m01 ... m33' (row-major 4x4); the identity without file or line."""
    if not os.path.exists(path):
        return np.eye(4)
    with open(path) as f:
        lines = f.read().splitlines()
    for key, _, value in (line.partition("=") for line in lines):
        if key.strip() == "axisAlignment":
            try:
                matrix = np.array([float(v) for v in value.split()]).reshape(4, 4)
            except ValueError:
                matrix = np.full((4, 4), np.nan)
            if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
                raise ValueError(f"{path}: field 'axisAlignment' must be 16 finite numbers of an invertible 4x4")
            return matrix
    return np.eye(4)


def group_vertices(path, index, group, segment_ids, segment_of_vertex):
    """segGroups[index] -> (its raw label, mask of its vertices); every segment must exist in the mesh."""
    label, segments = (group.get("label"), group.get("segments")) if isinstance(group, dict) else (None, None)
    segments = np.asarray(segments if isinstance(segments, list) else [None])
    if not isinstance(label, str) or segments.ndim != 1 or (segments.size and segments.dtype.kind not in "iu"):
        raise ValueError(f"{path}: field 'segGroups[{index}]' needs a 'label' string and a 'segments' list of ints")
    if not np.isin(segments, segment_ids).all():  # a segment of another segmentation: wrong file pair
        missing = segments[~np.isin(segments, segment_ids)][0]
        raise ValueError(f"{path}: field 'segGroups[{index}].segments' has segment {missing}, on no mesh vertex")
    return label, np.isin(segment_ids, segments)[segment_of_vertex]


def scannet_category(name, category_names):
    """A raw ScanNet label (lower case) -> ours, or "other": the table, else the label, its last word, each also
    without a plural s ("dining chairs" -> chair, "bunk bed" -> bed; "tv stand" stays other: a stand, not a tv)."""
    last = name.split()[-1]
    for candidate in (name, last, name.removesuffix("s"), last.removesuffix("s")):
        category = SCANNET_TO_CATEGORY.get(candidate, candidate)
        if category in category_names:
            return category
    return "other"


def floor_area(points, triangles, on_floor):
    """Area seen from above (xy) of the triangles whose three corners are floor vertices, in m2."""
    a, b, c = (points[triangles[on_floor[triangles].all(axis=1), k], :2] for k in range(3))
    return float(np.abs((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]).sum() / 2)


def scannet_boxes(scene_dir, category_names):
    """A ScanNet v2 scene folder -> the boxes.json dict: an oriented box per annotated object, in the raw
    mesh frame (that of ScanNet's camera poses), and the floor area. Labels outside our categories -> "other"."""
    base = os.path.join(scene_dir, os.path.basename(os.path.normpath(scene_dir)))
    agg_path, segs_path, ply_path = next(([base + name for name in files] for files in SCANNET_FILES
                                          if os.path.exists(base + files[0])), [base + n for n in SCANNET_FILES[0]])
    vertices, triangles = read_ply(ply_path)
    vertex_segment = np.asarray(read_json_list(segs_path, "segIndices"))
    if vertex_segment.shape != (len(vertices),) or vertex_segment.dtype.kind not in "iu":
        raise ValueError(f"{segs_path}: field 'segIndices' must be {len(vertices)} integers (one per vertex "
                         f"of {ply_path}), got {vertex_segment.size} of type {vertex_segment.dtype}")
    segment_ids, segment_of_vertex = np.unique(vertex_segment, return_inverse=True)
    align = read_axis_alignment(base + ".txt")
    aligned = vertices @ align[:3, :3].T + align[:3, 3]
    to_raw = np.linalg.inv(align)  # boxes are axis-aligned in the aligned frame: turned by to_raw's yaw in the raw one
    yaw = math.atan2(to_raw[1, 0], to_raw[0, 0])
    objects, on_floor, seen = [], np.zeros(len(vertices), dtype=bool), set()
    for index, group in enumerate(read_json_list(agg_path, "segGroups")):
        label, members = group_vertices(agg_path, index, group, segment_ids, segment_of_vertex)
        name = " ".join(label.lower().split())  # annotators typed labels: compare them case- and space-blind
        if name == "floor":
            on_floor |= members
        if SHELL_WORDS & set(name.split()[-1:]) or members.sum() < MIN_VERTICES:
            continue
        low, high = aligned[members].min(axis=0), aligned[members].max(axis=0)
        if (name, tuple(sorted(group["segments"]))) in seen:  # some scenes list an object twice (scene0217_00)
            continue
        seen.add((name, tuple(sorted(group["segments"]))))
        objects.append({"category": scannet_category(name, category_names), "label": label,
                        "center": [round(float(v), 6) for v in to_raw[:3, :3] @ ((low + high) / 2) + to_raw[:3, 3]],
                        "size": [round(float(v), 6) for v in high - low], "yaw": round(yaw, 6)})
    area = round(floor_area(aligned, triangles, on_floor), 4)  # float32 vertices: finer digits are noise
    return {"objects": objects, "room": {"floor_area": area} if area > 0 else {}}


def write_scannet_boxes(scans_dir, scenes_dir):
    """boxes.json for every scene folder of scenes_dir (SPAR's layout) from ScanNet's annotations of the same
    scene in scans_dir; a boxes.json already there is kept."""
    written = 0
    for scene in sorted(d for d in os.listdir(scenes_dir) if os.path.isdir(os.path.join(scenes_dir, d))):
        target = os.path.join(scenes_dir, scene, "boxes.json")
        if not os.path.exists(target):
            if not os.path.isdir(os.path.join(scans_dir, scene)):
                raise ValueError(f"{os.path.join(scans_dir, scene)}: no ScanNet scene folder for {target}")
            boxes = scannet_boxes(os.path.join(scans_dir, scene), CATEGORY_NAMES)
            write_atomic(target, json.dumps(boxes, indent=1).encode())
            written += 1
    print(f"wrote {written} boxes.json into {scenes_dir} (scenes that had one kept it)")


def usable_frames(scene_dir, video, colors, depths, pose_files):
    """The video's frames that have their three files and a usable pose -> {number: pose}; the rest counted."""
    complete = [f for f in video if f in colors and f in depths and f in pose_files]
    poses = {f: rigid_pose(pose_files[f]) for f in complete}
    usable = {f: pose for f, pose in poses.items() if pose is not None}
    if len(usable) < len(video):
        print(f"{scene_dir}: skipped {len(video) - len(usable)} of {len(video)} frames: {len(video) - len(complete)} "
              f"without their colour, depth or pose file, {len(complete) - len(usable)} with a pose not finite or "
              f"rigid")
    if len(usable) < 2:
        raise ValueError(f"{scene_dir}: {len(usable)} usable frame(s); a scene needs at least 2")
    return usable


def load_scan(scene_dir, res, frames=32):
    """One scanned scene -> (scene dict, rgb (V,res,res,3) uint8, depth (V,res,res) f32, instance, K, poses):
    `frames` of its video, evenly spaced, among those with all their files and a usable pose."""
    colors = numbered_files(os.path.join(scene_dir, "image_color"), (".jpg", ".jpeg", ".png"))
    depths = numbered_files(os.path.join(scene_dir, "image_depth"), (".png",))
    pose_files = numbered_files(os.path.join(scene_dir, "pose"), (".txt",))
    poses = usable_frames(scene_dir, scan_video(scene_dir, colors), colors, depths, pose_files)
    usable = list(poses)
    chosen = [usable[int(i)] for i in np.unique(np.linspace(0, len(usable) - 1, min(frames, len(usable))).round())]
    objects, room = read_boxes(os.path.join(scene_dir, "boxes.json"))
    shared_K = os.path.join(scene_dir, "intrinsic", "intrinsic_color.txt")
    depth_K = os.path.join(scene_dir, "intrinsic", "intrinsic_depth.txt")
    scene = {"id": os.path.basename(os.path.normpath(scene_dir)), "source": "scan", "room": room, "objects": objects}
    rgbs, depth_maps, Ks = [], [], []
    for frame in chosen:
        color, depth_mm = read_image(colors[frame]), read_png(depths[frame])
        K_path = shared_K if os.path.exists(shared_K) else \
            os.path.join(scene_dir, "intrinsic", os.path.basename(pose_files[frame]))  # one per frame
        K = check_intrinsics(read_matrix(K_path, "intrinsic", (3, 3)), color, K_path)
        if os.path.exists(depth_K):
            K_depth = check_intrinsics(read_matrix(depth_K, "intrinsic", (3, 3)), depth_mm, depth_K)
        else:  # the depth camera is the colour camera at the depth image's size
            K_depth = np.diag([depth_mm.shape[1] / color.shape[1], depth_mm.shape[0] / color.shape[0], 1.0]) @ K
        K_res = np.diag([res / color.shape[1], res / color.shape[0], 1.0]) @ K
        rgbs.append(np.clip(np.round(resize_area(color, res, res)), 0, 255).astype(np.uint8))
        depth_maps.append(depth_on_color_grid(depth_mm, K_depth, K_res, res))
        Ks.append(K_res)
    pose_stack = np.stack([poses[frame] for frame in chosen])
    instance = np.stack([scan_instances(scene, K, pose, depth) for K, pose, depth in zip(Ks, pose_stack, depth_maps)])
    return scene, np.stack(rgbs), np.stack(depth_maps), instance, np.stack(Ks), pose_stack


def scan_instances(scene, K, pose, measured_depth):
    """Instance map of a scanned view from its boxes, kept only where the measured depth agrees (visible)."""
    height, width = measured_depth.shape
    _, box_depth, box_instance = render(scene, K, pose, height, width, with_room=False)
    agrees = (measured_depth > 0) & (np.abs(box_depth - measured_depth) < 0.05 + 0.03 * measured_depth)
    return np.where(agrees & (box_instance >= 0), box_instance, -4).astype(np.int16)

# -----------------------------------------------------------------------------
# 9. Files, tokenizer, preview, benchmark and the command line.
# safetensors is a simple format (8-byte header length, a JSON header, raw little-endian bytes). We write it
# ourselves because safetensors.numpy.save lays the header and tensors out in another order, and a seed must keep
# giving byte-identical files across versions. Reading back uses the library (read_safetensors), as data.py does.

SAFETENSORS_DTYPES = {np.uint8: "U8", np.int16: "I16", np.float16: "F16", np.float32: "F32"}


def safetensors_bytes(tensors, metadata=None):
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
        header[key] = {"dtype": SAFETENSORS_DTYPES[array.dtype.type], "shape": list(array.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_scene(out_dir, scene, rgb, depth, instance, K, poses):
    """scenes/<id>.safetensors (rgb, depth, instance, K, pose) and scenes/<id>.json, each written atomically."""
    base = os.path.join(out_dir, "scenes", scene["id"])
    tensors = {"rgb": rgb.astype(np.uint8), "depth": np.where(np.isfinite(depth), depth, 0).astype(np.float16),
               "instance": instance.astype(np.int16), "K": K.astype(np.float32), "pose": poses.astype(np.float32)}
    write_atomic(base + ".safetensors", safetensors_bytes(tensors, {"scene": scene["id"]}))
    write_atomic(base + ".json", (json.dumps(scene, indent=1) + "\n").encode())


# Tokenizer: byte-level BPE trained on the QA text, with the chat's special tokens at ids 0..5 (data.py loads it)
SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<image>"]


def train_tokenizer(texts, path, vocab_size=2048):
    """Train a byte-level BPE on `texts` and save it (atomically) as tokenizer.json at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # only needed here
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    write_atomic(path, tokenizer.to_str(pretty=True).encode())  # the bytes tokenizer.save(path) would write
    return tokenizer


@dataclass
class GenConfig:
    out: str = "data/spar"        # output directory
    scenes: int = 32              # training scenes
    val_scenes: int = 4           # held-out scenes (disjoint from training scenes)
    views: int = 20               # views per scene: an ordered walk (the video, <= 32 frames) + random views
    random_views: int = 4         # of those, how many are random views aimed at objects
    res: int = 224                # square image side in pixels
    seed: int = 0
    workers: int = 1              # processes; the output is byte-identical for any number
    qa_per_task: int = 3          # questions per task per scene (room size: one)
    numeric_select: float = 0.25  # share of numeric SPAR questions asked as multiple choice
    vocab_size: int = 2048        # BPE vocabulary of tokenizer.json (0: do not train one)
    preview: int = 0              # write preview PNGs for this many scenes (one question of each task)
    spar7m: bool = False          # also write spar7m/: the questions as SPAR-7M training records, frames as PNG
    from_scans: str = ""          # a directory of scanned scenes (SPAR RGBD layout) instead of procedural rooms
    val_fraction: float = 0.2     # with --from_scans: share of scanned scenes held out
    scan_frames: int = 32         # with --from_scans: frames per scene, evenly spaced along its video
    scannet_boxes: str = ""       # a ScanNet scans/ folder: write each --from_scans scene's boxes.json, then stop
    bench: bool = False           # print renderer frames/s per core and exit


def build_scene(job):
    """Generate (or read), write and question one scene. Runs in a worker process; depends only on its job."""
    config, index, split, scan_dir = job
    if scan_dir:
        scene, rgb, depth, instance, K, poses = load_scan(scan_dir, config.res, config.scan_frames)
        video_frames = min(len(poses), 32)
    else:
        rng = np.random.default_rng([config.seed, index])
        scene = sample_scene(rng, f"scene{index:05d}")
        video_frames = config.views - config.random_views
        K, poses = sample_cameras(rng, scene, video_frames, config.random_views, config.res)
        rendered = [render(scene, K[v], poses[v], config.res, config.res) for v in range(len(poses))]
        rgb, depth, instance = (np.stack(parts) for parts in zip(*rendered))
    scene.update(split=split, video_frames=video_frames, image_size=[int(rgb.shape[1]), int(rgb.shape[2])])
    write_scene(config.out, scene, rgb, depth, instance, K, poses)
    views = scene_views(scene, K, poses, instance, video_frames)
    return make_questions(views, np.random.default_rng([config.seed, index, 1]), config.qa_per_task,
                          config.numeric_select)


def scene_jobs(config):
    if not config.from_scans:
        total = config.scenes + config.val_scenes
        return [(config, i, "train" if i < config.scenes else "val", "") for i in range(total)]
    dirs = sorted(d for d in os.listdir(config.from_scans) if os.path.isdir(os.path.join(config.from_scans, d)))
    n_val = int(round(len(dirs) * config.val_fraction)) if len(dirs) > 1 else 0
    return [(config, i, "val" if i >= len(dirs) - n_val else "train", os.path.join(config.from_scans, d))
            for i, d in enumerate(dirs)]


def generate(config):
    """The whole data set: scenes (in parallel), qa_{train,val}.jsonl, tokenizer.json, optional previews; a
    failure leaves --out as it found it (absent or empty), so a corrected rerun is not refused."""
    if not 1 <= config.views - config.random_views <= 32:
        raise SystemExit(f"--views={config.views} with --random_views={config.random_views}: the walk needs 1..32 frames")
    if os.path.isdir(config.out) and os.listdir(config.out):  # an earlier set's scenes would mix with this one's
        raise SystemExit(f"--out={config.out} is not empty: generate into a new or empty folder")
    inside = os.path.abspath(config.out).startswith(os.path.join(os.path.abspath(config.from_scans), ""))
    if config.from_scans and inside:
        raise SystemExit(f"--out={config.out} is inside --from_scans: it would be read as a scene")
    if config.from_scans and not 2 <= config.scan_frames <= 32:
        raise SystemExit(f"--scan_frames={config.scan_frames}: a scan's video takes 2..32 frames")
    existed = os.path.isdir(config.out)
    os.makedirs(os.path.join(config.out, "scenes"))
    try:
        return generate_into(config)
    except BaseException:
        for name in os.listdir(config.out) if existed else []:
            shutil.rmtree(os.path.join(config.out, name), ignore_errors=True)
        if not existed:
            shutil.rmtree(config.out, ignore_errors=True)
        raise


def generate_into(config):
    from tqdm import tqdm
    jobs = scene_jobs(config)
    records = {"train": [], "val": []}
    if config.workers > 1:
        with multiprocessing.get_context("spawn").Pool(config.workers) as pool:
            results = list(tqdm(pool.imap(build_scene, jobs), total=len(jobs), desc="scenes"))
    else:
        results = [build_scene(job) for job in tqdm(jobs, desc="scenes")]
    for job, questions in zip(jobs, results):
        records[job[2]] += questions
    for split, rows in records.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        write_atomic(os.path.join(config.out, f"qa_{split}.jsonl"), text.encode())
    if config.vocab_size:
        source = records["train"] or records["val"]  # the vocabulary is learnt from training text only
        texts = [prompt(r) + "\n" + r["answer"] for r in source]
        train_tokenizer(texts, os.path.join(config.out, "tokenizer.json"), config.vocab_size)
    for split in records:
        print(f"{split}: {sum(job[2] == split for job in jobs)} scenes, {len(records[split])} questions")
    if config.preview:
        write_previews(config.out, records["train"] + records["val"], config.preview)
    if config.spar7m:
        write_spar7m(config.out, records)
    return records


def draw_markers(image, markers, slot):
    """Draw the markers of a question's image `slot`: a dark-rimmed dot at the point, and the visible box."""
    image = image.copy()
    height, width = image.shape[:2]
    v, u = np.mgrid[0:height, 0:width]
    radius = max(2.0, width / 60)
    for marker in (m for m in markers if m["image"] == slot):
        color = np.array(MARKER_RGB[marker["color"]], dtype=np.uint8)
        if "box" in marker:  # optional: converted benchmark records may mark points only
            x0, y0, x1, y1 = (int(round(c * size / 1000)) for c, size in zip(marker["box"], (width, height) * 2))
            image[y0:y1, [min(x0, width - 1), max(x1 - 1, 0)]] = color
            image[[min(y0, height - 1), max(y1 - 1, 0)], x0:x1] = color
        px, py = marker["point"][0] * width / 1000 - 0.5, marker["point"][1] * height / 1000 - 0.5
        distance = np.hypot(u - px, v - py)
        image[distance <= radius + 1.5] = 0
        image[distance <= radius] = color
    return image


def write_previews(out_dir, records, scenes):
    """preview/<id>.png (images, markers drawn) and .txt (question, answer): one question per task and scene."""
    os.makedirs(os.path.join(out_dir, "preview"), exist_ok=True)
    for scene_id in list(dict.fromkeys(r["scene"] for r in records))[:scenes]:  # the first `scenes` scenes
        rgb = read_safetensors(os.path.join(out_dir, "scenes", scene_id + ".safetensors"))["rgb"]
        done = set()
        for record in (r for r in records if r["scene"] == scene_id and r["task"] not in done):
            done.add(record["task"])
            frames = record["image"]
            shown = frames if len(frames) <= 4 else [frames[i] for i in np.linspace(0, len(frames) - 1, 8).astype(int)]
            tiles = [draw_markers(rgb[f], record.get("markers", []), frames.index(f)) for f in shown]
            strip = np.concatenate([np.pad(t, ((4, 4), (4, 4), (0, 0)), constant_values=255) for t in tiles], axis=1)
            base = os.path.join(out_dir, "preview", record["id"])
            write_png(base + ".png", strip)
            text = f"{record['task']} ({record['level']}, {record['format_type']}), frames {frames}\n\n"
            text += f"{record['question']}\n\nanswer: {record['answer']}\n"
            write_atomic(base + ".txt", text.encode())
    print(f"previews: {os.path.join(out_dir, 'preview')}")


def write_spar7m(out_dir, records):
    """spar7m/: the questions in SPAR-7M's training layout, for other trainers (LLaVA / InternVL / Qwen-VL
    fine-tuning scripts) and for ours (train.py --stage=vlm --data=OUT/spar7m). qa_{split}.jsonl holds
    {"id", "type": task, "image": [paths under images/], "conversations": [human: the prompt, gpt: the answer]}
    (no "<image>" token: as with SPAR-7M, the loader places the images); the frames are PNGs at
    images/<scene>/image_color/<frame>.png, and an image with markers gets its own marked copy at
    images/<scene>/marked/<id>_<slot>.png (SPAR-7M draws its markers at load time from fields of its own)."""
    root, written = os.path.join(out_dir, "spar7m"), set()
    os.makedirs(root, exist_ok=True)
    for split, rows in records.items():
        lines, rgb, rgb_scene = [], None, None
        for record in rows:
            if record["scene"] != rgb_scene:
                rgb_scene = record["scene"]
                rgb = read_safetensors(os.path.join(out_dir, "scenes", rgb_scene + ".safetensors"))["rgb"]
            paths = []
            for slot, frame in enumerate(record["image"]):
                marked = any(m["image"] == slot for m in record.get("markers", []))
                path = (f"{rgb_scene}/marked/{record['id']}_{slot}.png" if marked
                        else f"{rgb_scene}/image_color/{frame}.png")
                if path not in written:
                    os.makedirs(os.path.dirname(os.path.join(root, "images", path)), exist_ok=True)
                    write_png(os.path.join(root, "images", path),
                              draw_markers(rgb[frame], record["markers"], slot) if marked else rgb[frame])
                    written.add(path)
                paths.append(path)
            lines.append({"id": record["id"], "type": record["task"], "image": paths,
                          "conversations": [{"from": "human", "value": prompt(record)},
                                            {"from": "gpt", "value": record["answer"]}]})
        write_atomic(os.path.join(root, f"qa_{split}.jsonl"), "".join(json.dumps(r) + "\n" for r in lines).encode())
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        shutil.copyfile(os.path.join(out_dir, "tokenizer.json"), os.path.join(root, "tokenizer.json"))
    print(f"SPAR-7M layout: {root}")


def bench(res=224, objects=30, frames=50):
    """Renderer throughput on one core at res x res with `objects` primitives (bench.py calls this too)."""
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, "bench", objects, objects)
    K, poses = sample_cameras(rng, scene, frames, 0, res)
    render(scene, K[0], poses[0], res, res)
    start, start_cpu = time.perf_counter(), time.process_time()
    for v in range(frames):
        render(scene, K[v], poses[v], res, res)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    # CPU time counts every thread numpy might use, so frames / CPU second is the per-core figure
    print(f"renderer at {res}x{res}, {len(scene['objects'])} primitives + room: {frames / cpu:.1f} frames per "
          f"CPU second ({1000 * cpu / frames:.2f} ms/frame; wall {frames / elapsed:.1f} frames/s)")


def announce(script, doing, output):
    """Every entry point's first line, before any heavy work: what it will do, where its output goes, and the
    versions it runs with (torch where the script has loaded it)."""
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    if "torch" in sys.modules:
        versions.insert(1, f"torch {sys.modules['torch'].__version__}")
    print(f"{script}: {doing} | {' | '.join(versions)} | output: {output}", flush=True)


BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_args(argv, config, sections=None):
    """--key=value overrides of the dataclass `config`, set in place; returns `config`. Typed by the field: bools
    are true|false|1|0|yes|no only (a misspelt --resume=ture must not mean false), a bare --flag is a true bool,
    a missing or empty value is an error unless a str. sections {name: dataclass}: --name.key=value sets that section's
    field in place (callers read and re-validate their own section objects, e.g. with dataclasses.replace).
    --help or -h prints every option with its value and the # comment in the dataclass source, and exits."""
    sections = sections or {}
    if "--help" in argv or "-h" in argv:
        for prefix, cfg in [("", config)] + [(name + ".", section) for name, section in sections.items()]:
            comments = dict(re.findall(r"^\s*(\w+)\s*:[^#\n]*#\s*(.*)$", inspect.getsource(type(cfg)), re.M))
            for f in fields(cfg):
                print(f"  {f'--{prefix}{f.name}={getattr(cfg, f.name)}':<32} {comments.get(f.name, '')}".rstrip())
        raise SystemExit(0)
    options = " ".join([f"--{f.name}" for f in fields(config)] + [f"--{name}.*" for name in sections])
    for arg in argv:
        key, equals, value = arg.lstrip("-").partition("=")
        section, dot, key = key.replace("-", "_").rpartition(".")
        target = sections.get(section) if dot else config
        kinds = {f.name: f.type for f in fields(target)} if target is not None else {}
        if not arg.startswith("--") or key not in kinds:
            valid = " ".join(f"--{section}.{k}" for k in kinds) if kinds and dot else options
            raise SystemExit(f"unknown argument {arg!r}; options: {valid}")
        flag, kind = f"--{section}{dot}{key}", kinds[key]
        if not equals and kind is bool:
            setattr(target, key, True)
        elif kind is bool:
            if value.lower() not in BOOLS:
                raise SystemExit(f"{flag}: expected true or false, got {value!r}")
            setattr(target, key, BOOLS[value.lower()])
        elif value == "" and kind is not str:
            raise SystemExit(f"{flag}: expected {kind.__name__}, got nothing")
        else:
            try:
                setattr(target, key, kind(value))
            except ValueError:
                raise SystemExit(f"{flag}: expected {kind.__name__}, got {value!r}") from None
    return config


if __name__ == "__main__":
    config = parse_args(sys.argv[1:], GenConfig())
    if config.bench:
        bench()
    elif config.scannet_boxes and not config.from_scans:
        raise SystemExit("--scannet_boxes: give the scenes to write boxes.json into as --from_scans=DIR")
    else:
        start = time.time()
        source = f"the scans in {config.from_scans}" if config.from_scans else \
            f"{config.scenes} + {config.val_scenes} procedural scenes"
        announce("generate_spar.py", f"boxes.json from {config.scannet_boxes}" if config.scannet_boxes else
                 f"questions from {source}, {config.res} px, {config.workers} worker(s)",
                 config.from_scans if config.scannet_boxes else config.out)
        try:  # bad input (a scan's file): one line naming it, not a traceback
            write_scannet_boxes(config.scannet_boxes, config.from_scans) if config.scannet_boxes else generate(config)
        except ValueError as error:
            raise SystemExit(f"generate_spar.py: {error}")
        except OSError as error:
            raise SystemExit(f"generate_spar.py: {error.filename}: {error.strerror}" if error.filename else str(error))
        if not config.scannet_boxes:
            print(f"wrote {config.out} in {time.time() - start:.1f} s")
