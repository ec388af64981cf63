"""ProbeBank: P linear probes (block feature -> class logits) stored as one padded tensor set."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from klas.errors import KlasError
from klas.fs import atomic_path
from klas.probes._features import FeatureArray, check_features, iter_row_chunks, pad_rows, release_pages
from klas.utils import resolve_device

__all__ = ["ProbeBank", "LOGIT_CHUNK_BYTES"]

#: One metadata key: safetensors writes several in random order, so two identical banks would differ in bytes.
_FORMAT = "klas-probe-bank/1"
_OLD_FORMAT = ("klas-probe-bank", "1")  # (format, version) as written before the single key
_KEYS = ("weight", "bias", "mean", "std", "dims")

#: Default size of one streamed chunk of logits (float32 bytes).
LOGIT_CHUNK_BYTES = 1 << 26


@dataclass
class ProbeBank:
    """P linear probes evaluated together: logits_p = ((x_p - mean_p) / std_p) @ weight_p + bias_p.

    Probe p reads the first ``dims[p]`` columns; rows of ``weight`` past that are 0 and ignored.
    """

    weight: Tensor  # (P, Dmax, C) float32
    bias: Tensor  # (P, C) float32
    mean: Tensor  # (P, Dmax) float32, 0 on padding
    std: Tensor  # (P, Dmax) float32, 1 on padding
    dims: Tensor  # (P,) int64 true feature width per probe

    @property
    def num_probes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[2])

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def to(self, device: str | torch.device | None) -> "ProbeBank":
        """A copy of the bank on ``device`` (``None``/"auto": CUDA when present)."""
        dev = resolve_device(device) if not isinstance(device, torch.device) else device
        return ProbeBank(*(getattr(self, k).to(dev) for k in _KEYS))

    def _check(self, feats: Sequence[FeatureArray]) -> int:
        n, dims = check_features(feats, "probe features")
        if len(dims) != self.num_probes:
            raise KlasError(f"got features for {len(dims)} probes; the probe bank has {self.num_probes}")
        want = self.dims.tolist()
        bad = [i for i, (d, w) in enumerate(zip(dims, want)) if d != w]
        if bad:
            i = bad[0]
            raise KlasError(f"probe #{i} expects width {want[i]} but got {dims[i]}; features and probes are from different caches")
        return n

    def _forward(self, x: Tensor) -> Tensor:
        """Padded raw features (P, n, Dmax) -> logits (P, n, C) float32."""
        x = (x.float() - self.mean[:, None]) / self.std[:, None]  # (P, n, Dmax), padding stays 0
        return torch.baddbmm(self.bias[:, None], x, self.weight)  # (P, n, C)

    @torch.no_grad()
    def logits(self, feats: Sequence[FeatureArray]) -> Tensor:
        """P arrays (n, D_p) -> logits (P, n, C) float32 on the bank's device, all probes in one bmm."""
        n = self._check(feats)
        x = pad_rows(feats, 0, n, int(self.weight.shape[1]), self.device, torch.float32)  # (P, n, Dmax)
        return self._forward(x)

    @torch.no_grad()
    def iter_logits(self, feats: Sequence[FeatureArray], batch_size: int | None = None) -> Iterator[Tensor]:
        """Stream logits chunk by chunk -> (P, <=batch_size, C) each; feeds :func:`klas.score.kl_matrix`.

        ``batch_size=None`` sizes chunks to ~64 MiB of float32 logits (430 samples at P=39, C=1000),
        which keeps the scorer's memory flat and its GEMM efficient; pages of memory-mapped
        features are handed back after every chunk, so the resident set stays flat in n too.
        """
        n = self._check(feats)
        dmax = int(self.weight.shape[1])
        if batch_size is None:
            batch_size = LOGIT_CHUNK_BYTES // (4 * self.num_probes * self.num_classes)
        for a, b in iter_row_chunks(n, max(1, int(batch_size))):
            z = self._forward(pad_rows(feats, a, b, dmax, self.device, torch.float32))
            release_pages(feats)
            yield z

    @torch.no_grad()
    def accuracy(self, feats: Sequence[FeatureArray], labels: np.ndarray | Tensor, batch_size: int = 4096) -> np.ndarray:
        """Top-1 accuracy of every probe -> (P,) float64, streamed over ``batch_size`` rows at a time."""
        n = self._check(feats)
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).long().view(-1)
        if y.numel() != n:
            raise KlasError(f"got {y.numel()} labels for {n} feature rows")
        correct = torch.zeros(self.num_probes, dtype=torch.int64, device=self.device)
        start = 0
        for z in self.iter_logits(feats, batch_size):  # (P, b, C)
            yb = y[start : start + z.shape[1]].to(self.device)
            correct += (z.argmax(-1) == yb[None]).sum(1)
            start += z.shape[1]
        return (correct.double() / max(n, 1)).cpu().numpy()

    def save(self, path: str | Path) -> None:
        """Write the bank as one safetensors file (atomically: readers never see a torn file)."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in _KEYS}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _FORMAT})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> "ProbeBank":
        """Read a bank written by :meth:`save`; ``device=None`` picks CUDA when present."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise KlasError(f"probe bank not found: {path}; run `klas search` to train probes")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != _FORMAT and (meta.get("format"), meta.get("version")) != _OLD_FORMAT:
                    raise KlasError(f"{path} is not a klas probe bank; delete it and rerun `klas search`")
                missing = [k for k in _KEYS if k not in fh.keys()]
                if missing:
                    raise KlasError(f"probe bank {path} lacks {missing}; delete it and rerun `klas search`")
                bank = cls(*(fh.get_tensor(k) for k in _KEYS))
        except KlasError:
            raise
        except Exception as exc:  # safetensors raises several types for corrupt headers
            raise KlasError(f"probe bank {path} is unreadable ({exc.__class__.__name__}); delete it and rerun") from exc
        bank.validate()
        return bank.to(device)

    def validate(self) -> None:
        """Check shapes agree; raise :class:`KlasError` otherwise."""
        p, dmax, c = self.weight.shape
        shapes = {"bias": (p, c), "mean": (p, dmax), "std": (p, dmax), "dims": (p,)}
        for k, want in shapes.items():
            if tuple(getattr(self, k).shape) != want:
                raise KlasError(f"probe bank field {k!r} has shape {tuple(getattr(self, k).shape)}, expected {want}")
        if int(self.dims.max()) > dmax or int(self.dims.min()) < 1:
            raise KlasError("probe bank widths are out of range; delete it and rerun `klas search`")
