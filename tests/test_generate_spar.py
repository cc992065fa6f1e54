"""Tests for generate_spar.py: the renderer against independent geometry, the QA engine on hand-built scenes,
determinism, file formats and the real-scan source."""

import dataclasses
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import generate_spar as g

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_box(index, category, center, size, yaw=0.0, shape="box"):
    return {"id": index, "category": category, "shape": shape, "center": list(center), "size": list(size),
            "yaw": yaw, "color": [200, 100, 50], "parent": None}


def make_scene(objects, room=(8.0, 6.0, 3.0)):
    w, d, h = room
    return {"id": "hand", "source": "procedural", "objects": objects,
            "room": {"size": [w, d, h], "floor_area": w * d, "floor_color": [120, 120, 120],
                     "ceiling_color": [230, 230, 230], "wall_colors": [[150, 150, 150]] * 4}}


# -----------------------------------------------------------------------------
# renderer


def test_floor_depth_matches_trigonometry():
    """A camera at height h pitched down by theta: the ray through a pixel row at angle alpha below the axis
    meets the floor after h / sin(theta + alpha), i.e. at z-depth h cos(alpha) / sin(theta + alpha)."""
    height, theta, res = 1.4, math.radians(35), 64
    K = g.intrinsics(res, res, 60)
    pose = g.look_pose(np.array([0.0, 0.0, height]), 0.3, -theta)
    _, depth, instance = g.render(make_scene([]), K, pose, res, res)
    f, cy = K[1, 1], K[1, 2]
    for row in range(res // 2, res):
        alpha = math.atan((row + 0.5 - cy) / f)
        expected = height * math.cos(alpha) / math.sin(theta + alpha)
        assert instance[row, res // 2] == g.SHELL_IDS["floor"]
        assert abs(depth[row, res // 2] - expected) < 1e-3


def test_box_face_depth_is_exact():
    """A camera looking along +x at an axis-aligned box: every pixel on the facing side has z-depth equal to
    the face's distance, and the face spans exactly the projection of its edges."""
    box = make_box(0, "cabinet", (2.0, 0.0, 1.5), (1.0, 2.0, 1.0))
    res = 64
    K = g.intrinsics(res, res, 90)
    pose = g.look_pose(np.array([-2.0, 0.0, 1.5]), 0.0, 0.0)
    _, depth, instance = g.render(make_scene([box]), K, pose, res, res)
    face_distance = (2.0 - 0.5) - (-2.0)
    on_box = instance == 0
    assert on_box.sum() > 100
    np.testing.assert_allclose(depth[on_box], face_distance, atol=1e-3)
    # the face's half-width 1 m at 3.5 m spans |u + 0.5 - cx| <= fx / 3.5 pixels
    u = np.arange(res) + 0.5 - K[0, 2]
    expected_columns = np.abs(u) < K[0, 0] * 1.0 / face_distance
    assert np.array_equal(on_box[res // 2], expected_columns)


def test_instance_map_matches_brute_force_ray_marching():
    """March along the rays of a few pixels in 2 mm steps: the first object containing a point is the one the
    instance map names, and the depth agrees to the step size."""
    objects = [make_box(0, "table", (1.0, 0.3, 0.4), (1.2, 0.7, 0.8), yaw=0.5),
               make_box(1, "stool", (0.0, -0.7, 0.3), (0.5, 0.5, 0.6), shape="cylinder"),
               make_box(2, "plant", (0.6, -0.1, 1.2), (0.5, 0.5, 0.5), shape="sphere")]
    res = 48
    K = g.intrinsics(res, res, 70)
    pose = g.look_pose(np.array([-2.0, 0.0, 1.5]), 0.05, -0.3)
    _, depth, instance = g.render(make_scene(objects), K, pose, res, res)

    def inside(obj, points):
        local = (points - obj["center"]) @ g.yaw_matrix(obj["yaw"]) / (np.array(obj["size"]) / 2)
        if obj["shape"] == "box":
            return np.all(np.abs(local) <= 1, axis=1)
        if obj["shape"] == "sphere":
            return (local ** 2).sum(1) <= 1
        return ((local[:, :2] ** 2).sum(1) <= 1) & (np.abs(local[:, 2]) <= 1)

    rng = np.random.default_rng(0)
    hits = np.argwhere(instance >= 0)
    pixels = [tuple(p) for p in hits[rng.choice(len(hits), 12, replace=False)]] + [(2, 2), (res - 3, 3)]
    steps = np.arange(0.0, 6.0, 0.002)
    for v, u in pixels:
        ray = pose[:3, :3] @ np.linalg.solve(K, [u + 0.5, v + 0.5, 1.0])  # camera z = 1: step = z-depth
        points = pose[:3, 3] + steps[:, None] * ray
        first = [np.argmax(inside(o, points)) if inside(o, points).any() else len(steps) for o in objects]
        nearest = int(np.argmin(first))
        if first[nearest] == len(steps):
            assert instance[v, u] < 0
        else:
            assert instance[v, u] == nearest
            assert abs(depth[v, u] - steps[first[nearest]]) <= 0.0025


def test_camera_centre_is_the_pose_translation():
    """The QA engine's camera centre is pose[:3, 3] of the camera-to-world pose, not -R.T @ t (the VLM-3R bug)."""
    pose = g.look_pose(np.array([1.0, -2.0, 1.5]), 1.1, -0.4)
    assert np.allclose(g.camera_center(pose), [1.0, -2.0, 1.5])
    wrong = -pose[:3, :3].T @ pose[:3, 3]
    assert not np.allclose(wrong, pose[:3, 3])
    # and the distance answer uses it
    obj = make_box(0, "chair", (3.0, 0.0, 0.45), (0.5, 0.5, 0.9))
    views = views_of(make_scene([obj]), [pose], res=64, force_visible=True)
    record = g.ask_distance_oc(g.Asker(views, np.random.default_rng(0), numeric_select=0), False)
    assert float(record["answer"]) == pytest.approx(np.linalg.norm(np.array(obj["center"]) - [1.0, -2.0, 1.5]), abs=0.005)
    assert abs(float(record["answer"]) - np.linalg.norm(np.array(obj["center"]) - wrong)) > 0.1


def test_renderer_rgb_and_depth_are_deterministic():
    rng = np.random.default_rng(1)
    scene = g.sample_scene(rng, "s")
    K, poses = g.sample_cameras(rng, scene, 2, 1, 32)
    a = [g.render(scene, K[i], poses[i], 32, 32) for i in range(3)]
    b = [g.render(scene, K[i], poses[i], 32, 32) for i in range(3)]
    for x, y in zip(a, b):
        for p, q in zip(x, y):
            assert p.tobytes() == q.tobytes()


# -----------------------------------------------------------------------------
# QA engine on hand-built scenes


def views_of(scene, poses, res=96, video_frames=None, force_visible=False):
    """Render a hand scene and build the QA engine's view of it."""
    K = np.stack([g.intrinsics(res, res, 70)] * len(poses))
    instance = np.stack([g.render(scene, K[i], p, res, res)[2] for i, p in enumerate(poses)])
    views = g.scene_views(scene, K, np.stack(poses), instance, video_frames or len(poses))
    if force_visible:
        views.pixels[:] = views.min_pixels
    return views


def marked(record, objects):
    """Objects named by a record's markers, in order, and the view index of each."""
    return [objects[m["object"]] for m in record["markers"]], [record["image"][m["image"]] for m in record["markers"]]


def option_text(record):
    return {o[0]: o[3:] for o in record["options"]}[record["answer"]]


def value_of(record):
    return float(record["answer"]) if record["format_type"] == "fill" else float(option_text(record))


@pytest.fixture(scope="module")
def spar_scene():
    """Three boxes in front of three cameras, all in one 8 x 6 m room."""
    objects = [make_box(0, "chair", (0.0, 1.0, 0.45), (0.5, 0.5, 0.9)),
               make_box(1, "table", (1.0, -1.0, 0.375), (1.4, 0.8, 0.75)),
               make_box(2, "bed", (2.5, 1.2, 0.25), (2.0, 1.6, 0.5))]
    poses = [g.look_pose(np.array([-3.0, 0.0, 1.5]), 0.0, math.radians(-15)),
             g.look_pose(np.array([-2.0, -1.0, 1.6]), math.radians(-5), math.radians(-20)),
             g.look_pose(np.array([-2.5, 1.5, 1.4]), math.radians(-25), math.radians(-12))]
    scene = make_scene(objects)
    return scene, views_of(scene, poses)


def many(task, views, count=20, numeric_select=0.5):
    asker = g.Asker(views, np.random.default_rng(0), numeric_select=numeric_select)
    records = [g.ASK[task](asker) for _ in range(count)]
    records = [r for r in records if r is not None]
    assert records, f"{task}: no question could be asked"
    return records


def camera_basis(pose):
    """Independent heading frame: yaw from the optical axis' floor projection, right = (sin, -cos)."""
    yaw = math.atan2(pose[1, 2], pose[0, 2])
    return np.array([math.cos(yaw), math.sin(yaw)]), np.array([math.sin(yaw), -math.cos(yaw)])


def test_depth_and_distance_answers(spar_scene):
    scene, views = spar_scene
    objects = scene["objects"]
    for task in ("depth_prediction_oc", "depth_prediction_oc_mv", "distance_prediction_oc", "distance_prediction_oo_mv",
                 "depth_prediction_oo"):
        for record in many(task, views):
            objs, _ = marked(record, objects)
            pose = views.poses[record["image"][0]]  # distances refer to image 1's camera
            centers = [np.array(o["center"]) for o in objs]
            depths = [np.dot(c - pose[:3, 3], pose[:3, 2]) for c in centers]  # along the optical axis
            if task.startswith("depth_prediction_oc"):
                expected = depths[0]
            elif task == "depth_prediction_oo":
                expected = depths[0] - depths[1]
            elif task == "distance_prediction_oc":
                expected = np.linalg.norm(centers[0] - pose[:3, 3])
            else:
                expected = np.linalg.norm(centers[0] - centers[1])
            assert value_of(record) == pytest.approx(expected, abs=0.006), record["question"]


def test_relation_and_imagination_answers(spar_scene):
    scene, views = spar_scene
    objects = scene["objects"]
    for record in many("obj_spatial_relation_oo", views):
        (a, b), _ = marked(record, objects)
        forward, right = camera_basis(views.poses[record["image"][0]])
        delta = np.array(a["center"][:2]) - b["center"][:2]
        side, depth = delta @ right, delta @ forward
        expected = ("right of" if side > 0 else "left of") if abs(side) > abs(depth) else ("behind" if depth > 0 else "in front of")
        assert option_text(record) == expected
    for record in many("spatial_imagination_oo", views):
        (a, b, c), _ = marked(record, objects)
        facing = np.array(b["center"][:2]) - a["center"][:2]
        target = np.array(c["center"][:2]) - a["center"][:2]
        cross = facing[0] * target[1] - facing[1] * target[0]  # > 0: target is counter-clockwise = left
        expected = ("front-" if facing @ target > 0 else "back-") + ("left" if cross > 0 else "right")
        assert option_text(record) == expected
    for record in many("spatial_imagination_oc", views):
        (a, b), _ = marked(record, objects)
        facing = views.poses[record["image"][0]][:2, 3] - a["center"][:2]
        target = np.array(b["center"][:2]) - a["center"][:2]
        cross = facing[0] * target[1] - facing[1] * target[0]
        assert option_text(record) == ("front-" if facing @ target > 0 else "back-") + ("left" if cross > 0 else "right")


def named_components(answer):
    """SPAR's view_change answer read back independently: signed (right, forward, turn right)."""
    signs = {"move_right": (0, 1), "move_left": (0, -1), "move_forward": (1, 1), "move_backward": (1, -1),
             "rotate_right": (2, 1), "rotate_left": (2, -1)}
    values = [0.0, 0.0, 0.0]
    for item in answer.split(","):
        key, value = item.split(":")
        axis, sign = signs[key]
        assert float(value) >= 0, answer  # the name carries the direction
        values[axis] = sign * float(value)
    return values


def test_view_change_and_camera_motion_answers(spar_scene):
    scene, views = spar_scene
    for record in many("view_change_infer", views):
        first, second = (views.poses[i] for i in record["image"])
        forward, right = camera_basis(first)
        move = second[:2, 3] - first[:2, 3]
        turn = math.degrees(math.atan2(first[1, 2], first[0, 2]) - math.atan2(second[1, 2], second[0, 2]))
        expected = [move @ right, move @ forward, turn]
        assert named_components(record["answer"]) == pytest.approx(expected, abs=0.51), record["answer"]
    assert g.view_change_answer(-1.5, 0.5, 25.0) == "move_left:1.50,move_forward:0.50,rotate_right:25"
    # pose 0 -> 1: 1 m right, 1 m forward, 5 degrees right; pose 0 -> 2: 1.5 m left, 0.5 m forward, 25 degrees right
    assert np.allclose(g.camera_motion(views.poses[0], views.poses[1]), (1.0, 1.0, 5.0))
    assert np.allclose(g.camera_motion(views.poses[0], views.poses[2]), (-1.5, 0.5, 25.0))
    # two cameras that see each other (and the chair): the second stands 1.5 m ahead of the first
    views = views_of(scene, [g.look_pose(np.array([-3.0, 0.0, 1.5]), 0.0, math.radians(-15)),
                             g.look_pose(np.array([-1.5, 0.3, 1.3]), math.radians(10), math.radians(-10))])
    height, width = views.image_size
    for record in many("camera_motion_infer", views):  # camera 2's centre in camera 1's image, on the 0-1000 grid, and its depth
        first, second = (views.poses[i] for i in record["image"])
        x, y, z = (np.linalg.inv(first) @ np.append(second[:3, 3], 1.0))[:3]
        K = views.K[record["image"][0]]
        u, v = K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2]
        assert option_text(record) == f"({int(u / width * 1000)}, {int(v / height * 1000)}), {z:.1f}"


def test_counting_size_room_order_and_route_on_a_video():
    """Four objects in the corners of a 10 x 8 m room (plus a second chair by the sofa); the video looks at
    one corner per frame, in a known order."""
    corners = {"table": (-3.5, -2.5), "sofa": (3.5, -2.5), "bed": (3.5, 2.5), "fridge": (-3.5, 2.5)}
    sizes = {"table": (1.4, 0.8, 0.75), "sofa": (2.0, 0.9, 0.85), "bed": (2.0, 1.6, 0.55), "fridge": (0.7, 0.7, 1.8)}
    objects = [make_box(i, name, (x, y, sizes[name][2] / 2), sizes[name]) for i, (name, (x, y)) in enumerate(corners.items())]
    objects += [make_box(4, "chair", (2.4, -2.7, 0.45), (0.5, 0.5, 0.9)), make_box(5, "chair", (3.0, -1.6, 0.45), (0.5, 0.5, 0.9))]
    scene = make_scene(objects, room=(10.0, 8.0, 3.0))
    order = ["sofa", "bed", "table", "fridge"]
    poses = []
    for name in order:  # stand 2.2 m from the corner object, towards the room centre, and look at it
        target = np.array(corners[name])
        position = target * (1 - 2.2 / np.linalg.norm(target))
        yaw = math.atan2(*(target - position)[::-1])
        poses.append(g.look_pose(np.array([*position, 1.5]), yaw, math.radians(-20)))
    views = views_of(scene, poses, res=96)
    seen = [set(views.visible(v)) for v in range(4)]
    assert seen[0] >= {1, 4, 5} and 0 not in seen[0] | seen[1], seen  # the hand setup is what we think

    record = many("obj_appearance_order", views)[0]
    assert option_text(record) == ", ".join(order)
    for record in many("object_counting", views):
        category = record["question"].split("How many ")[1].split("(s)")[0]
        assert int(record["answer"]) == sum(o["category"] == category for o in objects)
    for record in many("object_size_estimation", views):
        name = record["question"].split("dimension (length, width, or height) of the ")[1].split(",")[0]
        assert int(record["answer"]) == round(100 * max(sizes[name]))
    assert many("room_size_estimation", views)[0]["answer"] == "80.0"
    for record in many("route_planning", views):
        names = re.findall(r"Go forward until the (.+?)(?: \d\.|\. You)", record["question"])
        start = record["question"].split("beginning at the ")[1].split(" facing")[0]
        path = [np.array(corners[n]) for n in [start] + names]
        turns = []
        for k in (1, 2):
            h1, h2 = path[k] - path[k - 1], path[k + 1] - path[k]
            cross, dot = h1[0] * h2[1] - h1[1] * h2[0], h1 @ h2
            turns.append("Turn Back" if dot < -0.9 * np.linalg.norm(h1) * np.linalg.norm(h2)
                         else ("Turn Left" if cross > 0 else "Turn Right"))
        assert option_text(record) == ", ".join(turns)
    for record in many("object_abs_distance", views):
        names = record["question"].split("between the ")[1].split(" (in meters)")[0].split(" and the ")
        a, b = (objects[list(corners).index(n)] for n in names)
        gaps = [max(0.0, abs(a["center"][k] - b["center"][k]) - (a["size"][k] + b["size"][k]) / 2) for k in range(3)]
        assert float(record["answer"]) == pytest.approx(math.hypot(*gaps), abs=0.051)  # one decimal, as VSI-Bench


def test_closest_box_distance_matches_dense_sampling():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = make_box(0, "box", rng.uniform(-1, 1, 3), rng.uniform(0.2, 1.0, 3), yaw=rng.uniform(0, 3))
        b = make_box(1, "box", rng.uniform(-1, 1, 3) + [2.0, 0, 0], rng.uniform(0.2, 1.0, 3), yaw=rng.uniform(0, 3))

        def surface(obj, n=24):
            grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij"), -1).reshape(-1, 3)
            grid = grid[np.abs(grid).max(1) == 1]  # the cube's surface
            return (grid * np.array(obj["size"]) / 2) @ g.yaw_matrix(obj["yaw"]).T + obj["center"]

        pa, pb = surface(a), surface(b)
        brute = min(np.linalg.norm(pa[i::50, None] - pb[None], axis=-1).min() for i in range(50))
        assert g.closest_box_distance(a, b) == pytest.approx(brute, abs=0.05)
        assert g.closest_box_distance(a, b) <= brute + 1e-9


def test_cameras_never_stand_inside_an_object_footprint():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        scene = g.sample_scene(rng, "s")
        _, poses = g.sample_cameras(rng, scene, 6, 3, 16)
        for pose in poses:
            for obj in scene["objects"]:
                local = g.yaw_matrix(obj["yaw"]).T @ (pose[:3, 3] - obj["center"])
                assert np.any(np.abs(local[:2]) > np.array(obj["size"][:2]) / 2), (seed, obj["category"])


def test_markers_without_a_box_draw_only_the_point():
    image = np.zeros((20, 20, 3), np.uint8)
    drawn = g.draw_markers(image, [{"image": 0, "color": "red", "point": [500, 500]}], 0)
    assert (drawn[10, 10] == [255, 0, 0]).all() and drawn[0, 0].sum() == 0


def test_numeric_distractors_are_spread_and_in_range():
    rng = np.random.default_rng(0)
    for truth in (0.8, 2.37, 14.0):
        values = [float(v) for v in g.numeric_distractors(rng, truth, 2)]
        everything = [truth] + values
        assert all(0.25 * truth - 0.01 <= v <= 1.75 * truth + 0.01 for v in values)
        assert all(abs(x - y) >= 0.2 * truth - 0.01 for i, x in enumerate(everything) for y in everything[i + 1:])


# -----------------------------------------------------------------------------
# files: the command line, determinism, formats


def run_generator(out, *args):
    subprocess.run([sys.executable, os.path.join(ROOT, "generate_spar.py"), f"--out={out}", *args],
                   check=True, capture_output=True, cwd=ROOT)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("spar")
    run_generator(out, "--scenes=8", "--val_scenes=2", "--res=96", "--seed=0", "--preview=1", "--vocab_size=512")
    return out


def test_all_28_tasks_and_disjoint_splits(generated):
    train = [json.loads(line) for line in open(generated / "qa_train.jsonl")]
    val = [json.loads(line) for line in open(generated / "qa_val.jsonl")]
    assert {r["task"] for r in train + val} == set(g.TASKS)
    assert not {r["scene"] for r in train} & {r["scene"] for r in val}
    for r in train:
        assert json.load(open(generated / "scenes" / f"{r['scene']}.json"))["split"] == "train"
    assert len({r["id"] for r in train + val}) == len(train + val)


# VSI-Bench's question templates word for word, {x} standing for a category name, with the options each row
# has. Source: the rows of nyu-visionx/VSI-Bench (test split) as printed in vision-x-nyu/test-set-training
# (branch meta_nov25, notebooks/vsi_debias_*.ipynb: ids 0, 439, 530, 680, 957, 1334, 2713, 4959) and the
# prompt of thinking-in-space lmms_eval/tasks/vsibench/utils.py (vsibench_doc_to_text). The paper's Table 4
# says "direct distance"; the released rows do not, and neither do we.
VSI_TEMPLATES = {
    "object_counting": ("How many {x}(s) are in this room?", None),
    "object_abs_distance": ("Measuring from the closest point of each object, what is the distance between the {x} "
                            "and the {x} (in meters)?", None),
    "object_size_estimation": ("What is the length of the longest dimension (length, width, or height) of the {x}, "
                               "measured in centimeters?", None),
    "room_size_estimation": ("What is the size of this room (in square meters)? \nIf multiple rooms are shown, "
                             "estimate the size of the combined space.", None),
    "object_rel_distance": ("Measuring from the closest point of each object, which of these objects ({x}, {x}, {x}, "
                            "{x}) is the closest to the {x}?", 4),
    "object_rel_direction/easy": ("If I am standing by the {x} and facing the {x}, is the {x} to the left or the "
                                  "right of the {x}?", 2),
    "object_rel_direction/medium": ("If I am standing by the {x} and facing the {x}, is the {x} to my left, right, or "
                                    "back?\nAn object is to my back if I would have to turn at least 135 degrees in "
                                    "order to face it.", 3),
    "object_rel_direction/hard": ("If I am standing by the {x} and facing the {x}, is the {x} to my front-left, "
                                  "front-right, back-left, or back-right?\nThe directions refer to the quadrants of a "
                                  "Cartesian plane (if I am standing at the origin and facing along the positive "
                                  "y-axis).", 4),
    "route_planning": ("You are a robot beginning at the {x} facing the {x}. You want to navigate to the {x}. You will "
                       "perform the following actions (Note: for each [please fill in], choose either 'turn back,' "
                       "'turn left,' or 'turn right.'): 1. Go forward until the {x} 2. [please fill in] 3. Go "
                       "forward until the {x} 4. [please fill in] 5. Go forward until the {x}. You have reached the "
                       "final destination.", 4),
    "obj_appearance_order": ("What will be the first-time appearance order of the following categories in the "
                             "video: {x}, {x}, {x}, {x}?", 4),
}


def test_vsi_questions_match_the_benchmark_templates_word_for_word(generated):
    records = [json.loads(line) for line in open(generated / "qa_train.jsonl")]
    category = "(?:" + "|".join(map(re.escape, g.CATEGORY_NAMES)) + ")"
    for kind, (template, num_options) in VSI_TEMPLATES.items():
        task, _, difficulty = kind.partition("/")
        asked = [r for r in records if r["task"] == task and r.get("difficulty", "") == difficulty]
        assert asked, f"no {kind} question generated"
        pattern = re.escape(template).replace(re.escape("{x}"), category)
        for record in asked:
            assert re.fullmatch(pattern, record["question"]), (kind, record["question"])
            assert len(record.get("options", [])) == (num_options or 0), (kind, record.get("options"))
            prompt = g.prompt(record)  # as vsibench_doc_to_text assembles it
            assert prompt.startswith("These are frames of a video.\n" + record["question"] + "\n")
            assert prompt.endswith("Answer with the option's letter from the given choices directly." if num_options
                                   else "Please answer the question using a single word or phrase.")
        if task == "object_rel_distance":  # the options are the listed objects, in the question's order
            for record in asked:
                listed = record["question"].split("objects (")[1].split(")")[0].split(", ")
                assert [o[3:] for o in record["options"]] == listed


def test_no_direction_or_turn_label_near_a_class_boundary():
    """Every angle, 0.25 degrees apart: a label only 15 degrees or more away from each class boundary of its
    question (VSI-Bench: "back" from 135 degrees; a route's turn is also none under 30 degrees; SPAR's relation
    of two objects changes class on the diagonals), and then the right one."""
    boundaries = {"easy": [0, 180], "medium": [0, 135], "hard": [0, 90, 180], "turn": [0, 135], "relation": [45, 135]}
    for angle in np.arange(-179.875, 180, 0.25):  # never exactly on a boundary, where rounding decides
        heading = np.array([1.0, 0.0, 0.0])
        turned = np.array([math.cos(math.radians(-angle)), math.sin(math.radians(-angle)), 0.0])  # +: clockwise, right
        labels = {difficulty: g.rel_direction_answer(angle, difficulty) for difficulty in ("easy", "medium", "hard")}
        labels["turn"] = g.turn_word(heading, turned)
        side = "right" if angle > 0 else "left"
        expected = {"easy": side, "medium": "back" if abs(angle) > 135 else side,
                    "hard": ("back-" if abs(angle) > 90 else "front-") + side,
                    "turn": None if abs(angle) < 30 else "Turn Back" if abs(angle) > 135 else f"Turn {side.title()}"}
        labels["relation"] = g.relation_word(math.sin(math.radians(angle)), math.cos(math.radians(angle)), 0, 0)
        expected["relation"] = ("right of" if angle > 0 else "left of") if 45 < abs(angle) < 135 else \
            ("behind" if abs(angle) < 90 else "in front of")  # A ahead of B, seen from the camera: behind it
        for kind, label in labels.items():
            near = min(abs(abs(angle) - b) for b in boundaries[kind]) < (30 if kind == "turn" and abs(angle) < 90 else 15)
            assert label == (None if near else expected[kind]), (kind, angle, label)


def test_every_entry_point_first_says_what_it_will_do_and_with_what(tmp_path):
    """generate_spar.py, train.py and eval.py: a first line naming the work, the versions and the output."""
    out = tmp_path / "d"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_spar.py"), f"--out={out}", "--scenes=2",
                             "--val_scenes=1", "--res=32", "--vocab_size=0"], capture_output=True, text=True, cwd=ROOT)
    first = result.stdout.splitlines()[0]
    assert first.startswith("generate_spar.py: questions from 2 + 1 procedural scenes, 32 px, 1 worker(s) | python ")
    assert f"| numpy {np.__version__} | output: {out}" in first
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage=geo", "--device=cpu",
                             f"--data={out}", f"--out={tmp_path / 'g'}", "--steps=1", "--preset=tiny",
                             "--eval_every=0"], capture_output=True, text=True, cwd=ROOT)
    first = result.stdout.splitlines()[0]
    assert first.startswith("train.py: stage(s) geo on 1 x cpu | python ") and "| torch " in first, result.stdout
    assert first.endswith(f"output: {tmp_path / 'g'}")


def test_same_seed_same_bytes_for_any_number_of_workers(tmp_path):
    for workers in (1, 2):
        run_generator(tmp_path / f"w{workers}", "--scenes=3", "--val_scenes=1", "--res=48", "--views=6",
                      "--random_views=2", "--seed=7", f"--workers={workers}", "--vocab_size=300")
    names = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    assert len(names) == 4 * 2 + 3
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_scene_file_loads_with_the_safetensors_library(generated):
    from safetensors.numpy import load_file

    arrays = load_file(str(generated / "scenes" / "scene00000.safetensors"))
    ours = g.read_safetensors(str(generated / "scenes" / "scene00000.safetensors"))
    meta = json.load(open(generated / "scenes" / "scene00000.json"))
    assert arrays["rgb"].shape == (20, 96, 96, 3) and arrays["rgb"].dtype == np.uint8
    assert arrays["depth"].dtype == np.float16 and arrays["instance"].dtype == np.int16
    assert meta["video_frames"] == 16
    for key in arrays:
        assert np.array_equal(arrays[key], ours[key])
    # the stored depth is the renderer's (to float16 precision)
    scene = meta
    _, depth, instance = g.render(scene, arrays["K"][3], arrays["pose"][3], 96, 96)
    np.testing.assert_allclose(arrays["depth"][3].astype(np.float32), depth, rtol=1e-3)
    assert np.array_equal(arrays["instance"][3], instance)


def test_preview_png_shows_markers(generated):
    pngs = sorted((generated / "preview").glob("*position_matching*.png"))
    assert pngs
    image = g.read_png(str(pngs[0]))
    red = (image[..., 0] == 255) & (image[..., 1] == 0) & (image[..., 2] == 0)
    assert red.sum() > 5  # the red marker is drawn
    assert (pngs[0].with_suffix(".txt")).read_text().count("answer:") == 1


def filtered_png(image, bpp):
    """A PNG of uint8 RGB or uint16 gray whose rows use the filters none, sub, up, average, Paeth in turn, as
    other writers (OpenCV, Pillow) choose them: the encoder side of the PNG spec, written independently."""
    height, depth, color = image.shape[0], (16 if image.dtype == np.uint16 else 8), (0 if image.ndim == 2 else 2)
    rows = (image.astype(">u2") if depth == 16 else image).tobytes()
    stride, raw, prev = len(rows) // height, b"", [0] * (len(rows) // height)
    for r in range(height):
        line, kind, out = list(rows[r * stride:(r + 1) * stride]), r % 5, []
        for i, x in enumerate(line):
            left, up, up_left = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
            p = left + up - up_left
            paeth = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - up_left), 2, up_left))[2]
            out.append((x - [0, left, up, (left + up) // 2, paeth][kind]) & 255)
        raw, prev = raw + bytes([kind] + out), line

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", image.shape[1], height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_png_round_trip_including_filters(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    g.write_png(str(tmp_path / "a.png"), rgb)
    assert np.array_equal(g.read_png(str(tmp_path / "a.png")), rgb)
    depth = rng.integers(0, 65535, (5, 4)).astype(np.uint16)
    g.write_png(str(tmp_path / "d.png"), depth)
    assert np.array_equal(g.read_png(str(tmp_path / "d.png")), depth)
    # every row filter, in 8-bit RGB and 16-bit gray (scanned depth)
    rgb, depth = rng.integers(0, 256, (11, 9, 3), dtype=np.uint8), rng.integers(0, 65535, (10, 7)).astype(np.uint16)
    (tmp_path / "fa.png").write_bytes(filtered_png(rgb, 3))
    (tmp_path / "fd.png").write_bytes(filtered_png(depth, 2))
    assert np.array_equal(g.read_png(str(tmp_path / "fa.png")), rgb)
    assert np.array_equal(g.read_png(str(tmp_path / "fd.png")), depth)


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    g.write_atomic(str(path), b"old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        g.write_atomic(str(path), b"new contents")
    assert path.read_bytes() == b"old"


# -----------------------------------------------------------------------------
# real scans


def write_scan(scene, K, poses, res, out):
    """Lay out a rendered scene as a scan in the SPAR RGBD layout (PNG colour, depth in mm) + boxes.json."""
    for folder in ("image_color", "image_depth", "intrinsic", "pose"):
        os.makedirs(out / folder, exist_ok=True)
    np.savetxt(out / "intrinsic" / "intrinsic_color.txt", K[0])
    for v, pose in enumerate(poses):
        rgb, depth, _ = g.render(scene, K[v], pose, res, res)
        g.write_png(str(out / "image_color" / f"{v:03d}.png"), rgb)
        g.write_png(str(out / "image_depth" / f"{v:03d}.png"), np.round(depth * 1000).astype(np.uint16))
        np.savetxt(out / "pose" / f"{v:03d}.txt", pose)
    boxes = [{"category": o["category"], "center": o["center"], "size": o["size"], "yaw": o["yaw"]}
             for o in scene["objects"]]
    json.dump({"objects": boxes, "room": {"floor_area": scene["room"]["floor_area"]}}, open(out / "boxes.json", "w"))


def test_scan_source_reads_the_spar_layout_and_asks_the_same_questions(tmp_path):
    rng = np.random.default_rng(4)
    scene = g.sample_scene(rng, "scan0")
    for obj in scene["objects"]:
        obj["shape"] = "box"  # scans describe objects by boxes only
    K, poses = g.sample_cameras(rng, scene, 6, 2, 64)
    write_scan(scene, K, poses, 64, tmp_path / "scan0")
    loaded, rgb, depth, instance, K2, poses2 = g.load_scan(str(tmp_path / "scan0"), 64)
    assert np.allclose(K2, K) and np.allclose(poses2, poses)
    _, true_depth, true_instance = zip(*[g.render(scene, K[v], poses[v], 64, 64) for v in range(len(poses))])
    assert np.abs(depth - np.stack(true_depth)).max() <= 0.0006  # millimetre PNG
    objects_seen = np.stack(true_instance) >= 0
    agree = (instance == np.stack(true_instance))[objects_seen].mean()
    assert agree > 0.97, agree
    # the same QA engine: distance answers from the scan equal the ground truth of the procedural scene
    views = g.scene_views(loaded, K2, poses2, instance, 6)
    for record in g.make_questions(views, np.random.default_rng(0), 2, 0.0, ["distance_prediction_oc"]):
        obj = scene["objects"][record["markers"][0]["object"]]
        expected = np.linalg.norm(np.array(obj["center"]) - poses[record["image"][0]][:3, 3])
        assert float(record["answer"]) == pytest.approx(expected, abs=0.006)


def test_scannet_export_numeric_frames_lost_tracking_and_depth_intrinsics(tmp_path, capsys):
    """SPAR's ScanNet export as it is: unpadded frame numbers (text order would scramble the video), one pose of
    -inf (tracking lost: skipped, counted), depth at its own resolution and intrinsics; --scan_frames spacing."""
    rng = np.random.default_rng(6)
    scene = g.sample_scene(rng, "scan1")
    for obj in scene["objects"]:
        obj["shape"] = "box"
    K, poses = g.sample_cameras(rng, scene, 12, 0, 64)
    out = tmp_path / "scene0001_00"
    write_scan(scene, K, poses, 64, out)
    names = [str(20 * v) for v in range(12)]  # 0, 20, ..., 220: "100" sorts before "20" as text
    K_depth = np.array([[30.0, 0, 23.5], [0, 26.0, 19.5], [0, 0, 1]])  # a 48 x 40 depth camera, wider lens
    for v, name in enumerate(names):
        for folder, ext in (("image_color", "png"), ("image_depth", "png"), ("pose", "txt")):
            os.rename(out / folder / f"{v:03d}.{ext}", out / folder / f"{name}.{ext}")
        _, depth, _ = g.render(scene, K_depth, poses[v], 40, 48)
        g.write_png(str(out / "image_depth" / f"{name}.png"), np.round(depth * 1000).astype(np.uint16))
    np.savetxt(out / "intrinsic" / "intrinsic_depth.txt", K_depth)
    np.savetxt(out / "pose" / "140.txt", np.full((4, 4), -np.inf))  # frame 7
    loaded, rgb, depth, instance, K2, poses2 = g.load_scan(str(out), 64)
    kept = [v for v in range(12) if v != 7]
    assert np.allclose(poses2, poses[kept])  # numeric order, the lost frame left out
    assert "skipped 1 of 12 frames" in capsys.readouterr().out
    true_depth = np.stack([g.render(scene, K[v], poses[v], 64, 64)[1] for v in kept])
    seen = depth > 0  # the depth camera sees the whole colour image; nearest samples differ only at edges
    assert seen.mean() > 0.99 and np.median(np.abs(depth - true_depth)) < 0.03  # a coarser sensor: 48 x 40
    assert (np.abs(depth - true_depth)[seen] < 0.05 + 0.03 * true_depth[seen]).mean() > 0.9
    views = g.scene_views(loaded, K2, poses2, instance, len(kept))
    records = g.make_questions(views, np.random.default_rng(0), 3, 0.0, ["obj_appearance_order"])
    assert records
    for record in records:
        first = {}  # an independent first appearance, on the true instance maps, in the numeric order
        for v in kept:
            ids, counts = np.unique(g.render(scene, K[v], poses[v], 64, 64)[2], return_counts=True)
            for obj, count in zip(ids, counts):
                if obj >= 0 and count >= views.min_pixels:
                    first.setdefault(scene["objects"][obj]["category"], v)
        listed = record["question"].split("in the video: ")[1].rstrip("?").split(", ")
        assert option_text(record).split(", ") == sorted(listed, key=lambda c: first[c])
    (out / "video_idx.txt").write_text("200\n0\n100\n")  # SPAR's own video list
    assert np.allclose(g.load_scan(str(out), 32)[5], poses[[10, 0, 5]])
    (out / "video_idx.txt").unlink()
    assert np.allclose(g.load_scan(str(out), 32, frames=3)[5], poses[[0, 5, 11]])  # evenly spaced among the 11 usable
    boxes = json.load(open(out / "boxes.json"))  # an unmapped ScanNet object: it occludes, nobody asks about it
    boxes["objects"][0]["category"] = "other"
    json.dump(boxes, open(out / "boxes.json", "w"))
    loaded, _, _, instance, K2, poses2 = g.load_scan(str(out), 64)
    assert (instance == 0).any()
    views = g.scene_views(loaded, K2, poses2, instance, len(poses2))
    records = g.make_questions(views, np.random.default_rng(0), 5, 0.0)
    assert records and not any("other" in r["question"].split() for r in records)
    assert all(m["object"] != 0 for r in records for m in r.get("markers", []))


def test_scan_frames_matched_by_number_incomplete_ones_skipped_bad_files_named(tmp_path, capsys):
    rng = np.random.default_rng(4)
    scene = g.sample_scene(rng, "scan0")
    K, poses = g.sample_cameras(rng, scene, 5, 0, 32)
    out = tmp_path / "scans" / "scan0"
    write_scan(scene, K, poses, 32, out)
    os.rename(out / "image_color" / "001.png", out / "image_color" / "frame-000001.color.png")  # other namings
    os.rename(out / "pose" / "002.txt", out / "pose" / "2.txt")
    (out / "image_depth" / "003.png").unlink()  # an incomplete frame: skipped and counted
    (out / "image_color" / "notes.txt").write_text("not a frame")
    loaded = g.load_scan(str(out), 32)
    assert np.allclose(loaded[5], poses[[0, 1, 2, 4]])
    assert "skipped 1 of 5 frames: 1 without their colour, depth or pose file" in capsys.readouterr().out
    np.savetxt(out / "pose" / "000.txt", np.eye(4)[:3])  # a broken file is an error, not lost tracking
    with pytest.raises(ValueError, match=r"pose/000.txt: pose must be a 4x4 matrix"):
        g.load_scan(str(out), 32)
    np.savetxt(out / "pose" / "000.txt", poses[0])
    np.savetxt(out / "intrinsic" / "intrinsic_depth.txt", K[0] * [[2], [2], [1]])  # of a 64 x 64 depth image
    with pytest.raises(ValueError, match="intrinsic_depth.txt: principal point .* far from the centre of the 32x32"):
        g.load_scan(str(out), 32)
    (out / "intrinsic" / "intrinsic_depth.txt").unlink()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_spar.py"), f"--from_scans={tmp_path / 'scans'}",
                             f"--out={tmp_path / 'data'}", "--scan_frames=1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "--scan_frames=1: a scan's video takes 2..32 frames" in result.stderr
    (out / "boxes.json").write_text("{")  # a failed run leaves --out as it found it: a rerun is not refused
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_spar.py"), f"--from_scans={tmp_path / 'scans'}",
                             f"--out={tmp_path / 'data'}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "boxes.json: cannot read boxes" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()


@pytest.mark.parametrize("label, category", [
    ("office chair", "chair"), ("dining chair", "chair"), ("chairs", "chair"), ("kitchen table", "table"),
    ("bunk bed", "bed"), ("refridgerator", "fridge"), ("kitchen cabinets", "cabinet"), ("sofa chair", "armchair"),
    ("nightstands", "nightstand"), ("floor lamp", "lamp"), ("tv stand", "other"), ("picture frame", "other"),
    ("toilet", "other"), ("shower curtain", "other")])
def test_scannet_labels_map_to_our_categories(label, category):
    assert g.scannet_category(label, g.CATEGORY_NAMES) == category


def test_scan_errors_name_the_file_and_field(tmp_path):
    rng = np.random.default_rng(4)
    scene = g.sample_scene(rng, "scan0")
    K, poses = g.sample_cameras(rng, scene, 2, 0, 32)
    write_scan(scene, K, poses, 32, tmp_path / "scan0")
    boxes = json.load(open(tmp_path / "scan0" / "boxes.json"))
    boxes["objects"][1]["size"] = [1.0, "x", 2.0]
    json.dump(boxes, open(tmp_path / "scan0" / "boxes.json", "w"))
    with pytest.raises(ValueError, match=r"boxes.json: objects\[1\].size"):
        g.load_scan(str(tmp_path / "scan0"), 32)
    np.savetxt(tmp_path / "scan0" / "pose" / "001.txt", np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match=r"pose/001.txt: pose"):
        g.read_matrix(str(tmp_path / "scan0" / "pose" / "001.txt"), "pose", (4, 4))


# -----------------------------------------------------------------------------
# ScanNet v2 annotations -> boxes.json: a tiny synthetic ScanNet scene written into tmp_path, checked against
# values known by construction (objects placed axis-aligned in the aligned frame, the mesh written in the raw frame)

SCENE = "scene0000_00"
ANGLE, SHIFT = math.radians(30), np.array([0.7, -1.3, 0.05])  # axisAlignment: turn 30 degrees about z, then shift
CHAIR = dict(center=[1.0, 1.0, 0.45], size=[0.5, 0.6, 0.9])
MYSTERY = dict(center=[3.0, 2.0, 0.3], size=[0.4, 0.4, 0.6])


def axis_alignment():
    c, s = math.cos(ANGLE), math.sin(ANGLE)
    return np.array([[c, -s, 0, SHIFT[0]], [s, c, 0, SHIFT[1]], [0, 0, 1, SHIFT[2]], [0, 0, 0, 1]])


def to_raw(points):
    """aligned -> raw by hand: undo the shift, then turn by -30 degrees (no matrix inverse)."""
    c, s = math.cos(-ANGLE), math.sin(-ANGLE)
    p = np.asarray(points, dtype=np.float64) - SHIFT
    return np.stack([c * p[..., 0] - s * p[..., 1], s * p[..., 0] + c * p[..., 1], p[..., 2]], axis=-1)


def box_surface(center, size):
    """The 8 corners of a box plus a 4x4 grid on each face: > 10 distinct vertices."""
    t = np.linspace(-0.5, 0.5, 4)
    grid = np.array([[a, b] for a in t for b in t])
    faces = [np.insert(grid, axis, side, axis=1) for axis in range(3) for side in (-0.5, 0.5)]
    return np.unique(np.concatenate(faces), axis=0) * size + center


def synthetic_mesh():
    """Aligned-frame vertices, faces (lists of indices), per-vertex segment ids and the segGroups."""
    floor = np.array([[0, 0, 0], [4, 0, 0], [4, 3, 0], [0, 3, 0]], dtype=np.float64)  # a 4 x 3 m rectangle
    wall = np.array([[x, 3.0, z] for x in np.linspace(0, 4, 4) for z in np.linspace(0, 2.5, 3)])  # 12 vertices
    chair, mystery = box_surface(**CHAIR), box_surface(**MYSTERY)
    lamp = np.array([[2, 2, 1.0], [2.1, 2, 1], [2, 2.1, 1], [2, 2, 1.2], [2.1, 2.1, 1.2]])  # 5: too few
    loose = np.array([[0.5, 2.5, 0.1], [0.6, 2.5, 0.1], [0.5, 2.6, 0.1]])  # annotated by no group
    parts = [floor, wall, chair, mystery, lamp, loose]
    start = np.cumsum([0] + [len(p) for p in parts])
    segments = np.concatenate([[10, 10, 17, 17], np.full(12, 7), np.where(np.arange(len(chair)) % 2, 3, 250),
                               np.full(len(mystery), 42), np.full(5, 5000), np.full(3, 999)])
    groups = [{"id": 0, "objectId": 0, "segments": [10, 17], "label": "floor"},
              {"id": 1, "objectId": 1, "segments": [7], "label": "wall"},
              {"id": 2, "objectId": 2, "segments": [3, 250], "label": "office chair"},
              {"id": 3, "objectId": 3, "segments": [42], "label": "mystery thing"},
              {"id": 4, "objectId": 4, "segments": [5000], "label": "lamp"}]
    w, c = start[1], start[2]
    faces = [[0, 1, 2], [0, 2, 3],  # the floor
             [w, w + 3, w + 1], [w + 3, w + 4, w + 1],  # part of the wall
             [0, 1, c],  # two floor corners and a chair corner, seen from above inside the room: not floor
             [c, c + 1, c + 2]]  # a chair sliver
    return np.concatenate(parts), faces, segments, groups


def write_ply(path, vertices, faces, ascii=False):
    """ScanNet's layout: float x y z, uchar red green blue alpha; faces as 'list uchar int vertex_indices'."""
    header = ("ply\nformat {}\ncomment VCGLIB generated\nelement vertex {}\nproperty float x\nproperty float y\n"
              "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
              "element face {}\nproperty list uchar int vertex_indices\nend_header\n").format(
        "ascii 1.0" if ascii else "binary_little_endian 1.0", len(vertices), len(faces))
    xyz = np.asarray(vertices, dtype=np.float32)
    if ascii:
        lines = [" ".join(repr(float(v)) for v in p) + " 128 64 32 255" for p in xyz]
        lines += [" ".join(str(i) for i in [len(f)] + list(f)) for f in faces]
        body = ("\n".join(lines) + "\n").encode()
    else:
        rows = np.zeros(len(xyz), dtype=[("xyz", "<f4", 3), ("rgba", "u1", 4)])
        rows["xyz"], rows["rgba"] = xyz, [128, 64, 32, 255]
        body = rows.tobytes() + b"".join(np.array([len(f)], "u1").tobytes() + np.array(f, "<i4").tobytes()
                                         for f in faces)
    with open(path, "wb") as f:
        f.write(header.encode() + body)


def write_scene(root, ascii=False, faces=None, txt=True):
    """Write the scene in the raw frame; returns (scene folder, its files' base path, raw vertices as written)."""
    aligned, default_faces, segments, groups = synthetic_mesh()
    scene_dir = root / SCENE
    scene_dir.mkdir(exist_ok=True)
    base = str(scene_dir / SCENE)
    raw = to_raw(aligned) if txt else aligned
    write_ply(base + "_vh_clean_2.ply", raw, faces or default_faces, ascii)
    with open(base + "_vh_clean_2.0.010000.segs.json", "w") as f:
        json.dump({"params": {"kThresh": "0.0001"}, "sceneId": SCENE, "segIndices": segments.tolist()}, f)
    with open(base + ".aggregation.json", "w") as f:
        json.dump({"sceneId": "scannet." + SCENE, "appId": "Aggregator.v2", "segGroups": groups,
                   "segmentsFile": "scannet." + SCENE + "_vh_clean_2.0.010000.segs.json"}, f)
    if txt:
        with open(base + ".txt", "w") as f:
            numbers = " ".join(f"{v:.9f}" for v in axis_alignment().ravel())
            f.write(f"colorHeight = 968\naxisAlignment = {numbers}\nnumDepthFrames = 5578\nsceneType = Bedroom\n")
    return scene_dir, base, np.asarray(raw, dtype=np.float32).astype(np.float64)


def corners(center, size, yaw):
    """A box's 8 corners, written out independently of the converter."""
    c, s = math.cos(yaw), math.sin(yaw)
    local = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)]) * size
    return np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], 1) + center


