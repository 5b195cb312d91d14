"""The GenEval reward's model path on tiny random models saved and loaded back with ``from_pretrained``: the
Mask2Former post-processing against transformers' own, label mapping, a detector forced to see dogs, the CLIP
colour classifier against a direct computation, bad input, the recipe group and ``alignkit serve-reward``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignkit import cli
from alignkit.compose import load_run_config
from alignkit.errors import ModelLoadError
from alignkit.prompts import load_prompts
from alignkit.reward_set import RewardSet
from alignkit.rewards.common import to_pil
from alignkit.rewards.geneval import (
    COLOR_TEMPLATES,
    ColorClassifier,
    GenEval,
    Mask2FormerDetector,
    color_crop,
    geneval_label_names,
    mask2former_instances,
    mask_boxes,
    save_tiny_clip,
    save_tiny_detector,
)
from alignkit.rewards.geneval_rules import COCO_NAMES, COLORS, Detection, GenEvalMetadataError
from alignkit.rewards.remote import RemoteReward, RemoteRewardError

pytest.importorskip("open_clip", reason="the tiny CLIP takes the CLIP BPE vocabulary from open-clip-torch")

REPO = Path(__file__).resolve().parents[1]
DOG = COCO_NAMES.index("dog")
SIZE = {"detector_size": 64, "detector_max_size": 128, "device": "cpu"}


def meta(tag: str, *include: dict, exclude: list[dict] | None = None) -> dict:
    out = {"tag": tag, "include": list(include)}
    if exclude:
        out["exclude"] = exclude
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Mask2Former, the same with its class head forced to "dog", and a tiny CLIP."""
    from transformers import Mask2FormerForUniversalSegmentation

    root = tmp_path_factory.mktemp("geneval_models")
    det = save_tiny_detector(root / "detector")
    model = Mask2FormerForUniversalSegmentation.from_pretrained(det)
    with torch.no_grad():  # every query says "dog" with probability ~1 - 81 e^-12
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[DOG] = 12.0
    model.save_pretrained(root / "dog_detector")
    for name in ("preprocessor_config.json",):
        (root / "dog_detector" / name).write_text((det / name).read_text())
    return {"detector": det, "dog_detector": root / "dog_detector", "clip": save_tiny_clip(root / "clip")}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 48, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dog_reward(dirs: dict[str, Path]) -> GenEval:
    return GenEval(str(dirs["dog_detector"]), str(dirs["clip"]), batch_size=3, **SIZE)


# -------------------------------------------------------------------------------- detector post-processing


def test_instances_match_transformers_post_processing_at_its_384_grid() -> None:
    """transformers resizes mask logits to 384 x 384 before thresholding; at a 384-pixel input and image the
    mmdetection path (input size, valid crop, image size) is the same computation."""
    from transformers import Mask2FormerImageProcessor
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    g = torch.Generator().manual_seed(0)
    q = 6
    cls_logits = torch.randn(q, 81, generator=g) * 3
    mask_logits = torch.randn(q, 96, 96, generator=g)
    cls_logits[2, 5] = 10.0
    mask_logits[2] = -5.0  # a confident query with an empty mask: dropped by transformers, score 0 here
    ours = mask2former_instances(cls_logits, mask_logits, (384, 384), (384, 384), (384, 384), top_k=q)
    out = Mask2FormerForUniversalSegmentationOutput(class_queries_logits=cls_logits[None],
                                                    masks_queries_logits=mask_logits[None])
    ref = Mask2FormerImageProcessor().post_process_instance_segmentation(
        out, threshold=0.0, target_sizes=[(384, 384)], return_binary_maps=True)[0]
    theirs = sorted((s["label_id"], s["score"], i) for i, s in enumerate(ref["segments_info"]))
    nonempty = [j for j in range(q) if ours.masks[j].any()]
    assert len(nonempty) == len(theirs) < q
    mine = sorted((int(ours.labels[j]), float(ours.scores[j]), j) for j in nonempty)
    for (la, sa, ja), (lb, sb, jb) in zip(mine, theirs):
        assert la == lb and sa == pytest.approx(sb, abs=2e-6)
        assert torch.equal(ours.masks[ja], ref["segmentation"][jb].bool())
    assert all(float(ours.scores[j]) == 0.0 for j in range(q) if j not in nonempty)


