"""Tests for data.py: validated loading (every malformed input names its file and field), the two datasets,
and the tokenizer."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import data
import generate_spar as g
import train
from model import GeoBackbone, GeoConfig


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    config = g.GenConfig(out=str(out), scenes=3, val_scenes=1, views=6, random_views=2, res=48, seed=1,
                         vocab_size=400, qa_per_task=2)
    g.generate(config)
    return out


def copy_of(dataset_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(dataset_dir, target)
    return target


# -----------------------------------------------------------------------------
# QA records


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def good_record(**changes):
    record = {"id": "q0", "scene": "scene00000", "task": "depth_prediction_oc", "level": "low", "format_type": "fill",
              "img_type": "single_view", "image": [0], "question": "How deep?", "answer": "2.30"}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


@pytest.mark.parametrize("row, field", [
    ('{"id": "q0", "scene": ', "not valid JSON"),
    (good_record(answer=None), "field 'answer'"),
    (good_record(question=3), "field 'question'"),
    (good_record(format_type="essay"), "field 'format_type'"),
    (good_record(image="0"), "field 'image'"),
    (good_record(format_type="select"), "field 'options'"),
    (good_record(format_type="select", options=["A. x", "B. y"], answer="C"), "field 'answer'"),
    (good_record(markers=[{"image": 3, "point": [1, 2]}]), "field 'markers.image'"),
    ("[1, 2]", "JSON object"),
])
def test_malformed_qa_line_names_file_line_and_field(tmp_path, row, field):
    path = write_lines(tmp_path / "qa.jsonl", [good_record(id="first"), row])
    with pytest.raises(ValueError) as error:
        data.load_qa_jsonl(path)
    assert str(error.value).startswith(f"{path}:2:") and field in str(error.value)
    assert "\n" not in str(error.value)


def test_duplicate_ids_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [good_record(), "", good_record()])
    with pytest.raises(ValueError, match=r"qa.jsonl:3: field 'id'"):
        data.load_qa_jsonl(path)
    with pytest.raises(ValueError, match="nope.jsonl: file not found"):
        data.load_qa_jsonl(str(tmp_path / "nope.jsonl"))


def test_generated_records_pass_validation(dataset_dir):
    records = data.load_qa_jsonl(str(dataset_dir / "qa_train.jsonl"))
    assert len(records) > 50 and {r["scene"] for r in records} == set(data.scene_ids(dataset_dir, "train"))


# -----------------------------------------------------------------------------
# scenes


def rewrite_scene(directory, **changes):
    """Rewrite scene00000's tensors with some replaced (None removes one)."""
    path = str(directory / "scenes" / "scene00000.safetensors")
    arrays = dict(g.read_safetensors(path))
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    g.write_atomic(path, g.safetensors_bytes(arrays))
    return path


