"""Structured pruning of a timm student to a cost or latency target.

Torch-Pruning's four steps (importance -> pruner -> ``step()`` -> fine-tune), driven by cost:
``PruneConfig.target = {"macs": 0.5}`` keeps half the student's multiply-accumulates (or
``{"params": 0.5}`` half its parameters). A *channel ratio* p is torch-pruning's
``pruning_ratio``: the fraction of output channels removed from every prunable layer (with
global pruning, of all channels together). Both sides of most convolutions shrink, so MACs fall
roughly to (1 - p)^2; p = 0.3 already keeps only ~47% of the MACs of these students. The ratio
that meets a target is found by trying it on deep copies of the network.

Iterative pruning: round k of ``steps`` aims at ``1 - k/steps * (1 - target)`` of the unpruned
cost, and its channel ratio (relative to the channels left at that round) is solved for on the
current weights; a round whose goal is already met prunes nothing (ratio 0). Torch-Pruning's own
``iterative_steps`` fixes every round's ratio up front, which cannot promise the final cost once
fine-tuning between rounds changes the importance ranking (global pruning, Taylor); solving each
round on the current weights can.

A latency target (``{"latency_ms": 2.0}``) is met by measurement, not by counting:
:mod:`student.latency_target` times pruned copies on the deployment runtime, and hands the MACs of
the least-pruned copy that met it to this pruner as ``macs_goal``; the rounds then run as for a
MAC target whose last round must not exceed that count.

MACs are counted as the report counts them (:func:`profiling.cost.counting.count_macs`, fvcore,
BatchNorm folded into the convolution), so ``{macs: 0.3}`` is 30% of the MACs the report shows.

Saving: :meth:`StudentPruner.structure` gives the pruning as JSON-able data, which
:func:`training.pruned.rebuild_pruned` replays on a fresh timm model so the safetensors weights
load (no pickle).

After pruning, create any optimizer, EMA or scheduler anew: one made before holds the old
parameters. ``num_features`` / ``head_hidden_size`` are re-measured here, so timm's
``reset_classifier`` works again; size projectors with :func:`training.pruned.feature_dim`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch_pruning as tp
from torch import Tensor, nn

from core.errors import UserError
from profiling.cost.counting import count_macs, count_params
from training.pruned import FORMAT, arch_of, on_device, rebuild_pruned, replay, shapes, sync_widths, traced
from student.config import PruneConfig

__all__ = ["IMPORTANCES", "StudentPruner", "cost", "prune_channels", "prune_options", "pruned_copy"]

#: Channel importance criteria, by ``prune.importance`` name. Taylor needs gradients in ``.grad``.
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2),
}

# Channel ratios tried, low to high, before bisecting: cost is not monotone in the ratio near 1
# (layers that round_to would empty are left whole), so the first ratio that meets the target
# is searched from below.
_GRID = tuple(i / 10 for i in range(1, 10))
_TOLERANCE = 0.005


def _se_classes() -> tuple[type[nn.Module], ...]:
    from timm.layers import SqueezeExcite
    from timm.layers.squeeze_excite import SEModule
    from timm.models._efficientnet_blocks import SqueezeExcite as EfficientNetSE

    return EfficientNetSE, SqueezeExcite, SEModule


def cost(net: nn.Module, example: Tensor) -> tuple[int, int]:
    """(macs, params) as the report counts them: fvcore's MACs at ``example``'s size with BatchNorm
    folded (:attr:`profiling.cost.counting.MacCount.macs_bn_folded`), and the parameters. The net's
    train/eval mode is left as is. ~0.15 s for MobileNetV3-Large at 224 px, a fraction of a trial."""
    return count_macs(net, on_device(net, example)).macs_bn_folded, count_params(net)


def _importance(name: str) -> tp.importance.Importance:
    if name not in IMPORTANCES:
        raise UserError(f"prune.importance: unknown '{name}'; choose one of {', '.join(IMPORTANCES)}")
    return IMPORTANCES[name]()


def prune_channels(net: nn.Module, example: Tensor, ratio: float, *, importance: str = "magnitude",
                   global_pruning: bool = False, round_to: int | None = 8,
                   prune_se: bool = True) -> list[list[Any]]:
    """Remove channel ratio ``ratio`` from ``net`` in place (one torch-pruning round); return the
    round's pruning history as JSON-able ``[layer_name, out_channels, [removed indices]]`` rows.

    The classifier is never pruned. With ``prune_se=False`` every squeeze-excitation module is
    ignored: its convolutions keep their shapes, and so do the block channels its gate multiplies
    (which is why keeping SE costs about half the MAC savings). ``importance="taylor"`` reads
    ``.grad``, so call ``loss(net).backward()`` first.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"channel ratio must be in [0, 1), got {ratio}")
    scorer = _importance(importance)
    if importance == "taylor" and all(p.grad is None for p in net.parameters()):
        raise ValueError("taylor importance needs gradients: call loss_fn(net).backward() before pruning")
    ignored: list[nn.Module] = [net.get_classifier()]
    if not prune_se:
        ignored += [m for m in net.modules() if isinstance(m, _se_classes())]
    with traced(net):
        pruner = tp.pruner.BasePruner(net, on_device(net, example), scorer, pruning_ratio=ratio,
                                      global_pruning=global_pruning, round_to=round_to, ignored_layers=ignored)
        pruner.step()
    return [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in pruner.pruning_history()]