def test_boxes_categories_and_floor(tmp_path):
    scene_dir, _, raw = write_scene(tmp_path)
    boxes = json.loads(json.dumps(g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES)))  # it must survive JSON
    assert [(o["category"], o["label"]) for o in boxes["objects"]] == [("chair", "office chair"),
                                                                       ("other", "mystery thing")]
    for obj, truth in zip(boxes["objects"], [CHAIR, MYSTERY]):
        assert obj["yaw"] == pytest.approx(-ANGLE, abs=1e-6)  # inverse(A) turns by -30 degrees
        assert obj["size"] == pytest.approx(truth["size"], abs=1e-5)
        assert obj["center"] == pytest.approx(to_raw(truth["center"]).tolist(), abs=1e-5)
        # the oriented box's corners in the raw frame are the true corners carried through inverse(A)
        expected = to_raw(corners(truth["center"], truth["size"], 0.0))
        got = corners(obj["center"], obj["size"], obj["yaw"])
        assert np.abs(np.sort(got, axis=0) - np.sort(expected, axis=0)).max() < 1e-5
    assert boxes["room"]["floor_area"] == pytest.approx(12.0, abs=1e-6)
    x, y = raw[:4, 0], raw[:4, 1]  # the floor quad as stored (float32): shoelace formula
    assert boxes["room"]["floor_area"] == pytest.approx(abs(x @ np.roll(y, -1) - y @ np.roll(x, -1)) / 2, abs=1e-4)


