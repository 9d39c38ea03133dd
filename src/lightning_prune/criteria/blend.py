"""Blending pruning criteria (paper 3: He et al., "Blending Pruning Criteria for CNNs", ICANN 2021).

Two stages per group: (1) *criteria clustering* -- criteria whose rankings agree (distance ``1 − Spearman ρ``
below a threshold) are one cluster and only its representative is a blending candidate; (2) *importance
calibration* -- the blended score is ``s_i = Σ_k α_{l,k} · ŝ_{k,i}`` with ``ŝ`` each candidate's ranks divided
by the width (scale-free) and ``α ≥ 0`` per group and candidate, found by an evolutionary search whose fitness
is the accuracy of the network pruned (masked) to the target with those ``α``, without fine-tuning.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

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
            collective: the DDP ranks, which share the evaluations (default a single process).

        Data-driven members must have observed their data first (``score_groups(model, groups, blend,
        dataloader)``). Afterwards :meth:`score` uses the best ``α`` found; the result is also in ``self.result``.
        """
        start = time.perf_counter()
        layout = _GenomeLayout(self, graph, removal_counts)
        rng = np.random.RandomState(self.seed)
        initial = self._initial_population(layout, rng)
        ranks = collective if collective is not None else LOCAL
        clock = _Clock(self.time_limit_s, start, ranks)
        n_elite = max(1, int(np.ceil(self.elite_fraction * len(initial))))
        bar = _progress_bar(len(initial) + self.generations * (len(initial) - n_elite),
                            enabled=self.progress and ranks.rank == 0)
        fitness = _Fitness(graph, evaluate, layout, ranks, bar)
        try:
            population, initial_fitness = self._evaluate_initial(initial, fitness, clock)
            births = itertools.count(len(population))
            history = [population[0].fitness]
            for generation in range(self.generations):
                if clock.out_of_time():
                    break
                population = self._next_generation(population[:n_elite], len(initial), layout, fitness, clock,
                                                   rng, births)
                history.append(population[0].fitness)
                if self.progress:
                    log.info("blend search: generation %d/%d best fitness %.4f", generation + 1, self.generations,
                             population[0].fitness)
        finally:
            bar.close()
        self.alphas = layout.alphas(population[0].genome)
        self.result = BlendSearchResult(best_fitness=population[0].fitness, alphas=self.alphas, history=history,
                                        evaluations=fitness.evaluations, seconds=time.perf_counter() - start,
                                        initial_fitness=initial_fitness)
        return self.result

    def _initial_population(self, layout: _GenomeLayout,
                            rng: np.random.RandomState) -> list[tuple[str | None, np.ndarray]]:
        """Equal weights over the representatives, a one-hot individual per member present (pool order), then
        random ones up to ``population``; labelled, so that the result can report the named ones' fitness."""
        initial: list[tuple[str | None, np.ndarray]] = [("equal", layout.searchable.astype(float))]
        initial += [(member, layout.one_hot(member)) for member in self.member_names if layout.has_member(member)]
        while len(initial) < self.population:
            initial.append((None, rng.uniform(0.0, 1.0, layout.size) * layout.searchable))
        return initial

    @staticmethod
    def _evaluate_initial(initial: list[tuple[str | None, np.ndarray]], fitness: _Fitness,
                          clock: _Clock) -> tuple[list[_Individual], dict[str, float]]:
        """The initial population, best first, and the named individuals' fitness. One evaluation per rank
        between checks of the clock; the first chunk is always evaluated, so there is a best individual."""
        population: list[_Individual] = []
        named: dict[str, float] = {}
        chunk = fitness.ranks.world_size
        for first in range(0, len(initial), chunk):
            if clock.out_of_time() and population:
                break
            part = initial[first:first + chunk]
            for index, ((label, genome), value) in enumerate(zip(part, fitness([g for _, g in part])), first):
                if label is not None:
                    named[label] = value
                population.append(_Individual(value, index, genome))
        return _best_first(population), named

    def _next_generation(self, elites: list[_Individual], size: int, layout: _GenomeLayout, fitness: _Fitness,
                         clock: _Clock, rng: np.random.RandomState, births: Iterator[int]) -> list[_Individual]:
        """The elites and their children up to ``size`` individuals, best first (ties: the older one). One child
        per rank between checks of the clock."""
        children: list[_Individual] = []
        while len(elites) + len(children) < size and not clock.out_of_time():
            batch = []
            while len(elites) + len(children) + len(batch) < size and len(batch) < fitness.ranks.world_size:
                batch.append(self._child(elites, layout, rng))
            children += [_Individual(value, next(births), genome) for genome, value in zip(batch, fitness(batch))]
        return _best_first(elites + children)

    def _child(self, elites: list[_Individual], layout: _GenomeLayout, rng: np.random.RandomState) -> np.ndarray:
        """Uniform crossover of two elites, then Gaussian mutation of the weights the search may move (the
        representatives', and any a parent already uses), clipped to ``α ≥ 0``."""
        a, b = rng.randint(len(elites)), rng.randint(len(elites))
        child = np.where(rng.rand(layout.size) < 0.5, elites[a].genome, elites[b].genome)
        noise = rng.normal(0.0, self.mutation_std, layout.size)
        return np.clip(child + noise * (layout.searchable | (child > 0)), 0.0, None)

    def __repr__(self) -> str:
        return f"Blend([{', '.join(self.member_names)}], cluster_threshold={self.cluster_threshold})"


