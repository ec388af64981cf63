"""Γ variants: the choices inside KLAS's score, each re-scored against one stored ground truth.

``klas search`` computes, per candidate ``(a, i) -> (b, j)``: probes on every representation's pooled
features (ViT: cls and mean token side by side), trained ``probe_epochs`` on probe-train labels;
Θ(s, t) = mean over the score split of KL(P_s || P_t) at temperature T; Γ = Θ(a_i, b_j) / Σ with
Σ = Θ(b_j, b_{j+1}) (:func:`klas.search.stitch_scores`). The paper (stitching-facts.md) defines the
same. The variants change one choice each:

* ``pool=cls`` / ``pool=mean``: probes read one pooled vector only (ViTs; CNNs have one pool);
* ``T=0.5`` / ``T=2`` / ``T=4``: the KL's temperature;
* ``probe_epochs=4`` / ``probe_epochs=30``: probe training length;
* ``theta=reverse``: Θ(b_j, a_i) = KL(P_b || P_a); ``theta=symmetric``: their mean;
* ``sigma=none``: Γ = Θ (no normalisation by the target block's own change);
* ``sigma=head@last``: at the target's last block (j = n_b - 1) Σ compares the probe at b_{n-1} with the
  model's own output distribution (its cached logits) instead of a probe on the final representation.

Nothing here trains a stitch: the ground truth is trained once and every variant is re-scored against
it (Spearman ρ and recovery at K, :func:`klas.quality.signals.rate`), so choices are made on the score
split and reported on the eval split. The default's probes are the search's own (its run directory's
bank), not trained again.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from klas import probes, score
from klas.probes import ProbeBank
from klas.quality.config import QualityConfig
from klas.quality.signals import rate
from klas.search import SIGMA_FLOOR, probe_index, rep_positions

DEFAULT = "default"


def _pools(cache, index) -> list[str | None]:
    """None (every cached pool side by side, what ``klas search`` reads) plus each single pool when a
    model has more than one."""
    names = [tuple(cache.model(m).get("pool_names") or ()) for m in cache.model_names]
    single = sorted({p for n in names if len(n) > 1 for p in n}) if all(len(n) > 1 for n in names) else []
    return [None, *single]


def _probe_logits(cache, index, pool: str | None, epochs: int, seed: int, dev,
                  bank: ProbeBank | None = None) -> torch.Tensor:
    """Score-split logits (P, N, C) of probes trained on probe-train labels on features ``pool``
    (``bank``: probes already trained so, e.g. the search's)."""
    score_feats = [cache.rep_features("score", m, r, pool) for m, r in index]
    if bank is None:
        bank = probes.train_probes([cache.rep_features("probe-train", m, r, pool) for m, r in index],
                                   np.array(cache.labels("probe-train")), len(cache.classes), epochs=epochs, seed=seed,
                                   device=dev)
    return torch.cat(list(bank.to(dev).iter_logits(score_feats)), dim=1).cpu()


def _theta(logits: torch.Tensor, temperature: float) -> np.ndarray:
    return score.kl_matrix(score.chunked(logits, 1024), temperature=temperature, device="cpu").numpy()


def _gammas(theta: np.ndarray, stitches, index, last_head: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Γ with Θ as is, reversed, symmetric, without Σ, and (with ``last_head``) Σ against the head."""
    s_idx, d_idx = rep_positions(stitches, index)
    _, n_idx = rep_positions(stitches, index, dst_offset=1)
    sigma = np.maximum(theta[d_idx, n_idx], SIGMA_FLOOR)
    th = theta[s_idx, d_idx]
    out = {"": th / sigma, "theta=reverse": theta[d_idx, s_idx] / sigma,
           "theta=symmetric": 0.5 * (th + theta[d_idx, s_idx]) / sigma, "sigma=none": th}
    if last_head is not None:
        out["sigma=head@last"] = th / np.maximum(last_head, SIGMA_FLOOR)
    return out


def gamma_variants(cache, stitches: Sequence, cfg: QualityConfig, dev, bank: ProbeBank | None = None) -> dict[str, np.ndarray]:
    """Γ of every candidate under every variant (module docstring); ``default`` is ``klas search``'s
    (``bank``: the search's probes, else trained again the same way)."""
    index = probe_index(cache)
    out: dict[str, np.ndarray] = {}
    base = _probe_logits(cache, index, None, cfg.probe_epochs, cfg.seed, dev, bank)
    # the models' own score-split logits appended as extra rows: Σ at the last block against the head
    heads = torch.stack([torch.as_tensor(np.asarray(cache.logits("score", m), dtype=np.float32))
                         for m in cache.model_names])
    theta_ext = _theta(torch.cat([base, heads]), 1.0)
    p = len(index)
    _, d_idx = rep_positions(stitches, index)
    last = np.array([c.dst_cut == cache.profiles[c.dst].num_blocks - 1 for c in stitches])
    sig = theta_ext[d_idx, rep_positions(stitches, index, dst_offset=1)[1]]
    head_sig = np.where(last, theta_ext[d_idx, [p + cache.model_names.index(c.dst) for c in stitches]], sig)
    for name, g in _gammas(theta_ext[:p, :p], stitches, index, head_sig).items():
        out[name or DEFAULT] = g
    for t in (0.5, 2.0, 4.0):
        out[f"T={t:g}"] = _gammas(_theta(base, t), stitches, index)[""]
    for pool in _pools(cache, index)[1:]:
        out[f"pool={pool}"] = _gammas(_theta(_probe_logits(cache, index, pool, cfg.probe_epochs, cfg.seed, dev), 1.0),
                                      stitches, index)[""]
    for ep in (4, 30):
        out[f"probe_epochs={ep}"] = _gammas(_theta(_probe_logits(cache, index, None, ep, cfg.seed, dev), 1.0),
                                            stitches, index)[""]
    return out


def rate_variants(variants: dict[str, np.ndarray], gt_acc: np.ndarray, bucket: np.ndarray, k: int) -> dict[str, dict]:
    """Per variant, against one split's ground-truth accuracies: Spearman ρ(-Γ, acc) over all candidates
    and in range, and the recovery of klas's bucket rule on that Γ brought to K."""
    return {name: rate(g, gt_acc, bucket, k) for name, g in variants.items()}


__all__ = ["DEFAULT", "gamma_variants", "rate_variants"]
