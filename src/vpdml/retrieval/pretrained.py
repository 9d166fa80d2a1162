"""Load a trained model (adapter folder, Hub repo or full fine-tuning folder) with the preprocessing it was trained with."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from vpdml.data import EvalTransform, transforms_from_processor
from vpdml.data.processor_config import (
    PREPROCESSOR_CONFIG_FILE,
    eval_transform_from_config,
    is_vpdml_processor_config,
    read_processor_config,
)
from vpdml.hub import resolve_adapter_path
from vpdml.models.full_finetune import FullFineTuningDML, saved_model_kind
from vpdml.models.lora import LoRADML, saved_base_model
from vpdml.models.protocol import as_dml_model
from vpdml.modules.loading import load_backbone, load_image_processor
from vpdml.retrieval.identity import AdapterIdentity

# --------------------------------------------------------------------------------------------------
# Loading a trained model (evaluate, embed)
# --------------------------------------------------------------------------------------------------


def load_trained_model(
    adapter: str, backbone: str | None = None, *, onto: Any = None, adapter_name: str = "default"
) -> tuple[Any, str | None]:
    """A trained model from an adapter folder or Hub repo (or a full fine-tuning folder), in eval mode.

    Returns ``(model, backbone name)``; the backbone is ``backbone`` or the adapter's
    ``base_model_name_or_path``. The adapter is loaded as ``adapter_name``. ``onto``: a ``PeftModel`` that already
    holds adapters on the same backbone; the adapter is added to it (PEFT ``load_adapter``, the active adapter
    does not change) instead of loading another copy of the backbone, and ``onto`` is returned.
    """
    from peft import PeftModel

    local = Path(adapter)
    kind = saved_model_kind(local)
    if kind is not None:  # full fine-tuning saves the whole model; LoRA its adapter with the head and proxies
        if onto is not None:
            raise ValueError(f"{adapter} is a {kind} model: it cannot share a backbone with vpdml adapters.")
        if kind == "lora":
            name = backbone or saved_base_model(local)
            if not name:
                raise ValueError(
                    f"{adapter} does not name its base model: pass --backbone <the ViT it was trained on>."
                )
            return LoRADML.from_pretrained(local, load_backbone(name)).eval(), name
        return FullFineTuningDML.from_pretrained(local).eval(), backbone
    path = resolve_adapter_path(adapter)
    config = json.loads((path / "adapter_config.json").read_text())
    name = backbone or config.get("base_model_name_or_path")
    if not name:
        raise ValueError(
            f"{adapter} does not name its base model (adapter_config.json has no base_model_name_or_path): pass "
            "--backbone <Hub id or folder of the ViT it was trained on>."
        )
    if onto is not None:
        onto.load_adapter(str(path), adapter_name=adapter_name)
        return onto.eval(), name
    return PeftModel.from_pretrained(load_backbone(name), str(path), adapter_name=adapter_name).eval(), name


def adapter_folder(adapter: str) -> Path:
    """The local folder of an adapter: the folder itself, or its Hub snapshot (downloaded if needed)."""
    local = Path(adapter).expanduser()
    return local if local.is_dir() else resolve_adapter_path(adapter)


def trained_image_size(adapter: str | Path) -> int | None:
    """The evaluation crop size recorded by `vpdml train` in the adapter folder's metrics.json, if any."""
    metrics_path = Path(adapter) / "metrics.json"
    if not metrics_path.is_file():
        return None
    size = json.loads(metrics_path.read_text()).get("image_size")
    return int(size) if size else None


def eval_transform_for(model: Any, backbone_name: str | None, image_size: int | None) -> EvalTransform:
    """The eval transform from the backbone's image processor at ``image_size`` (else the processor's size)."""
    processor = load_image_processor(backbone_name) if backbone_name else {}
    if image_size is None and not processor:
        backbone = as_dml_model(model).backbone
        image_size = int(getattr(backbone.config, "image_size", 224))
    return transforms_from_processor(processor, image_size)[1]


def adapter_eval_transform(
    folder: Path, model: Any, backbone_name: str | None, image_size: int | None = None
) -> EvalTransform:
    """The transform an adapter folder was evaluated with: its ``preprocessor_config.json``.

    ``image_size`` changes the crop size (same normalisation). A folder saved without the file (vpdml before it
    wrote one, or ``save_pretrained``) gets a warning and the crop size of its ``metrics.json``, else the backbone's
    image processor.
    """
    config = read_processor_config(folder)
    if config is not None and is_vpdml_processor_config(config):
        transform = eval_transform_from_config(config)
        if image_size is None or image_size == transform.size:
            return transform
        return transforms_from_processor(config, image_size)[1]
    image_size = image_size or trained_image_size(folder)
    source = f"the crop size {image_size} of its metrics.json" if image_size else "the backbone's image size"
    warnings.warn(
        f"{folder} has no vpdml {PREPROCESSOR_CONFIG_FILE}: preprocessing with {source} and "
        f"{backbone_name or 'ImageNet'} normalisation. Retrain, or write one with "
        "vpdml.data.processor_config.write_processor_config, to make it explicit.",
        UserWarning,
        stacklevel=2,
    )
    return eval_transform_for(model, backbone_name, image_size)


def load_for_index(
    adapter: str,
    backbone: str | None,
    image_size: int | None,
    *,
    onto: Any = None,
    adapter_name: str = "default",
) -> tuple[Any, Any, Any, dict]:
    """``(model, eval transform, AdapterIdentity, info)`` of an adapter folder or Hub repo.

    ``onto`` and ``adapter_name``: as for :func:`load_trained_model`; the identity is that of ``adapter_name``.
    """

    model, backbone_name = load_trained_model(adapter, backbone, onto=onto, adapter_name=adapter_name)
    folder = adapter_folder(adapter)
    transform = adapter_eval_transform(folder, model, backbone_name, image_size)
    local = Path(adapter).expanduser()
    if local.is_dir():
        source, revision = str(local.resolve()), None
    else:  # a Hub snapshot folder is named after its commit
        source, revision = adapter, folder.name if folder.parent.name == "snapshots" else None
    identity = AdapterIdentity.of_model(
        model, adapter_name, name=source, revision=revision, backbone=backbone_name
    )
    return (
        model,
        transform,
        identity,
        {"adapter": source, "backbone": backbone_name, "image_size": transform.size},
    )


def index_source(
    index: Any,
    adapter: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    *,
    where: Any = "the index",
) -> tuple[str, str | None, int | None]:
    """``(adapter, backbone, image_size)`` an index was built with (``index.info``); the arguments override them."""
    adapter = adapter or index.info.get("adapter") or index.adapter_identity.name
    if not adapter:
        raise ValueError(f"{where} does not record its adapter: pass --adapter.")
    return adapter, backbone or index.info.get("backbone"), image_size or index.info.get("image_size")


def load_index_model(
    index: Any,
    adapter: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    *,
    where: Any = "the index",
    onto: Any = None,
    adapter_name: str = "default",
) -> tuple[Any, Any, Any, dict]:
    """``(model, eval transform, AdapterIdentity, info)`` to embed queries for a :class:`~vpdml.retrieval.index.GalleryIndex`.

    Reloads the adapter, backbone and crop size the index records (:func:`index_source`, as `vpdml search` does);
    ``where`` names the index in errors; ``onto`` and ``adapter_name``: as for :func:`load_trained_model` (load
    onto a model that already holds other adapters).
    """
    adapter, backbone, image_size = index_source(index, adapter, backbone, image_size, where=where)
    return load_for_index(adapter, backbone, image_size, onto=onto, adapter_name=adapter_name)
