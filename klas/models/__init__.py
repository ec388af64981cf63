"""timm adapters: split a model into stem -> blocks -> head, with shapes and per-block cost."""
from klas.models.adapters import (
    SUPPORTED_FAMILIES,
    Adapter,
    ConvNeXtAdapter,
    EvaAdapter,
    LevitAdapter,
    ResNetAdapter,
    StagedAdapter,
    SwinAdapter,
    ViTAdapter,
    adapt,
    adapter_class,
)
from klas.models.load import (
    LoadedModel, ModelSpec, build_model, check_random_init, data_config_of, load_model, parse_spec,
    register_weights_source,
)
from klas.models.profile import Profile, Rep, count_macs, profile_adapter
from klas.models.timing import describe_device, device_identity, median_ms, part_times, same_device, warm_up

__all__ = [
    "SUPPORTED_FAMILIES", "Adapter", "ConvNeXtAdapter", "EvaAdapter", "LevitAdapter", "ResNetAdapter",
    "StagedAdapter", "SwinAdapter", "ViTAdapter",
    "adapt", "adapter_class", "LoadedModel", "ModelSpec", "build_model", "check_random_init", "data_config_of", "load_model",
    "parse_spec", "register_weights_source", "Profile", "Rep", "count_macs", "profile_adapter",
    "describe_device", "device_identity", "median_ms", "part_times", "same_device", "warm_up",
]
