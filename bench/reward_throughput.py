"""Reward throughput on this machine: samples per second of each reward, batched as in training.

Each reward scores the same batch ``--reps`` times after one warm-up call; the median time gives
samples/s. Images are 256 px unless the reward resizes them itself. Rewards with real weights run as they
would in training (ShapeEval, JPEG, OCR with the PP-OCR weights shipped in rapidocr, MiniLM embedding
similarity). Learned preference models cannot be downloaded here, so they run with random weights in the
released architecture's size, saved to a temporary folder and loaded back through the reward's own
from-folder code, which times the same computation (records noted "architecture-sized random weights"):

* ``clipscore`` and CLIP ``temporal_consistency``: a CLIP of size ``--clip`` (:data:`CLIP_SIZES`);
* ``pickscore``: CLIP ViT-H/14 (the PickScore_v1 / CLIP-ViT-H-14-laion2B size);
* ``aesthetic``: CLIP ViT-L/14 plus the 768-d LAION MLP head;
* ``hpsv2``: open_clip ``ViT-H-14``, saved as ``HPS_v2.1_compressed.pt``;
* ``imagereward``: BLIP ViT-L/16 at 224 px and the 12-layer BERT-base text encoder with cross-attention
  (``med_config.json`` as released; ImageReward builds ``BLIP_Pretrain(image_size=224, vit='large')``),
  tokenised with the bert-base-uncased vocabulary that ships with the MiniLM package.

The four large models above (ViT-H/L towers, 1.7-4 GB of float32 weights each) are skipped with
``--no-large``. Text rewards score short strings; ``numeric_match`` parses the last number. The remote reward
is JPEG served on loopback by ``alignkit serve-reward``'s server. Video rewards score ``[B, F, 3, H, W]``
clips of 32 px frames; ``clip_function`` gets 256 px clips as mp4 paths and its function only returns the
file size, so it times the mp4 encode path (a static clip, the cheapest case for the encoder).
The JSON at ``--out`` is rewritten after every record.

    python bench/reward_throughput.py [--batch 32] [--reps 3] [--clip vit-b-32] [--no-large]
        [--out bench/results/rewards.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alignkit.worlds.shapes.world import prompt_set, render_batch

logger = logging.getLogger("bench.rewards")

CLIP_SIZES = {  # CLIP vision/text towers of the released preference models (random weights here)
    "vit-b-32": {"hidden": 768, "layers": 12, "heads": 12, "patch": 32, "proj": 512,
                 "text": 512, "text_layers": 12, "text_heads": 8},
    "vit-l-14": {"hidden": 1024, "layers": 24, "heads": 16, "patch": 14, "proj": 768,
                 "text": 768, "text_layers": 12, "text_heads": 12},
    "vit-h-14": {"hidden": 1280, "layers": 32, "heads": 16, "patch": 14, "proj": 1024,
                 "text": 1024, "text_layers": 24, "text_heads": 16},
}

IMAGEREWARD_MED_CONFIG = {  # ImageReward's med_config.json (BERT-base; BLIP sets the cross-attention width)
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}
IMAGEREWARD_VIT = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096, "patch_size": 16, "image_size": 224}  # BLIP ViT-L/16 at 224 px
RANDOM = "architecture-sized random weights"


def timed(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mp4_size(clip: Path, prompt: str, metadata: dict[str, Any]) -> float:
    """A trivial ClipFunction: the mp4's size in bytes (so its row times the encode path alone)."""
    return float(Path(clip).stat().st_size)