def test_ascii_ply_gives_the_same_boxes(tmp_path):
    (tmp_path / "binary").mkdir()
    (tmp_path / "ascii").mkdir()
    binary_dir, _, _ = write_scene(tmp_path / "binary")
    ascii_dir, base, _ = write_scene(tmp_path / "ascii", ascii=True)
    with open(base + "_vh_clean_2.ply", "rb") as f:
        assert b"format ascii 1.0" in f.read(200)
    assert g.scannet_boxes(str(ascii_dir), g.CATEGORY_NAMES) == g.scannet_boxes(str(binary_dir), g.CATEGORY_NAMES)


def test_polygon_faces_are_fanned_into_triangles(tmp_path):
    _, faces, _, _ = synthetic_mesh()
    scene_dir, _, _ = write_scene(tmp_path, faces=[[0, 1, 2, 3]] + faces[2:])  # the floor as one quad
    assert g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES)["room"]["floor_area"] == pytest.approx(12.0, abs=1e-6)


def test_without_axis_alignment_boxes_are_axis_aligned(tmp_path):
    scene_dir, _, raw = write_scene(tmp_path, txt=False)
    chair = g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES)["objects"][0]
    _, _, segments, _ = synthetic_mesh()
    points = raw[np.isin(segments, [3, 250])]
    assert chair["yaw"] == 0.0
    assert chair["center"] == pytest.approx(((points.min(0) + points.max(0)) / 2).tolist(), abs=1e-6)
    assert chair["size"] == pytest.approx((points.max(0) - points.min(0)).tolist(), abs=1e-6)


