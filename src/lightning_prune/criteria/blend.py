"""Blending pruning criteria (paper 3: He et al., "Blending Pruning Criteria for CNNs", ICANN 2021).

Two stages per group: (1) *criteria clustering* -- criteria whose rankings agree (distance ``1 − Spearman ρ``
below a threshold) are one cluster and only its representative is a blending candidate; (2) *importance
calibration* -- the blended score is ``s_i = Σ_k α_{l,k} · ŝ_{k,i}`` with ``ŝ`` each candidate's ranks divided
by the width (scale-free) and ``α ≥ 0`` per group and candidate, found by an evolutionary search whose fitness
is the accuracy of the network pruned (masked) to the target with those ``α``, without fine-tuning.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..allocation.evaluation import LOCAL
from ..structure import ChannelGroup
from ..structure.tracing import preserved_state
from .base import Criterion, get, register
from .variety import cluster_labels

log = logging.getLogger(__name__)

DEFAULT_POOL = ("l1", "l2", "fpgm", "fermat", "bn_scale", "taylor", "apoz", "sd")


def normalized_ranks(scores: torch.Tensor) -> np.ndarray:
    """Scores → ranks / n in (0, 1] (1 = best), ties sharing their average rank."""
    from scipy.stats import rankdata

    values = scores.detach().to(torch.float64).cpu().numpy()
    return rankdata(values, method="average") / len(values)


def spearman_distance(ranks: Sequence[np.ndarray]) -> np.ndarray:
    """``1 − ρ`` between every pair of rank vectors (Spearman ρ = Pearson correlation of ranks). A constant
    ranking is uncorrelated (ρ = 0) with every non-constant one and identical to other constant ones."""
    k = len(ranks)
    matrix = np.stack(ranks) if k else np.zeros((0, 0))
    centered = matrix - matrix.mean(1, keepdims=True)
    norms = np.sqrt((centered**2).sum(1))
    distance = np.ones((k, k))
    for i in range(k):
        for j in range(k):
            if i == j or (norms[i] == 0 and norms[j] == 0):
                distance[i, j] = 0.0
            elif norms[i] > 0 and norms[j] > 0:
                rho = float(centered[i] @ centered[j] / (norms[i] * norms[j]))
                distance[i, j] = 1.0 - min(max(rho, -1.0), 1.0)
    return np.clip((distance + distance.T) / 2, 0.0, 2.0)


@dataclass
class BlendSearchResult:
    """What :meth:`Blend.search` found."""

    best_fitness: float
    alphas: dict[str, dict[str, float]]
    history: list[float] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    initial_fitness: dict[str, float] = field(default_factory=dict)


class Blend(Criterion):
    """Blend several criteria with per-group weights found by an evolutionary search (paper 3).

    Args:
        criteria: the pool (instances or names); default :data:`DEFAULT_POOL` for ``get("blend")``.
        cluster_threshold: criteria at ``1 − ρ`` below this (average linkage) form one cluster; one
            representative (the first in pool order) per cluster is a blending candidate. Default 0.2.
        population, generations, elite_fraction, mutation_std: the search (defaults 20, 10, 0.25, 0.1).
            Elitist selection keeps the top ``elite_fraction``; children get uniform crossover of two elites and
            Gaussian mutation of the candidates' weights, clipped to ``α ≥ 0``.
        seed: seeds the search's ``numpy`` generator; the same seed and fitness give the same result.
        time_limit_s: stop the search after this many seconds (checked between evaluations); ``None`` = no limit.
        progress: show a tqdm bar (and log one line per generation).

    [design] The initial population holds the equal-weights individual and a one-hot individual for *every*
    member of the pool (not only the representatives), evaluated before any random individual; with elitism the
    result is therefore never worse on the fitness set than the best single criterion (unless ``time_limit_s``
    stops the search after the initial population). A member that cannot score a group (``bn_scale`` on a group
    without BatchNorm) is left out for that group. Before :meth:`search`, :meth:`score` uses equal weights over
    the representatives.

    The data protocol is forwarded to every member (their state keys are prefixed with ``"<index>/"``).
    """

    name = "blend"

    def __init__(
        self,
        criteria: Sequence[Criterion | str] = DEFAULT_POOL,
        cluster_threshold: float = 0.2,
        population: int = 20,
        generations: int = 10,
        elite_fraction: float = 0.25,
        mutation_std: float = 0.1,
        seed: int = 0,
        time_limit_s: float | None = None,
        progress: bool = True,
    ):
        super().__init__()
        if isinstance(criteria, (str, Criterion)):
            criteria = [criteria]
        self.members: list[Criterion] = [get(c) for c in criteria]
        if not self.members:
            raise ValueError("criteria: Blend needs at least one criterion")
        if not 0.0 <= float(cluster_threshold) <= 2.0:
            raise ValueError(f"cluster_threshold must be in [0, 2] (a distance 1 - rho), got {cluster_threshold!r}")
        if int(population) < 1 or int(generations) < 0:
            raise ValueError("population must be >= 1 and generations >= 0")
        if not 0.0 < float(elite_fraction) <= 1.0:
            raise ValueError(f"elite_fraction must be in (0, 1], got {elite_fraction!r}")
        if float(mutation_std) < 0:
            raise ValueError(f"mutation_std must be >= 0, got {mutation_std!r}")
        self.cluster_threshold = float(cluster_threshold)
        self.population = int(population)
        self.generations = int(generations)
        self.elite_fraction = float(elite_fraction)
        self.mutation_std = float(mutation_std)
        self.seed = int(seed)
        self.time_limit_s = time_limit_s
        self.progress = progress
        self.member_names = self._unique_names()
        self.alphas: dict[str, dict[str, float]] = {}
        self.result: BlendSearchResult | None = None

    def _unique_names(self) -> list[str]:
        names, seen = [], {}
        for member in self.members:
            base = getattr(member, "name", type(member).__name__)
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        return names

    @property
    def criteria(self) -> list[Criterion]:
        """The member criteria (alias of ``members``)."""
        return self.members

    # -- forwarded data protocol ----------------------------------------------------------------------------------
    @property
    def requires_data(self) -> bool:  # type: ignore[override]
        return any(m.requires_data for m in self.members)

    @property
    def requires_gradients(self) -> bool:  # type: ignore[override]
        return any(m.requires_gradients for m in self.members)

    @property
    def requires_labels(self) -> bool:  # type: ignore[override]
        return any(m.requires_labels for m in self.members)

    def reset(self) -> None:
        for member in self.members:
            member.reset()

    def observe(self, group, site, activation, gradient=None, labels=None) -> None:
        for member in self.members:
            if member.requires_data:
                member.observe(group, site, activation, gradient=gradient, labels=labels)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{i}/{k}": v for i, m in enumerate(self.members) for k, v in m.state().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, member in enumerate(self.members):
            prefix = f"{i}/"
            member.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    # -- per-group analysis ----------------------------------------------------------------------------------------
    def member_ranks(self, group: ChannelGroup) -> dict[str, np.ndarray]:
        """Each member's scores on ``group`` as ranks / n (members that cannot score the group are left out)."""
        ranks = {}
        errors = []
        for name, member in zip(self.member_names, self.members):
            try:
                scores = member.score(group)
            except ValueError as error:
                errors.append(f"{name}: {error}")
                continue
            ranks[name] = normalized_ranks(scores)
        if not ranks:
            raise ValueError(f"criterion 'blend': no member could score group {group.name!r}: " + "; ".join(errors))
        return ranks

    def representatives(self, ranks: Mapping[str, np.ndarray]) -> list[str]:
        """One member per cluster of ``1 − Spearman ρ`` (average linkage, ``cluster_threshold``): the first member
        of each cluster in pool order."""
        names = list(ranks)
        if len(names) == 1:
            return names
        labels = cluster_labels(spearman_distance([ranks[n] for n in names]), threshold=self.cluster_threshold)
        chosen, seen = [], set()
        for name, label in zip(names, labels):
            if label not in seen:
                seen.add(label)
                chosen.append(name)
        return chosen

    @staticmethod
    def _blend(ranks: Mapping[str, np.ndarray], alpha: Mapping[str, float]) -> torch.Tensor:
        size = len(next(iter(ranks.values())))
        total = np.zeros(size)
        for name, weight in alpha.items():
            if weight and name in ranks:
                total = total + weight * ranks[name]
        return torch.as_tensor(total, dtype=torch.float64)

    def score(self, group: ChannelGroup) -> torch.Tensor:
        ranks = self.member_ranks(group)
        alpha = self.alphas.get(group.name)
        if alpha is not None and any(alpha.get(n, 0.0) > 0 for n in ranks):
            return self._blend(ranks, alpha)
        reps = self.representatives(ranks)
        return self._blend(ranks, {n: 1.0 / len(reps) for n in reps})

    # -- evolutionary search -------------------------------------------------------------------------------------
    calibrates_on_validation = True

    def calibrate(self, graph: Any, evaluate: Callable[[], float], removal_counts: Mapping[str, int], *,
                  collective: Any = None) -> BlendSearchResult:
        """The allocation strategies' hook: :meth:`search` at the event's removal counts."""
        return self.search(graph, evaluate, removal_counts, collective=collective)

    def search(
        self,
        graph: Any,
        evaluate: Callable[[], float],
        removal_counts: Mapping[str, int],
        *,
        collective: Any = None,
    ) -> BlendSearchResult:
        """Search the blending weights ``α`` of every group in ``removal_counts``.

        Args:
            graph: the model's :class:`~lightning_prune.structure.DependencyGraph`.
            evaluate: returns the accuracy (higher = better) of the model as it is now on held-out batches; it is
                called inside :meth:`DependencyGraph.masked`, with the model in eval mode (modes are restored).
            removal_counts: ``{group name: channels to remove}``, the pruning target.

        Data-driven members must have observed their data first (``score_groups(model, groups, blend,
        dataloader)``). Afterwards :meth:`score` uses the best ``α`` found; the result is also in ``self.result``.
        """
        start = time.perf_counter()
        groups = {g.name: g for g in graph.groups}
        targets = {}
        for name, n in removal_counts.items():
            if name not in groups:
                try:
                    graph.group(name)
                except KeyError as error:
                    raise ValueError(f"removal_counts: {error.args[0]} Accepted values are the names of "
                                     "graph.groups.") from None
            if int(n) > 0:
                targets[name] = (groups[name], int(n))
        rng = np.random.RandomState(self.seed)

        # Per group: member ranks, the genome slice over members, which entries the search may move.
        layout = []  # (group name, group, n, member names, ranks, searchable mask)
        for name, (group, n) in targets.items():
            ranks = self.member_ranks(group)
            names = list(ranks)
            reps = set(self.representatives(ranks))
            layout.append((name, group, n, names, ranks, np.array([m in reps for m in names])))
        searchable = np.concatenate([entry[5] for entry in layout]) if layout else np.zeros(0, dtype=bool)
        slices, offset = [], 0
        for entry in layout:
            slices.append(slice(offset, offset + len(entry[3])))
            offset += len(entry[3])

        def alphas_of(genome: np.ndarray) -> dict[str, dict[str, float]]:
            result = {}
            for (name, _, _, names, _, mask), sl in zip(layout, slices):
                weights = genome[sl].copy()
                if weights.sum() <= 0:
                    weights = mask / mask.sum()
                weights = weights / weights.sum()
                result[name] = {m: float(w) for m, w in zip(names, weights)}
            return result

        cache: dict[bytes, float] = {}
        evaluations = 0
        ranks_of = collective if collective is not None else LOCAL
        deadline = None if self.time_limit_s is None else start + float(self.time_limit_s)
        modes = [(m, m.training) for m in graph.model.modules()]

        def removals_of(genome: np.ndarray) -> dict[str, list[int]]:
            alphas = alphas_of(genome)
            return {name: group.lowest(self._blend(ranks, alphas[name]), n)
                    for (name, group, n, _, ranks, _) in layout}

        def fitnesses(genomes: list[np.ndarray]) -> list[float]:
            """Fitness of every genome; the unseen ones are dealt round-robin to the DDP ranks, each evaluated
            with rank zero's BatchNorm buffers, and the results gathered, so every rank gets the same values."""
            nonlocal evaluations
            keys = [np.round(g, 12).tobytes() for g in genomes]
            todo = list(dict.fromkeys(k for k in keys if k not in cache))
            by_key = dict(zip(keys, genomes))
            mine = todo[ranks_of.rank::ranks_of.world_size]
            measured = {}
            with preserved_state(graph.model):
                ranks_of.sync_buffers(graph.model)
                graph.model.eval()
                for key in mine:
                    with graph.masked(removals_of(by_key[key])):
                        measured[key] = float(evaluate())
            for part in ranks_of.gather(measured) if ranks_of.is_distributed else [measured]:
                cache.update(part)
            evaluations += len(todo)
            bar.update(len(todo))
            return [cache[k] for k in keys]

        # Initial population: equal weights over representatives, one-hot per member (in pool order), random.
        members_in_pool = [m for m in self.member_names if any(m in entry[3] for entry in layout)]
        initial: list[tuple[str | None, np.ndarray]] = [("equal", searchable.astype(float))]
        for member in members_in_pool:
            genome = np.zeros(offset)
            for (_, _, _, names, _, mask), sl in zip(layout, slices):
                block = np.array([1.0 if m == member else 0.0 for m in names])
                genome[sl] = block if block.sum() > 0 else mask.astype(float)
            initial.append((member, genome))
        size = max(self.population, len(initial))
        while len(initial) < size:
            initial.append((None, rng.uniform(0.0, 1.0, offset) * searchable))

        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        total = size + self.generations * (size - max(1, int(np.ceil(self.elite_fraction * size))))
        bar = tqdm(total=total, desc="blend search", leave=False,
                   disable=not self.progress or tqdm is None or ranks_of.rank != 0)

        def out_of_time() -> bool:
            over = deadline is not None and time.perf_counter() > deadline
            return bool(ranks_of.gather(over)[0]) if ranks_of.is_distributed else over  # rank zero's clock decides

        population: list[tuple[float, int, np.ndarray]] = []
        initial_fitness: dict[str, float] = {}
        history: list[float] = []
        try:
            chunk = ranks_of.world_size  # one evaluation per rank between checks of the clock
            for start_at in range(0, len(initial), chunk):
                if out_of_time() and population:
                    break
                part = initial[start_at:start_at + chunk]
                for offset_in, ((label, genome), value) in enumerate(zip(part, fitnesses([g for _, g in part]))):
                    if label is not None:
                        initial_fitness[label] = value
                    population.append((value, start_at + offset_in, genome))
            counter = len(population)
            population.sort(key=lambda item: (-item[0], item[1]))
            history.append(population[0][0])
            n_elite = max(1, int(np.ceil(self.elite_fraction * size)))
            for generation in range(self.generations):
                if out_of_time():
                    break
                elites = population[:n_elite]
                scored = []
                while len(elites) + len(scored) < size and not out_of_time():
                    children = []
                    while len(elites) + len(scored) + len(children) < size and len(children) < chunk:
                        a, b = rng.randint(len(elites)), rng.randint(len(elites))
                        mask = rng.rand(offset) < 0.5
                        child = np.where(mask, elites[a][2], elites[b][2])
                        noise = rng.normal(0.0, self.mutation_std, offset)
                        movable = searchable | (child > 0)
                        children.append(np.clip(child + noise * movable, 0.0, None))
                    values = fitnesses(children)
                    scored.extend((v, counter + i, c) for i, (v, c) in enumerate(zip(values, children)))
                    counter += len(children)
                population = sorted(list(elites) + scored, key=lambda item: (-item[0], item[1]))
                history.append(population[0][0])
                if self.progress:
                    log.info("blend search: generation %d/%d best fitness %.4f", generation + 1, self.generations,
                             population[0][0])
        finally:
            bar.close()
            for module, training in modes:
                module.training = training

        best_fitness, _, best = population[0]
        self.alphas = alphas_of(best)
        self.result = BlendSearchResult(
            best_fitness=best_fitness,
            alphas=self.alphas,
            history=history,
            evaluations=evaluations,
            seconds=time.perf_counter() - start,
            initial_fitness=initial_fitness,
        )
        return self.result

    def __repr__(self) -> str:
        return f"Blend([{', '.join(self.member_names)}], cluster_threshold={self.cluster_threshold})"


@register("blend")
def blend(criteria: Sequence[Criterion | str] = DEFAULT_POOL, **kwargs: Any) -> Blend:
    """``get("blend")``: a :class:`Blend` of the default pool (weight and data-driven criteria)."""
    return Blend(criteria, **kwargs)
