"""
generate_spar.py -- the SPAR-style data engine: 3D scenes in, spatial question-answer data out.

SPAR ("From Flatland to Space") turns 3D ground truth -- geometry, cameras, object boxes -- into spatial QA
at scale. Its generator was never released; this one is open and needs numpy only. It is the first step of
the nanoSpa3R pipeline (see README):

    generate_spar.py -> DATA/scenes/<id>.safetensors + <id>.json, qa_train.jsonl, qa_val.jsonl, tokenizer.json
    train.py --stage=geo | psfm | vlm     (reads DATA through data.py)
    eval.py                               (scores the VLM on qa_val.jsonl)

Read top to bottom:
  1. the object table (24 indoor categories with real size priors) and the 28 task names
  2. camera geometry (OpenCV cameras, world z up, metres)
  3. procedural scenes: a room, objects placed without overlap, some stacked
  4. camera trajectories: an ordered walk (the "video") plus random views aimed at objects
  5. the renderer: analytic ray casting of boxes, cylinders, spheres and the room -> RGB, z-depth, instances
  6. visibility and markers: which objects a view shows well enough to ask about
  7. the QA engine: 20 SPAR-Bench tasks and 8 VSI-Bench tasks, every answer from ground truth
  8. real scans: the SPAR RGBD layout + boxes.json through the same QA engine
  9. writing files (atomically), PNG preview, benchmark, command line

Usage:
    python generate_spar.py --out=data/spar --scenes=64 --val_scenes=8 --seed=0 --workers=2
    python generate_spar.py --out=data/spar --preview          # + PNGs of questions with their markers
    python generate_spar.py --from_scans=DIR --out=data/real     # real RGBD scans instead of procedural rooms
    python generate_spar.py --bench                              # renderer frames/s per core at 224x224
"""

import json
import math
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass, fields

import numpy as np

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

