"""Reward interface and the multi-objective reward set.

A reward is a callable ``reward(samples, prompts, metadata) -> sequence of float | None`` with one score
per sample. ``None`` or NaN means "could not score": the sample is masked (its transitions do not train)
and counted, never replaced by a sentinel. Rewards are found by registry name (a factory called with the
term's ``kwargs``) or by dotted import path (a class is instantiated with ``kwargs``; a function is the
reward itself and receives ``kwargs`` as keyword arguments at every call). Naming a dotted path runs that
module's code, as running it as a script would. A ``kwargs`` value ``env:VAR`` is replaced by environment
variable ``VAR`` when the reward is built (:func:`resolve_env`); the configuration keeps the text.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from alignkit.config import RewardTermConfig
from alignkit.credit import group_normalize
from alignkit.errors import RewardError
from alignkit.registry import REWARDS, is_import_path

logger = logging.getLogger(__name__)


class Reward(Protocol):
    """One score per sample."""

    def __call__(
        self, samples: Any, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> Sequence[float | None] | torch.Tensor: ...


@dataclass
class RewardTerm:
    """A named, weighted reward; ``timeout``: seconds one call may take (None: no limit), see
    :func:`call_with_timeout`."""

    name: str
    fn: Reward
    weight: float
    timeout: float | None = None


class RewardOutputError(RewardError, ValueError):
    """A reward returned something other than one real number (or None) per sample."""


@dataclass
class RewardTable:
    """Scores of ``S`` samples.

    Attributes:
        raw: reward name -> ``[S]`` float32 scores, NaN where the reward could not score.
        invalid: reward name -> number of samples it could not score (None, NaN or inf).
    """

    raw: dict[str, torch.Tensor]
    invalid: dict[str, int]

    @staticmethod
    def cat(tables: Sequence[RewardTable], index: Sequence[torch.Tensor] | None = None) -> RewardTable:
        """Concatenate the tables of consecutive chunks; with ``index`` (the sample indices ``[n_i]`` of each
        chunk), put every score at its sample's position instead."""
        raw = {name: torch.cat([t.raw[name] for t in tables]) for name in tables[0].raw}
        if index is not None:
            order = torch.argsort(torch.cat(list(index)))
            raw = {name: v[order] for name, v in raw.items()}
        return RewardTable(raw=raw, invalid={name: sum(t.invalid[name] for t in tables) for name in tables[0].invalid})


def to_scores(name: str, out: Any, n: int) -> tuple[torch.Tensor, int]:
    """Validate a reward's output: ``[n]`` float32 with NaN for unscorable samples.

    Raises:
        RewardOutputError: naming the reward, the offending value and what to return instead.
    """
    if isinstance(out, torch.Tensor):
        values = out.detach().float().cpu().flatten().tolist() if out.dim() <= 1 else None
        if values is None:
            raise RewardOutputError(f"reward {name!r} returned a tensor of shape {tuple(out.shape)}; return shape "
                                    f"[{n}]")
    else:
        try:
            if isinstance(out, (str, bytes, dict)):
                raise TypeError  # iterable, but not scores
            values = list(out)
        except TypeError:
            raise RewardOutputError(f"reward {name!r} returned {type(out).__name__}; return a list of {n} "
                                    "floats") from None
    if len(values) != n:
        raise RewardOutputError(f"reward {name!r} returned {len(values)} scores for {n} samples; return one per "
                                "sample")
    scores = []
    for i, v in enumerate(values):
        if v is None:
            scores.append(math.nan)
            continue
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            try:
                scores.append(float(v))
                continue
            except OverflowError:
                raise RewardOutputError(f"reward {name!r} returned a number too large for a float for sample {i} "
                                        f"({_describe_number(v)}); return a float, or None when the sample cannot "
                                        "be scored") from None
        raise RewardOutputError(
            f"reward {name!r} returned {_short_repr(v)} ({type(v).__name__}) for sample {i}; "
            "return a float, or None when the sample cannot be scored"
        )
    t = torch.tensor(scores, dtype=torch.float32)
    bad = ~torch.isfinite(t)
    t[bad] = math.nan
    return t, int(bad.sum())


def _describe_number(v: numbers.Real) -> str:
    if isinstance(v, numbers.Integral):
        return f"an integer of {abs(int(v)).bit_length()} bits"
    return type(v).__name__


def _short_repr(v: Any, limit: int = 80) -> str:
    try:
        text = repr(v)
    except Exception:  # a repr that fails is still an answer to report
        return f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


ENV_PREFIX = "env:"