def test_one_query_may_appear_under_two_classes_and_scores_use_the_mask() -> None:
    cls_logits = torch.full((1, 81), -20.0)
    cls_logits[0, [3, 7]] = torch.tensor([0.0, 0.0])  # two classes share the query's probability
    mask_logits = torch.full((1, 4, 4), -10.0)
    mask_logits[0, :2, :2] = 10.0
    inst = mask2former_instances(cls_logits, mask_logits, (16, 16), (16, 16), (16, 16), top_k=2)
    assert sorted(inst.labels.tolist()) == [3, 7] and inst.masks.shape == (2, 16, 16)
    up = F.interpolate(mask_logits[None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(inst.masks[0], up > 0) and inst.boxes[0].tolist() == [0.0, 0.0, 8.0, 8.0]
    expected = cls_logits.softmax(-1)[0, 3] * up.sigmoid()[up > 0].mean()  # class prob x mean mask prob
    assert torch.allclose(inst.scores, expected.expand(2), atol=1e-6) and 0.45 < expected < 0.5
    # padding: only the valid top-left 8 x 12 region of the input maps onto the 8 x 12 image
    padded = mask2former_instances(cls_logits, mask_logits, (16, 16), (8, 12), (8, 12), top_k=1)
    assert padded.masks.shape == (1, 8, 12) and padded.boxes[0].tolist() == [0.0, 0.0, 8.0, 8.0]
    assert torch.equal(padded.masks[0], inst.masks[0][:8, :12])


def test_mask_boxes_are_tight_plus_one() -> None:
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    masks[0, 1, 5] = True
    assert mask_boxes(masks).tolist() == [[3.0, 1.0, 7.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_label_names_follow_coco_and_genevals_renames() -> None:
    names = geneval_label_names(dict(enumerate(COCO_NAMES)))
    assert len(set(names.values())) == 80
    assert (names[64], names[65], names[66], names[62]) == ("computer mouse", "tv remote", "computer keyboard", "tv")
    detr = {0: "N/A", 1: "person", 12: "N/A", 13: "stop sign", 74: "Mouse", 77: "cell_phone"}  # a 91-id label space
    assert geneval_label_names(detr) == {1: "person", 13: "stop sign", 74: "computer mouse", 77: "cell phone"}
    assert geneval_label_names({0: "LABEL_0", 1: "LABEL_1"}) == {}
    with pytest.raises(ValueError, match="map two ids to 'tv remote'"):
        geneval_label_names({0: "remote", 1: "tv remote"})


# -------------------------------------------------------------------------------- detector and reward


def test_detector_loads_with_genevals_input_size_and_names(dirs: dict[str, Path], images: torch.Tensor) -> None:
    det = Mask2FormerDetector(str(dirs["dog_detector"]), size=64, max_size=128, device="cpu")
    assert len(det.classes) == 80 and "computer mouse" in det.classes
    inputs = det.processor(images=to_pil(images[:1]), return_tensors="pt")
    assert inputs["pixel_values"].shape[-2] == 64  # short side resized to detector_size
    found = det(to_pil(images), min_score=0.3)
    assert len(found) == 4 and all(found)
    for d in (d for dets in found for d in dets):
        assert d.label == "dog" and 0.3 < d.score <= 1 and d.mask.shape == (48, 64) and d.mask.any()
        ys, xs = np.nonzero(d.mask)
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_reward_on_a_detector_that_sees_dogs(dog_reward: GenEval, dirs: dict[str, Path], images: torch.Tensor) -> None:
    dogs = [len([d for d in dets if d.score > 0.3][:16]) for dets in dog_reward.detector(to_pil(images), 0.0)]
    assert all(n >= 1 for n in dogs)
    prompts = ["a photo of a dog", "a photo of a cat", "a photo of a dog and a cat", "a photo of a dog"]
    rows = [meta("single_object", {"class": "dog", "count": 1}), meta("single_object", {"class": "cat", "count": 1}),
            meta("two_object", {"class": "dog", "count": 1}, {"class": "cat", "count": 1}),
            meta("counting", {"class": "dog", "count": 1}, exclude=[{"class": "dog", "count": 2}])]
    v = dog_reward.verdicts(images, prompts, rows)
    assert [x.correct for x in v[:3]] == [True, False, False]
    assert v[0].score == 1 - abs(1 - dogs[0]) and v[1].score == 0.0
    assert v[2].terms == (1 - abs(1 - dogs[2]), 0.0)
    above_09 = [len([d for d in dets if d.score > 0.9]) for dets in dog_reward.detector(to_pil(images), 0.0)]
    assert v[3].correct == (above_09[3] == 1) and v[3].score == 1 - abs(1 - above_09[3])
    assert dog_reward(images, prompts, rows) == [x.score for x in v]
    strict = GenEval(str(dirs["dog_detector"]), str(dirs["clip"]), mode="strict", **SIZE)
    assert strict(images[:1], prompts[:1], rows[:1]) == [float(dogs[0] == 1)]
    # a non-finite image scores None; the others are unchanged
    bad = images.clone()
    bad[1, 0, 0, 0] = float("nan")
    assert dog_reward(bad, prompts, rows) == [v[0].score, None, v[2].score, v[3].score]


def test_colours_are_read_for_coloured_clauses(dog_reward: GenEval, images: torch.Tensor) -> None:
    rows = [meta("colors", {"class": "dog", "count": 1, "color": c}) for c in COLORS]
    pil = to_pil(images[:1])
    dets = [d for d in dog_reward.detector(pil, 0.3)[0]][:16]
    best = max(dets, key=lambda d: d.score)
    (color,) = dog_reward.colors(pil, [(0, best)])
    verdicts = dog_reward.verdicts(images[:1].expand(10, -1, -1, -1), ["x"] * 10, rows)
    assert [v.correct for v in verdicts] == [c == color for c in COLORS]  # GenEval: the best dog's colour
    n = len(dets)
    assert [v.score for v in verdicts] == [(1 + (c == color)) / 2 if n == 1 else (1 - abs(1 - n)) / 2
                                           for c in COLORS]


def test_colour_crop_and_classifier_equal_a_direct_clip_computation(dirs: dict[str, Path]) -> None:
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:20, 10:30] = True
    mask[8, 12] = False
    d = Detection("fire hydrant", 0.9, (10.0, 5.0, 30.0, 20.0), mask)
    crop = np.asarray(color_crop(image, d))
    expected = np.where(mask[..., None], np.asarray(image), 153)[5:20, 10:30]
    assert crop.shape == (15, 20, 3) and np.array_equal(crop, expected)
    assert np.asarray(color_crop(image, Detection("cat", .9, (9.4, 4.6, 30.6, 20.2)))).shape == (15, 22, 3)  # rounded

    classifier = ColorClassifier(str(dirs["clip"]), device="cpu", batch_size=2)
    dets = [d, Detection("cat", 0.8, (0.0, 0.0, 25.0, 40.0)), Detection("fire hydrant", 0.7, (20.0, 10.0, 50.0, 40.0))]
    got = classifier([image], [(0, x) for x in dets])
    model, processor = CLIPModel.from_pretrained(dirs["clip"]).eval(), CLIPProcessor.from_pretrained(dirs["clip"])
    with torch.no_grad():
        for det_, color in zip(dets, got):
            texts = [t.format(color=c, name=det_.label) for c in COLORS for t in COLOR_TEMPLATES]
            tok = processor(text=texts, padding=True, return_tensors="pt")
            txt = F.normalize(model.text_projection(model.text_model(**tok).pooler_output), dim=-1)
            classes = F.normalize(txt.view(10, 3, -1).mean(1), dim=-1)
            pixels = processor(images=[color_crop(image, det_)], return_tensors="pt")["pixel_values"]
            img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
            assert color == COLORS[int((classes @ img[0]).argmax())]


# -------------------------------------------------------------------------------- bad input


def test_bad_settings_fail_before_any_model_loads(dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="mode='best': use score"):
        GenEval("/no/such/detector", mode="best")
    with pytest.raises(ValueError, match=r"threshold=1.5"):
        GenEval("/no/such/detector", threshold=1.5)
    with pytest.raises(ModelLoadError, match=r"GenEval detector='/no/such/detector' cannot be loaded.*Mask2Former"):
        GenEval("/no/such/detector", **SIZE)
    with pytest.raises(ValueError, match=r"detector=.* is a 'clip' model"):
        GenEval(str(dirs["clip"]), str(dirs["clip"]), **SIZE)
    with pytest.raises(ModelLoadError, match="GenEval clip='/no/such/clip' cannot be loaded"):
        GenEval(str(dirs["detector"]), "/no/such/clip", **SIZE)
    with pytest.raises(ValueError, match="background='grey-ish' is not a colour"):
        GenEval("/no/such/detector", background="grey-ish")
    assert cli.main(["serve-reward", "geneval", "--kwargs", '{"mode": "best"}']) == 2  # one log line, no traceback
    assert cli.main(["serve-reward", "geneval", "--kwargs", '{"detector": "/no/such/detector"}']) == 2


def test_bad_metadata_is_named(dog_reward: GenEval, images: torch.Tensor) -> None:
    x = images[:2]
    cases = [
        (None, "GenEval got 2 samples and no metadata"),
        ([{}, {}], "metadata[0] has no 'tag'"),
        ([meta("single_object", {"class": "dog", "count": 1}), meta("single", {"class": "dog", "count": 1})],
         "metadata[1].tag='single'"),
        ([meta("single_object", {"class": "unicorn", "count": 1})] * 2, "metadata[0].include[0].class='unicorn'"),
        ([meta("single_object", {"class": "dog"})] * 2, "metadata[0].include[0] has no 'count'"),
    ]
    for rows, words in cases:
        with pytest.raises(GenEvalMetadataError) as info:
            dog_reward(x, ["a", "b"], rows)
        assert words in str(info.value)
    with pytest.raises(ValueError, match="got 2 images but 1 prompts"):
        dog_reward(x, ["a"], [{}])


def test_a_detector_without_a_class_refuses_prompts_naming_it(dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "no_zebra"
    for f in dirs["detector"].iterdir():
        (folder / f.name).parent.mkdir(exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["id2label"][str(COCO_NAMES.index("zebra"))] = "unused"
    (folder / "config.json").write_text(json.dumps(config))
    reward = GenEval(str(folder), str(dirs["clip"]), **SIZE)
    assert "zebra" not in reward.detector.classes
    with pytest.raises(GenEvalMetadataError, match="class='zebra' is not one of the 79 classes the detector knows"):
        reward(torch.rand(1, 3, 32, 32), ["a zebra"], [meta("single_object", {"class": "zebra", "count": 1})])


# -------------------------------------------------------------------------------- recipes and the reward server


def test_reward_group_in_a_recipe_scores_geneval_prompts(dirs: dict[str, Path], images: torch.Tensor) -> None:
    cfg = load_run_config("sd3_tiny_flow_grpo", [
        "reward=geneval", "prompts=geneval", f"reward.geneval.kwargs.detector={dirs['dog_detector']}",
        f"reward.geneval.kwargs.clip={dirs['clip']}", "reward.geneval.kwargs.detector_size=64",
        "reward.geneval.kwargs.device=cpu", "prompts.options.counts=2"])
    assert cfg.reward["geneval"].fn == "geneval" and cfg.prompts.source == "geneval"
    train, _ = load_prompts(cfg.prompts)
    table = RewardSet.from_config(cfg.reward, cfg.algo.reward_aggregation).score(
        images[:3], train.prompts[:3], train.metadata[:3])
    direct = GenEval(str(dirs["dog_detector"]), str(dirs["clip"]), detector_size=64, device="cpu")(
        images[:3], train.prompts[:3], train.metadata[:3])
    assert table.raw["geneval"].tolist() == pytest.approx(direct)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_reward_geneval_on_loopback(dirs: dict[str, Path], dog_reward: GenEval,
                                              images: torch.Tensor) -> None:
    port = _free_port()
    kwargs = {"detector": str(dirs["dog_detector"]), "clip": str(dirs["clip"]), "batch_size": 3, **SIZE}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "serve-reward", "geneval", "--port", str(port),
                             "--kwargs", json.dumps(kwargs)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        remote = RemoteReward(url, timeout=30.0, retries=0)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                assert remote.health()["name"] == "geneval"
                break
            except RemoteRewardError:
                assert time.monotonic() < deadline, "the GenEval server did not answer /health"
                time.sleep(0.2)
        prompts = ["a photo of a dog", "a photo of a cat and a dog", "a photo of two dogs"]
        rows = [meta("single_object", {"class": "dog", "count": 1}),
                meta("two_object", {"class": "cat", "count": 1}, {"class": "dog", "count": 1}),
                meta("counting", {"class": "dog", "count": 2}, exclude=[{"class": "dog", "count": 3}])]
        assert remote(images[:3], prompts, rows) == pytest.approx(dog_reward(images[:3], prompts, rows), abs=1e-6)
        with pytest.raises(RemoteRewardError, match=r"HTTP 500: reward 'geneval' raised GenEvalMetadataError: "
                                                    r"metadata\[0\] has no 'include'"):
            remote(images[:1], ["a"], [{"tag": "single_object"}])
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.integration
def test_tiny_sd3_trains_one_epoch_on_geneval_prompts_and_reward(dirs: dict[str, Path], tmp_path: Path) -> None:
    from alignkit.metrics import read_metrics
    from alignkit.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_run_config("sd3_tiny_flow_grpo", [
        "reward=geneval", "prompts=geneval", f"reward.geneval.kwargs.detector={dirs['dog_detector']}",
        f"reward.geneval.kwargs.clip={dirs['clip']}", "reward.geneval.kwargs.detector_size=64",
        "reward.geneval.kwargs.device=cpu", "prompts.options.counts=2", "prompts.options.eval_counts=1",
        f"output_dir={out}", "train.epochs=1", "train.prompts_per_epoch=2", "algo.num_seeds=2",
        "train.rollout_batch_size=4", "train.train_batch_size=4", "backbone.num_steps=3", "train.sample_every=1",
        "train.checkpoint_every=1"])
    Trainer(cfg, tensorboard=False).train()
    (row,) = read_metrics(out / "metrics.jsonl")
    assert row["reward/geneval_invalid"] == 0 and -16 < row["reward/geneval_mean"] <= 1
