"""A stitched network (or an anchor) as a standalone artifact: ``model.safetensors`` + ``config.json``.

The weights are exactly what the network runs: for a stitch, ``src.*`` = the source's stem and blocks
``0..src_cut-1``, ``stitch.*`` = the stitch layer, ``dst.*`` = the target's blocks ``dst_cut..`` and head
(keys are the timm models' own state-dict keys under those prefixes); for an anchor, ``src.*`` = the
whole model. :func:`load_stitched` rebuilds the network without any network access: it creates the
timm architectures with ``pretrained=False`` and loads the saved tensors.

Both files vouch for each other: ``config.json`` records ``weights_sha256`` (the tensors' content
hash) and the safetensors metadata ``config_sha256`` (the config's hash, canonical JSON), so an edited
config (a cut point, a width) or changed tensors are refused on load (:func:`read_artifact`); the
config is also checked against the tensors (names, shapes, no extra or missing ones, cut points
within the architecture) and the rebuilt network must run. Every such failure is one KlasError.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from klas.errors import KlasError
from klas.fs import atomic_path, write_json_atomic
from klas.models import Adapter, Rep, adapt
from klas.stitch.bridge import BridgedStitch
from klas.stitch.layers import lora_rank, make_stitch_layer
from klas.stitch.network import AnchorModel, StitchedModel
from klas.utils import sha256_json, sha256_state_dict

FORMAT = "klas.stitched/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: What re-creates a damaged or edited artifact of ``klas export pareto``.
REEXPORT = "re-export it with: klas export pareto RUN --models"


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
    write_artifact(out_dir, FORMAT, config, tensors)
    return out_dir


def write_artifact(out_dir: Path, fmt: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """``model.safetensors`` and ``config.json``, each recording the other's hash (module docstring)."""
    from safetensors.torch import save_file

    config = json.loads(json.dumps({**config, "weights_sha256": sha256_state_dict(tensors)}))  # as read back
    with atomic_path(Path(out_dir) / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": fmt, "config_sha256": sha256_json(config)})
    write_json_atomic(Path(out_dir) / CONFIG, config)


def read_artifact(path: Path, fmt: str, what: str, fix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the tensors of an exported artifact, refused in one line (naming ``fix``) when
    missing, unreadable, of another format, or when either file no longer hashes to what the other records."""
    from safetensors import safe_open

    path = Path(path)
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise KlasError(f"{path} is not an exported klas {what} (needs {CONFIG} and {WEIGHTS}); {fix}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise KlasError(f"{cfg_path} is unreadable ({exc.__class__.__name__}); {fix}") from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        raise KlasError(f"{cfg_path} is not a {fmt} config; {fix}")
    try:
        with safe_open(str(w_path), "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # any reader failure is a damaged file
        raise KlasError(f"{w_path} is unreadable ({exc.__class__.__name__}); {fix}") from None
    if meta.get("config_sha256") not in (None, sha256_json(config)):
        raise KlasError(f"{cfg_path} was edited after export (it no longer hashes to what {WEIGHTS} records); {fix}")
    if config.get("weights_sha256") not in (None, sha256_state_dict(tensors)):
        raise KlasError(f"{w_path} was changed after export (its tensors no longer hash to what {CONFIG} records); {fix}")
    return config, tensors


@contextmanager
def rebuilding(path: Path, fix: str) -> Iterator[None]:
    """Turn whatever rebuilding an artifact raises on a config its tensors do not fit (a missing key, a
    wrong type, a shape torch refuses) into one KlasError naming the artifact."""
    try:
        yield
    except KlasError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        why = (str(exc).splitlines() or [""])[0][:160]
        raise KlasError(f"{path} holds a config its tensors do not fit or klas cannot build "
                        f"({exc.__class__.__name__}: {why}); {fix}") from None


def check_cut(entry: dict[str, Any], adapter: Adapter, role: str, where: Path, fix: str) -> None:
    """The cut point and block count ``entry`` records must fit the architecture it builds: ``role`` "src"
    runs blocks ``0..cut-1`` (1..n), "dst" blocks ``cut..`` (0..n-1), "whole" the whole model (no cut)."""
    n, cut = adapter.num_blocks, entry.get("cut")
    if entry.get("num_blocks") != n:
        raise KlasError(f"{where} records {entry.get('num_blocks')!r} blocks for {entry.get('arch')}, which has {n}; {fix}")
    if role == "whole":
        if cut is None:
            return
        raise KlasError(f"{where} records cut point {cut!r} for {entry.get('arch')}, which runs whole; {fix}")
    low, high = (1, n) if role == "src" else (0, n - 1)
    if isinstance(cut, int) and not isinstance(cut, bool) and low <= cut <= high:
        return
    raise KlasError(f"{where} records cut point {cut!r} for {entry.get('arch')} ({role}), outside {low}..{high}; {fix}")


def dry_run(model: nn.Module, config: dict[str, Any], where: Path, fix: str) -> None:
    """One zero image through the rebuilt network: the config's widths and cut points must line up."""
    size = (config.get("data_config") or {}).get("input_size")
    if not size:
        return
    try:
        with torch.no_grad():
            model(torch.zeros(1, *size, device=next(model.parameters()).device))
    except Exception as exc:  # a network that does not run on its own input is a damaged artifact
        why = (str(exc).splitlines() or [""])[0][:160]
        raise KlasError(f"{where} does not run on its input size {list(size)} ({exc.__class__.__name__}: {why}); "
                        f"{fix}") from None


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


def _check_state(need: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str, where: Path,
                 fix: str) -> None:
    """The saved ``state`` must hold exactly the tensors ``need`` names, each of its shape."""
    missing = sorted(set(need) - set(state))
    unexpected = sorted(set(state) - set(need))
    if missing or unexpected:
        which = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise KlasError(f"{where} does not fit {what}, {which}); {fix}")
    wrong = next((k for k in sorted(need) if tuple(state[k].shape) != tuple(need[k].shape)), None)
    if wrong is not None:
        raise KlasError(f"{where} does not fit {what}: {wrong} has shape {list(state[wrong].shape)}, the model "
                        f"{list(need[wrong].shape)}); {fix}")


def _load_part(adapter: Adapter, state: dict[str, torch.Tensor], role: str, cut: int | None, where: Path,
               fix: str = REEXPORT) -> None:
    _check_state(used_state(adapter, role, cut), state, f"{adapter.model.__class__.__name__} ({role}", where, fix)
    adapter.model.load_state_dict(state, strict=False)


def _load_layer(layer: nn.Module, state: dict[str, torch.Tensor], where: Path, fix: str = REEXPORT) -> None:
    _check_state(layer.state_dict(), state, f"its stitch layer ({layer.__class__.__name__}", where, fix)
    layer.load_state_dict(state)


def load_stitched(path: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported network (eval mode, no gradients); ``model(images) -> logits``.

    The returned module also has ``pre_logits(images)`` and carries the artifact's ``config`` dict.
    A damaged or edited artifact (see the module docstring) is refused with one KlasError.
    """
    path = Path(path)
    config, tensors = read_artifact(path, FORMAT, "model", REEXPORT)
    parts: dict[str, dict[str, torch.Tensor]] = {"src": {}, "dst": {}, "stitch": {}}
    for k, v in tensors.items():
        prefix, _, rest = k.partition(".")
        if prefix not in parts:
            raise KlasError(f"{path / WEIGHTS} holds an unexpected tensor {k!r}; {REEXPORT}")
        parts[prefix][rest] = v
    with rebuilding(path, REEXPORT):
        model = _rebuild_stitched(config, parts, path)
    model.config = config
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dry_run(model, config, path, REEXPORT)
    return model


def _rebuild_stitched(config: dict[str, Any], parts: dict[str, dict[str, torch.Tensor]], path: Path) -> nn.Module:
    if config.get("kind") not in ("anchor", "stitch"):
        raise KlasError(f"{path / CONFIG} has kind {config.get('kind')!r}, not anchor or stitch; {REEXPORT}")
    src = _build(config["src"])
    if config["kind"] == "anchor":
        check_cut(config["src"], src, "whole", path, REEXPORT)
        if parts["dst"] or parts["stitch"]:
            raise KlasError(f"{path / WEIGHTS} holds stitch or target tensors, but {CONFIG} says anchor; {REEXPORT}")
        _load_part(src, parts["src"], "src", None, path)
        return AnchorModel(src)
    dst = _build(config["dst"])
    check_cut(config["src"], src, "src", path, REEXPORT)
    check_cut(config["dst"], dst, "dst", path, REEXPORT)
    layer = _stitch_layer(config["stitch"], path)
    _load_layer(layer, parts["stitch"], path)
    _load_part(src, parts["src"], "src", config["src"]["cut"], path)
    _load_part(dst, parts["dst"], "dst", config["dst"]["cut"], path)
    return StitchedModel(src, config["src"]["cut"], layer, dst, config["dst"]["cut"])


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