def test_hi_res_files_and_category_subset(tmp_path):
    scene_dir, base, _ = write_scene(tmp_path)
    expected = g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES)
    for low, high in [(".aggregation.json", "_vh_clean.aggregation.json"),
                      ("_vh_clean_2.0.010000.segs.json", "_vh_clean.segs.json"), ("_vh_clean_2.ply", "_vh_clean.ply")]:
        os.rename(base + low, base + high)  # ScanNet's hi-res annotation goes with the hi-res segs and mesh
    assert g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES) == expected
    objects = g.scannet_boxes(str(scene_dir), ["table", "lamp"])["objects"]
    assert [(o["category"], o["label"]) for o in objects] == [("other", "office chair"), ("other", "mystery thing")]


def test_no_floor_label_leaves_floor_area_out(tmp_path):
    scene_dir, base, _ = write_scene(tmp_path)
    with open(base + ".aggregation.json") as f:
        data = json.load(f)
    data["segGroups"][0]["label"] = "rug"  # 4 vertices: too few to be an object either
    with open(base + ".aggregation.json", "w") as f:
        json.dump(data, f)
    assert g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES)["room"] == {}


def break_json(path, change):
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


BAD_INPUTS = {  # name -> (file suffix, how to break it, field the error must name)
    "no segGroups": (".aggregation.json", lambda d: d.pop("segGroups"), "segGroups"),
    "unknown segment": (".aggregation.json", lambda d: d["segGroups"][2]["segments"].append(12345),
                        "segGroups[2].segments"),
    "label missing": (".aggregation.json", lambda d: d["segGroups"][3].pop("label"), "segGroups[3]"),
    "segment not int": (".aggregation.json", lambda d: d["segGroups"][1]["segments"].append("7"), "segGroups[1]"),
    "segs too short": ("_vh_clean_2.0.010000.segs.json", lambda d: d["segIndices"].pop(), "segIndices"),
    "segs not ints": ("_vh_clean_2.0.010000.segs.json", lambda d: d["segIndices"].__setitem__(0, "a"),
                      "segIndices"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_json_names_file_and_field(tmp_path, case):
    suffix, change, field = BAD_INPUTS[case]
    scene_dir, base, _ = write_scene(tmp_path)
    break_json(base + suffix, change)
    with pytest.raises(ValueError) as error:
        g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES)
    message = str(error.value)
    assert message.startswith(base + suffix + ":") and f"'{field}" in message and "\n" not in message


@pytest.mark.parametrize("case", ["axisAlignment short", "ply truncated", "face index", "not a ply", "no ply",
                                  "ascii word"])
def test_bad_mesh_or_alignment_names_file_and_field(tmp_path, case):
    scene_dir, base, raw = write_scene(tmp_path)
    path, field = {"axisAlignment short": (base + ".txt", "axisAlignment"),
                   "ply truncated": (base + "_vh_clean_2.ply", "face"),
                   "face index": (base + "_vh_clean_2.ply", "vertex_indices"),
                   "not a ply": (base + "_vh_clean_2.ply", "'header'"),
                   "no ply": (base + "_vh_clean_2.ply", "mesh"),
                   "ascii word": (base + "_vh_clean_2.ply", "body")}[case]
    if case == "axisAlignment short":
        with open(path, "w") as f:
            f.write("axisAlignment = " + " ".join(["1"] * 15) + "\n")
    elif case == "ply truncated":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:-5])
    elif case == "face index":
        write_ply(path, raw, [[0, 1, len(raw)]])
    elif case == "not a ply":
        with open(path, "wb") as f:
            f.write(b"not a mesh")
    elif case == "no ply":
        os.remove(path)
    else:
        write_ply(path, raw, [[0, 1, 2]], ascii=True)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data.replace(b" 128 64 32 255\n", b" 128 sixty-four 32 255\n", 1))
    with pytest.raises(ValueError) as error:
        g.scannet_boxes(str(scene_dir), g.CATEGORY_NAMES)
    message = str(error.value)
    assert message.startswith(path + ":") and field in message and "\n" not in message


