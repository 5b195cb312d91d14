"""``alignkit report RUN_DIR``: one self-contained ``report.html`` of a run (:mod:`alignkit.html_page`).

It holds the run's status (an unfinished run is reported as far as it got, and says so), the held-out table
(:mod:`alignkit.summary`), curves of every reward against epoch, rollout NFE and total model FLOPs (when the run
logged ``cost/flops_total``), before / after samples of the held-out prompts that changed most and least
(images, videos as animated GIFs, audio as players with spectrograms, text as text), the composed
configuration with its overrides, and the environment of each training session (commit, versions, threads,
device).
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from alignkit.html_page import data_uri, escape, figure_uri, page, pyplot, table
from alignkit.provenance import read_environment
from alignkit.run_dir import AXES, HeldoutRecord, Key, RunDir
from alignkit.summary import NOISE_BAND_METHOD, format_count, heldout_table, summarize

__all__ = ["REPORT_FILE", "changed_samples", "render_sample", "write_report"]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
CURVE_AXES = ("epoch", "nfe", "flops")
GIF_HEIGHT = 128
IMAGE_MAX = 384
"""Largest side (px) of an image sample inlined in the report (the file in ``eval/`` keeps its full size)."""
GIF_FRAMES = 24


def write_report(run_dir: Path | str, out: Path | str | None = None, *, samples: int = 4) -> Path:
    """Write the report of run folder ``run_dir`` to ``out`` (default ``<run_dir>/report.html``).

    Args:
        samples: how many most-changed and least-changed held-out samples to show.

    Raises:
        RunFolderError: ``run_dir`` is not a run (naming it) or one of its files is unreadable.
        ImportError: matplotlib is missing (with the install command).
    """
    if samples < 1:
        raise ValueError(f"--samples {samples}: must be >= 1 (held-out samples shown among the most and the least "
                         "changed)")
    run = RunDir.open(run_dir)
    pyplot()  # fail before any work when matplotlib is missing
    path = Path(out) if out is not None else run.path / REPORT_FILE
    parts = [f"<h1>alignkit run report: {escape(run.path.name)}</h1>",
             f"<p class=\"note\">{escape(run.path)}</p>"]
    status = run.status()
    parts.append(f"<p class=\"banner\">{escape(status)}</p>" if not run.finished else f"<p>{escape(status)}</p>")
    parts.append(_summary_section(run))
    parts.append(_curves_section(run))
    parts.append(_samples_section(run, samples))
    parts.append(_config_section(run))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page(f"alignkit report: {run.path.name}", "\n".join(parts)), encoding="utf-8")
    tmp.replace(path)
    logger.info("report of %s written to %s (%s)", run.path, path, status)
    return path


# --- sections ---------------------------------------------------------------------------------------------


def _summary_section(run: RunDir) -> str:
    s = summarize(run)
    a = s.algorithm
    out = ["<h2>Summary</h2>", "<p>Algorithm <b>" + escape(a["name"]) + "</b> (plan " + escape(a["plan"])
           + ", credit " + escape(a["credit"]) + f" by {escape(a['group_by'])}, step " + escape(a["step_kind"])
           + "); rewards " + escape(", ".join(f"{k} x{w:g}" for k, w in s.rewards.items()))
           + f" aggregated by {escape(s.aggregation)}; backbone {escape(s.backbone['name'])} "
           + f"{escape(s.backbone['pretrained'])}.</p>"]
    if s.changes:
        out.append(f"<p>Held-out {escape(s.before)} &rarr; {escape(s.after)}: {s.prompts} prompts, {s.samples} "
                   "samples, paired by prompt id and evaluation seed; the change's 95% interval is over prompts. "
                   f"Base noise band: {escape(NOISE_BAND_METHOD)}.</p>")
        out.append(table(heldout_table(s.changes)))
    else:
        out.append("<p>No held-out before/after records (<code>eval/eval_before.jsonl</code> and a later one): "
                   "set <code>eval.before_after=true</code> to compare.</p>")
    wall = f"{s.wall_seconds:.0f} s" if s.wall_seconds is not None else "not logged"
    train = f"{s.train_seconds:.0f} s" if s.train_seconds is not None else "not logged"
    out.append(f"<p>Cost: rollout NFE {format_count(s.nfe_total)}, model FLOPs {format_count(s.flops_total)}, "
               f"training {train}, wall {wall}.</p>")
    return "\n".join(out)


def _curves_section(run: RunDir) -> str:
    out = ["<h2>Curves</h2>"]
    if not run.metrics:
        return out[0] + "\n<p>No epoch finished yet: metrics.jsonl is empty.</p>"
    axes = [a for a in CURVE_AXES if run.has_axis(a)]
    missing = [a for a in CURVE_AXES if a not in axes]
    for axis in axes:
        out.append(f"<figure><img alt=\"rewards against {escape(AXES[axis][1])}\" src=\"{_curve_figure(run, axis)}\">"
                   f"<figcaption>Each reward against {escape(AXES[axis][1])}: the training rollout's mean (line) and "
                   "the held-out mean (dots); aggregate: the weighted sum of the training rewards.</figcaption>"
                   "</figure>")
    if missing:
        out.append(f"<p class=\"note\">Not logged by this run: {escape(', '.join(AXES[a][0] for a in missing))}.</p>")
    return "\n".join(out)


def _curve_figure(run: RunDir, axis: str) -> str:
    plt = pyplot()
    train = run.reward_series(axis)
    held = run.heldout_series(axis)
    names = list(train) + [n for n in held if n not in train]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axs = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axs.flat, names, strict=False):
        if name in train and train[name][0]:
            ax.plot(*train[name], ".-", color="tab:blue", alpha=0.7, lw=1.2, ms=3, label="training rollout")
        if name in held and held[name][0]:
            ax.plot(*held[name], "o-", color="tab:orange", ms=4, lw=1, label="held-out")
        weight = run.weights.get(name)
        ax.set_title(name + ("" if weight is None else f" (weight {weight:g})"), fontsize=10)
        ax.set_xlabel(AXES[axis][1], fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axs.flat)[len(names):]:
        ax.axis("off")
    axs.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return figure_uri(fig)


def changed_samples(before: HeldoutRecord, after: HeldoutRecord, weights: dict[str, float],
                    k: int) -> tuple[list[tuple[Key, float]], list[tuple[Key, float]]]:
    """The ``k`` held-out samples whose score changed most (largest absolute change) and the ``k`` that changed
    least, as ``((prompt id, seed), change)``; the score is the aggregate (weighted sum of the training
    rewards), or the first reward when the records lack a weighted one. Ties go to the lower prompt id. With fewer
    than ``2 k`` samples, the first half (rounded up) counts as most changed and the rest as least."""
    if any(w != 0 and n in after.rewards for n, w in weights.items()):
        a, b = before.aggregate(weights), after.aggregate(weights)
    else:
        first = after.rewards[0]
        a, b = before.scores(first), after.scores(first)
    changes = sorted(((key, b[key] - a[key]) for key in a if a[key] is not None and b.get(key) is not None),
                     key=lambda kc: (-abs(kc[1]), kc[0]))
    most = changes[:min(k, (len(changes) + 1) // 2)]
    least = sorted(changes[len(most):], key=lambda kc: (abs(kc[1]), kc[0]))[:k]
    return most, least


def _samples_section(run: RunDir, k: int) -> str:
    head = "<h2>Held-out samples before and after</h2>"
    before, after = run.before, run.latest
    if before is None or after is None:
        return head + "\n<p>No per-sample held-out records before and after training (eval/*.jsonl).</p>"
    most, least = changed_samples(before, after, run.weights, k)
    out = [head, f"<p class=\"note\">{escape(before.name)} (epoch {before.epoch}) and {escape(after.name)} "
           f"(epoch {after.epoch}); the same prompt and evaluation noise on both sides.</p>"]
    for title, picked in (("Changed most", most), ("Changed least", least)):
        out.append(f"<h3>{title}</h3>")
        rows = ["<table><tr><th>prompt</th><th>before</th><th>after</th></tr>"]
        for key, change in picked:
            rb, ra = before.row(key), after.row(key)
            label = (f"{escape(ra['prompt'])}<br><span class=\"note\">prompt {key[0]}, seed {key[1]}; change "
                     f"{change:+.3f}</span>")
            rows.append(f"<tr><td>{label}</td><td>{_cell(before, rb)}</td><td>{_cell(after, ra)}</td></tr>")
        rows.append("</table>")
        out.append("\n".join(rows))
    return "\n".join(out)


def _cell(record: HeldoutRecord, row: dict[str, Any]) -> str:
    scores = ", ".join(f"{k}={v:.3f}" if v is not None else f"{k}=invalid" for k, v in row["rewards"].items())
    return (f"<div class=\"sample\">{render_sample(record.folder, row)}<br>"
            f"<span class=\"note\">{escape(scores)}</span></div>")


def render_sample(folder: Path, row: dict[str, Any]) -> str:
    """HTML of one held-out sample: an image, a video as an animated GIF, audio as an ``<audio>`` player with a
    spectrogram, text as text; a note when its file is missing."""
    if row.get("file") is None:
        return f"<pre>{escape(row.get('text') or '')}</pre>"
    path = folder / row["file"]
    if not path.is_file():
        return f"<span class=\"note\">missing file {escape(row['file'])}</span>"
    suffix = path.suffix.lower()
    if suffix == ".png":
        with Image.open(path) as im:
            small = im.height < 128  # drawn larger, pixels kept sharp
            pixels = " class=\"pixels\"" if small else ""
            width = max(128, im.width) if small else min(im.width, IMAGE_MAX)
            if max(im.size) > IMAGE_MAX:  # a large sample is inlined at a reviewable size
                im.thumbnail((IMAGE_MAX, IMAGE_MAX), Image.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data = buf.getvalue()
            else:
                data = path.read_bytes()
        uri = data_uri(data, "image/png")
        return f"<img{pixels} width=\"{width}\" alt=\"{escape(row['file'])}\" src=\"{uri}\">"
    if suffix == ".mp4":
        return f"<img alt=\"{escape(row['file'])}\" src=\"{_gif(path)}\">"
    if suffix == ".wav":
        wav = data_uri(path.read_bytes(), "audio/wav")
        return (f"<audio controls preload=\"auto\" src=\"{wav}\"></audio><br>"
                f"<img alt=\"spectrogram of {escape(row['file'])}\" src=\"{_spectrogram(path)}\">")
    return f"<span class=\"note\">{escape(row['file'])}: no preview for {escape(suffix)} files</span>"


def _gif(path: Path) -> str:
    """An mp4 clip as an animated GIF data URI (at most ``GIF_FRAMES`` evenly spaced frames, ``GIF_HEIGHT`` px)."""
    from alignkit.media.video import read_video

    frames = read_video(path).numpy()  # [F, H, W, 3] uint8
    index = np.linspace(0, len(frames) - 1, min(len(frames), GIF_FRAMES)).round().astype(int)
    h, w = frames.shape[1:3]
    size = (max(1, round(w * GIF_HEIGHT / h)), GIF_HEIGHT)
    images = [Image.fromarray(frames[i]).resize(size, Image.NEAREST) for i in index]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=125, loop=0)
    return data_uri(buf.getvalue(), "image/gif")


def _spectrogram(path: Path) -> str:
    from alignkit.media.audio import read_wav

    wave, rate = read_wav(path)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3.2, 1.6))
    x = wave[0].numpy()
    nfft = int(min(256, max(16, 2 ** math.floor(math.log2(max(16, len(x) // 8))))))
    ax.specgram(x, NFFT=nfft, Fs=rate, noverlap=nfft // 2, cmap="magma")
    ax.set_xlabel("s", fontsize=7)
    ax.set_ylabel("Hz", fontsize=7)
    ax.tick_params(labelsize=6)
    return figure_uri(fig)


def _threads_text(threads: dict[str, Any] | None) -> str | None:
    """The thread settings of one session (:class:`alignkit.cpu_threads.ThreadSettings`), or None before they were
    recorded."""
    if not threads:
        return None
    return (f"{threads.get('intra_op')} intra-op ({threads.get('source')}), {threads.get('inter_op')} inter-op; "
            f"OpenMP waiting: {threads.get('wait')}; usable CPUs {threads.get('usable_cpus')}")


def _config_section(run: RunDir) -> str:
    import yaml

    out = ["<h2>Configuration</h2>"]
    if run.config is None:
        out.append("<p>No config.yaml in the run folder.</p>")
    else:
        if run.overrides:
            out.append("<p>Command-line overrides: <code>" + escape(" ".join(run.overrides)) + "</code></p>")
        out.append(f"<details><summary>composed configuration ({escape(run.setting('recipe', ''))})</summary>"
                   f"<pre>{escape(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>")
    out.append("<h2>Environment</h2>")
    sessions = read_environment(run.path)
    if not sessions:
        out.append("<p>No environment.jsonl: the run predates it.</p>")
    for env in sessions:
        versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
        dirty = " (with uncommitted changes)" if env.get("dirty") else ""
        rows = [["session from epoch", env.get("start_epoch")], ["date (UTC)", env.get("date_utc")],
                ["commit", f"{env.get('commit')}{dirty}"], ["versions", versions],
                ["torch threads", env.get("torch_threads")],
                ["thread settings", _threads_text(env.get("threads"))],
                ["load average (1, 5, 15 min)", env.get("load_average")], ["CPUs", env.get("cpu_count")],
                ["device", f"{env.get('device_name')} ({env.get('device')}), {env.get('processes')} process(es)"],
                ["platform", env.get("platform")], ["command", " ".join(env.get("argv") or [])]]
        out.append(table(rows, header=False))
    if run.summary is not None:
        out.append("<details><summary>summary.json</summary><pre>"
                   + escape(json.dumps({k: v for k, v in run.summary.items() if k != "config"}, indent=1))
                   + "</pre></details>")
    return "\n".join(out)
