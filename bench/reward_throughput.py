"""Reward throughput on this machine: samples per second of each reward, batched as in training.

Each reward scores the same batch ``--reps`` times after one warm-up call; the median time gives
samples/s. Rewards with real weights run as they would in training (ShapeEval, JPEG, OCR with the PP-OCR
weights shipped in rapidocr, MiniLM embedding similarity); CLIP-family preference models cannot be
downloaded here, so they run with random weights in the real architecture's size (``--clip``), which
times the same computation. The remote reward is JPEG served on loopback by ``alignkit serve-reward``'s
server. Video rewards score ``[B, F, 3, H, W]`` clips.

    python bench/reward_throughput.py [--batch 32] [--reps 3] [--clip vit-b-32] [--out bench/results/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modalities.image.shapes.world import prompt_set, render_batch

logger = logging.getLogger("bench.rewards")

CLIP_SIZES = {  # CLIP vision/text towers of the released preference models (random weights here)
    "vit-b-32": {"hidden": 768, "layers": 12, "heads": 12, "patch": 32, "proj": 512, "text": 512, "text_layers": 12},
    "vit-l-14": {"hidden": 1024, "layers": 24, "heads": 16, "patch": 14, "proj": 768, "text": 768, "text_layers": 12},
}


def timed(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clip_folder(size: str, root: Path) -> Path:
    """A random CLIP of the given tower sizes with a real BPE tokenizer (open_clip's vocabulary)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from rewards.preference import offline_clip_tokenizer

    s = CLIP_SIZES[size]
    cfg = CLIPConfig(
        vision_config={"hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
                       "intermediate_size": 4 * s["hidden"], "patch_size": s["patch"], "image_size": 224},
        text_config={"hidden_size": s["text"], "num_hidden_layers": s["text_layers"], "num_attention_heads": 8,
                     "intermediate_size": 4 * s["text"], "max_position_embeddings": 77},
        projection_dim=s["proj"],
    )
    folder = root / f"clip-{size}"
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    tokenizer = offline_clip_tokenizer(root / "tokenizer")
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--clip", default="vit-b-32", choices=list(CLIP_SIZES))
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
    ocr_prompts = [f'a sign that says "{w}"' for w in ("open", "alignkit", "late night", "cafe")] * (args.batch // 4)
    texts = [f"the answer is {i}" for i in range(args.batch)]

    from alignkit.reward_server import make_server
    from rewards.compression import JpegCompressibility
    from rewards.ocr import OCRReward
    from rewards.remote import RemoteReward
    from rewards.shapeeval import ShapeEval
    from rewards.text import EmbeddingSimilarity, ExactMatch
    from rewards.video import PerFrame, TemporalConsistency

    results: dict[str, dict[str, float | str]] = {}

    def record(name: str, fn: Callable[[], Any], n: int, note: str = "") -> None:
        seconds = timed(fn, args.reps)
        results[name] = {"samples_per_s": n / seconds, "seconds_per_batch": seconds, "batch": n, "note": note}
        logger.info("%-28s %9.1f samples/s  (%d per batch, %.3f s)  %s", name, n / seconds, n, seconds, note)

    b = args.batch
    record("shapeeval (32 px)", lambda: ShapeEval("partial")(images32, prompts, meta), b)
    record("jpeg_compressibility (256 px)", lambda: JpegCompressibility()(images256, prompts, meta), b)
    ocr = OCRReward()
    record("ocr (256 px, PP-OCR)", lambda: ocr(images256, ocr_prompts, [{}] * b), b, "real shipped weights")
    emb = EmbeddingSimilarity()
    record("embedding_similarity (MiniLM)", lambda: emb(texts, prompts, [{}] * b), b, "real packaged weights")
    record("exact_match", lambda: ExactMatch()(texts, prompts, [{"answer": "3"}] * b), b)
    frames = PerFrame(reward="jpeg_compressibility", reduce="mean")
    record(f"per_frame jpeg ({args.frames} frames)", lambda: frames(videos, prompts, meta), b)
    tc = TemporalConsistency(features="pixels")
    record(f"temporal_consistency pixels ({args.frames} fr)", lambda: tc(videos, prompts, meta), b)

    with tempfile.TemporaryDirectory() as tmp:
        folder = clip_folder(args.clip, Path(tmp))
        from rewards.preference import CLIPScore

        clip = CLIPScore(model=str(folder))
        record(f"clipscore ({args.clip}, random)", lambda: clip(images256, prompts, meta), b,
               "architecture-sized random weights")
        tcc = TemporalConsistency(model=str(folder))
        record(f"temporal_consistency {args.clip} ({args.frames} fr)", lambda: tcc(videos, prompts, meta), b,
               "architecture-sized random weights")

    server = make_server(JpegCompressibility(), "127.0.0.1", 0, "jpeg")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = RemoteReward(f"http://127.0.0.1:{server.server_address[1]}", max_batch=b)
        record("remote jpeg (loopback, 256 px)", lambda: remote(images256, prompts, meta), b, "PNG over HTTP")
    finally:
        server.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=1))
    logger.info("written %s", args.out)


if __name__ == "__main__":
    main()