def test_scannet_to_questions_in_two_commands(tmp_path):
    """README's route: ScanNet's annotations -> boxes.json in SPAR's scene folder (command 1), then questions
    from the scan (command 2); frames named 0, 10, ..., one lost pose, depth at 48 x 40 with its own lens. A
    chair distance is checked against the chair's known place and the camera; the unmapped object is never named."""
    (tmp_path / "scans").mkdir()
    write_scene(tmp_path / "scans")
    chair_raw = to_raw(CHAIR["center"])
    scene = make_scene([make_box(0, "chair", chair_raw, CHAIR["size"], -ANGLE),
                        make_box(1, "other", to_raw(MYSTERY["center"]), MYSTERY["size"], -ANGLE)])
    spar = tmp_path / "spar" / SCENE
    for folder in ("image_color", "image_depth", "intrinsic", "pose"):
        (spar / folder).mkdir(parents=True)
    K, K_depth = g.intrinsics(64, 64, 70), np.array([[30.0, 0, 23.5], [0, 26.0, 19.5], [0, 0, 1]])
    np.savetxt(spar / "intrinsic" / "intrinsic_color.txt", K)
    np.savetxt(spar / "intrinsic" / "intrinsic_depth.txt", K_depth)
    poses = []
    for v in range(6):  # around the chair, 2.2 m away, looking at it
        angle = math.radians(200 + 25 * v)
        eye = chair_raw + np.array([2.2 * math.cos(angle), 2.2 * math.sin(angle), 0.8])
        poses.append(g.look_pose(eye, angle + math.pi, math.radians(-20)))
        g.write_png(str(spar / "image_color" / f"{10 * v}.png"), g.render(scene, K, poses[-1], 64, 64)[0])
        depth = g.render(scene, K_depth, poses[-1], 40, 48)[1]
        g.write_png(str(spar / "image_depth" / f"{10 * v}.png"), np.round(depth * 1000).astype(np.uint16))
        np.savetxt(spar / "pose" / f"{10 * v}.txt", poses[-1] if v != 3 else np.full((4, 4), -np.inf))
    run_generator(tmp_path / "unused", f"--scannet_boxes={tmp_path / 'scans'}", f"--from_scans={tmp_path / 'spar'}")
    assert json.load(open(spar / "boxes.json"))["objects"][0]["category"] == "chair"
    run_generator(tmp_path / "data", f"--from_scans={tmp_path / 'spar'}", "--res=64", "--vocab_size=0",
                  "--qa_per_task=4", "--val_fraction=0", "--numeric_select=0")
    records = [json.loads(line) for line in open(tmp_path / "data" / "qa_train.jsonl")]
    kept = [0, 1, 2, 4, 5]  # frame 30 lost its pose
    distances = [r for r in records if r["task"] == "distance_prediction_oc"]
    assert distances and records
    for record in distances:
        camera = poses[kept[record["image"][0]]][:3, 3]
        assert float(record["answer"]) == pytest.approx(np.linalg.norm(chair_raw - camera), abs=0.006)
    assert not any("other" in r["question"].split() for r in records)


