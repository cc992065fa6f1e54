"""Tests for vlm.py: the decoder LM (causality, padding, KV cache), visual tokens, the Spa3R adapter,
the chat template and its targets, batching, checkpoints, Llama loading, FLOPs, and overfitting 8 QA pairs."""
import json
import math
import os
import tempfile
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

import vlm
from generate_spar import train_tokenizer
from test_model import count_flops, watched_sdpa
from vlm import (IGNORE, LM, LMConfig, SpaVLM, VLMConfig, chat_tokens, collate, flops_per_sample, load_for_eval,
                 load_llama, pixel_shuffle, prompt_batch, rotary, apply_rotary)

# Eight QA pairs: the first four ask the same question, so only the images tell their answers apart.
QA = [("How far is the chair from the camera of image 1? Answer with a number in metres.", "1.25", 1),
      ("How far is the chair from the camera of image 1? Answer with a number in metres.", "3.4", 2),
      ("How far is the chair from the camera of image 1? Answer with a number in metres.", "0.87", 1),
      ("How far is the chair from the camera of image 1? Answer with a number in metres.", "2.1", 3),
      ("How did the camera move between image 1 and image 2? A. left B. right C. forward D. back", "C", 2),
      ("The camera moved from image 1 to image 2. Give right, forward (m) and yaw (deg).", "0.52, 1.20, -30", 2),
      ("How many chair(s) can be seen in this video of a room?", "4", 3),
      ("Which point in image 2 shows the same object as the red point? A. (120, 455) B. (870, 300)", "B", 2)]


def make_tokenizer():
    """data.py's byte-level BPE (special tokens at ids 0..6), trained on the test's own text."""
    with tempfile.TemporaryDirectory() as tmp:
        return train_tokenizer([vlm.SYSTEM_PROMPT] + [q + " " + a for q, a, _ in QA] * 4,
                               os.path.join(tmp, "tokenizer.json"), vocab_size=400)


TOKENIZER = make_tokenizer()


def tiny_config(**overrides):
    return VLMConfig.tiny(lm=LMConfig(vocab_size=TOKENIZER.get_vocab_size()), **overrides)


def tiny_vlm(seed=0, **overrides):
    torch.manual_seed(seed)
    return SpaVLM(tiny_config(**overrides), TOKENIZER)


def qa_items(seed=0, pairs=QA):
    g = torch.Generator().manual_seed(seed)
    return [{"id": f"q{i}", "task": "t", "images": torch.rand(n, 3, 32, 32, generator=g), "question": q, "answer": a}
            for i, (q, a, n) in enumerate(pairs)]


