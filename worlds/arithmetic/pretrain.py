"""Pretrain the arithmetic masked LM on CPU, reproducibly, and write the shipped weights.

    python -m alignkit.worlds.arithmetic.pretrain [--out DIR] [--steps 1500] [--batch 128] [--layers 3] [--seed 0]

A character tokenizer (built in-process) and a tiny ``BertForMaskedLM`` are trained with the masked
diffusion loss on training-split problems only: per example a masking rate ``t ~ U(0, 1)``, each of the
``G`` answer positions masked with probability ``t`` (at least one), cross-entropy on the masked positions;
the prompt prefix is never masked. The model is saved with ``save_pretrained`` and its held-out greedy
accuracy, measured through the sampler (the recipes' evaluation path), goes to ``pretrain_info.json``.
Everything random is drawn from generators seeded by ``--seed``; with the same thread count the result
is bit-identical. The step count is deliberately short: the shipped model is decent but imperfect, so
that reinforcement learning has something to improve.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from alignkit.config import BackboneConfig, LoraConfig
from alignkit.modalities.discrete.mlm import MaskedLMSampler, encode_prefix, encode_targets
from alignkit.modalities.discrete.tiny import build_char_tokenizer, build_tiny_masked_lm, save_masked_lm
from alignkit.prompts import PromptSet
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.rewards.text import ExactMatch
from alignkit.trainer import evaluate
from alignkit.worlds.arithmetic.world import ANSWER_LENGTH, PROMPT_LENGTH, WEIGHTS_DIR, all_problems, problem_set
from alignkit.worlds.pretrain_common import train_masked_diffusion

logger = logging.getLogger(__name__)


def heldout_accuracy(folder: Path, *, num_steps: int = ANSWER_LENGTH + 1, limit: int | None = None,
                     lora: bool = False) -> float:
    """Greedy held-out exact-match accuracy of the model in ``folder`` through :class:`MaskedLMSampler`."""
    cfg = BackboneConfig(name="masked_lm", pretrained=str(folder), num_steps=num_steps,
                         max_sequence_length=PROMPT_LENGTH, options={"gen_length": ANSWER_LENGTH},
                         lora=LoraConfig(enabled=lora))
    sampler = MaskedLMSampler.from_config(cfg, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    problems = list(all_problems("heldout"))[:limit]
    prompts = PromptSet([p.caption() for p in problems], [p.to_metadata() for p in problems])
    rewards = RewardSet([RewardTerm("exact", ExactMatch(), 1.0)])
    _, table = evaluate(sampler, rewards, prompts, seed=0, seeds_per_prompt=1, batch_size=512)
    return float(table.raw["exact"].mean())


def pretrain(out: Path, *, steps: int, batch: int, lr: float, seed: int, hidden: int, layers: int) -> dict:
    """Train from scratch and save into ``out``; returns the run summary written to ``pretrain_info.json``."""
    tokenizer = build_char_tokenizer(model_max_length=PROMPT_LENGTH + ANSWER_LENGTH)
    model = build_tiny_masked_lm(tokenizer, hidden=hidden, layers=layers, heads=max(1, hidden // 32),
                                 max_positions=16, seed=seed)
    problems = problem_set(len(all_problems("train")), seed, "train")
    ids, pmask = encode_prefix(tokenizer, [p.caption() for p in problems], PROMPT_LENGTH, fill=tokenizer.eos_token_id)
    target = encode_targets(tokenizer, [str(p.answer) for p in problems], ANSWER_LENGTH,
                            end_id=tokenizer.eos_token_id)  # [D, G]
    start = time.perf_counter()

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(problems), (batch,), generator=gen)
        return ids[rows], pmask[rows], target[rows]

    final_loss, _ = train_masked_diffusion(model, draw, mask_id=tokenizer.mask_token_id, steps=steps, lr=lr,
                                           seed=seed, warmup=100)
    out.mkdir(parents=True, exist_ok=True)
    save_masked_lm(model, tokenizer, out)
    seconds = time.perf_counter() - start
    info = {
        "command": f"python -m alignkit.worlds.arithmetic.pretrain --steps {steps} --batch {batch} --lr {lr} "
                   f"--seed {seed} "
                   f"--hidden {hidden} --layers {layers}",
        "final_loss": final_loss, "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_problems": len(all_problems("heldout")),
        "heldout_greedy_exact_match": heldout_accuracy(out),
    }
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    info = pretrain(args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, hidden=args.hidden,
                    layers=args.layers)
    logger.info("wrote %s: %s", args.out, json.dumps(info))


if __name__ == "__main__":
    main()
