"""Preference rewards on tiny random models, saved to disk and loaded through the rewards' real loading code.

Each score is checked against an independent computation (the model's sub-modules called directly and the
published formula), then batch-size invariance, NaN masking and input errors. The CLIP tokenizer is the real
BPE vocabulary shipped by open_clip; nothing touches the network.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from alignkit.config import RewardTermConfig
from alignkit.reward_set import RewardSet
from alignkit.rewards.common import to_pil
from alignkit.rewards.preference import (
    HPS_FILES,
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    Aesthetic,
    CLIPScore,
    HPSv2,
    ImageReward,
    PickScore,
    PreferenceReward,
    offline_clip_tokenizer,
    resolve_dtype,
)

pytest.importorskip("open_clip", reason="the tests take the CLIP BPE vocabulary from open-clip-torch")

PROMPTS = ["a photo of a cat", "a red dog", "two blue squares on grass", "", "a cat of a photo of a cat"]
HEAD_SHAPES = [(1024, 32), (128, 1024), (64, 128), (16, 64), (1, 16)]  # Linear (out, in) of the aesthetic MLP
HEAD_INDEX = [0, 2, 4, 6, 7]  # nn.Sequential positions of those Linear layers in the reference checkpoint



@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Five 40x48 images in [0, 1] (not square, so resize and crop both act)."""
    return torch.rand(len(PROMPTS), 3, 40, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel (projection 32) with a CLIPProcessor (32 px), saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = offline_clip_tokenizer(tmp_path_factory.mktemp("bpe"))
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@functools.cache
def _load_clip(folder: Path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def _clip_embeddings(folder: Path, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Normalised image and text embeddings and ``logit_scale.exp()``, from the towers and projections."""
    model, processor = _load_clip(folder)
    with torch.no_grad():
        pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tok = processor(text=texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp().item()


@pytest.fixture(scope="module")
def head_state() -> dict[str, torch.Tensor]:
    """Random weights in the layout of ``sac+logos+ava1-l14-linearMSE.pth`` for 32-d embeddings."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for i, (out_f, in_f) in zip(HEAD_INDEX, HEAD_SHAPES):
        state[f"layers.{i}.weight"] = torch.randn(out_f, in_f, generator=g) / in_f**0.5
        state[f"layers.{i}.bias"] = torch.randn(out_f, generator=g) * 0.1
    return state


def _head_reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The aesthetic MLP by hand: five affine maps, no activations (dropout is off at inference)."""
    for i in HEAD_INDEX:
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip ViT registered as ``alignkit-tiny-hps``, its weights saved like the HPS checkpoints (and
    ``alignkit-tiny-hps-wide``, an architecture they do not fit)."""
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    for name, embed_dim in (("alignkit-tiny-hps", 16), ("alignkit-tiny-hps-wide", 24)):
        (cfg_dir / f"{name}.json").write_text(json.dumps({
            "embed_dim": embed_dim,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        }))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(2)
    model = open_clip.create_model("alignkit-tiny-hps", pretrained=None)
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": model.state_dict()}, folder / HPS_FILES["v2.1"])
    return folder


def _tiny_bert_vocab() -> list[str]:
    words = "a photo of cat red dog two blue squares on grass".split()
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny ImageReward checkpoint in the original BLIP key layout, its med_config.json and a BERT tokenizer.

    The weights come from tiny transformers BLIP towers; the names are written out here in BLIP's (timm ViT)
    layout, independently of the reward's own mapping.
    """
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    folder, tok_dir = tmp_path_factory.mktemp("imagereward"), tmp_path_factory.mktemp("bert_tok")
    vocab = _tiny_bert_vocab()
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tok_dir)
    med = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
           "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 64, "model_type": "bert"}
    (folder / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(3)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=8,
                                              layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                                        encoder_hidden_size=64, is_decoder=True), add_pooling_layer=False)
    for p in [*vision.parameters(), *text.parameters()]:  # not the near-constant default init
        p.data.normal_(0, 0.3)
    hf_to_blip = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
                  "embeddings.patch_embedding.": "patch_embed.proj.", "post_layernorm.": "norm.",
                  "encoder.layers.": "blocks.", "layer_norm1.": "norm1.", "layer_norm2.": "norm2.",
                  "self_attn.qkv.": "attn.qkv.", "self_attn.projection.": "attn.proj."}
    state = {}
    for name, value in vision.state_dict().items():
        for hf, blip in hf_to_blip.items():
            name = name.replace(hf, blip)
        state[f"blip.visual_encoder.{name}"] = value
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # persisted by BLIP, unused
    state["blip.vision_proj.weight"] = torch.randn(16, 64)  # BLIP_Pretrain projections, unused by ImageReward
    head = {f"layers.{i}.{p}": torch.randn(o, i_) if p == "weight" else torch.randn(o)
            for i, (o, i_) in zip(HEAD_INDEX, HEAD_SHAPES) for p in ("weight", "bias")}
    state.update({f"mlp.{k}": v / 10 for k, v in head.items()})
    assert "blip.visual_encoder.blocks.1.attn.proj.weight" in state
    torch.save(state, folder / "ImageReward.pt")
    return folder, tok_dir


@pytest.fixture(scope="module")
def head_dir(head_state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the aesthetic head under its hub file name."""
    folder = tmp_path_factory.mktemp("aesthetic")
    torch.save(head_state, folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder


@pytest.fixture(scope="module")
def rewards(
    clip_dir: Path, hps_dir: Path, head_dir: Path, imagereward_dir: tuple[Path, Path]
) -> dict[str, PreferenceReward]:
    ir_dir, tok_dir = imagereward_dir
    return {
        "pickscore": PickScore(model=str(clip_dir), processor=str(clip_dir), device="cpu", batch_size=2),
        "clipscore": CLIPScore(model=str(clip_dir), device="cpu", batch_size=2),
        "aesthetic": Aesthetic(model=str(clip_dir), head=str(head_dir), device="cpu", batch_size=2),
        "hpsv2": HPSv2(checkpoint=str(hps_dir), arch="alignkit-tiny-hps", device="cpu", batch_size=2),
        "imagereward": ImageReward(model=str(ir_dir), tokenizer=str(tok_dir), device="cpu", batch_size=2),
    }


def test_pickscore_matches_formula(rewards, clip_dir: Path, images: torch.Tensor):
    img, txt, scale = _clip_embeddings(clip_dir, images, PROMPTS)
    expected = scale * (img * txt).sum(-1)
    assert rewards["pickscore"](images, PROMPTS, [{}] * 5) == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)


def test_clipscore_matches_formula(rewards, clip_dir: Path, images: torch.Tensor):
    img, txt, _ = _clip_embeddings(clip_dir, images, ["A photo depicts " + p for p in PROMPTS])
    expected = 2.5 * (img * txt).sum(-1).clamp(min=0)
    scores = rewards["clipscore"](images, PROMPTS, [{}] * 5)
    assert scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert all(0.0 <= s <= 2.5 for s in scores)


def test_aesthetic_matches_head_by_hand(rewards, clip_dir: Path, head_state, images: torch.Tensor, tmp_path: Path):
    img, _, _ = _clip_embeddings(clip_dir, images, PROMPTS)
    expected = _head_reference(head_state, img).tolist()
    assert rewards["aesthetic"](images, ["ignored"] * 5, [{}] * 5) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # the head also loads from a file path, as .pth or .safetensors
    save_file(head_state, tmp_path / "head.safetensors")
    torch.save(head_state, tmp_path / "head.pth")
    for path in ("head.safetensors", "head.pth"):
        reward = Aesthetic(model=str(clip_dir), head=str(tmp_path / path), device="cpu")
        assert reward(images, PROMPTS, [{}] * 5) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_hpsv2_matches_open_clip_forward(rewards, hps_dir: Path, images: torch.Tensor):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("alignkit-tiny-hps", pretrained=None,
                                                                 output_dict=True)
    model.load_state_dict(torch.load(hps_dir / HPS_FILES["v2.1"], weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():  # as HPS scores: the diagonal of image_features @ text_features.T
        out = model(torch.stack([preprocess(im) for im in to_pil(images)]), open_clip.tokenize(PROMPTS))
        expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    scores = rewards["hpsv2"](images, PROMPTS, [{}] * 5)
    assert scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in scores)


def test_imagereward_matches_blip_towers(rewards, imagereward_dir: tuple[Path, Path], images: torch.Tensor):
    from transformers import BertTokenizer, CLIPImageProcessor

    folder, tok_dir = imagereward_dir
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    reward = rewards["imagereward"]
    # the towers' weights equal the checkpoint's under BLIP's names
    assert torch.equal(reward.vision.encoder.layers[1].self_attn.projection.weight,
                       state["blip.visual_encoder.blocks.1.attn.proj.weight"])
    assert torch.equal(reward.vision.embeddings.class_embedding, state["blip.visual_encoder.cls_token"])
    assert torch.equal(reward.text.encoder.layer[0].crossattention.self.key.weight,
                       state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tok = BertTokenizer.from_pretrained(tok_dir)(PROMPTS, padding="max_length", max_length=35, return_tensors="pt")
    head = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}
    with torch.no_grad():
        image_tokens = reward.vision(processor(images=to_pil(images), return_tensors="pt")["pixel_values"])
        image_tokens = image_tokens.last_hidden_state
        text = reward.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           encoder_hidden_states=image_tokens,
                           encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))
        expected = (_head_reference(head, text.last_hidden_state[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    assert reward(images, PROMPTS, [{}] * 5) == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    # the image matters: cross-attention reads it
    assert reward(images.flip(0), PROMPTS, [{}] * 5) != pytest.approx(expected.tolist(), rel=1e-3)


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward"])
def test_batch_size_invariance_and_nan_masking(rewards, name: str, images: torch.Tensor):
    reward = rewards[name]
    reference = reward(images, PROMPTS, [{}] * 5)
    try:
        for batch_size in (1, 3, 8):
            reward.batch_size = batch_size
            assert reward(images, PROMPTS, [{}] * 5) == pytest.approx(reference, rel=1e-4, abs=1e-5)
        bad = images.clone()
        bad[1, 0, 3, 3] = float("nan")
        bad[3, 2, 0, 0] = float("inf")
        scores = reward(bad, PROMPTS, [{}] * 5)
    finally:
        reward.batch_size = 2
    assert scores[1] is None and scores[3] is None
    assert [scores[i] for i in (0, 2, 4)] == pytest.approx([reference[i] for i in (0, 2, 4)], rel=1e-4, abs=1e-5)
    assert all(isinstance(s, float) for s in reference)


@pytest.mark.parametrize("name", ["pickscore", "hpsv2"])
def test_bad_inputs_raise(rewards, name: str, images: torch.Tensor):
    reward = rewards[name]
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\]"):
        reward(images[:, :2], PROMPTS, [{}] * 5)
    with pytest.raises(ValueError, match=r"expected images of shape"):
        reward(images[0], PROMPTS[:1], [{}])
    with pytest.raises(ValueError, match="got 5 images but 2 prompts"):
        reward(images, PROMPTS[:2], [{}] * 2)


def test_bad_settings_raise(clip_dir: Path, hps_dir: Path, head_state, tmp_path: Path):
    with pytest.raises(ValueError, match="batch_size=0"):
        PickScore(model=str(clip_dir), processor=str(clip_dir), batch_size=0)
    with pytest.raises(ValueError, match="dtype='float9'"):
        resolve_dtype("float9")
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="version='v3'"):
        HPSv2(version="v3", checkpoint=str(hps_dir))
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt"):
        HPSv2(version="v2.0", checkpoint=str(hps_dir), arch="alignkit-tiny-hps")
    with pytest.raises(ValueError, match=r"does not fit CLIP \(open_clip 'alignkit-tiny-hps-wide'"):
        HPSv2(checkpoint=str(hps_dir / HPS_FILES["v2.1"]), arch="alignkit-tiny-hps-wide")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist"):
        Aesthetic(model=str(clip_dir), head=str(tmp_path / "missing.pth"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "not_a_head.pth")
    with pytest.raises(ValueError, match=r"no 'layers\.0\.weight'"):
        Aesthetic(model=str(clip_dir), head=str(tmp_path / "not_a_head.pth"))
    wide = {k: (torch.zeros(v.shape[0], 768) if k == "layers.0.weight" else v) for k, v in head_state.items()}
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"takes 768-d embeddings but .* gives 32-d"):
        Aesthetic(model=str(clip_dir), head=str(tmp_path / "wide.pth"))


def test_reward_set_resolves_import_path(clip_dir: Path, images: torch.Tensor):
    cfg = {"pick": RewardTermConfig(fn="alignkit.rewards.preference:PickScore", weight=1.0,
                                    kwargs={"model": str(clip_dir), "processor": str(clip_dir), "device": "cpu"})}
    table = RewardSet.from_config(cfg, "sum_then_normalize").score(images, PROMPTS, [{}] * 5)
    assert table.raw["pick"].shape == (5,) and table.invalid["pick"] == 0


def test_bfloat16_on_cpu_is_close(rewards, clip_dir, hps_dir, imagereward_dir, images):
    """The dtype setting reaches every tower (a float32 head on bfloat16 embeddings still works)."""
    ir_dir, tok_dir = imagereward_dir
    low = {
        "pickscore": PickScore(model=str(clip_dir), processor=str(clip_dir), device="cpu", dtype="bfloat16"),
        "hpsv2": HPSv2(checkpoint=str(hps_dir), arch="alignkit-tiny-hps", device="cpu", dtype=torch.bfloat16),
        "imagereward": ImageReward(model=str(ir_dir), tokenizer=str(tok_dir), device="cpu", dtype="bfloat16"),
    }
    assert next(low["hpsv2"].model.parameters()).dtype is torch.bfloat16
    for name, reward in low.items():
        assert reward(images, PROMPTS, [{}] * 5) == pytest.approx(rewards[name](images, PROMPTS, [{}] * 5),
                                                                  rel=0.1, abs=0.1), name


@pytest.mark.gpu
def test_half_precision_on_cuda_matches_cpu(rewards, clip_dir, hps_dir, head_dir, imagereward_dir, images,
                                            gpu_device):
    """The device and dtype settings: float16 / bfloat16 on CUDA agree with float32 on CPU."""
    ir_dir, tok_dir = imagereward_dir
    dev = str(gpu_device)
    on_cuda = {
        "pickscore": PickScore(model=str(clip_dir), processor=str(clip_dir), device=dev, dtype="float16"),
        "clipscore": CLIPScore(model=str(clip_dir), device=dev, dtype="float16"),
        "aesthetic": Aesthetic(model=str(clip_dir), head=str(head_dir), device=dev, dtype="float16"),
        "hpsv2": HPSv2(checkpoint=str(hps_dir), arch="alignkit-tiny-hps", device=dev, dtype="float16"),
        "imagereward": ImageReward(model=str(ir_dir), tokenizer=str(tok_dir), device=dev, dtype="bfloat16"),
    }
    for name, reward in on_cuda.items():
        assert reward(images, PROMPTS, [{}] * 5) == pytest.approx(rewards[name](images, PROMPTS, [{}] * 5),
                                                                  rel=0.05, abs=0.05), name
