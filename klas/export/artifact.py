"""A stitched network (or an anchor) as a standalone artifact: ``model.safetensors`` + ``config.json``.

The weights are exactly what the network runs: for a stitch, ``src.*`` = the source's stem and blocks
``0..src_cut-1``, ``stitch.*`` = the stitch layer, ``dst.*`` = the target's blocks ``dst_cut..`` and head
(keys are the timm models' own state-dict keys under those prefixes); for an anchor, ``src.*`` = the
whole model. :func:`load_stitched` rebuilds the network without any network access: it creates the
timm architectures with ``pretrained=False`` and loads the saved tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from klas.errors import KlasError
from klas.fs import atomic_path, write_json_atomic
from klas.models import Adapter, Rep, adapt
from klas.stitch.bridge import BridgedStitch
from klas.stitch.layers import lora_rank, make_stitch_layer
from klas.stitch.network import AnchorModel, StitchedModel

FORMAT = "klas.stitched/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _ids(modules) -> set[int]:
    return {id(t) for m in modules for t in m.state_dict(keep_vars=True).values()}


def used_state(adapter: Adapter, role: str, cut: int | None) -> dict[str, torch.Tensor]:
    """The entries of ``adapter.model.state_dict()`` a network runs.

    ``role="src"``: stem + blocks ``0..cut-1`` (``cut=None``: the whole model, head included);
    ``role="dst"``: blocks ``cut..`` + head.
    """
    full = adapter.model.state_dict(keep_vars=True)
    if role == "src" and cut is None:
        return dict(full)
    head = _ids(adapter.head_modules())
    if role == "src":
        drop = (_ids(adapter.blocks[cut:]) | head) - _ids(adapter.shared_modules())
        return {k: v for k, v in full.items() if id(v) not in drop}
    keep = _ids(adapter.blocks[cut:]) | head | _ids(adapter.shared_modules())
    return {k: v for k, v in full.items() if id(v) in keep}


def _create_kwargs(adapter: Adapter) -> dict[str, Any]:
    """Extra ``timm.create_model`` arguments a model was built with (models built outside klas may
    carry them as ``model.klas_create_kwargs``); the class count is always recorded."""
    extra = dict(getattr(adapter.model, "klas_create_kwargs", {}) or {})
    extra["num_classes"] = adapter.num_classes
    return extra


def _model_entry(arch: str, adapter: Adapter, cut: int | None) -> dict[str, Any]:
    """``input_norm``: the model converts the network's input (normalised with ``given``) to its own
    normalisation (``own``); None when the two agree."""
    return {"arch": arch, "create_kwargs": _create_kwargs(adapter), "family": adapter.family,
            "num_blocks": adapter.num_blocks, "cut": cut, "input_norm": adapter.input_norm}


def _stitch_entry(layer: nn.Module) -> dict[str, Any]:
    """``config.json``'s ``stitch``: the layer's kind and widths, plus a bridged stitch's two representations."""
    inner = layer.layer if isinstance(layer, BridgedStitch) else layer
    entry = {"kind": layer.kind, "in_width": layer.in_width, "out_width": layer.out_width,
             **({"rank": inner.rank} if layer.kind == "lora" else {})}
    if isinstance(layer, BridgedStitch):
        b = layer.bridge
        return {**entry, "layout": "tokens", "bridge": {"src": b.src.to_json(), "dst": b.dst.to_json()}}
    return {**entry, "layout": layer.layout}


def _stitch_layer(s: dict[str, Any], where: Path) -> nn.Module:
    """The stitch layer ``config.json``'s ``stitch`` describes (weights not loaded yet)."""
    if s["kind"] == "lora" and s.get("rank") != lora_rank(s["in_width"], s["out_width"]):
        raise KlasError(f"{where} holds a LoRA stitch of rank {s.get('rank')}, this klas builds rank "
                        f"{lora_rank(s['in_width'], s['out_width'])}; export it again with this klas version")
    if "bridge" in s:
        return BridgedStitch(s["kind"], Rep.from_json(s["bridge"]["src"]), Rep.from_json(s["bridge"]["dst"]))
    return make_stitch_layer(s["kind"], s["in_width"], s["out_width"], s["layout"])


