"""Turn a ``--model`` argument into an eval-mode timm model with known weights.

Three sources of weights:

* ``NAME``: timm's pretrained weights (downloaded on the user's machine), or the file a registered
  local source gives (:func:`register_weights_source`; the demo family ``klas_vit_ti``, ... registers
  the weights klas trains locally under ``cache/zoo``);
* ``NAME=path/to/file.safetensors|.pth``: a local file;
* ``random_init=True``: untrained, seeded weights (what the tests use; never touches the network).

Any of the first two may carry an alias in front, ``ALIAS:NAME[=path]``: the model is then called
``ALIAS`` everywhere (cache directories, manifest, candidates, selection, training, export), so two
trainings of one architecture can be stitched (``--model klas_vit_ti --model b:klas_vit_ti=b.pth``).
Without an alias a model's name is its architecture.
"""
from __future__ import annotations

import difflib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from klas.errors import KlasError
from klas.models.adapters import Adapter, adapt, adapter_class
from klas.models.profile import Profile, profile_adapter
from klas.utils import DEFAULT_ROOT, sha256_file, sha256_json, sha256_state_dict

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: What an alias may hold: no ``:``, ``=``, ``/`` or ``->`` (they delimit specs, stitch ids and paths).
ALIAS_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` argument."""

    arch: str  # timm architecture name
    path: Path | None = None  # local weights, if given
    alias: str | None = None  # the model's name when it is not its architecture

    @property
    def name(self) -> str:
        return self.alias or self.arch

    def __str__(self) -> str:
        text = self.arch if self.path is None else f"{self.arch}={self.path}"
        return text if self.alias is None else f"{self.alias}:{text}"


def parse_spec(text: str) -> ModelSpec:
    """``[ALIAS:]NAME[=path]``; checks the alias, the name against timm's registry and the path on disk."""
    head, sep, path = text.partition("=")
    alias, colon, arch = head.rpartition(":")
    arch, alias = arch.strip(), (alias.strip() if colon else None)
    if alias is not None and not ALIAS_PATTERN.fullmatch(alias):
        raise KlasError(f"model alias {alias!r} in {text!r} must be letters, digits, '_', '.', '+' or '-'; e.g. b:{arch}")
    _check_arch(arch)
    if not sep:
        return ModelSpec(arch, alias=alias)
    p = Path(path.strip()).expanduser()
    if not p.is_file():
        raise KlasError(f"weights file for {arch} not found: {p}; give an existing .safetensors or .pth file")
    if p.suffix not in WEIGHT_SUFFIXES:
        raise KlasError(f"weights file {p} has suffix {p.suffix!r}; klas reads {', '.join(WEIGHT_SUFFIXES)}")
    return ModelSpec(arch, p, alias)


#: Local weight sources, consulted in order before timm's own download: ``source(arch, root) -> Path | None``.
_WEIGHT_SOURCES: list[Callable[[str, Path], Path | None]] = []


def register_weights_source(source: Callable[[str, Path], Path | None]) -> None:
    """Let a package that registers timm architectures of its own supply their weights.

    ``source(arch, root)`` returns a weights file for ``arch`` (a ``NAME`` without ``=path``), or None
    when it does not know the architecture. The demo zoo (:mod:`klas.zoo`) registers itself this way,
    so this layer never imports it.
    """
    if source not in _WEIGHT_SOURCES:
        _WEIGHT_SOURCES.append(source)


def _local_weights(arch: str, root: Path) -> Path | None:
    for source in _WEIGHT_SOURCES:
        path = source(arch, root)
        if path is not None:
            return Path(path)
    return None


def _check_arch(arch: str) -> None:
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise KlasError(f"unknown model {arch!r}: {hint}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is the user's file, not our bug
        raise KlasError(f"cannot read weights {path} ({exc.__class__.__name__}); check the file is a state dict") from exc
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise KlasError(f"weights file {path} holds no state dict; save model.state_dict() to it")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classifier_outputs(arch: str, state: dict[str, torch.Tensor]) -> int | None:
    key = timm.models.get_pretrained_cfg_value(arch, "classifier") or "head"
    key = key if isinstance(key, str) else key[0]
    w = state.get(f"{key}.weight")
    return int(w.shape[0]) if w is not None else None


def _create(arch: str, pretrained: bool, **kwargs) -> nn.Module:
    try:
        model = timm.create_model(arch, pretrained=pretrained, drop_rate=0.0, drop_path_rate=0.0, **kwargs)
    except TypeError as exc:  # a family without drop-path (GhostNet, ...): built without it, then judged
        if "drop_path_rate" not in str(exc):
            raise
        model = timm.create_model(arch, pretrained=pretrained, drop_rate=0.0, **kwargs)
    adapter_class(model, arch)  # fail early, before any weights are read, for unsupported families
    return model


def _add_head(model: nn.Module, spec: ModelSpec, num_classes: int | None, seed: int) -> bool:
    """Give a model without a classifier (timm's ``num_classes=0``: DINOv2, SigLIP, DINOv3, EVA-02
    backbones) a new linear head for ``num_classes`` classes, seeded by its name; whether it did."""
    if num_classes is None or num_classes < 2 or int(getattr(model, "num_classes", 1)) != 0:
        return False
    torch.manual_seed(seed ^ zlib.crc32(f"{spec.name}/head".encode()))
    model.reset_classifier(num_classes)
    return True


def build_model(spec: ModelSpec, random_init: bool = False, root: Path = DEFAULT_ROOT, seed: int = 0,
                num_classes: int | None = None) -> tuple[nn.Module, str]:
    """The eval-mode model for a spec and a hash of its weights.

    ``num_classes``: the data's class count; a model without a classifier gets a new, seeded linear
    head of that size (``model.klas_added_head`` says so), so that it has logits to stitch and train.
    """
    model, digest = _build_model(spec, random_init, root, seed)
    if _add_head(model, spec, num_classes, seed):
        model.klas_added_head = True
        model.eval()
        digest = sha256_json([digest, sha256_state_dict(model.state_dict())])
    return model, digest


def check_random_init(specs: list[ModelSpec] | tuple[ModelSpec, ...], random_init: bool) -> None:
    """``random_init`` builds untrained, seeded weights: refuse a weights file it would silently ignore."""
    given = next((s for s in specs if s.path is not None), None) if random_init else None
    if given is not None:
        raise KlasError(f"--random-init builds untrained, seeded weights and would ignore the weights file {given.path} "
                        f"given for {given.arch}; drop --random-init to use the file, or drop ={given.path}")


def _build_model(spec: ModelSpec, random_init: bool, root: Path, seed: int) -> tuple[nn.Module, str]:
    check_random_init([spec], random_init)
    if random_init:  # seeded by name: two aliases of one architecture get different weights
        torch.manual_seed(seed ^ zlib.crc32(spec.name.encode()))
        model = _create(spec.arch, pretrained=False)
        return model.eval(), sha256_state_dict(model.state_dict())
    path = spec.path
    if path is None:
        path = _local_weights(spec.arch, root)
    if path is None:
        try:
            model = _create(spec.arch, pretrained=True)
        except KlasError:
            raise
        except Exception as exc:
            raise KlasError(
                f"could not get pretrained weights for {spec.arch} ({exc.__class__.__name__}); "
                f"pass {spec.arch}=path/to/weights.safetensors or use --random-init"
            ) from exc
        return model.eval(), sha256_state_dict(model.state_dict())
    state = _read_state_dict(path)
    classes = _classifier_outputs(spec.arch, state)
    model = _create(spec.arch, pretrained=False, **({"num_classes": classes} if classes else {}))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: weights of another architecture or width
        raise KlasError(
            f"weights {path} do not fit {spec.arch} ({_first_mismatch(exc)}); pass the architecture they were trained with"
        ) from None
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise KlasError(f"weights {path} do not fit {spec.arch} ({what}); pass the architecture they were trained with")
    return model.eval(), sha256_file(path)


def _first_mismatch(exc: RuntimeError) -> str:
    """The first line of torch's load_state_dict error that names a tensor, shortened to one phrase."""
    for line in str(exc).splitlines():
        m = re.search(r"size mismatch for ([\w.]+): copying a param with shape (\S+(?: \S+)*?) from checkpoint, "
                      r"the shape in current model is (.+?)\.?$", line.strip())
        if m:
            file_shape, model_shape = (re.sub(r"torch\.Size\((.*)\)", r"\1", t) for t in (m[2], m[3]))
            return f"{m[1]} has shape {file_shape} in the file, {model_shape} in the model"
    return "tensor shapes differ"


def _set_input_size(model: nn.Module, arch: str, size: tuple[int, ...], native: tuple[int, ...]) -> None:
    """Rebuild a model's position embeddings (ViT, Eva, Swin: timm's ``set_input_size``, which resamples
    them) for another resolution, and remember it for export (``klas_create_kwargs``). Convolutional
    models take any size as they are."""
    if tuple(size[1:]) == tuple(native[1:]) or not hasattr(model, "set_input_size"):
        return
    try:
        model.set_input_size(img_size=tuple(size[1:]))
    except Exception as exc:  # e.g. a Swin window that does not divide the new grid
        why = (str(exc).splitlines() or [""])[0][:120]
        raise KlasError(f"{arch} cannot be resized to {list(size[1:])} ({exc.__class__.__name__}: {why}); "
                        "pick an --input-size its patch and window sizes divide") from None
    model.klas_create_kwargs = {**(getattr(model, "klas_create_kwargs", None) or {}), "img_size": list(size[1:])}


def _check_input_grid(model: nn.Module, arch: str, size: tuple[int, ...]) -> None:
    """Refuse an input size the model's first convolution does not tile: a patchifying stem (ViT, Eva,
    Swin patch embeddings, ConvNeXt's stem: no padding, stride > 1) would silently drop the last rows
    and columns (a patch-16 ViT at 70 px sees 64). Stems that pad, and patch embeddings that pad
    themselves (``dynamic_img_pad``), take any size."""
    if getattr(getattr(model, "patch_embed", None), "dynamic_img_pad", False):
        return
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.padding not in ((0, 0), "valid"):
        return
    for dim, k, stride in zip(size[1:], conv.kernel_size, conv.stride):
        drop = (dim - k) % stride if stride > 1 and dim >= k else 0
        if drop:
            fits = [v for v in (dim - drop, dim - drop + stride) if v >= k]
            raise KlasError(f"input size {dim} px does not fit {arch}: its first layer reads {k}-pixel patches every "
                            f"{stride} px and would silently drop the last {drop} rows and columns; use an "
                            f"--input-size it tiles, e.g. {' or '.join(map(str, fits))}")


@dataclass
class LoadedModel:
    """An adapted model with everything a stage needs to know about it."""

    spec: ModelSpec
    adapter: Adapter
    profile: Profile
    weights_sha256: str
    data_config: dict

    @property
    def name(self) -> str:
        return self.spec.name

    def feed(self, shared: dict, own: dict | None = None) -> dict:
        """Let this model take images preprocessed with ``shared`` (a timm data config), normalising
        them for itself with ``own``'s mean and std (default: the model's own data config).

        Returns what the model then sees: the shared resolution, resize and crop with its own
        mean and std (recorded per model in the cache manifest).
        """
        own = own or self.data_config
        self.adapter.set_input_norm((shared["mean"], shared["std"]), (own["mean"], own["std"]))
        return {**{k: shared.get(k) for k in ("input_size", "interpolation", "crop_pct", "crop_mode")},
                "mean": list(own["mean"]), "std": list(own["std"])}


def data_config_of(model: nn.Module) -> dict:
    """timm's preprocessing for a model (input size, interpolation, mean, std, crop)."""
    cfg = timm.data.resolve_model_data_config(model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def load_model(
    spec: ModelSpec | str,
    random_init: bool = False,
    root: Path = DEFAULT_ROOT,
    device: torch.device | str = "cpu",
    seed: int = 0,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build, adapt and profile one model; always eval mode with dropout and drop-path off.

    Costs are measured at ``input_size`` (default: the model's own data config), the resolution the
    model will actually see; a ViT, Eva or Swin built for another resolution is resized to it
    (timm's ``set_input_size`` resamples the position embeddings). ``num_classes``: see :func:`build_model`.
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    model, digest = build_model(spec, random_init=random_init, root=root, seed=seed, num_classes=num_classes)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = data_config_of(model)
    size, native = tuple(input_size or cfg["input_size"]), tuple(cfg["input_size"])
    _set_input_size(model, spec.arch, size, native)
    _check_input_grid(model, spec.arch, size)
    adapter = adapt(model, spec.arch)
    try:
        profile = profile_adapter(adapter, size)
    except KlasError:
        raise
    except Exception as exc:  # e.g. LeViT, whose attention biases are built for one resolution
        if size[1:] != native[1:] and not hasattr(model, "set_input_size"):
            raise KlasError(f"{spec.arch} runs only at its native input size {native[-1]} px (it cannot be resized); "
                            f"use --input-size {native[-1]}, or leave --input-size out and give {spec.arch} first") from None
        raise KlasError(
            f"{spec.arch} does not accept inputs of size {list(size)} ({exc.__class__.__name__}); "
            "pick an --input-size the model's patch, window or stride grid divides"
        ) from exc
    return LoadedModel(spec, adapter, profile, digest, cfg)