# -----------------------------------------------------------------------------
# the command line: parse_args, which every script uses


@dataclasses.dataclass
class Section:
    dim: int = 64        # width of the model
    dropout: float = 0.0
    freeze: bool = False  # keep the weights fixed


def test_help_lists_every_option_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        g.parse_args(["--scenes=5", "--help"], g.GenConfig(), {"geo": Section()})
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(dataclasses.fields(g.GenConfig)) + 3
    by_option = {line.split()[0]: line for line in lines}
    assert by_option["--out=data/spar"].endswith("output directory")
    assert by_option["--vocab_size=2048"].endswith("BPE vocabulary of tokenizer.json (0: do not train one)")
    assert by_option["--bench=False"].endswith("print renderer frames/s per core and exit")
    assert by_option["--seed=0"] == "  --seed=0"  # no comment, no trailing text
    assert by_option["--geo.dim=64"].endswith("width of the model") and "--geo.dropout=0.0" in by_option
    with pytest.raises(SystemExit) as exit_info:
        g.parse_args(["-h"], Section())
    assert exit_info.value.code == 0 and "keep the weights fixed" in capsys.readouterr().out


def test_dotted_sections_set_their_config_in_place():
    config, geo, vlm = g.GenConfig(), Section(), Section()
    assert g.parse_args(["--res=32", "--geo.dim=96", "--vlm.freeze", "--geo.dropout=0.1"], config,
                        {"geo": geo, "vlm": vlm}) is config
    assert (config.res, geo.dim, geo.dropout, geo.freeze, vlm.dim, vlm.freeze) == (32, 96, 0.1, False, 64, True)
    with pytest.raises(SystemExit, match=r"unknown argument '--lm.dim=3'; options: --out .* --geo\.\* --vlm\.\*$"):
        g.parse_args(["--lm.dim=3"], config, {"geo": geo, "vlm": vlm})
    with pytest.raises(SystemExit, match=r"unknown argument '--geo.depth=3'; options: --geo.dim --geo.dropout --geo.freeze$"):
        g.parse_args(["--geo.depth=3"], config, {"geo": geo})
    with pytest.raises(SystemExit, match=r"^--geo.dim: expected int, got 'x'$"):
        g.parse_args(["--geo.dim=x"], config, {"geo": geo})
    with pytest.raises(SystemExit, match=r"unknown argument '--geo.dim=3'; options: --out "):
        g.parse_args(["--geo.dim=3"], config)  # no sections: a dotted option is unknown