def clip_folder(size: str, root: Path) -> Path:
    """A random CLIP of the given tower sizes with a real BPE tokenizer (open_clip's vocabulary)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from alignkit.rewards.preference import offline_clip_tokenizer

    folder = root / f"clip-{size}"
    if folder.is_dir():
        return folder
    s = CLIP_SIZES[size]
    cfg = CLIPConfig(
        vision_config={"hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
                       "intermediate_size": 4 * s["hidden"], "patch_size": s["patch"], "image_size": 224},
        text_config={"hidden_size": s["text"], "num_hidden_layers": s["text_layers"],
                     "num_attention_heads": s["text_heads"], "intermediate_size": 4 * s["text"],
                     "max_position_embeddings": 77},
        projection_dim=s["proj"],
    )
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    tokenizer = offline_clip_tokenizer(root / "tokenizer")
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    gc.collect()
    return folder


def aesthetic_head_folder(root: Path, in_features: int = 768) -> Path:
    """A random LAION aesthetic MLP head saved under its hub file name (``layers.{0,2,4,6,7}`` state dict)."""
    from alignkit.rewards.preference import ScoreHead

    folder = root / "aesthetic-head"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ScoreHead(in_features).state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder


def hps_folder(root: Path, arch: str = "ViT-H-14") -> Path:
    """A random open_clip ``arch`` saved like the HPS v2.1 checkpoint (``{"state_dict": ...}``)."""
    import open_clip

    from alignkit.rewards.preference import HPS_FILES

    folder = root / "hps"
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, folder / HPS_FILES["v2.1"])
    del model
    gc.collect()
    return folder


def imagereward_folder(root: Path) -> Path:
    """A random ImageReward checkpoint at the released size, in BLIP's key layout, with its med_config.json."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from alignkit.rewards.preference import ScoreHead

    folder = root / "imagereward"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "med_config.json").write_text(json.dumps(IMAGEREWARD_MED_CONFIG))
    vision = BlipVisionModel(BlipVisionConfig(**IMAGEREWARD_VIT, layer_norm_eps=1e-6))
    med = IMAGEREWARD_MED_CONFIG
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
        encoder_hidden_size=IMAGEREWARD_VIT["hidden_size"], is_decoder=True,
    ), add_pooling_layer=False)
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
    state.update({f"mlp.{k}": v for k, v in ScoreHead(med["hidden_size"]).state_dict().items()})
    torch.save(state, folder / "ImageReward.pt")
    del vision, text, state
    gc.collect()
    return folder