def _clone(net: nn.Module) -> nn.Module:
    """A deep copy with the gradients too (``Parameter.__deepcopy__`` drops ``.grad``), for Taylor."""
    twin = copy.deepcopy(net)
    for mine, theirs in zip(twin.parameters(), net.parameters(), strict=True):
        if theirs.grad is not None:
            mine.grad = theirs.grad.detach().clone()
    return twin


def pruned_copy(net: nn.Module, example: Tensor, ratio: float, **options: Any) -> tuple[nn.Module, list[list[Any]]]:
    """A deep copy of ``net`` (gradients included, for Taylor) with channel ratio ``ratio`` removed by
    :func:`prune_channels` with ``options``, and that round's history; ``net`` is left untouched."""
    twin = _clone(net)
    return twin, prune_channels(twin, example, ratio, **options)


def prune_options(cfg: PruneConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`prune_channels` that ``cfg`` sets."""
    return {"importance": cfg.importance, "global_pruning": cfg.global_pruning, "round_to": cfg.round_to,
            "prune_se": cfg.prune_se}


class StudentPruner:
    """Prune ``net`` in place to ``cfg.target`` of its cost over ``cfg.steps`` calls of :meth:`step`.

    ``loss_fn(net)`` returns a scalar loss on a batch; it is needed (and only used) for Taylor
    importance, which reads the gradients of ``loss_fn(net).backward()`` taken before each round.
    The caller fine-tunes between rounds, with an optimizer created after each round.

    A ``{latency_ms: X}`` target needs ``macs_goal``: the MACs of the pruned copy that was measured
    to meet it (:func:`student.latency_target.search_latency_ratio`); the last round keeps at most
    that many, earlier rounds are interpolated by MACs. ``latency`` (the search's record) is kept
    in :meth:`structure`.
    """

    def __init__(self, net: nn.Module, example: Tensor, cfg: PruneConfig,
                 loss_fn: Callable[[nn.Module], Tensor] | None = None, *, macs_goal: int | None = None,
                 latency: dict[str, Any] | None = None) -> None:
        _importance(cfg.importance)  # fail on a bad name before any work
        if cfg.importance == "taylor" and loss_fn is None:
            raise ValueError("prune.importance=taylor needs a loss_fn(net) -> loss for the gradients")
        self.net, self.example, self.cfg, self.loss_fn = net, example, cfg, loss_fn
        self.metric, self.kept = next(iter(cfg.target.items()))
        self.macs0, self.params0 = cost(net, example)
        if self.metric == "latency_ms":
            if macs_goal is None:
                raise ValueError("a latency_ms target needs macs_goal: the MACs of the copy measured to meet it "
                                 "(student.latency_target.search_latency_ratio)")
            self.metric, self.kept = "macs", macs_goal / self.macs0
        elif macs_goal is not None:
            raise ValueError(f"macs_goal is for a latency_ms target; prune.target is {cfg.target}")
        #: The last round's goal: exactly ``macs_goal`` for a latency target (no float rounding).
        self.final_goal = float(macs_goal) if macs_goal is not None else self._base() * self.kept
        self.latency = latency
        self._shapes0 = shapes(net)
        self._history: list[list[Any]] = []
        self.rounds: list[dict[str, Any]] = []

    def _base(self) -> int:
        return self.macs0 if self.metric == "macs" else self.params0

    @property
    def done(self) -> bool:
        return len(self.rounds) >= self.cfg.steps

    def _options(self) -> dict[str, Any]:
        return prune_options(self.cfg)

    def _trial(self, ratio: float) -> tuple[tuple[int, int], list[list[Any]]]:
        twin, history = pruned_copy(self.net, self.example, ratio, **self._options())
        return cost(twin, self.example), history

    def _solve(self, goal: float, now: tuple[int, int]) -> tuple[float, list[list[Any]]]:
        """A channel ratio whose round leaves cost <= goal: 0 if ``now`` already does, else the first
        of 0.1, 0.2, ... 0.9 that does, bisected against the one below it down to 0.005 (so the
        target is met, not overshot)."""
        index = 0 if self.metric == "macs" else 1
        if now[index] <= goal:
            return 0.0, []
        lo, found, best = 0.0, None, None
        for ratio in _GRID:
            (counts, history) = self._trial(ratio)
            best = counts[index] if best is None else min(best, counts[index])
            if counts[index] <= goal:
                found = (ratio, history)
                break
            lo = ratio
        if found is None:
            base = self.macs0 if index == 0 else self.params0
            c = self.cfg
            raise UserError(
                f"prune.target {{{self.metric}: {self.kept:.4g}}}{self._as_latency()} is out of reach in round "
                f"{len(self.rounds) + 1}: "
                f"channel ratios up to {_GRID[-1]} keep at least {best / base:.3f} of the {self.metric} "
                f"(round_to={c.round_to}, prune_se={c.prune_se}, global_pruning={c.global_pruning}); "
                f"raise the target, or allow more pruning (prune_se: true, a smaller round_to)")
        hi, history = found
        while hi - lo > _TOLERANCE:
            mid = (lo + hi) / 2
            counts, mid_history = self._trial(mid)
            if counts[index] <= goal:
                hi, history = mid, mid_history
            else:
                lo = mid
        return hi, history

    def _as_latency(self) -> str:
        ms = self.cfg.target.get("latency_ms")
        return "" if ms is None else f" (the MACs of the copy measured at {ms} ms)"

    def step(self) -> dict[str, Any]:
        """One pruning round; returns its channel ratio and the cost before and after it."""
        if self.done:
            raise RuntimeError(f"all {self.cfg.steps} pruning rounds are done")
        k = len(self.rounds) + 1
        goal = self.final_goal if k == self.cfg.steps else self._base() * (1.0 - k / self.cfg.steps * (1.0 - self.kept))
        macs_before, params_before = cost(self.net, self.example)
        if self.loss_fn is not None and self.cfg.importance == "taylor":
            self.net.zero_grad(set_to_none=True)
            self.loss_fn(self.net).backward()
        ratio, history = self._solve(goal, (macs_before, params_before))
        replay(self.net, self.example, history)  # exactly the trial that met the goal
        self.net.zero_grad(set_to_none=True)
        sync_widths(self.net, self.example)
        self._history += history
        macs, params = cost(self.net, self.example)
        record = {"round": k, "steps": self.cfg.steps, "ratio": round(ratio, 6),
                  "macs_before": macs_before, "macs_after": macs,
                  "params_before": params_before, "params_after": params,
                  "macs_kept": macs / self.macs0, "params_kept": params / self.params0}
        self.rounds.append(record)
        return record

    def restore(self, structure: dict[str, Any]) -> None:
        """Continue a pruning that was interrupted: replay a saved :meth:`structure` of this
        pruner's own earlier rounds onto the (still unpruned) net."""
        if self.rounds:
            raise RuntimeError("restore() must be called on a fresh pruner")
        rebuild_pruned(self.net, self.example, structure)
        self._history = [list(row) for row in structure["history"]]
        self.rounds = [dict(r) for r in structure["rounds"]]
        self.latency = structure.get("latency", self.latency)

    def structure(self) -> dict[str, Any]:
        """The pruning so far as JSON-able data, for ``meta.json`` and :func:`rebuild_pruned`."""
        now = shapes(self.net)
        return {
            "format": FORMAT,
            "torch_pruning": version("torch-pruning"),
            "arch": arch_of(self.net),
            "input_size": list(self.example.shape),
            "target": dict(self.cfg.target),
            **self._options(),
            "macs": [self.macs0, self.rounds[-1]["macs_after"] if self.rounds else self.macs0],
            "params": [self.params0, self.rounds[-1]["params_after"] if self.rounds else self.params0],
            "rounds": [dict(r) for r in self.rounds],
            "shapes": {k: v for k, v in now.items() if v != self._shapes0.get(k)},
            "history": [list(row) for row in self._history],
            **({"latency": self.latency} if self.latency is not None else {}),
        }