def sharpen(module, seed=0):
    """Every matrix ~ N(0, 4 / fan_in): sharp attention and varied greedy outputs. At the real init (std 0.02,
    tied head) a random LM just repeats its last token, which no position or cache bug could change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.copy_(2 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return module


def tiny_lm(seed=0, vocab_size=50, **overrides):
    torch.manual_seed(seed)
    return sharpen(LM(LMConfig(vocab_size=vocab_size, **overrides)), seed)


# ----------------------------------------------------------------------------- the decoder LM

def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    pos = torch.tensor([[0, 3, 4, 9, 10, 20]])

    def scores(p):
        cos, sin = rotary(p, 16, 10000.0)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).mT

    assert torch.allclose(scores(pos), scores(pos + 7), atol=1e-4)
    assert not torch.allclose(scores(pos), scores(pos * 2), atol=1e-2)
    cos, sin = rotary(torch.zeros(1, 6, dtype=torch.long), 16, 10000.0)
    assert torch.equal(apply_rotary(q, cos, sin), q)  # position 0 is left as it is


def test_the_lm_looks_its_rotations_up_in_a_table_that_checkpoints_leave_out():
    lm = tiny_lm()
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 5, 1023]])  # left padding repeats position 0; the last slot
    cos, sin = rotary(positions, lm.config.dim // lm.config.n_heads, lm.config.rope_theta)
    assert torch.equal(lm.rope_cos[positions][:, None], cos) and torch.equal(lm.rope_sin[positions][:, None], sin)
    assert len(lm.rope_cos) == lm.config.max_seq_len
    assert not any(key.startswith("rope_") for key in lm.state_dict())  # checkpoints and load_llama unchanged


def test_changing_a_later_token_never_changes_earlier_logits():
    lm = tiny_lm()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % 50
    valid = torch.ones(2, 12, dtype=torch.bool)
    for v in (None, valid):  # the is_causal path (training) and the explicit-mask path (prompts)
        a, b = lm(lm.embed_tokens(ids), v), lm(lm.embed_tokens(changed), v)
        assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
        assert (a[:, 7:] - b[:, 7:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


def test_left_padding_changes_no_real_logit():
    lm = tiny_lm()
    g = torch.Generator().manual_seed(2)
    short, long = torch.randint(0, 50, (5,), generator=g), torch.randint(0, 50, (9,), generator=g)
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 4:], ids[1] = short, long
    valid = ids.new_ones(2, 9, dtype=torch.bool)
    valid[0, :4] = False
    batched = lm(lm.embed_tokens(ids), valid)
    assert torch.allclose(batched[0, 4:], lm(lm.embed_tokens(short[None]))[0], atol=1e-5)
    assert torch.allclose(batched[1], lm(lm.embed_tokens(long[None]))[0], atol=1e-5)


def left_padded_prompts(lm, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, lm.config.vocab_size, (len(lengths), T), generator=g)
    valid = torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]
    return lm.embed_tokens(ids).detach(), valid


def test_kv_cache_generation_equals_recomputing_every_step():
    lm = tiny_lm(n_kv_heads=1)  # 4 query heads share one key/value head
    x, valid = left_padded_prompts(lm, [3, 8, 5])
    cached = lm.generate(x, valid, 16, stop_id=-1)
    recomputed = lm.generate(x, valid, 16, stop_id=-1, use_cache=False)
    assert cached == recomputed and all(len(row) == 16 and len(set(row)) > 4 for row in cached)
    for i in range(3):  # and each row is what the prompt alone, unpadded, gives
        alone = lm.generate(x[i:i + 1, valid[i]], valid[i:i + 1, valid[i]], 16, stop_id=-1)
        assert alone[0] == cached[i]


def test_generation_stops_at_the_stop_token_and_caps_length():
    lm = tiny_lm()
    x, valid = left_padded_prompts(lm, [4, 6])
    free = lm.generate(x, valid, 10, stop_id=-1)
    stop = free[0][3]  # row 0's fourth token: row 0 must stop right before it
    out = lm.generate(x, valid, 10, stop_id=stop)
    assert out[0] == free[0][:free[0].index(stop)]
    assert out[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
    assert [len(r) for r in lm.generate(x, valid, 3, stop_id=-1)] == [3, 3]


def test_reference_presets_are_the_stated_sizes():
    with torch.device("meta"):
        lm = LM(LMConfig.reference())
    blocks = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed"))
    assert 105e6 < blocks < 107e6 and lm.embed_tokens.weight.numel() == 2048 * 576  # SmolLM-135M's shape
    assert vlm.tokens_per_image(VLMConfig.reference(), 224, 224) == 64


# ----------------------------------------------------------------------------- visual tokens and the adapter

def test_pixel_shuffle_joins_each_2x2_block_of_neighbours():
    grid = torch.arange(24.0).view(1, 24, 1)  # a 4 x 6 grid of 1-channel patches, row-major
    out = pixel_shuffle(grid, (4, 6), 2)[0]
    assert out.shape == (6, 4)
    assert out[0].tolist() == [0, 1, 6, 7] and out[1].tolist() == [2, 3, 8, 9] and out[3].tolist() == [12, 13, 18, 19]


def shared_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("adapter.", "spa3r."))}


def test_spa3r_none_removes_the_branch_and_nothing_else():
    spa3, base = tiny_vlm(), tiny_vlm(spa3r="none")
    assert base.adapter is None and base.spa3r is None
    assert set(base.state_dict()) == set(shared_state(spa3))
    assert all(torch.equal(v, spa3.state_dict()[k]) for k, v in base.state_dict().items())  # same seed, same start


LRS = {"lm": 1e-3, "vision": 1e-3, "projector": 1e-3, "adapter": 1e-3, "spa3r": 1e-3}


def test_zero_init_adapter_starts_as_the_baseline_and_only_it_learns():
    spa3, base = tiny_vlm(), tiny_vlm(spa3r="none")
    batch = collate(qa_items()[:3], TOKENIZER, spa3.config)
    assert torch.equal(spa3.logits(batch), base.logits(batch))  # the adapter adds exactly zero
    frozen = {k: v.clone() for k, v in spa3.spa3r.state_dict().items()}
    opt = torch.optim.AdamW(spa3.param_groups(LRS, 0.1))
    spa3(batch)[0].backward()
    assert spa3.adapter.bottleneck.fc2.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in spa3.spa3r.parameters())
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(v, frozen[k]) for k, v in spa3.spa3r.state_dict().items())
    x, latent = torch.randn(3, 4, 64), torch.randn(2, 16, 64)
    assert not torch.allclose(spa3.adapter(x, latent, torch.tensor([1, 2])), x)  # the spatial branch is live now
    spa3(batch)[0].backward()  # and the latent reaches the loss: its projector gets gradient from step 2
    assert spa3.adapter.latent_proj.fc1.weight.grad.abs().sum() > 0


def test_each_record_reads_its_own_images_and_latent():
    model = tiny_vlm()
    torch.nn.init.normal_(model.adapter.bottleneck.fc2.weight, std=0.5)  # make the branch matter
    items = qa_items()[:4]  # 1, 2, 1, 3 images
    batch = collate(items, TOKENIZER, model.config)
    latent = model.spatial_latent(batch["images"], batch["num_images"])
    vis = model.visual_tokens(batch["images"], batch["num_images"], latent).split(batch["num_images"].tolist())
    for i, item in enumerate(items):
        alone = model.spa3r.encode(item["images"][None])[0]
        assert torch.allclose(latent[i], alone, atol=1e-5)
        one = torch.tensor([len(item["images"])])
        assert torch.allclose(vis[i], model.visual_tokens(item["images"], one, alone[None]), atol=1e-5)
    plain = model.projector(model.vision(items[0]["images"])[:, 2:], (4, 4))  # record 0 before the adapter
    assert not torch.allclose(vis[0], model.adapter(plain, latent[3:], torch.tensor([1])), atol=1e-3)  # latent matters


# ----------------------------------------------------------------------------- template, targets, loss

def test_template_and_targets_hand_built_conversation():
    enc = lambda text: TOKENIZER.encode(text, add_special_tokens=False).ids  # noqa: E731
    ids, _ = chat_tokens(TOKENIZER, "How far?", 2, 4, "2.5")
    # contract ids: 0 pad, 1 system, 2 user, 3 assistant, 4 end, 5 image
    prompt = [1] + enc(vlm.SYSTEM_PROMPT) + [4, 2] + [5] * 8 + enc("How far?") + [4, 3]
    answer = enc("2.5") + [4]
    assert ids == prompt + answer
    item = {"id": "a", "images": torch.rand(2, 3, 32, 32), "question": "How far?", "answer": "2.5"}
    batch = collate([item], TOKENIZER, tiny_config())
    targets = batch["targets"][0].tolist()
    expected = [IGNORE] * (len(prompt) - 1) + answer + [IGNORE]  # position t predicts token t + 1
    assert targets == expected and sum(t != IGNORE for t in targets) == len(answer)
    model = tiny_vlm()
    logp = model.logits(batch)[0].log_softmax(-1)
    by_hand = -torch.stack([logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(answer)]).mean()
    assert torch.allclose(model(batch)[0], by_hand, atol=1e-5)


def test_padding_is_ignored_by_the_loss():
    model = tiny_vlm()
    items = qa_items()[4:6]
    batch = collate(items, TOKENIZER, model.config)
    pad = TOKENIZER.token_to_id("<|pad|>")
    lengths = [len(chat_tokens(TOKENIZER, it["question"], len(it["images"]), 4, it["answer"])[0]) for it in items]
    assert lengths[0] != lengths[1]
    short = lengths.index(min(lengths))
    assert (batch["input_ids"][short, min(lengths):] == pad).all() and (batch["targets"][short, min(lengths):] == IGNORE).all()
    singles = [collate([it], TOKENIZER, model.config) for it in items]
    counts = [int((b["targets"] != IGNORE).sum()) for b in singles]
    losses = [model(b)[0] for b in singles]
    weighted = sum(l * n for l, n in zip(losses, counts)) / sum(counts)  # the batch mean is over answer tokens
    assert torch.allclose(model(batch)[0], weighted, atol=1e-5)


def test_batched_kv_cache_answers_match_recompute_and_each_record_alone():
    model = tiny_vlm()
    torch.nn.init.normal_(model.adapter.bottleneck.fc2.weight, std=0.5)
    items = qa_items()[3:7]  # 3, 2, 2, 3 images; prompts of different lengths
    batch = prompt_batch([it["question"] for it in items], [it["images"] for it in items], TOKENIZER, model.config)
    assert not batch["valid"].all()
    sharpen(model.lm)
    cached = model.generate(batch, 12)
    assert cached == model.generate(batch, 12, use_cache=False)
    assert sum(len(set(r)) for r in cached) >= 12, cached  # varied answers, not one repeated token
    for i, it in enumerate(items):
        alone = prompt_batch([it["question"]], [it["images"]], TOKENIZER, model.config)
        assert model.generate(alone, 12) == [cached[i]]


def test_bad_inputs_name_the_field():
    model = tiny_vlm()
    items = qa_items()[:2]
    batch = collate(items, TOKENIZER, model.config)
    batch["input_ids"][1, batch["input_ids"][1].tolist().index(5)] = 7  # one <image> slot lost
    with pytest.raises(RuntimeError, match=r"batch\['input_ids'\] has a row whose <image> slots differ from its "
                                           r"images' visual tokens \(4 each\)"):
        model.logits(batch)
    with pytest.raises(ValueError, match="record 'q0' field 'question'.*<image>"):
        collate([{**items[0], "question": "What is in <image>?"}], TOKENIZER, model.config)
    with pytest.raises(ValueError, match="record 'q1' field 'images'"):
        collate([items[0], {**items[1], "images": torch.rand(1, 3, 64, 64)}], TOKENIZER, model.config)
    with pytest.raises(ValueError, match="field 'images' mixes uint8 and float images"):
        collate([items[0], {**items[1], "images": (items[1]["images"] * 255).to(torch.uint8)}], TOKENIZER, model.config)
    with pytest.raises(ValueError, match="multiples of patch_size x pixel_shuffle = 16"):
        collate([{**items[0], "images": torch.rand(1, 3, 40, 40)}], TOKENIZER, model.config)
    with pytest.raises(ValueError, match="tokenizer has 400 tokens, LMConfig.vocab_size is 300"):
        SpaVLM(VLMConfig.tiny(lm=LMConfig(vocab_size=300)), TOKENIZER)
    plain = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="lacks the special token"):
        SpaVLM(tiny_config(), plain)
    with pytest.raises(ValueError, match="spa3r must be 'psfm', 'none' or 'oracle'"):
        tiny_config(spa3r="vggt")
    with pytest.raises(ValueError, match="max_seq_len 40"):
        collate(items[:1], TOKENIZER, VLMConfig.tiny(lm=LMConfig(vocab_size=TOKENIZER.get_vocab_size(), max_seq_len=40)))


def test_param_groups_hold_every_trainable_weight_once():
    model = tiny_vlm()
    groups = model.param_groups(LRS, 0.1)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert {g["name"].split("/")[0] for g in groups} == {"lm", "projector", "adapter"}  # Spa3R and vision frozen
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("/no_decay"))
    with pytest.raises(ValueError, match="learning rate for 'adapter'"):
        model.param_groups({k: v for k, v in LRS.items() if k != "adapter"})
    tuned = tiny_vlm(freeze_spa3r=False)
    spa3r = [p for g in tuned.param_groups(LRS) if g["name"].startswith("spa3r") for p in g["params"]]
    assert {id(p) for p in spa3r} == {id(p) for p in tuned.spa3r.encoder.parameters()}  # backbone stays frozen
    seeing = tiny_vlm(freeze_vision=False)
    vision = [p for g in seeing.param_groups(LRS) if g["name"].startswith("vision") for p in g["params"]]
    assert {id(p) for p in vision} == {id(p) for p in seeing.vision.parameters()}


def test_bf16_autocast_feeds_attention_one_dtype_and_generates():
    model = tiny_vlm()
    items = qa_items()[:3]
    prompts = prompt_batch([it["question"] for it in items], [it["images"] for it in items], TOKENIZER, model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16), watched_sdpa() as calls:
        loss = model(collate(items, TOKENIZER, model.config))[0]
        out = model.generate(prompts, 4)
    assert torch.isfinite(loss) and len(out) == 3
    assert calls and all(len(dtypes) == 1 for _, _, dtypes in calls)  # CUDA's flash kernel wants one dtype


# ----------------------------------------------------------------------------- checkpoints

def test_save_and_load_for_eval_round_trip(tmp_path):
    model = tiny_vlm()
    torch.nn.init.normal_(model.adapter.bottleneck.fc2.weight, std=0.5)
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # what train.py writes for stage vlm
    (tmp_path / "config.json").write_text(json.dumps(asdict(model.config)))
    model.tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_for_eval(tmp_path, device="cpu")
    assert loaded.config == model.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    records = [{"id": it["id"], "question": it["question"]} for it in qa_items()[:3]]
    images = [it["images"] for it in qa_items()[:3]]
    assert loaded.answer(records, images) == model.answer(records, images)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors: file not found"):
        load_for_eval(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()), "lr": 1}))
    with pytest.raises(ValueError, match="config.json: .*'lr'"):
        load_for_eval(tmp_path)


def test_init_from_psfm_copies_the_backbone_vit_and_the_whole_spa3r():
    donor = tiny_vlm(seed=1).spa3r
    model = tiny_vlm()
    model.init_from_psfm(donor.state_dict())
    assert all(torch.equal(v, donor.backbone.vit.state_dict()[k]) for k, v in model.vision.state_dict().items())
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in model.spa3r.state_dict().items())
    base = tiny_vlm(spa3r="none")
    base.init_from_psfm(donor.state_dict())
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in base.vision.state_dict().items())


def naive_llama_logits(t, hf, ids):
    """Llama's forward from the formulas, in float64, one head at a time: RMSNorm, RoPE as a complex rotation
    of channel pairs (j, j + head_dim / 2), softmax attention with an explicit causal mask, SwiGLU."""
    t = {k: v.double() for k, v in t.items()}
    H, Hkv, D = hf["num_attention_heads"], hf["num_key_value_heads"], hf["hidden_size"]
    hd, T = D // H, len(ids)
    norm = lambda x, w: w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + hf["rms_norm_eps"])  # noqa: E731
    freqs = hf["rope_theta"] ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    turn = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.arange(T)[:, None] * freqs)

    def rope(x):  # (T, hd)
        z = torch.complex(x[:, :hd // 2], x[:, hd // 2:]) * turn
        return torch.cat([z.real, z.imag], -1)

    x = t["model.embed_tokens.weight"][ids]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for layer in range(hf["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q, k, v = (h @ t[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        heads = []
        for i in range(H):
            j = i // (H // Hkv)
            s = rope(q[:, i * hd:(i + 1) * hd]) @ rope(k[:, j * hd:(j + 1) * hd]).T / math.sqrt(hd)
            heads.append(s.masked_fill(future, -math.inf).softmax(-1) @ v[:, j * hd:(j + 1) * hd])
        x = x + torch.cat(heads, -1) @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ t[p + "mlp.down_proj.weight"].T
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return norm(x, t["model.norm.weight"]) @ head.T


def write_hf_llama(path, tied):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48, "intermediate_size": 80,
          "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 400,
          "rms_norm_eps": 1e-5, "rope_theta": 500.0, "max_position_embeddings": 64, "hidden_act": "silu",
          "tie_word_embeddings": tied, "torch_dtype": "bfloat16"}
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (400, 48), "model.norm.weight": (48,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (48, 48), p + "self_attn.k_proj.weight": (16, 48),
                       p + "self_attn.v_proj.weight": (16, 48), p + "self_attn.o_proj.weight": (48, 48),
                       p + "mlp.gate_proj.weight": (80, 48), p + "mlp.up_proj.weight": (80, 48),
                       p + "mlp.down_proj.weight": (48, 80), p + "input_layernorm.weight": (48,),
                       p + "post_attention_layernorm.weight": (48,)})
    if not tied:
        shapes["lm_head.weight"] = (400, 48)
    tensors = {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.1 * torch.randn(s, generator=g)
               for k, s in shapes.items()}
    tensors = {k: v.bfloat16() for k, v in tensors.items()}  # as checkpoints ship
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf))
    TOKENIZER.save(str(path / "tokenizer.json"))
    return hf, tensors


@pytest.mark.parametrize("tied", [False, True])
def test_load_llama_matches_an_independent_forward(tmp_path, tied):
    hf, tensors = write_hf_llama(tmp_path, tied)
    lm, tokenizer = load_llama(tmp_path)
    assert (lm.lm_head is None) == tied and tokenizer.get_vocab_size() == 400
    ids = torch.tensor(tokenizer.encode("How far is the chair from the camera?").ids)
    ours = lm(lm.embed_tokens(ids[None]))[0].double()
    assert torch.allclose(ours, naive_llama_logits(tensors, hf, ids), atol=1e-4)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TEXT_OF_FIXTURES = "How far is the chair from the camera? About 2.5 meters."  # make_llama.py's TEXT


@pytest.mark.parametrize("name", ["llama_v4_tied", "llama_v5_untied_sharded"])
def test_load_llama_gives_the_logits_transformers_gave(name):
    """Tiny checkpoints as transformers 4 (rope_theta at the top, tied, one file) and 5 (rope_parameters,
    untied, sharded with an index) save them, bf16, and transformers' fp32 logits of a fixed text
    (tests/fixtures/make_llama.py wrote them once; rope_theta 500, so a missed theta shows)."""
    lm, tokenizer = load_llama(os.path.join(FIXTURES, name))
    expected = load_file(os.path.join(FIXTURES, name, "expected.safetensors"))
    assert (lm.lm_head is None) == name.endswith("tied") and lm.config.rope_theta == 500.0
    assert tokenizer.encode(TEXT_OF_FIXTURES).ids == expected["ids"].tolist()  # the chat tokens changed no text
    with torch.no_grad():
        ours = lm(lm.embed_tokens(expected["ids"][None]))[0]
    assert torch.allclose(ours[:, :expected["logits"].shape[1]], expected["logits"], atol=1e-4)


def test_load_llama_adds_the_chat_tokens_and_grows_a_full_vocabulary(tmp_path):
    """A tokenizer that fills every embedding row and lacks the chat's tokens: they are added after its last id,
    the embedding (and the untied head) grow by the mean row, and the old rows and logits stay."""
    from tokenizers import decoders, pre_tokenizers, trainers
    full = Tokenizer(models.BPE())
    full.pre_tokenizer, full.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    full.train_from_iterator(["How far is the chair from the camera?"] * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf, tensors = write_hf_llama(tmp_path, tied=False)
    hf["vocab_size"] = full.get_vocab_size()
    rows = full.get_vocab_size()
    tensors = {k: v[:rows] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    full.save(str(tmp_path / "tokenizer.json"))
    lm, tokenizer = load_llama(tmp_path)
    ids = vlm.special_ids(tokenizer)
    assert sorted(ids.values()) == list(range(rows, rows + len(ids))) and tokenizer.token_to_id("<|endoftext|>") == 0
    assert lm.config.vocab_size == rows + len(ids)
    grown = lm.embed_tokens.weight.detach()
    old = tensors["model.embed_tokens.weight"].float()
    assert torch.equal(grown[:rows], old) and torch.allclose(grown[rows:], old.mean(0).expand(len(ids), -1))
    assert torch.equal(lm.lm_head.weight.detach()[:rows], tensors["lm_head.weight"].float())
    text = torch.tensor(full.encode("How far is the chair?").ids)
    assert torch.allclose(lm(lm.embed_tokens(text[None]))[0, :, :rows].double(),
                          naive_llama_logits({**tensors}, hf, text), atol=1e-4)


def test_load_llama_refuses_what_it_does_not_implement(tmp_path):
    hf, _ = write_hf_llama(tmp_path, True)
    for rope in ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},  # transformers 4
                 {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}}):  # transformers 5
        (tmp_path / "config.json").write_text(json.dumps({**hf, **rope}))
        field, kind = next(iter(rope)), next(iter(rope.values()))["rope_type"]
        with pytest.raises(ValueError, match=f"config.json: field '{field}.rope_type' = '{kind}' is not supported"):
            load_llama(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="gone.safetensors"):
        load_llama(tmp_path)
    os.remove(tmp_path / "model.safetensors.index.json")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="field 'hidden_size' is missing"):
        load_llama(tmp_path)


# ----------------------------------------------------------------------------- cost, determinism, overfitting

@pytest.mark.parametrize("spa3r", ["psfm", "none"])
def test_flops_per_sample_matches_counted_flops(spa3r):
    model = tiny_vlm(spa3r=spa3r)
    item = qa_items()[3]  # 3 images
    batch = collate([item], TOKENIZER, model.config)
    text = int((batch["input_ids"] != 5).sum())
    assert flops_per_sample(model.config, 3, text) == count_flops(lambda: model.logits(batch))
    if spa3r == "psfm":  # a cached latent (train.py --cache_latent): Spa3R does not run in the step
        with torch.no_grad():
            batch["latent"] = model.spatial_latent(batch["images"], batch["num_images"])
        assert flops_per_sample(model.config, 3, text, cached_latent=True) == count_flops(lambda: model.logits(batch))
    lm = model.config.lm
    assert vlm.lm_flops_per_token(lm, 10) == sum(2 * p.numel() for p in model.lm.parameters() if p.dim() == 2) \
        + lm.n_layers * 4 * 10 * lm.dim  # tied: the embedding matrix is the head's, counted once


def test_training_flops_bill_frozen_parts_once():
    model = tiny_vlm(freeze_vision=True)
    images, n = torch.rand(2, 3, 32, 32), torch.tensor([2])
    frozen = count_flops(lambda: model.spatial_latent(images, n)) + count_flops(lambda: model.vision(images))
    c = model.config
    assert flops_per_sample(c, 2, 30, training=True) == 3 * flops_per_sample(c, 2, 30) - 2 * frozen
    none = tiny_config(spa3r="none", freeze_vision=False)  # nothing frozen: every part billed 3x
    assert flops_per_sample(none, 2, 30, training=True) == 3 * flops_per_sample(none, 2, 30)


def test_same_seed_same_loss():
    batch = collate(qa_items()[:4], TOKENIZER, tiny_config())
    assert torch.equal(tiny_vlm(seed=3)(batch)[0], tiny_vlm(seed=3)(batch)[0])
    assert not torch.equal(tiny_vlm(seed=3)(batch)[0], tiny_vlm(seed=4)(batch)[0])


def overfit(steps=100, seed=0):
    """The tiny Spa3-VLM (frozen random Spa3R) trained on the 8 QA pairs, full batch, AdamW."""
    model = tiny_vlm(seed=seed)
    items = qa_items(seed)
    batch = collate(items, TOKENIZER, model.config)
    opt = torch.optim.AdamW(model.param_groups({k: 3e-3 for k in LRS}, 0.0))
    for _ in range(steps):
        loss = model(batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    answers = model.answer([{"id": it["id"], "question": it["question"]} for it in items], [it["images"] for it in items])
    return loss.item(), answers


def test_tiny_vlm_memorises_eight_qa_pairs():
    loss, answers = overfit()
    assert answers == [a for _, a, _ in QA] and loss < 0.05, (loss, answers)


def oracle_items():
    """Four records alike in question and (blank) images, whose answers only their oracle tokens tell apart (5 rows
    of random numbers, the unused rows zero as data.oracle_tokens leaves them)."""
    g = torch.Generator().manual_seed(0)
    return [{"id": f"o{i}", "task": "t", "images": torch.zeros(1, 3, 32, 32), "question": QA[0][0], "answer": answer,
             "record": {"scene": f"scene{i}"}, "oracle": F.pad(torch.randn(5, vlm.ORACLE_DIM, generator=g), (0, 0, 0, vlm.ORACLE_CAMERAS + vlm.ORACLE_OBJECTS - 4))}
            for i, answer in enumerate(["1.25", "3.4", "0.87", "2.1"])]


def test_oracle_arm_reads_its_tokens_and_the_latent_swap_gate_sees_it():
    import train
    model = tiny_vlm(spa3r="oracle", freeze_vision=False)  # trained vision: without the standardisation it then fails
    assert model.spa3r is None and model.adapter.latent_proj.fc1.in_features == vlm.ORACLE_DIM
    items = oracle_items()
    batch = collate(items, TOKENIZER, model.config)
    assert batch["oracle"].shape == (4, *vlm.latent_shape(model.config)) and batch["scenes"] == ["scene0", "scene1", "scene2", "scene3"]
    model.set_latent_statistics([batch])  # as train.build_vlm does for either arm with an adapter
    gate = train.vlm_gates(model, [batch])[0]  # zero-init adapter: the latent changes nothing yet
    assert gate["baseline_name"] == "another scene's latent" and gate["diff"] == 0 and not gate["pass"]
    opt = torch.optim.AdamW(model.param_groups({k: 3e-3 for k in LRS}, 0.0))
    for _ in range(250):
        loss = model(batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    answers = model.answer([{"id": it["id"], "question": it["question"]} for it in items],
                           [it["images"] for it in items], oracle=[it["oracle"] for it in items])
    assert answers == [it["answer"] for it in items]
    with torch.no_grad():
        own, swapped = model.record_losses(batch), model.record_losses(batch, torch.tensor([1, 2, 3, 0]))
    assert (swapped > own).all() and (swapped - own).mean() > 0.5
    latent_gate = train.vlm_gates(model, [batch])[0]
    assert latent_gate["pass"] and latent_gate["diff"] == pytest.approx((own - swapped).mean().item(), rel=1e-4)


def test_record_losses_average_each_records_answer_tokens():
    model = tiny_vlm()
    sharpen(model)
    items = qa_items()[:3]
    batch = collate(items, TOKENIZER, model.config)
    per_record = model.record_losses(batch)
    for i, item in enumerate(items):  # each record alone: its mean over its own answer tokens
        alone, _ = model(collate([item], TOKENIZER, model.config))
        assert per_record[i].item() == pytest.approx(alone.item(), rel=1e-4)


def test_latent_statistics_standardise_the_frozen_latent():
    model = tiny_vlm()
    batch = collate(qa_items(), TOKENIZER, model.config)
    assert torch.equal(model.adapter.latent_mean, torch.zeros(16, 64)) and torch.equal(model.adapter.latent_std, torch.ones(16, 64))
    model.set_latent_statistics([batch])
    with torch.no_grad():
        latent = model.spatial_latent(batch["images"], batch["num_images"])  # (8 records, 16 slots, 64)
    standardised = (latent - model.adapter.latent_mean) / model.adapter.latent_std
    # each slot's each channel: mean 0 and std 1 over the records (per channel alone, slots would differ)
    assert torch.allclose(standardised.mean(0), torch.zeros(16, 64), atol=1e-4)
    assert torch.allclose(standardised.std(0), torch.ones(16, 64), atol=1e-3)
    assert "adapter.latent_mean" in model.state_dict()  # saved with the checkpoint, as eval must use the same


def test_image_swap_gate_of_the_baseline_ties_when_images_cannot_matter():
    import train
    model = tiny_vlm(spa3r="none")
    items = oracle_items()  # blank images: swapping them changes nothing
    for item, n in zip(items, (1, 2, 1, 2)):
        item["images"] = torch.zeros(n, 3, 32, 32)
    gate = train.vlm_gates(model, [collate(items, TOKENIZER, model.config)])[0]
    assert gate["baseline_name"] == "another scene's images" and gate["n"] == 4 and gate["diff"] == 0
    items[0]["images"] = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sharpen(model)
    gate = train.vlm_gates(model, [collate(items, TOKENIZER, model.config)])[0]
    assert gate["diff"] != 0  # records 0 and 2 (one image each) now read different images