class _Individual(NamedTuple):
    fitness: float
    index: int  # order of birth: the older individual wins a tie
    genome: np.ndarray


def _best_first(population: list[_Individual]) -> list[_Individual]:
    return sorted(population, key=lambda individual: (-individual.fitness, individual.index))


@dataclass
class _GroupGenes:
    """One group's slice of a genome: a weight per member that could score the group."""

    name: str
    group: ChannelGroup
    remove: int
    members: list[str]
    ranks: dict[str, np.ndarray]
    searchable: np.ndarray  # per member: a cluster representative, which the search may move
    where: slice


class _GenomeLayout:
    """Where each group's blending weights sit in a flat genome, and what a genome means: ``α`` per group and the
    channels it removes."""

    def __init__(self, blend: Blend, graph: Any, removal_counts: Mapping[str, int]):
        self.genes: list[_GroupGenes] = []
        offset = 0
        for name, n in removal_counts.items():
            try:
                group = graph.group(name)
            except KeyError as error:
                raise ValueError(f"removal_counts: {error.args[0]} Accepted values are the names of "
                                 "graph.groups.") from None
            if int(n) <= 0:
                continue
            ranks = blend.member_ranks(group)
            members = list(ranks)
            representatives = set(blend.representatives(ranks))
            self.genes.append(_GroupGenes(name, group, int(n), members, ranks,
                                          np.array([m in representatives for m in members]),
                                          slice(offset, offset + len(members))))
            offset += len(members)
        self.size = offset
        self.searchable = (np.concatenate([g.searchable for g in self.genes]) if self.genes
                           else np.zeros(0, dtype=bool))

    def has_member(self, member: str) -> bool:
        return any(member in genes.members for genes in self.genes)

    def one_hot(self, member: str) -> np.ndarray:
        """All weight on ``member``; equal weights over the representatives of groups it cannot score."""
        genome = np.zeros(self.size)
        for genes in self.genes:
            block = np.array([1.0 if m == member else 0.0 for m in genes.members])
            genome[genes.where] = block if block.sum() > 0 else genes.searchable.astype(float)
        return genome

    def alphas(self, genome: np.ndarray) -> dict[str, dict[str, float]]:
        """Each group's weights normalized to sum 1 (all zero: equal weights over the representatives)."""
        result = {}
        for genes in self.genes:
            weights = genome[genes.where].copy()
            if weights.sum() <= 0:
                weights = genes.searchable / genes.searchable.sum()
            weights = weights / weights.sum()
            result[genes.name] = {m: float(w) for m, w in zip(genes.members, weights)}
        return result

    def removals(self, genome: np.ndarray) -> dict[str, list[int]]:
        alphas = self.alphas(genome)
        return {genes.name: genes.group.lowest(Blend._blend(genes.ranks, alphas[genes.name]), genes.remove)
                for genes in self.genes}


class _Fitness:
    """The fitness of genomes, cached by value. Unseen genomes are dealt round-robin to the DDP ranks, each
    evaluated with rank zero's BatchNorm buffers, and the results gathered, so every rank gets the same values."""

    def __init__(self, graph: Any, evaluate: Callable[[], float], layout: _GenomeLayout, ranks: Any, bar: Any):
        self.graph, self.evaluate, self.layout, self.ranks, self.bar = graph, evaluate, layout, ranks, bar
        self.cache: dict[bytes, float] = {}
        self.evaluations = 0

    def __call__(self, genomes: list[np.ndarray]) -> list[float]:
        keys = [np.round(g, 12).tobytes() for g in genomes]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        by_key = dict(zip(keys, genomes))
        measured = {}
        with preserved_state(self.graph.model):
            self.ranks.sync_buffers(self.graph.model)
            self.graph.model.eval()
            for key in todo[self.ranks.rank::self.ranks.world_size]:
                with self.graph.masked(self.layout.removals(by_key[key])):
                    measured[key] = float(self.evaluate())
        for part in self.ranks.gather(measured) if self.ranks.is_distributed else [measured]:
            self.cache.update(part)
        self.evaluations += len(todo)
        self.bar.update(len(todo))
        return [self.cache[k] for k in keys]


class _Clock:
    """``time_limit_s`` for the search; under DDP rank zero's clock decides, so all ranks stop together."""

    def __init__(self, limit_s: float | None, start: float, ranks: Any):
        self.deadline = None if limit_s is None else start + float(limit_s)
        self.ranks = ranks

    def out_of_time(self) -> bool:
        over = self.deadline is not None and time.perf_counter() > self.deadline
        return bool(self.ranks.gather(over)[0]) if self.ranks.is_distributed else over


def _progress_bar(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None:
        return _NoBar()
    return tqdm(total=total, desc="blend search", leave=False, disable=not enabled)


class _NoBar:  # pragma: no cover - tqdm is a dependency of Lightning
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@register("blend")
def blend(criteria: Sequence[Criterion | str] = DEFAULT_POOL, **kwargs: Any) -> Blend:
    """``get("blend")``: a :class:`Blend` of the default pool (weight and data-driven criteria)."""
    return Blend(criteria, **kwargs)