def test_bools_are_strict_and_empty_values_are_refused():
    config = g.GenConfig()
    for text, value in [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)]:
        assert g.parse_args([f"--bench={text}"], config).bench is value
    assert g.parse_args(["--bench"], config).bench is True and g.parse_args(["--preview=1"], config).preview == 1
    for arg, message in [("--bench=ture", "--bench: expected true or false, got 'ture'"),
                         ("--bench=", "--bench: expected true or false, got ''"),
                         ("--res=", "--res: expected int, got nothing"),
                         ("--numeric_select=", "--numeric_select: expected float, got nothing"),
                         ("--res=3.5", "--res: expected int, got '3.5'"),
                         ("--nope=1", "unknown argument '--nope=1'; options: --out --scenes"),
                         ("res=3", "unknown argument 'res=3'; options: --out --scenes")]:
        with pytest.raises(SystemExit) as exit_info:
            g.parse_args([arg], g.GenConfig())
        assert str(exit_info.value).startswith(message), (arg, str(exit_info.value))
    assert g.parse_args(["--from_scans="], config).from_scans == ""  # an empty str is a value
    assert g.parse_args(["--from-scans=x"], config).from_scans == "x"  # dashes or underscores


def test_generate_spar_is_the_ground_floor(tmp_path):
    """It imports no other project file, even when it trains the tokenizer."""
    project = ["data", "model", "train", "vlm", "psfm", "eval", "bench"]
    script = (f"import sys, generate_spar as g\n"
              f"loaded = [m for m in {project} if m in sys.modules]\n"
              f"g.generate(g.GenConfig(out={str(tmp_path)!r}, scenes=1, val_scenes=0, views=3, random_views=1, "
              f"res=16, vocab_size=300))\n"
              f"print(loaded, [m for m in {project} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.splitlines()[-1] == "[] []"
    assert (tmp_path / "tokenizer.json").exists() and g.SPECIAL_TOKENS[0] == "<|pad|>"