def save_stitched(model: nn.Module, out_dir: Path, *, src_arch: str, dst_arch: str | None = None,
                  info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a :class:`StitchedModel` or :class:`AnchorModel`) to ``out_dir``.

    ``info`` (route, accuracy, costs, data config, ...) is merged into ``config.json``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(model, StitchedModel):
        parts = [("src", used_state(model.src, "src", model.src_cut)),
                 ("stitch", model.stitch.state_dict()),
                 ("dst", used_state(model.dst, "dst", model.dst_cut))]
        layer = model.stitch
        config = {
            "kind": "stitch",
            "src": _model_entry(src_arch, model.src, model.src_cut),
            "dst": _model_entry(dst_arch or src_arch, model.dst, model.dst_cut),
            "stitch": _stitch_entry(layer),
            "num_classes": model.dst.num_classes,
        }
    elif isinstance(model, AnchorModel):
        parts = [("src", used_state(model.adapter, "src", None))]
        config = {"kind": "anchor", "src": _model_entry(src_arch, model.adapter, None), "dst": None, "stitch": None,
                  "num_classes": model.adapter.num_classes}
    else:
        raise TypeError(f"save_stitched takes a StitchedModel or AnchorModel, not {type(model).__name__}")
    for prefix, state in parts:
        for k, v in state.items():
            tensors[f"{prefix}.{k}"] = v.detach().to("cpu").contiguous().clone()
    config = {"format": FORMAT, **config, **(info or {}), "weights": WEIGHTS, "tensors": len(tensors),
              "parameters": int(sum(t.numel() for k, t in tensors.items() if t.is_floating_point()))}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    write_json_atomic(out_dir / CONFIG, config)
    return out_dir


def _build(entry: dict[str, Any]) -> Adapter:
    import timm

    try:
        import klas.zoo  # noqa: F401  registers the demo architectures with timm
    except ImportError:
        pass
    arch = entry["arch"]
    if not timm.is_model(arch):
        raise KlasError(f"architecture {arch!r} is not known to this timm ({timm.__version__}); install a timm that has it")
    model = timm.create_model(arch, pretrained=False, drop_rate=0.0, drop_path_rate=0.0, **entry.get("create_kwargs", {}))
    adapter = adapt(model.eval(), arch)
    norm = entry.get("input_norm")
    if norm:
        adapter.set_input_norm((norm["given"]["mean"], norm["given"]["std"]), (norm["own"]["mean"], norm["own"]["std"]))
    return adapter


def _load_part(adapter: Adapter, state: dict[str, torch.Tensor], role: str, cut: int | None, where: Path) -> None:
    need = set(used_state(adapter, role, cut))
    missing = sorted(need - set(state))
    unexpected = sorted(set(state) - need)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise KlasError(f"{where} does not fit {adapter.model.__class__.__name__} ({role}, {what}); re-export it")
    adapter.model.load_state_dict(state, strict=False)


def load_stitched(path: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported network (eval mode, no gradients); ``model(images) -> logits``.

    The returned module also has ``pre_logits(images)`` and carries the artifact's ``config`` dict.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = path / CONFIG
    if not cfg_path.is_file() or not (path / WEIGHTS).is_file():
        raise KlasError(f"{path} is not an exported klas model (needs {CONFIG} and {WEIGHTS}); run klas export pareto RUN --models")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != FORMAT:
        raise KlasError(f"{cfg_path} is not a {FORMAT} config")
    tensors = load_file(str(path / WEIGHTS))
    parts: dict[str, dict[str, torch.Tensor]] = {"src": {}, "dst": {}, "stitch": {}}
    for k, v in tensors.items():
        prefix, _, rest = k.partition(".")
        if prefix not in parts:
            raise KlasError(f"{path / WEIGHTS} holds an unexpected tensor {k!r}; re-export it")
        parts[prefix][rest] = v
    src = _build(config["src"])
    if config["kind"] == "anchor":
        _load_part(src, parts["src"], "src", None, path)
        model: nn.Module = AnchorModel(src)
    else:
        dst = _build(config["dst"])
        layer = _stitch_layer(config["stitch"], path)
        layer.load_state_dict(parts["stitch"])
        _load_part(src, parts["src"], "src", config["src"]["cut"], path)
        _load_part(dst, parts["dst"], "dst", config["dst"]["cut"], path)
        model = StitchedModel(src, config["src"]["cut"], layer, dst, config["dst"]["cut"])
    model.config = config
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    """``model.onnx`` with a dynamic batch axis; raises whatever the exporter raises."""
    import warnings

    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = dict(input_names=["images"], output_names=["logits"], dynamo=dynamo)
                if not dynamo:
                    kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
                torch.onnx.export(model, (example,), str(out), **kwargs)
            return
        except Exception as exc:  # exporter failures vary by torch version and model
            errors.append(f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise RuntimeError("; ".join(errors))
