"""Class-discrimination criteria (paper 2: Liu, Wentzlaff & Kung, "Rethinking Class-Discrimination Based CNN
Channel Pruning").

For channel ``k`` of the tensor that feeds a consumer, and each class ``c``, the images of class ``c`` form the
set P and all other images the set Q (one-vs-rest). Means and variances pool images and spatial positions::

    μ_P = ΣX_P / (n_P·HW)          σ²_P = ΣX²_P / (n_P·HW) − μ_P²

Only running sums are kept, per class: image count, element count, ΣX and ΣX² per channel. Q's sums are the
totals minus P's, so the state is sum-reducible (DDP all-reduce gives the statistics of the union). The binary
statistic (``r`` = ridge) is one of

- ``tt`` (t-test):  ``|μ_P − μ_Q| / √(σ²_P/n_P + σ²_Q/n_Q + r)``, ``r = 1e-4``, ``n`` counting images;
- ``snr``:          ``|μ_P − μ_Q| / (σ_P + σ_Q + r)``, ``r = 1e-4``;
- ``fdr`` (Fisher): ``(μ_P − μ_Q)² / (σ²_P + σ²_Q + r)``, ``r = 1e-4``;
- ``sd`` (generalized symmetric divergence, the family's default):
  ``½[σ²_P/(σ²_Q+r) + σ²_Q/(σ²_P+r)] + ½(μ_P − μ_Q)²/(σ²_P+σ²_Q+r) − 1``, ``r = 0.05``;

and the multi-class score is the mean over the classes present in the scoring data (a class counts when both P
and Q have images). Degenerate data never gives NaN: zero variances are covered by the ridge, absent classes are
left out of the mean, and with fewer than two classes present every score is 0.
"""
from __future__ import annotations

import torch

from .activation import SiteCriterion, per_channel
from .base import register

STATISTICS = ("tt", "snr", "fdr", "sd")
DEFAULT_RIDGE = {"tt": 1e-4, "snr": 1e-4, "fdr": 1e-4, "sd": 0.05}


def _binary(statistic: str, mu_p, var_p, n_p, mu_q, var_q, n_q, ridge: float) -> torch.Tensor:
    diff = mu_p - mu_q
    if statistic == "tt":
        return diff.abs() / (var_p / n_p + var_q / n_q + ridge).sqrt()
    if statistic == "snr":
        return diff.abs() / (var_p.sqrt() + var_q.sqrt() + ridge)
    if statistic == "fdr":
        return diff.pow(2) / (var_p + var_q + ridge)
    return 0.5 * (var_p / (var_q + ridge) + var_q / (var_p + ridge)) + 0.5 * diff.pow(2) / (var_p + var_q + ridge) - 1.0


class ClassDiscrimination(SiteCriterion):
    """One-vs-rest class-discrimination score of each channel (see the module docstring).

    Args:
        statistic: ``"tt"``, ``"snr"``, ``"fdr"`` or ``"sd"``.
        ridge: the ``r`` of the formula; default per statistic from the paper's code (1e-4, or 0.05 for sd).
        num_classes: number of classes. ``None`` (default) grows the per-class buffers to the largest label
            seen. [design] Under DDP the state tensors of every rank must have the same shape for the
            all-reduce, so set ``num_classes`` there (the callback passes the datamodule's).
    """

    requires_labels = True
    statistic = "sd"

    def __init__(self, ridge: float | None = None, num_classes: int | None = None, combine: str = "mean"):
        super().__init__(combine)
        self.ridge = DEFAULT_RIDGE[self.statistic] if ridge is None else float(ridge)
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)

    def _grow(self, group, site, classes: int) -> int:
        """Pad this site's per-class buffers to ``classes`` rows; return the row count in use."""
        prefix = "|".join((group.name, site, ""))
        current = self._state.get(prefix + "images")
        have = 0 if current is None else current.shape[0]
        if current is not None and classes > have:
            for stat in ("images", "elements", "sum", "sumsq"):
                old = self._state[prefix + stat]
                pad = old.new_zeros((classes - have, *old.shape[1:]))
                self._state[prefix + stat] = torch.cat([old, pad])
        return max(have, classes)

    def update(self, group, site, activation, gradient, labels):
        labels = torch.as_tensor(labels, device=activation.device)
        if labels.dim() > 1:  # one-hot or probabilities
            labels = labels.argmax(-1)
        labels = labels.reshape(-1).long()
        if labels.numel() != activation.shape[0]:
            raise ValueError(
                f"criterion {self.name!r}: {labels.numel()} labels for a batch of {activation.shape[0]} samples"
            )
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"criterion {self.name!r}: class labels must be >= 0, got {int(labels.min())}")
        seen = int(labels.max()) + 1 if labels.numel() else 0
        if self.num_classes is not None:
            if seen > self.num_classes:
                raise ValueError(
                    f"criterion {self.name!r}: label {seen - 1} is out of range for num_classes={self.num_classes}"
                )
            classes = self.num_classes
        else:
            classes = self._grow(group, site, seen)
        flat = per_channel(activation.to(torch.float64))  # [N, size, M]
        m = flat.shape[2]
        onehot = torch.zeros(labels.numel(), classes, dtype=torch.float64, device=flat.device)
        onehot[torch.arange(labels.numel(), device=flat.device), labels] = 1.0
        images = onehot.sum(0)
        self.add(group, site, "images", images)
        self.add(group, site, "elements", images * m)
        self.add(group, site, "sum", onehot.T @ flat.sum(2))
        self.add(group, site, "sumsq", onehot.T @ flat.pow(2).sum(2))

    def site_score(self, group, stats):
        images, elements = stats["images"], stats["elements"]
        sums, sumsq = stats["sum"], stats["sumsq"]
        total_images, total_elements = images.sum(), elements.sum()
        q_images, q_elements = total_images - images, total_elements - elements
        present = (images > 0) & (q_images > 0)
        if not bool(present.any()):
            return torch.zeros(sums.shape[1], dtype=torch.float64, device=sums.device)
        images, elements, q_images, q_elements = (t[present][:, None] for t in (images, elements, q_images, q_elements))
        s_p, sq_p = sums[present], sumsq[present]
        s_q, sq_q = sums.sum(0) - s_p, sumsq.sum(0) - sq_p
        mu_p, mu_q = s_p / elements, s_q / q_elements
        var_p = (sq_p / elements - mu_p.pow(2)).clamp_min(0)
        var_q = (sq_q / q_elements - mu_q.pow(2)).clamp_min(0)
        values = _binary(self.statistic, mu_p, var_p, images, mu_q, var_q, q_images, self.ridge)
        return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).mean(0)


@register("tt")
class TTest(ClassDiscrimination):
    """Class discrimination by a two-sample t-test statistic (one-vs-rest, mean over classes), ridge 1e-4."""

    name = "tt"
    statistic = "tt"


@register("snr")
class SNR(ClassDiscrimination):
    """Class discrimination by the signal-to-noise ratio (one-vs-rest, mean over classes), ridge 1e-4."""

    name = "snr"
    statistic = "snr"


@register("fdr")
class FDR(ClassDiscrimination):
    """Class discrimination by Fisher's discriminant ratio (one-vs-rest, mean over classes), ridge 1e-4."""

    name = "fdr"
    statistic = "fdr"


@register("sd")
class SymmetricDivergence(ClassDiscrimination):
    """Class discrimination by the generalized symmetric divergence (one-vs-rest, mean over classes), ridge
    0.05: the default of the class-discrimination family. Scores can be negative (≥ −1); higher = keep."""

    name = "sd"
    statistic = "sd"