def test_scene_errors_name_the_file_and_the_tensor(dataset_dir, tmp_path):
    copy = copy_of(dataset_dir, tmp_path)
    scene = data.load_scene(str(copy / "scenes" / "scene00000"))
    pose = scene["pose"].copy()
    pose[2, 0, 3] = np.nan
    path = rewrite_scene(copy, pose=pose)
    with pytest.raises(ValueError, match=f"{path}: tensor 'pose' holds non-finite"):
        data.load_scene(path)
    path = rewrite_scene(copy, pose=scene["pose"], depth=np.zeros((2, 48, 48), np.float16))
    with pytest.raises(ValueError, match=r"tensor 'depth' has shape \(2, 48, 48\), expected \(6, 48, 48\)"):
        data.load_scene(path)
    path = rewrite_scene(copy, depth=None)
    with pytest.raises(ValueError, match="tensor 'depth' is missing"):
        data.load_scene(path)
    path = rewrite_scene(copy, depth=scene["depth"].astype(np.float16), K=np.zeros((6, 3, 3), np.float64).astype(np.float16))
    with pytest.raises(ValueError, match="tensor 'K' must be float32"):
        data.load_scene(path)
    (copy / "scenes" / "scene00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="scene00000.safetensors: unreadable"):
        data.load_scene(str(copy / "scenes" / "scene00000"))
    os.remove(copy / "scenes" / "scene00001.safetensors")
    with pytest.raises(ValueError, match="scene00001.safetensors: scene file not found"):
        data.load_scene(str(copy / "scenes" / "scene00001"))
    meta = json.load(open(copy / "scenes" / "scene00002.json"))
    meta["video_frames"] = 99
    json.dump(meta, open(copy / "scenes" / "scene00002.json", "w"))
    with pytest.raises(ValueError, match=r"scene00002.json: field 'video_frames'"):
        data.load_scene(str(copy / "scenes" / "scene00002"))


def test_missing_scene_is_reported_with_the_qa_record(dataset_dir, tmp_path):
    copy = copy_of(dataset_dir, tmp_path)
    os.remove(copy / "scenes" / "scene00000.safetensors")
    dataset = data.QADataset(str(copy), "train")
    index = next(i for i, r in enumerate(dataset.records) if r["scene"] == "scene00000")
    with pytest.raises(ValueError, match=r"qa_train.jsonl: record .* \(field 'scene' / 'image'\): .*scene file not found"):
        dataset[index]


def test_semantic_map_by_hand():
    objects = [{"category": "bed"}, {"category": "unknown thing"}, {"category": "chair"}]
    instance = np.array([[-1, -2, -3, -4], [0, 1, 2, 0]], dtype=np.int16)
    expected = [[0, 1, 2, -1], [3 + g.CATEGORY_NAMES.index("bed"), -1, 3 + g.CATEGORY_NAMES.index("chair"),
                                3 + g.CATEGORY_NAMES.index("bed")]]
    assert data.semantic_map(instance, objects).tolist() == expected
    assert data.SEMANTIC_CLASSES[0] == "floor" and len(data.SEMANTIC_CLASSES) == 27


# -----------------------------------------------------------------------------
# datasets


def test_scene_views_dataset_shapes_and_determinism(dataset_dir):
    dataset = data.SceneViewsDataset(str(dataset_dir), "train", num_views=4, seed=3)
    assert len(dataset) == 3
    item = dataset[1]
    assert item["images"].shape == (4, 3, 48, 48) and item["images"].dtype == torch.uint8  # widened on the device
    assert item["depth"].shape == (4, 48, 48) and item["semantic"].shape == (4, 48, 48)
    assert item["K"].shape == (4, 3, 3) and item["pose"].shape == (4, 4, 4)
    assert len(set(item["views"].tolist())) == 4
    scene = data.load_scene(str(dataset_dir / "scenes" / item["scene"]))
    v = int(item["views"][2])  # the tensors are that view's, unaltered
    assert torch.equal(item["images"][2], torch.from_numpy(scene["rgb"][v]).permute(2, 0, 1))
    assert torch.equal(item["semantic"][2].long(), torch.from_numpy(data.semantic_map(scene["instance"][v],
                                                                                      scene["meta"]["objects"])))
    assert torch.equal(item["pose"][2], torch.from_numpy(scene["pose"][v]))
    again = data.SceneViewsDataset(str(dataset_dir), "train", num_views=4, seed=3)[1]
    assert torch.equal(again["views"], item["views"])
    dataset.set_epoch(1)
    assert not all(torch.equal(dataset[i]["views"], again_i["views"]) for i, again_i in
                   enumerate(data.SceneViewsDataset(str(dataset_dir), "train", num_views=4, seed=3)))
    batch = data.collate_views([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 4, 3, 48, 48) and batch["semantic"].dtype == torch.int16
    ready = train.to_device(batch, torch.device("cpu"))  # as the models take it
    assert ready["images"].dtype == torch.float32 and ready["semantic"].dtype == torch.int64
    assert batch["depth"].dtype == torch.float16 and ready["depth"].dtype == torch.float32
    assert torch.equal(ready["images"], batch["images"].float() / 255) and torch.equal(ready["semantic"], batch["semantic"].long())
    with pytest.raises(ValueError, match="images must be floats in"):  # a compact batch is refused, not misread
        GeoBackbone(GeoConfig.tiny()).aggregate(batch["images"])


def test_resizing_scales_the_intrinsics(dataset_dir):
    full = data.SceneViewsDataset(str(dataset_dir), "val", num_views=2, seed=0)[0]
    half = data.SceneViewsDataset(str(dataset_dir), "val", num_views=2, seed=0, res=24)[0]
    assert half["images"].shape == (2, 3, 24, 24)
    assert torch.allclose(half["K"][:, :2], full["K"][:, :2] / 2)
    # area resizing = mean of 2x2 blocks, rounded back to uint8
    block_means = torch.nn.functional.avg_pool2d(full["images"][0].float(), 2)
    assert half["images"].dtype == torch.uint8 and torch.equal(half["images"][0], block_means.round().to(torch.uint8))


def test_resized_semantics_line_up_with_the_scaled_intrinsics():
    """Down-sampled labels must sit under the rays of the scaled K: compare with a direct render at the small size."""
    rng = np.random.default_rng(2)
    scene = g.sample_scene(rng, "s")
    K, poses = g.sample_cameras(rng, scene, 3, 1, 64)
    instance = np.stack([g.render(scene, K[v], poses[v], 64, 64)[2] for v in range(len(poses))])
    semantic = torch.from_numpy(data.semantic_map(instance, scene["objects"]))
    images, depth = torch.zeros(len(poses), 3, 64, 64), torch.ones(len(poses), 64, 64)
    _, _, small, K_small = data.resize_views(images, depth, semantic, torch.from_numpy(K).float(), 16)
    direct = np.stack([g.render(scene, K_small[v].numpy(), poses[v], 16, 16)[2] for v in range(len(poses))])
    mismatch = (small.numpy() != data.semantic_map(direct, scene["objects"])).mean()
    assert mismatch < 0.05, mismatch  # corner sampling ("nearest") mismatches about 9 %


def test_qa_dataset_draws_markers_on_the_marked_images(dataset_dir):
    dataset = data.QADataset(str(dataset_dir), "train")
    plain = data.QADataset(str(dataset_dir), "train", markers=False)
    index = next(i for i, r in enumerate(dataset.records) if r.get("markers") and r["img_type"] == "multi_view")
    item, bare = dataset[index], plain[index]
    assert item["images"].shape[0] == len(item["record"]["image"])
    assert item["answer"] == item["record"]["answer"] and item["question"] == item["record"]["question"]
    for slot in range(item["images"].shape[0]):
        marked = any(m["image"] == slot for m in item["record"]["markers"])
        assert marked == (not torch.equal(item["images"][slot], bare["images"][slot]))


def test_views_are_read_alone_and_equal_a_whole_scene_read(dataset_dir):
    """SceneViewsDataset reads a sample's views through safetensors slices: the same tensors as indexing a whole
    load_scene, with only those views' image bytes in hand."""
    dataset = data.SceneViewsDataset(str(dataset_dir), "train", num_views=2, view_sampling="near")
    for i in range(6):
        item = dataset[i]
        whole = data.load_scene(os.path.join(dataset.scene_dir, item["scene"]))
        v = item["views"].numpy()
        assert torch.equal(item["images"], torch.from_numpy(whole["rgb"][v]).permute(0, 3, 1, 2))
        assert item["depth"].dtype == torch.float16 and torch.equal(item["depth"].float(), torch.from_numpy(whole["depth"][v]))
        assert torch.equal(item["pose"], torch.from_numpy(whole["pose"][v])) and torch.equal(item["K"], torch.from_numpy(whole["K"][v]))
        semantic = data.semantic_map(whole["instance"][v], whole["meta"]["objects"])
        assert torch.equal(item["semantic"], torch.from_numpy(semantic))
    read = data.read_views(os.path.join(dataset.scene_dir, item["scene"]), [1, 3], whole["meta"])
    images = sum(read[k].nbytes for k in ("rgb", "instance")) + 2 * read["depth"].size  # depth is float16 on disk
    on_disk = sum(whole[k].nbytes for k in ("rgb", "instance")) + 2 * whole["depth"].size
    assert images == on_disk * 2 // len(whole["rgb"])


def test_a_questions_frames_are_read_alone_and_equal_a_whole_scene_read(dataset_dir):
    """SceneStore (stage vlm, eval) reads the frames a question shows through the same slices."""
    store = data.SceneStore(str(dataset_dir))
    whole = data.load_scene(str(dataset_dir / "scenes" / "scene00000"))
    frames = store.frames("scene00000", [3, 0, 3])  # any order, repeats allowed
    assert torch.equal(frames, data.as_images(whole["rgb"][[3, 0, 3]]))
    assert torch.equal(store.frames("scene00000", [1], res=24), data.as_images(whole["rgb"][[1]], 24))
    with pytest.raises(ValueError, match="scene00000.safetensors: frame 99 out of range"):
        store.frames("scene00000", [0, 99])
    questions = data.QADataset(str(dataset_dir), "train", res=24)  # resized: both sides round to the same 8 bits
    assert torch.equal(questions[0]["images"], store.record_frames(questions.records[0], 24))


def test_spar7m_export_reads_back_as_the_same_training_items(dataset_dir, tmp_path):
    """generate_spar's SPAR-7M layout (PNG frames, markers drawn into copies) read by data.py: the same prompts,
    answers and images, to the bit, as the records and scenes they came from; the lines in SPAR-7M's fields."""
    out = tmp_path / "set"
    shutil.copytree(dataset_dir, out)
    records = {split: data.load_qa_jsonl(str(out / f"qa_{split}.jsonl")) for split in ("train", "val")}
    g.write_spar7m(str(out), records)
    line = json.loads(open(out / "spar7m" / "qa_train.jsonl").readline())
    assert set(line) == {"id", "type", "image", "conversations"}
    assert [turn["from"] for turn in line["conversations"]] == ["human", "gpt"]
    assert all((out / "spar7m" / "images" / path).is_file() for path in line["image"])
    assert (out / "spar7m" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    for split in ("train", "val"):
        ours, theirs = data.QADataset(str(out), split, res=32), data.QADataset(str(out / "spar7m"), split, res=32)
        assert len(ours) == len(theirs) == len(records[split])
        for index in range(len(ours)):
            a, b = ours[index], theirs[index]
            assert (a["id"], a["task"], a["question"], a["answer"]) == (b["id"], b["task"], b["question"], b["answer"])
            assert a["question"] == g.prompt(records[split][index])  # VSI questions assembled, as lmms-eval does
            assert torch.equal(a["images"], b["images"]), a["id"]


def test_spar7m_rows_keep_their_markers_turn_order_and_words(tmp_path):
    row = {"id": "scene0261_00_16", "type": "depth_prediction_oc_mv",
           "image": ["scene0261_00/image_color/1.jpg", "scene0261_00/image_color/2.jpg"],
           "conversations": [{"from": "human", "value": "<image>\n<image>\nThe towel (red point) in this<image>view?"},
                             {"from": "gpt", "value": "1.5"}],
           "red_point": [[553, 397]], "blue_point": [[641, 838]], "point_img_idx": [[1, 0]],
           "green_bbox": [[100, 200, 300, 400]]}
    record = data.from_conversations(row, "f:1", "/root")
    assert record["prompt"] == "The towel (red point) in this view?" and record["scene"] == "scene0261_00"
    assert record["markers"] == [{"image": 1, "color": "red", "point": [553, 397]},
                                 {"image": 0, "color": "blue", "point": [641, 838]},
                                 {"image": 0, "color": "green", "box": [100, 200, 300, 400], "point": [200.0, 300.0]}]
    swapped = {**row, "conversations": row["conversations"][::-1]}
    with pytest.raises(ValueError, match="^f:1: field 'conversations': expected a human turn, then a gpt turn"):
        data.from_conversations(swapped, "f:1", "/root")
    with pytest.raises(ValueError, match="^f:1: field 'markers.point'"):
        data.from_conversations({**row, "red_point": [[553, 1397]]}, "f:1", "/root")


def test_image_files_of_16_bit_png_are_scaled_to_8_bits(tmp_path):
    gray = np.array([[0, 65535], [32768, 65535]], dtype=np.uint16)
    g.write_png(str(tmp_path / "d.png"), gray)
    images = data.as_images(data.read_image_file(str(tmp_path / "d.png"))[None])
    assert images.shape == (1, 3, 2, 2) and images.dtype == torch.uint8
    assert images[0, :, 0].tolist() == [[0, 255]] * 3 and images[0, 0, 1, 0] == 127


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_special_tokens_and_determinism(dataset_dir, tmp_path):
    tokenizer = data.load_tokenizer(str(dataset_dir / "tokenizer.json"))
    for token_id, token in enumerate(data.SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id
    text = "<|user|><image>How far is the chair at the red point (412, 530)?<|end|><|assistant|>2.35<|end|>"
    ids = tokenizer.encode(text).ids
    assert ids.count(tokenizer.token_to_id("<image>")) == 1 and ids.count(4) == 2
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    texts = [r["question"] for r in data.load_qa_jsonl(str(dataset_dir / "qa_train.jsonl"))]
    g.train_tokenizer(texts, str(tmp_path / "a.json"), 400)
    g.train_tokenizer(texts, str(tmp_path / "b.json"), 400)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.json: tokenizer file not found"):
        data.load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: unreadable tokenizer"):
        data.load_tokenizer(str(tmp_path / "bad.json"))
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.BPE())
    plain.add_special_tokens(["<|pad|>"])
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match=r"plain.json: special token '<\|system\|>'"):
        data.load_tokenizer(str(tmp_path / "plain.json"))


def test_oracle_tokens_hand_worked_scene():
    """Image 0 looks along world +x from (1, 2, 1.5), image 1 along +y from (1, 3, 1.5): in image 0's camera
    (x right = world -y, y down = world -z, z forward = world +x) image 1 stands at (-1, 0, 0) looking along
    (-1, 0, 0), and a chair at world (3, 2, 1.5) sits 2 m straight ahead."""
    poses = np.stack([g.look_pose(np.array([1, 2, 1.5]), 0.0, 0.0), g.look_pose(np.array([1, 3, 1.5]), math.pi / 2, 0.0)])
    meta = {"room": {"size": [4, 5, 2.5], "floor_area": 20.0},
            "objects": [{"category": "table", "center": [2, 4, 0.4], "size": [1, 1, 0.8]},
                        {"category": "chair", "center": [3, 2, 1.5], "size": [0.5, 0.5, 0.9]},
                        {"category": "thing", "center": [0, 0, 0], "size": [1, 1, 1]}]}
    record = {"image": [0, 1], "markers": [{"image": 0, "object": 1, "point": [500, 500]}]}
    tokens = data.oracle_tokens(meta, poses.astype(np.float32), record).numpy()
    assert tokens.shape == (1 + data.ORACLE_CAMERAS + data.ORACLE_OBJECTS, data.ORACLE_DIM)
    assert tokens[0, :3].tolist() == [1, 0, 0] and tokens[0, 6:10].tolist() == pytest.approx([4, 5, 2.5, 2.0])
    camera0, camera1 = tokens[1], tokens[2]
    assert camera0[3:6].tolist() == pytest.approx([0, 0, 0], abs=1e-6) and camera0[6:9].tolist() == pytest.approx([0, 0, 1])
    assert camera1[3:6].tolist() == pytest.approx([-1, 0, 0], abs=1e-6)
    assert camera1[6:9].tolist() == pytest.approx([-1, 0, 0], abs=1e-6) and camera1[9] == pytest.approx(1 / 8)
    assert not tokens[3:1 + data.ORACLE_CAMERAS].any()  # unused camera rows stay zero
    table, chair, thing = tokens[1 + data.ORACLE_CAMERAS:4 + data.ORACLE_CAMERAS]
    assert chair[:3].tolist() == [0, 0, 1] and chair[3:6].tolist() == pytest.approx([0, 0, 2], abs=1e-6)
    assert table[3:6].tolist() == pytest.approx([-2, 1.1, 1], abs=1e-6)  # 2 m left, 1.1 m below the eye, 1 m ahead
    assert chair[10] == 1 and table[10] == 0  # 1 + the index of the marker on it
    assert chair[11 + g.CATEGORY_NAMES.index("chair")] == 1 and chair[11:].sum() == 1
    assert thing[11:].sum() == 0 and thing[2] == 1  # an unknown category: an object with no class


def test_near_sampling_takes_views_close_to_view_0(dataset_dir):
    dataset = data.SceneViewsDataset(str(dataset_dir), "train", num_views=3, seed=0, view_sampling="near")
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            views = dataset[i]["views"].tolist()
            pose = data.load_scene(os.path.join(dataset.scene_dir, dataset.ids[i]))["pose"].astype(np.float64)
            gaps = []  # camera distance + angle between the optical axes, by a plain loop
            for v in range(len(pose)):
                cos = float(np.dot(pose[v, :3, 2], pose[views[0], :3, 2]))
                gaps.append(math.dist(pose[v, :3, 3], pose[views[0], :3, 3]) + math.acos(max(-1.0, min(1.0, cos))))
            rank = sorted(range(len(pose)), key=lambda v: gaps[v])
            assert len(set(views)) == 3 and rank[0] == views[0]
            assert all(rank.index(v) <= 4 for v in views[1:])  # among the 2 (V - 1) = 4 nearest