def resolve_env(value: Any, path: str) -> Any:
    """``value`` with every ``env:VAR`` string (in nested lists and mappings too) replaced by environment variable
    ``VAR`` (a string). Secrets such as tokens can so be given to a reward without being written in a recipe, a
    checkpoint or the saved configuration, which keep the ``env:VAR`` text.

    Raises:
        ValueError: naming ``path`` and the variable when it is not set.
    """
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        var = value[len(ENV_PREFIX):]
        if not var:
            raise ValueError(f"{path}={value!r}: name the environment variable, e.g. env:MY_TOKEN")
        if var not in os.environ:
            raise ValueError(f"{path}={value!r}: environment variable {var} is not set; export {var}=... before the "
                             "run (it is read when the reward is built and never saved)")
        return os.environ[var]
    if isinstance(value, dict):
        return {k: resolve_env(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def resolve_reward(name: str, term: RewardTermConfig) -> Reward:
    """Build the reward named by ``term.fn`` (``env:VAR`` kwargs resolved now; ``term`` is left unchanged) and
    check that it can be called as ``reward(samples, prompts, metadata)``.

    Raises:
        ImportError: one line naming ``reward.<name>.fn``, the module and the cause (see
            :func:`alignkit.registry.import_object`).
        ValueError: kwargs that do not fit, an unset ``env:`` variable, a reward that cannot take
            ``(samples, prompts, metadata)``, or the reward's own check of its kwargs.
        RewardError: the reward's constructor raised anything else.
    """
    try:
        obj = REWARDS.get(term.fn)
    except ImportError as exc:
        raise ImportError(f"reward.{name}.fn={term.fn!r}: {exc}") from None
    kwargs = resolve_env(term.kwargs, f"reward.{name}.kwargs")
    if term.fn in REWARDS or inspect.isclass(obj):
        try:
            reward = obj(**kwargs)
        except TypeError as exc:
            raise ValueError(f"reward.{name}.kwargs={term.kwargs} do not fit {term.fn!r}: {exc}") from exc
        except (ValueError, FileNotFoundError, ImportError):
            raise  # the reward's own checks: their messages name the setting
        except Exception as exc:
            raise RewardError(f"reward.{name}.fn={term.fn!r}: building the reward raised {type(exc).__name__}: "
                              f"{exc}") from exc
    elif is_import_path(term.fn) and callable(obj):
        problem = _signature_problem(obj, kwargs) if kwargs else None
        if problem is not None:
            raise ValueError(f"reward.{name}.kwargs={term.kwargs} do not fit {term.fn!r}: {problem}")
        reward = functools.partial(obj, **kwargs) if kwargs else obj
    else:
        raise ValueError(f"reward.{name}.fn={term.fn!r} is not callable")
    if not callable(reward):
        raise ValueError(f"reward.{name}.fn={term.fn!r} built a {type(reward).__name__}, which cannot be called; a "
                         "reward is a function or an object with __call__(samples, prompts, metadata)")
    problem = _signature_problem(reward, {})
    if problem is not None:
        raise ValueError(f"reward.{name}.fn={term.fn!r} cannot be called as reward(samples, prompts, metadata): "
                         f"{problem}; give it those three parameters (and its settings as keyword arguments)")
    return reward


def _signature_problem(fn: Callable[..., Any], kwargs: dict[str, Any]) -> str | None:
    """Why ``fn(samples, prompts, metadata, **kwargs)`` would not bind, or None (also when ``fn`` has no
    signature to check, e.g. a builtin)."""
    try:
        inspect.signature(fn).bind(None, None, None, **kwargs)
    except TypeError as exc:
        return str(exc)
    except ValueError:
        return None
    return None


class CallTimeout(TimeoutError):
    """:func:`call_with_timeout` stopped waiting (a call's own ``TimeoutError`` is not one)."""


def call_with_timeout(fn: Callable[..., Any], args: tuple[Any, ...], timeout: float, what: str) -> Any:
    """``fn(*args)`` on a daemon thread, waiting at most ``timeout`` seconds for it.

    Grad mode and the current CUDA device are those of the caller. A Python thread cannot be killed: after a
    timeout the call runs on in the background (holding what it holds: memory, a GPU, a lock of its own) until
    it returns, and its result is dropped; the daemon thread does not keep the process alive at exit.

    Raises:
        CallTimeout: ``what`` gave no answer within ``timeout`` seconds.
        the call's own exception, when it raised in time.
    """
    box: dict[str, Any] = {}
    done = threading.Event()
    grad = torch.is_grad_enabled()
    cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def run() -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            with torch.set_grad_enabled(grad):
                box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"alignkit-call-{what}", daemon=True).start()
    if not done.wait(timeout):
        raise CallTimeout(f"{what} gave no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class RewardSet:
    """Named, weighted rewards with one aggregation mode.

    ``sum_then_normalize`` (Flow-GRPO): the score is the weighted sum of raw rewards, normalised later
    by the credit assigner. ``normalize_then_sum`` (GDPO / MixGRPO): each reward is group-normalised
    first, then weighted and summed. A sample with any invalid reward has an invalid (NaN) score.
    """

    def __init__(self, terms: list[RewardTerm], aggregation: str = "sum_then_normalize") -> None:
        if not terms:
            raise ValueError("a reward set needs at least one reward")
        if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError(f"unknown reward aggregation {aggregation!r}; use sum_then_normalize or "
                             "normalize_then_sum")
        self.terms = terms
        self.aggregation = aggregation

    @classmethod
    def from_config(cls, cfg: dict[str, RewardTermConfig], aggregation: str) -> RewardSet:
        terms = [RewardTerm(name, resolve_reward(name, t), t.weight, t.timeout) for name, t in cfg.items()]
        return cls(terms, aggregation)

    def score(self, samples: Any, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> RewardTable:
        """Every reward's ``[S]`` scores. Tensor samples with a non-finite value (a diverged decode) are not
        shown to the rewards: they score NaN under every reward and count as invalid."""
        n = len(prompts)
        rows = finite_rows(samples, n)
        if len(rows) < n:
            logger.warning("%d of %d samples have non-finite values: masked under every reward", n - len(rows), n)
            samples = samples[rows]
            prompts = [prompts[i] for i in rows.tolist()]
            metadata = [metadata[i] for i in rows.tolist()]
        raw: dict[str, torch.Tensor] = {}
        invalid: dict[str, int] = {}
        for term in self.terms:
            out = self._call(term, samples, list(prompts), list(metadata))
            scores, bad = to_scores(term.name, out, len(prompts))
            if bad:
                logger.warning("reward %r could not score %d of %d samples (masked)", term.name, bad, len(prompts))
            raw[term.name] = torch.full((n,), math.nan).index_copy_(0, rows, scores)
            invalid[term.name] = bad + n - len(rows)
        return RewardTable(raw=raw, invalid=invalid)

    @staticmethod
    def _call(term: RewardTerm, samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> Any:
        """One reward call, within ``term.timeout`` seconds when set; every failure is a :class:`RewardError`."""
        try:
            if term.timeout is None:
                return term.fn(samples, prompts, metadata)
            return call_with_timeout(term.fn, (samples, prompts, metadata), term.timeout, f"reward {term.name!r}")
        except CallTimeout:
            raise RewardError(
                f"reward {term.name!r} gave no scores within {term.timeout:g} s (reward.{term.name}.timeout="
                f"{term.timeout:g}); raise that setting if the reward is just slow, or find where it hangs (a lock, "
                "a network call, a stuck device). The call keeps running on its thread (a Python thread cannot be "
                "killed) and its result is dropped"
            ) from None
        except Exception as exc:
            raise RewardError(f"reward {term.name!r} raised {type(exc).__name__}: {exc}") from exc

    def aggregate(
        self, table: RewardTable, groups: torch.Tensor, *, std: str = "group", eps: float = 1e-4
    ) -> torch.Tensor:
        """``[S]`` combined score, NaN where any weighted reward is invalid.

        Rewards of weight 0 are logged only: they neither change nor mask the score. With
        ``normalize_then_sum`` every reward is normalised over the samples valid under all weighted rewards,
        so a sample masked by one reward does not shift another reward's group statistics.
        """
        weighted = [t for t in self.terms if t.weight != 0]
        if not weighted:
            raise ValueError("every reward has weight 0: give at least one reward a non-zero weight")
        valid = torch.stack([~torch.isnan(table.raw[t.name]) for t in weighted]).all(dim=0)  # [S]
        total = torch.zeros_like(table.raw[weighted[0].name])
        for term in weighted:
            r = torch.where(valid, table.raw[term.name], torch.full_like(total, math.nan))  # [S]
            if self.aggregation == "normalize_then_sum":
                r, _ = group_normalize(r, groups, std=std, eps=eps)
            total = total + term.weight * r
        return total


def finite_rows(samples: Any, n: int) -> torch.Tensor:
    """``[k]`` indices of the samples without NaN / inf values (all ``n`` for non-tensor samples)."""
    if not (isinstance(samples, torch.Tensor) and samples.is_floating_point()):
        return torch.arange(n)
    flat = samples.detach().reshape(samples.shape[0], -1)  # [S, D]
    return torch.isfinite(flat).all(dim=1).cpu().nonzero().flatten()


class OverlappedScorer:
    """Scores chunks of finished samples on a worker thread while the rollout goes on.

    Pass :meth:`submit` as the rollout engine's sink; :meth:`result` waits for every chunk and returns the
    table in sample order, equal to scoring all samples at once. Rewards run one chunk at a time, in
    submission order, on a single thread.
    """

    def __init__(self, reward_set: RewardSet, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
        self.reward_set = reward_set
        self.prompts, self.metadata = list(prompts), list(metadata)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-reward")
        self._futures: list[tuple[torch.Tensor, Future[RewardTable]]] = []

    def submit(self, sample_index: torch.Tensor, prompt_index: torch.Tensor, samples: Any) -> None:
        """Queue ``samples`` (sample indices ``[n]``, prompt indices ``[n]``) for scoring."""
        ps = [self.prompts[i] for i in prompt_index.tolist()]
        ms = [self.metadata[i] for i in prompt_index.tolist()]
        self._futures.append((sample_index.clone(), self._pool.submit(self.reward_set.score, samples, ps, ms)))

    def cancel(self) -> None:
        """Drop the chunks not scored yet (the epoch is abandoned); waits for the one being scored."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def result(self) -> RewardTable:
        """The table of every submitted sample, in sample order; re-raises a reward's error."""
        try:
            tables = [f.result() for _, f in self._futures]
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if not tables:
            raise RuntimeError("no samples were submitted for scoring")
        return RewardTable.cat(tables, [i for i, _ in self._futures])


RewardFactory = Callable[..., Reward]
