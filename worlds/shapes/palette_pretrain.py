"""Pretrain the shapes world's palette-token masked LM on CPU, reproducibly, and write the shipped weights.

    python -m alignkit.worlds.shapes.palette_pretrain [--out DIR] [--steps 4000] [--batch 32] [--grid 16]

Training pairs are rendered training-split captions (:func:`alignkit.worlds.shapes.world.render_batch`) turned
into ``grid x grid`` palette tokens (:func:`alignkit.worlds.shapes.palette.image_tokens`). The model, a
``BertForMaskedLM`` over the caption words and the palette tokens, learns with the masked diffusion loss: per
example a masking rate ``t ~ U(0, 1)``, each image token masked with probability ``t`` (at least one),
cross-entropy on the masked tokens; the caption prefix is never masked. Held-out captions are never trained on;
the saved model's held-out partial and strict ShapeEval, sampled through the ``masked_palette`` backbone as the
recipes evaluate (deterministic steps keyed by the state: argmax reveals are mostly background), go to
``pretrain_info.json``. Everything random is drawn from generators seeded by ``--seed``; with the same thread count
the result is bit-identical.

A quantised render is not a perfect ShapeEval image: at ``grid=16`` the token images of clean renders score
0.91 partial and 0.76 strict on 160 training captions (small triangles and circles lose their outline;
``tests/test_palette_world.py``), the ceiling of this world.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from alignkit.config import BackboneConfig, LoraConfig
from alignkit.evaluation import evaluate
from alignkit.modalities.discrete.mlm import encode_prefix
from alignkit.modalities.discrete.tiny import build_tiny_masked_lm, save_masked_lm
from alignkit.prompts import PromptSet
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.worlds.pretrain_common import caption_batches, train_masked_diffusion
from alignkit.worlds.shapes.palette import (
    PALETTE_TOKENS,
    WEIGHTS_DIR,
    MaskedPaletteSampler,
    build_palette_tokenizer,
    image_tokens,
)
from alignkit.worlds.shapes.shapeeval import ShapeEval
from alignkit.worlds.shapes.world import IMAGE_SIZE, all_specs, prompt_set, render_batch, split_of

logger = logging.getLogger(__name__)

CAPTION_TOKENS = 8
"""Longest caption in words ("a red circle left of a green square"): the prompt prefix length."""


def heldout_scores(folder: Path, *, grid: int, num_steps: int, lora: bool = False,
                   deterministic_step: str = "keyed_sample") -> dict[str, float]:
    """Held-out partial and strict ShapeEval of the model in ``folder``: every held-out caption once, sampled
    through :class:`MaskedPaletteSampler` (the recipes' evaluation path) with ``deterministic_step`` (the recipes'
    ``keyed_sample``, or ``argmax``)."""
    cfg = BackboneConfig(name="masked_palette", pretrained=str(folder), num_steps=num_steps, height=IMAGE_SIZE,
                         width=IMAGE_SIZE, max_sequence_length=CAPTION_TOKENS,
                         options={"grid": grid, "deterministic_step": deterministic_step},
                         lora=LoraConfig(enabled=lora))
    sampler = MaskedPaletteSampler.from_config(cfg, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    specs = [s for s in all_specs() if split_of(s.caption()) == "heldout"]
    prompts = PromptSet([s.caption() for s in specs], [s.to_metadata() for s in specs])
    rewards = RewardSet([RewardTerm("partial", ShapeEval("partial"), 1.0),
                         RewardTerm("strict", ShapeEval("strict"), 0.0)])
    _, table = evaluate(sampler, rewards, prompts, seed=0, seeds_per_prompt=1, batch_size=128)
    return {"heldout_captions": len(specs), "heldout_shapeeval_partial": float(table.raw["partial"].mean()),
            "heldout_shapeeval_strict": float(table.raw["strict"].mean())}


def pretrain(out: Path, *, steps: int, batch: int, lr: float, seed: int, hidden: int, layers: int, grid: int,
             eval_steps: int) -> dict[str, Any]:
    """Train from scratch and save into ``out``; returns the run summary written to ``pretrain_info.json``."""
    tokenizer = build_palette_tokenizer()
    palette_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in PALETTE_TOKENS])  # [P]
    tokens = grid * grid
    model = build_tiny_masked_lm(tokenizer, hidden=hidden, layers=layers, heads=max(1, hidden // 32),
                                 max_positions=CAPTION_TOKENS + tokens, seed=seed)
    data = caption_batches(prompt_set, lambda specs, s: render_batch(specs, seed=s), seed, batch)
    start, cpu_start = time.perf_counter(), time.process_time()

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captions, images = next(data)  # the data stream has its own seed; gen is left to the masking
        ids, pmask = encode_prefix(tokenizer, captions, CAPTION_TOKENS, fill=tokenizer.pad_token_id)  # [b, L]
        return ids, pmask, palette_ids[image_tokens(images, grid)]  # [b, G] token ids

    _, ema = train_masked_diffusion(model, draw, mask_id=tokenizer.mask_token_id, steps=steps, lr=lr, seed=seed,
                                    warmup=200, allowed=palette_ids)
    out.mkdir(parents=True, exist_ok=True)
    save_masked_lm(model, tokenizer, out)
    info: dict[str, Any] = {
        "command": f"python -m alignkit.worlds.shapes.palette_pretrain --steps {steps} --batch {batch} --lr {lr} "
                   f"--seed {seed} --hidden {hidden} --layers {layers} --grid {grid} "
                   f"--threads {torch.get_num_threads()}",
        "grid": grid, "loss_ema": ema, "train_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1), "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()), "eval_num_steps": eval_steps,
    }
    info |= heldout_scores(out, grid=grid, num_steps=eval_steps)
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--eval-steps", type=int, default=16, help="reveal steps of the held-out evaluation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    info = pretrain(args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, hidden=args.hidden,
                    layers=args.layers, grid=args.grid, eval_steps=args.eval_steps)
    logger.info("wrote %s: %s", args.out, json.dumps(info))


if __name__ == "__main__":
    main()