def bert_uncased_vocab() -> str:
    """The bert-base-uncased WordPiece tokenizer shipped with the packaged MiniLM (30522 tokens)."""
    from alignkit.rewards.text import PACKAGED_MINILM, resolve_model_dir

    return str(resolve_model_dir(PACKAGED_MINILM))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clip", default="vit-b-32", choices=list(CLIP_SIZES))
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True,
                        help="time PickScore, Aesthetic, HPSv2 and ImageReward at their released sizes")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rewards.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)

    specs = prompt_set(args.batch, 0, "all")
    prompts = [s.caption() for s in specs]
    meta = [s.to_metadata() for s in specs]
    images32 = render_batch(specs, seed=0)  # [B, 3, 32, 32]
    images256 = torch.nn.functional.interpolate(images32, size=256, mode="nearest")
    videos = images32[:, None].repeat(1, args.frames, 1, 1, 1)  # [B, F, 3, 32, 32]
    videos256 = images256[:, None].repeat(1, args.frames, 1, 1, 1)  # [B, F, 3, 256, 256]
    ocr_prompts = [f'a sign that says "{w}"' for w in ("open", "alignkit", "late night", "cafe")] * (args.batch // 4)
    texts = [f"the answer is {i}" for i in range(args.batch)]

    from alignkit.reward_server import make_server
    from alignkit.rewards.compression import JpegCompressibility
    from alignkit.rewards.ocr import OCRReward
    from alignkit.rewards.remote import RemoteReward
    from alignkit.rewards.text import EmbeddingSimilarity, ExactMatch, NumericMatch
    from alignkit.rewards.video import ClipFunction, PerFrame, TemporalConsistency
    from alignkit.worlds.shapes.shapeeval import ShapeEval

    results: dict[str, dict[str, float | str]] = {}

    def record(name: str, fn: Callable[[], Any], n: int, note: str = "") -> None:
        seconds = timed(fn, args.reps)
        results[name] = {"samples_per_s": n / seconds, "seconds_per_batch": seconds, "batch": n, "note": note}
        logger.info("%-28s %9.1f samples/s  (%d per batch, %.3f s)  %s", name, n / seconds, n, seconds, note)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=1))

    b = args.batch
    record("shapeeval (32 px)", lambda: ShapeEval("partial")(images32, prompts, meta), b)
    record("jpeg_compressibility (256 px)", lambda: JpegCompressibility()(images256, prompts, meta), b)
    ocr = OCRReward()
    record("ocr (256 px, PP-OCR)", lambda: ocr(images256, ocr_prompts, [{}] * b), b, "real shipped weights")
    emb = EmbeddingSimilarity()
    refs = [{"reference": f"the result equals {i}"} for i in range(b)]  # without one a sample is masked, not encoded
    record("embedding_similarity (MiniLM)", lambda: emb(texts, prompts, refs), b, "real packaged weights")
    record("exact_match", lambda: ExactMatch()(texts, prompts, [{"answer": "3"}] * b), b)
    record("numeric_match", lambda: NumericMatch()(texts, prompts, [{"answer": "3"}] * b), b)
    frames = PerFrame(reward="jpeg_compressibility", reduce="mean")
    record(f"per_frame jpeg ({args.frames} frames)", lambda: frames(videos, prompts, meta), b)
    tc = TemporalConsistency(features="pixels")
    record(f"temporal_consistency pixels ({args.frames} fr)", lambda: tc(videos, prompts, meta), b)
    clip_fn = ClipFunction(mp4_size, input="mp4")
    record(f"clip_function mp4 ({args.frames} fr, 256 px)", lambda: clip_fn(videos256, prompts, meta), b,
           "fn returns the file size: times the mp4 encode path")

    server = make_server(JpegCompressibility(), "127.0.0.1", 0, "jpeg")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = RemoteReward(f"http://127.0.0.1:{server.server_address[1]}", max_batch=b)
        record("remote jpeg (loopback, 256 px)", lambda: remote(images256, prompts, meta), b, "PNG over HTTP")
    finally:
        server.shutdown()

    from alignkit.rewards.preference import Aesthetic, CLIPScore, HPSv2, ImageReward, PickScore

    def run_model(name: str, build: Callable[[], Any], samples: torch.Tensor, folder: Path | None = None) -> None:
        """Build one model and time it; its memory (and ``folder``) is freed before the next model is built."""
        reward = build()
        record(name, lambda: reward(samples, prompts, meta), b, RANDOM)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = clip_folder(args.clip, root)
        run_model(f"clipscore ({args.clip}, random)", lambda: CLIPScore(model=str(small)), images256)
        gc.collect()
        run_model(f"temporal_consistency {args.clip} ({args.frames} fr)",
                  lambda: TemporalConsistency(model=str(small)), videos)
        gc.collect()
        if args.large:
            h14 = clip_folder("vit-h-14", root)
            run_model("pickscore (vit-h-14, random)", lambda: PickScore(model=str(h14), processor=str(h14)),
                      images256, h14)
            gc.collect()
            l14, head = clip_folder("vit-l-14", root), aesthetic_head_folder(root)
            run_model("aesthetic (vit-l-14 + MLP, random)", lambda: Aesthetic(model=str(l14), head=str(head)),
                      images256, l14)
            gc.collect()
            hps = hps_folder(root)
            run_model("hpsv2 (open_clip ViT-H-14, random)", lambda: HPSv2(checkpoint=str(hps), arch="ViT-H-14"),
                      images256, hps)
            gc.collect()
            ir, tok = imagereward_folder(root), bert_uncased_vocab()
            run_model("imagereward (BLIP ViT-L/16, random)", lambda: ImageReward(model=str(ir), tokenizer=tok),
                      images256, ir)
    logger.info("written %s", args.out)


if __name__ == "__main__":
    main()