# task -> (benchmark level, image type). SPAR-Bench's 20 tasks, then VSI-Bench's 8.
TASKS = {
    "depth_prediction_oc": ("low", "single_view"),
    "depth_prediction_oc_mv": ("low", "multi_view"),
    "depth_prediction_oo": ("low", "single_view"),
    "depth_prediction_oo_mv": ("low", "multi_view"),
    "distance_prediction_oc": ("low", "single_view"),
    "distance_prediction_oc_mv": ("low", "multi_view"),
    "distance_prediction_oo": ("low", "single_view"),
    "distance_prediction_oo_mv": ("low", "multi_view"),
    "view_change_infer": ("middle", "multi_view"),
    "position_matching": ("middle", "multi_view"),
    "camera_motion_infer": ("middle", "multi_view"),
    "obj_spatial_relation_oo": ("middle", "single_view"),
    "obj_spatial_relation_oc_mv": ("middle", "multi_view"),
    "obj_spatial_relation_oo_mv": ("middle", "multi_view"),
    "spatial_imagination_oc": ("high", "single_view"),
    "spatial_imagination_oo": ("high", "single_view"),
    "spatial_imagination_oc_mv": ("high", "multi_view"),
    "spatial_imagination_oo_mv": ("high", "multi_view"),
    "distance_infer_center_oo": ("high", "single_view"),
    "distance_infer_center_oo_mv": ("high", "multi_view"),
    "object_counting": ("configuration", "video"),
    "object_rel_distance": ("configuration", "video"),
    "object_rel_direction": ("configuration", "video"),
    "route_planning": ("configuration", "video"),
    "object_abs_distance": ("measurement", "video"),
    "object_size_estimation": ("measurement", "video"),
    "room_size_estimation": ("measurement", "video"),
    "obj_appearance_order": ("spatiotemporal", "video"),
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
    """Camera-to-world pose at `position` looking at heading `yaw` (radians, counter-clockwise from +x)
    tilted by `pitch` (radians, negative = down), with no roll."""
    forward = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, position
    return pose


def camera_center(pose):
    """The camera centre of a camera-to-world pose is its translation column.
    (Not -R.T @ t: that formula is for world-to-camera extrinsics; VLM-3R had to publish an erratum for it.)"""
    return np.asarray(pose, dtype=np.float64)[:3, 3]


def heading_frame(pose):
    """Gravity-aligned (forward, right) unit vectors on the floor plane for a camera: 'left/right/front/behind'
    in questions are measured in this frame, so a tilted camera does not change the answer."""
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
    return {
        "size": [round(width, 3), round(depth, 3), round(height, 3)],
        "floor": [[-half_w, -half_d], [half_w, -half_d], [half_w, half_d], [-half_w, half_d]],
        "floor_area": round(width * depth, 4),
        "floor_color": rng.integers(90, 200, 3).tolist(),
        "ceiling_color": rng.integers(200, 250, 3).tolist(),
        "wall_colors": rng.integers(120, 230, (4, 3)).tolist(),
    }


def category_color(rng, category):
    """Each category has its own hue (so a model can learn what a 'bed' looks like); instances vary a little."""
    hue = CATEGORY_NAMES.index(category) / len(CATEGORY_NAMES)
    base = np.array([math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * 80 + 140
    return np.clip(base + rng.uniform(-20, 20, 3), 0, 255).astype(int).tolist()


def footprints_overlap(a, b, gap=0.05):
    """Separating-axis test of two objects' floor rectangles (each grown by gap / 2) and their z-ranges."""
    za, zb = a["center"][2], b["center"][2]
    if abs(za - zb) >= (a["size"][2] + b["size"][2]) / 2:
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
    """True if `point` lies within `margin` of any object's box (a camera there would see the inside)."""
    for obj in objects:
        local = yaw_matrix(obj["yaw"]).T @ (np.asarray(point) - obj["center"])
        if np.all(np.abs(local) <= np.asarray(obj["size"]) / 2 + margin):
            return True
    return False

# -----------------------------------------------------------------------------
# 4. Camera trajectories. The "video" is an ordered walk at eye height through free floor space; random views
# stand somewhere free and look at an object, so multi-view questions have overlapping views to work with.


def free_floor_point(rng, scene, eye_height, margin=0.35):
    half_w, half_d = scene["room"]["size"][0] / 2 - margin, scene["room"]["size"][1] / 2 - margin
    for _ in range(200):
        point = np.array([rng.uniform(-half_w, half_w), rng.uniform(-half_d, half_d), eye_height])
        if not inside_any_object(point, scene["objects"], margin):
            return point
    return np.array([0.0, 0.0, eye_height])


def sample_walk(rng, scene, frames, eye_height):
    """An ordered walk through 3 free waypoints, frames evenly spaced along it; the gaze follows the walking
    direction with a slow sideways pan, as a person filming a room does."""
    waypoints = np.stack([free_floor_point(rng, scene, eye_height) for _ in range(3)])
    segments = np.linalg.norm(np.diff(waypoints, axis=0), axis=1) + 1e-6
    arc = np.concatenate([[0.0], np.cumsum(segments)])
    pitch = math.radians(rng.uniform(-25, -8))
    pan_phase, pan_amp = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(20, 50))
    poses = []
    for s in np.linspace(0, arc[-1], frames):
        k = min(int(np.searchsorted(arc, s, side="right")) - 1, len(segments) - 1)
        position = waypoints[k] + (waypoints[k + 1] - waypoints[k]) * (s - arc[k]) / segments[k]
        direction = waypoints[k + 1] - waypoints[k]
        yaw = math.atan2(direction[1], direction[0]) + pan_amp * math.sin(pan_phase + 2 * math.pi * s / 4.0)
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
    """All cameras of a scene: K (V, 3, 3) and camera-to-world poses (V, 4, 4); frames 0..video_frames-1 are
    the ordered walk."""
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
# Rays are kept as three (H, W) planes (x, y, z components): elementwise numpy on them is much faster than
# reductions over a trailing axis of length 3. Only depth and instance are resolved per object; normals are
# computed once at the end for the pixels each object won ("deferred shading").

LIGHT = np.array([0.35, 0.55, 0.76], dtype=np.float32)  # unit vector towards the light, from above


def camera_rays(K, pose, height, width):
    """Ray directions in world as three float32 planes (3, H, W), with camera-space z = 1."""
    K = np.asarray(K, dtype=np.float64)
    u = (np.arange(width) + 0.5 - K[0, 2]) / K[0, 0]
    v = (np.arange(height) + 0.5 - K[1, 2]) / K[1, 1]
    R = np.asarray(pose, dtype=np.float64)[:3, :3]
    return (R[:, 0, None, None] * u[None, None, :] + R[:, 1, None, None] * v[None, :, None]
            + R[:, 2, None, None]).astype(np.float32)


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
    """A fixed pseudo-random value in [-1, 1] per 5 cm cell of world space (an integer hash: exactly
    reproducible on every machine)."""
    h = ((np.floor(x / cell).astype(np.int32) * 73856093) ^ (np.floor(y / cell).astype(np.int32) * 19349663)
         ^ (np.floor(z / cell).astype(np.int32) * 83492791))
    return (h & 1023).astype(np.float32) / 511.5 - 1.0


def render(scene, K, pose, height, width, with_room=True):
    """Render one view: RGB uint8 (H, W, 3), z-depth float32 (H, W) in metres, instance int16 (H, W)
    (object index, or a SHELL_IDS value; -4 where nothing is hit, which only happens with with_room=False)."""
    origin = camera_center(pose)
    d = camera_rays(K, pose, height, width)  # (3, H, W)
    if with_room:
        depth, surface = room_hits(scene["room"], origin, d)
    else:
        depth, surface = np.full((height, width), np.inf, np.float32), np.full((height, width), -4, np.int16)
    rects = {}
    for index, obj in enumerate(scene["objects"]):
        bounds = object_pixel_bounds(K, pose, obj, height, width)
        if bounds is None:
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
    """Lambert shading of each pixel's base colour, with a floor checkerboard and a little texture noise."""
    room = scene["room"]
    finite = np.where(np.isfinite(depth), depth, 0)
    x, y, z = origin[0] + d[0] * finite, origin[1] + d[1] * finite, origin[2] + d[2] * finite
    # room shell: axis-aligned normals; the palette is indexed by -surface (1 floor, 2 ceiling, 10..13 walls)
    palette = np.zeros((14 + len(scene["objects"]), 3), dtype=np.float32)
    palette[1], palette[2], palette[10:14] = room["floor_color"], room["ceiling_color"], room["wall_colors"]
    palette[14:] = [o["color"] for o in scene["objects"]]
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
    base = palette[lookup]  # (H, W, 3)
    checker = ((np.floor(x / 0.5) + np.floor(y / 0.5)) % 2).astype(np.float32)
    base *= np.where(surface == SHELL_IDS["floor"], 0.85 + 0.15 * checker, 1.0).astype(np.float32)[..., None]
    rgb = base * (0.45 + 0.55 * light)[..., None] + (8.0 * texture_noise(x, y, z))[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)

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
    out = np.zeros((height, width * bpp), dtype=np.int32)
    for r in range(height):  # undo the per-row filters
        kind, line = raw[r, 0], raw[r, 1:].astype(np.int32)
        prev = out[r - 1] if r else np.zeros(width * bpp, np.int32)
        if kind == 0:
            out[r] = line
        elif kind == 2:
            out[r] = (line + prev) & 255
        else:  # sub, average and Paeth depend on the pixel to the left: walk the row
            row = out[r]
            for i in range(width * bpp):
                left = row[i - bpp] if i >= bpp else 0
                up_left = prev[i - bpp] if i >= bpp else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + prev[i]) // 2
                else:
                    p = left + prev[i] - up_left
                    pa, pb, pc = abs(p - left), abs(p - prev[i]), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else (prev[i] if pb <= pc else up_left)
                row[i] = (line[i] + pred) & 255
    data = out.astype(np.uint8)
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
