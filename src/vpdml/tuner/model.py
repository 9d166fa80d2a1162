"""`VisualPromptDMLModel`: the PEFT tuner that turns a frozen ViT into a deep-metric-learning embedder.

Layout of the adapter state, on the tuner and keyed by adapter name (so the saved keys never depend on where a
transformers version keeps the blocks):

* ``vpdml_prompts[name]``  shared VPT-deep prompts            (inference)
* ``vpdml_head[name]``     LayerNorm -> Linear -> L2 head      (inference)
* ``vpdml_bitfit[name]``   bias offsets, when ``bitfit=True``  (inference)
* ``dml_proxies[name]``    learnable proxies, class prompts, proxy head, GRU/EMA, semantic-proxy state
                           (training only; see :mod:`vpdml.tuner.state`)

``save_pretrained`` writes the inference part only. The training-only container deliberately lacks the
``vpdml_`` prefix: PEFT warns about missing keys that carry the method prefix, and an inference adapter is
*meant* to lack them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from torch.profiler import record_function

from vpdml.modules.backbones import BackboneInfo, biased_modules, describe_backbone, pooled_features
from vpdml.modules.bitfit import BiasOffsets, install_bias_offsets
from vpdml.modules.head import EmbeddingHead
from vpdml.modules.prompts import VisualPrompts, prompt_schedule
from vpdml.proxies.accumulators import first_per_class
from vpdml.proxies.bank import ProxyBank
from vpdml.proxies.loss import proxy_loss
from vpdml.tuner.bank import proxy_bank_for, proxy_token_subset
from vpdml.tuner.checks import (
    check_adapter_tensors,
    check_backbone_signature,
    check_labels,
    check_pixel_values,
)
from vpdml.tuner.config import VisualPromptDMLConfig
from vpdml.tuner.layer import (
    PromptedBlock,
    PromptProvider,
    PromptRouter,
    SharedTrunk,
    mean_block_inputs,
)
from vpdml.tuner.outputs import DMLForwardOutput, DMLLossOutput
from vpdml.tuner.peft_type import PREFIX

#: ``lookup(canonical bias name) -> (B, D) per-sample offsets or None``, for mixed-adapter batches.
BiasLookup = Callable[[str], "torch.Tensor | None"]

INFERENCE_CONTAINERS: tuple[str, ...] = ("vpdml_prompts", "vpdml_head", "vpdml_bitfit")
TRAINING_CONTAINER = "dml_proxies"
ADAPTER_CONTAINERS: tuple[str, ...] = (*INFERENCE_CONTAINERS, TRAINING_CONTAINER)


class VisualPromptDMLModel(BaseTuner):
    """PEFT tuner for VPTSP: prompts in every block, an embedding head, BitFit, semantic proxies.

    Create it through PEFT: ``get_peft_model(vit, VisualPromptDMLConfig(...))``. The returned ``PeftModel``
    forwards unknown attributes here, so ``model.embed(pixel_values)`` and ``model.dml_loss(pixel_values,
    labels)`` work on it directly.
    """

    prefix: str = PREFIX
    tuner_layer_cls = PromptedBlock
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    # ------------------------------------------------------------------------------------------------ injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        info = describe_backbone(model)
        check_backbone_signature(config, info)
        config.backbone_signature = info.signature()
        if config.embedding_dim is None:
            config.embedding_dim = info.hidden_size
        self._ensure_prompt_infrastructure(model, info)
        self._build_adapter(adapter_name, config, info)
        for param in model.parameters():
            param.requires_grad = False
        if len(self.peft_config) == 1 or adapter_name == self.active_adapter:
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
        else:  # PEFT convention: a newly added adapter is inactive and frozen until set_adapter
            self.set_requires_grad(adapter_name, requires_grad=False)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        # PEFT's per-target-module injection is not used: inject_adapter wraps the blocks itself.
        raise NotImplementedError("vpdml injects adapters through inject_adapter, not per target module.")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad = False
        self.set_requires_grad(self.active_adapter)

    def _ensure_prompt_infrastructure(self, model: nn.Module, info: BackboneInfo) -> None:
        """Once per backbone: wrap the blocks, hook the biases, create the per-adapter containers."""
        if "vpdml_prompts" in self._modules:
            return
        self.backbone_info = info
        self._router = PromptRouter()
        self._router.provider = self._active_prompt_provider
        self._adapters_enabled = True
        blocks = model.get_submodule(info.blocks_path)
        for index, block in enumerate(blocks):
            if not isinstance(block, PromptedBlock):
                blocks[index] = PromptedBlock(block, index, self._router)
        self._biased_modules = biased_modules(model, info)
        self._bias_forwards = install_bias_offsets(self._biased_modules, self._active_bias_offset)
        self._bias_adapter: str | BiasLookup | None = None
        for container in ADAPTER_CONTAINERS:
            self.add_module(container, nn.ModuleDict())

    def _build_adapter(self, adapter_name: str, config: VisualPromptDMLConfig, info: BackboneInfo) -> None:
        device = next(self.model.parameters()).device
        hidden, dim = info.hidden_size, int(config.embedding_dim)
        counts = prompt_schedule(config.num_prompts, config.prompt_step, config.prompt_depth, info.num_layers)
        self.vpdml_prompts[adapter_name] = VisualPrompts(counts, hidden).to(device)
        self.vpdml_head[adapter_name] = EmbeddingHead(hidden, dim).to(device)
        if config.bitfit:
            shapes = {name: module.bias.shape for name, module in self._biased_modules.items()}
            self.vpdml_bitfit[adapter_name] = BiasOffsets(shapes).to(device)
        if config.num_classes is not None:
            bank = proxy_bank_for(config, embedding_dim=dim, hidden_size=hidden, num_layers=info.num_layers)
            # offloaded tables and proxies ignore this move and stay in host memory
            self.dml_proxies[adapter_name] = bank.to(device)

    # --------------------------------------------------------------------------------- prompt and bias routing
    def _active_prompt_provider(self, layer_index: int, batch_size: int) -> torch.Tensor | None:
        if not self._adapters_enabled or self.active_adapter not in self.vpdml_prompts:
            return None
        return _expand(self.vpdml_prompts[self.active_adapter].for_layer(layer_index), batch_size)

    def _active_bias_offset(self, canonical_name: str) -> torch.Tensor | None:
        if not self._adapters_enabled:
            return None
        if callable(self._bias_adapter):  # a mixed-adapter batch: one offset row per sample
            return self._bias_adapter(canonical_name)
        adapter = self._bias_adapter or self.active_adapter
        offsets = self.vpdml_bitfit[adapter] if adapter in self.vpdml_bitfit else None  # noqa: SIM401 (ModuleDict has no .get)
        return None if offsets is None else offsets.get(canonical_name)

    @contextlib.contextmanager
    def _route(self, provider: PromptProvider | None, bias: str | BiasLookup) -> Iterator[None]:
        """Temporarily use ``provider``'s prompts and the bias offsets of ``bias`` (an adapter name, or a lookup
        returning per-sample offsets)."""
        previous, self._bias_adapter = self._bias_adapter, bias
        try:
            with self._router.providing(provider):
                yield
        finally:
            self._bias_adapter = previous

    @property
    def prompts_as_keys(self) -> bool:
        """True (default): prompts enter each block's attention as keys and values only. False: they are full tokens
        whose outputs every block computes and drops, as in the official code (same result, more compute)."""
        return self._router.prompts_as_keys

    @prompts_as_keys.setter
    def prompts_as_keys(self, enabled: bool) -> None:
        self._router.prompts_as_keys = bool(enabled)

    # ----------------------------------------------------------------------------------------------- embedding
    def backbone_features(self, pixel_values: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """Pooled feature of the backbone's final norm with whatever prompts are routed right now."""
        return pooled_features(self.model, self.backbone_info, pixel_values, pooling)

    @torch.no_grad()
    def mean_block_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)``: for each image, the mean patch token (prefix tokens left out) that the frozen backbone,
        with no prompts and no BitFit offsets, feeds each of its ``L`` blocks. What ``prompt_init="token_mean"``
        centres the prompts on."""
        check_pixel_values(pixel_values, self.backbone_info, self.model.config)
        info = self.backbone_info
        blocks = self.model.get_submodule(info.blocks_path)
        with mean_block_inputs(blocks, info.num_prefix_tokens) as means, self._route(None, _no_bias_offsets):
            self.backbone_features(pixel_values)
        return torch.stack(means, dim=1)

    @torch.no_grad()
    def center_prompts(self, token_means: torch.Tensor, adapter_name: str | None = None) -> None:
        """Centre each layer's prompts on ``token_means[i]`` (``(L, D)``, see :meth:`mean_block_tokens` and
        :meth:`vpdml.modules.prompts.VisualPrompts.center_on`)."""
        self.vpdml_prompts[self.resolve_adapter(adapter_name)].center_on(token_means)

    def embed(
        self,
        pixel_values: torch.Tensor,
        *,
        adapter_name: str | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """L2-normalised ``(B, E)`` embeddings: what retrieval uses.

        ``adapter_names`` (one name per image, PEFT's convention for mixed-adapter batches) embeds each image with
        its own adapter's prompts, BitFit offsets and head. Adapters with the same prompt counts share one backbone
        pass; otherwise the batch is split into one pass per adapter. The adapters must share ``embedding_dim``.

        Inside ``with model.disable_adapter():`` this returns the frozen backbone's normalised pooled feature
        (``(B, D)``), i.e. the zero-shot baseline.
        """
        check_pixel_values(pixel_values, self.backbone_info, self.model.config)
        if not self._adapters_enabled:
            pooling = (
                self.peft_config[self.active_adapter].pooling
                if self.active_adapter in self.peft_config
                else "cls"
            )
            return nn.functional.normalize(self.backbone_features(pixel_values, pooling).float(), dim=-1)
        if adapter_names is not None:
            if adapter_name is not None:
                raise ValueError(
                    "Pass either adapter_name (whole batch) or adapter_names (one per image), not both."
                )
            return self._embed_mixed(pixel_values, list(adapter_names))
        adapter = self.resolve_adapter(adapter_name)
        config = self.peft_config[adapter]
        provider = _layer_prompts_provider(self.vpdml_prompts[adapter])
        with self._route(provider, adapter):
            features = self.backbone_features(pixel_values, config.pooling)
        return self.vpdml_head[adapter](features)

    def _embed_mixed(self, pixel_values: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        if len(adapter_names) != pixel_values.shape[0]:
            raise ValueError(
                f"adapter_names needs one adapter per image: got {len(adapter_names)} names for "
                f"{pixel_values.shape[0]} images."
            )
        adapters = [self.resolve_adapter(name) for name in dict.fromkeys(adapter_names)]
        dims = {self.peft_config[name].embedding_dim for name in adapters}
        if len(dims) > 1:
            raise ValueError(
                f"Adapters {adapters} have different embedding_dim {sorted(dims)}: one batch can only mix adapters "
                "whose embeddings have the same size. Embed them in separate calls."
            )
        if len(adapters) == 1:
            return self.embed(pixel_values, adapter_name=adapters[0])
        which = torch.tensor([adapters.index(name) for name in adapter_names], device=pixel_values.device)
        groups = [torch.nonzero(which == i, as_tuple=True)[0] for i in range(len(adapters))]
        shares_pass = (
            len({tuple(self.vpdml_prompts[name].counts) for name in adapters}) == 1
            and len({self.peft_config[name].pooling for name in adapters}) == 1
        )
        embeddings = pixel_values.new_empty(pixel_values.shape[0], dims.pop(), dtype=torch.float32)
        if not shares_pass:  # prompt sequences of different lengths: one backbone pass per adapter
            for name, rows in zip(adapters, groups, strict=True):
                embeddings[rows] = self.embed(pixel_values[rows], adapter_name=name)
            return embeddings
        with self._route(
            self._mixed_prompt_provider(adapters, which), self._mixed_bias_lookup(adapters, which)
        ):
            features = self.backbone_features(pixel_values, self.peft_config[adapters[0]].pooling)
        for name, rows in zip(adapters, groups, strict=True):
            embeddings[rows] = self.vpdml_head[name](features[rows])
        return embeddings

    def _mixed_prompt_provider(self, adapters: list[str], which: torch.Tensor) -> PromptProvider:
        def provider(layer_index: int, batch_size: int) -> torch.Tensor | None:
            prompts = [self.vpdml_prompts[name].for_layer(layer_index) for name in adapters]
            return None if prompts[0] is None else torch.stack(prompts)[which]

        return provider

    def _mixed_bias_lookup(self, adapters: list[str], which: torch.Tensor) -> BiasLookup:
        def lookup(canonical_name: str) -> torch.Tensor | None:
            offsets = [
                self.vpdml_bitfit[name].get(canonical_name) if name in self.vpdml_bitfit else None
                for name in adapters
            ]
            if all(offset is None for offset in offsets):
                return None
            bias = self._biased_modules[canonical_name].bias
            rows = [bias.new_zeros(bias.shape) if offset is None else offset for offset in offsets]
            return torch.stack(rows)[which]

        return lookup

    # ---------------------------------------------------------------------------------------------------- loss
    def dml_forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, *, adapter_name: str | None = None
    ) -> DMLForwardOutput:
        """Embeddings of a batch and, with semantic proxies, this step's semantic-proxy rows (no loss yet).

        With semantic proxies, a second backbone pass gives each image its class's prompts; the proxy head turns
        the result into semantic vectors that update the per-class state (in training mode). When the class
        prompts have the shared prompts' per-layer counts (and ``fuse_proxy_pass``), both passes run as one
        backbone pass over the concatenated batch. With ``proxy_pass_every=k`` the proxy pass runs on every k-th
        training step only; the other steps score against the stored semantic state.
        """
        adapter = self.resolve_adapter(adapter_name)
        config = self.peft_config[adapter]
        bank = self._proxy_bank(adapter)
        labels = check_labels(labels, pixel_values, bank.num_classes)
        # record_function scopes name the phases in torch.profiler traces (bench/profile_step.py); free otherwise
        if not bank.uses_semantic_proxies or not bank.proxy_pass_due():
            with record_function("vpdml.sample_pass"):
                return DMLForwardOutput(self.embed(pixel_values, adapter_name=adapter))
        chosen = first_per_class(labels, config.semantic_images_per_class)
        trunk_layers = config.shared_trunk_layers(self.backbone_info.num_layers)
        if trunk_layers:
            check_pixel_values(pixel_values, self.backbone_info, self.model.config)
            embeddings, semantic = self._passes_with_shared_trunk(
                bank, pixel_values, labels, chosen, adapter, config, SharedTrunk(trunk_layers)
            )
        elif self._can_fuse_proxy_pass(adapter, bank, config):
            check_pixel_values(pixel_values, self.backbone_info, self.model.config)
            with record_function("vpdml.fused_passes"):
                embeddings, semantic = self._fused_passes(bank, pixel_values, labels, chosen, adapter, config)
        else:
            with record_function("vpdml.sample_pass"):
                embeddings = self.embed(pixel_values, adapter_name=adapter)
            with record_function("vpdml.proxy_pass"):
                semantic = self._semantic_embeddings(
                    bank, pixel_values[chosen], labels[chosen], adapter, config
                )
        with record_function("vpdml.proxy_state"):
            semantic_rows = bank.accumulate(semantic, labels[chosen])
        return DMLForwardOutput(embeddings, semantic, semantic_rows)

    def dml_loss(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        *,
        adapter_name: str | None = None,
        return_outputs: bool = False,
    ) -> torch.Tensor | DMLLossOutput:
        """Proxy-Anchor loss of a batch against the adapter's (semantic) proxies (:meth:`dml_forward`, then the
        loss over every class's proxy, or over the batch's classes and sampled negatives with
        ``proxy_negatives``)."""
        adapter = self.resolve_adapter(adapter_name)
        config = self.peft_config[adapter]
        bank = self._proxy_bank(adapter)
        labels = check_labels(labels, pixel_values, bank.num_classes)
        outputs = self.dml_forward(pixel_values, labels, adapter_name=adapter)
        with record_function("vpdml.proxies_and_loss"):
            proxies = bank.loss_proxies(labels, outputs.semantic_rows)
            loss = proxy_loss(outputs.embeddings, labels, proxies, config.loss_settings)
        if return_outputs:
            return DMLLossOutput(
                loss, outputs.embeddings, proxies.proxies, outputs.semantic_embeddings, proxies.classes
            )
        return loss

    def _proxy_bank(self, adapter: str) -> ProxyBank:
        if adapter not in self.dml_proxies:
            raise ValueError(
                f"Adapter {adapter!r} has no proxies: create it with VisualPromptDMLConfig(num_classes=...) to "
                "train it (an adapter loaded for inference only embeds)."
            )
        return self.dml_proxies[adapter]

    def _semantic_embeddings(
        self,
        bank: ProxyBank,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        adapter: str,
        config: VisualPromptDMLConfig,
    ) -> torch.Tensor:
        per_layer = bank.class_prompts.gather(labels)

        def class_prompt_provider(layer_index: int, batch_size: int) -> torch.Tensor | None:
            return per_layer[layer_index]

        subset = proxy_token_subset(config, self.backbone_info)
        with self._route(class_prompt_provider, adapter), self._router.subsetting(subset):
            features = self.backbone_features(pixel_values, config.pooling)
        return bank.proxy_head(features)

    def _passes_with_shared_trunk(
        self,
        bank: ProxyBank,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        chosen: torch.Tensor,
        adapter: str,
        config: VisualPromptDMLConfig,
        trunk: SharedTrunk,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample pass, then a proxy pass that starts from its hidden states after ``trunk.layers`` blocks.

        The proxy pass costs ``proxy_pass_layers / num_layers`` of a whole pass over the chosen images (plus their
        patch embedding); its class prompts live in those last blocks only.
        """
        with record_function("vpdml.sample_pass"), self._router.sharing(trunk):
            embeddings = self.embed(pixel_values, adapter_name=adapter)
        trunk.select(chosen)
        with record_function("vpdml.proxy_pass"), self._router.sharing(trunk):
            semantic = self._semantic_embeddings(bank, pixel_values[chosen], labels[chosen], adapter, config)
        return embeddings, semantic

    def _can_fuse_proxy_pass(self, adapter: str, bank: ProxyBank, config: VisualPromptDMLConfig) -> bool:
        # one pass needs one sequence length per layer: the class prompts must match the shared prompts' counts,
        # and the proxy pass must keep every token
        return (
            config.fuse_proxy_pass
            and config.proxy_pass_tokens is None
            and list(bank.class_prompts.counts) == list(self.vpdml_prompts[adapter].counts)
        )

    def _fused_passes(
        self,
        bank: ProxyBank,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        chosen: torch.Tensor,
        adapter: str,
        config: VisualPromptDMLConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample pass (shared prompts) and the proxy pass (class prompts) as one backbone pass.

        The batch is ``[images; images[chosen]]``: the first ``B`` rows get the adapter's prompts, the others their
        class's prompts. A ViT treats every sample independently (no batch statistics), so this equals the two
        separate passes up to float rounding, with half the kernel launches and larger matmuls.
        """
        batch = pixel_values.shape[0]
        shared = self.vpdml_prompts[adapter]
        class_prompts = bank.class_prompts.gather(labels[chosen])

        def provider(layer_index: int, batch_size: int) -> torch.Tensor | None:
            prompts = shared.for_layer(layer_index)
            if prompts is None:  # equal counts: no class prompts in this layer either
                return None
            rows = class_prompts[layer_index]
            return torch.cat([_expand(prompts, batch), rows.to(device=prompts.device, dtype=prompts.dtype)])

        with self._route(provider, adapter):
            features = self.backbone_features(torch.cat([pixel_values, pixel_values[chosen]]), config.pooling)
        return self.vpdml_head[adapter](features[:batch]), bank.proxy_head(features[batch:])

    # ------------------------------------------------------------------------------------------ adapter control
    def resolve_adapter(self, adapter_name: str | None) -> str:
        adapter = adapter_name or self.active_adapter
        if isinstance(adapter, list):
            adapter = adapter[0]
        if adapter not in self.peft_config or adapter not in self.vpdml_head:
            raise ValueError(f"Unknown adapter {adapter!r}; available: {sorted(self.vpdml_head.keys())}.")
        return adapter

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter; it becomes trainable unless ``inference_mode``, the others are frozen."""
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(
                    f"vpdml activates one adapter at a time, got {adapter_name}. Call set_adapter(name) to switch."
                )
            adapter_name = adapter_name[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; available: {sorted(self.peft_config)}.")
        self.active_adapter = adapter_name
        for module in self.model.modules():
            if isinstance(module, PromptedBlock):
                module._active_adapter = adapter_name
        for name in self.peft_config:
            self.set_requires_grad(name, requires_grad=(name == adapter_name) and not inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for container in ADAPTER_CONTAINERS:
            modules: nn.ModuleDict = getattr(self, container)
            for name in names:
                if name in modules:
                    modules[name].requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._adapters_enabled = enabled
        for module in self.model.modules():
            if isinstance(module, PromptedBlock):
                module._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"Adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}."
            )
        del self.peft_config[adapter_name]
        for container in ADAPTER_CONTAINERS:
            modules: nn.ModuleDict = getattr(self, container)
            if adapter_name in modules:
                del modules[adapter_name]
        if self.active_adapter == adapter_name:
            remaining = list(self.peft_config)
            self.active_adapter = remaining[0] if remaining else []
            if remaining:
                self.set_adapter(remaining[0])

    def unload(self) -> nn.Module:
        """Remove every trace of vpdml and return the untouched backbone."""
        for forward in self._bias_forwards:
            forward.remove()
        self._bias_forwards = []
        blocks = self.model.get_submodule(self.backbone_info.blocks_path)
        for index, block in enumerate(blocks):
            if isinstance(block, PromptedBlock):
                blocks[index] = block.release()
        return self.model

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(
            "vpdml adapters cannot be merged: prompts are extra tokens, not weight deltas, and the embedding head is "
            "a new module. Keep the PeftModel (its adapter is tiny), or call unload() to get the bare backbone back."
        )

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        self.merge_and_unload()

    def _check_merge_allowed(self) -> None:
        self.merge_and_unload()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Adapters are created in float32 whatever the backbone's dtype; prompts are cast per forward pass."""

    # ----------------------------------------------------------------------------------------------- save/load
    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: VisualPromptDMLConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Only the inference part goes into ``adapter_model.safetensors``."""
        selected = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        return {k: v for k, v in selected.items() if f"{TRAINING_CONTAINER}." not in k}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        for container in ADAPTER_CONTAINERS:
            marker = f"{container}.{adapter_name}."
            if marker in key:
                return key.replace(marker, f"{container}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: VisualPromptDMLConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """PEFT only warns about missing keys and ignores unexpected ones; an adapter file is untrusted input, so
        every inference tensor must be present, of the right shape, finite, and nothing else may be there."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = tuple(f"{name}.{adapter_name}." for name in INFERENCE_CONTAINERS)
        expected = {k: v for k, v in model.state_dict().items() if any(p in k for p in prefixes)}
        check_adapter_tensors(
            expected, remapped, lambda key: cls._remove_adapter_name_from_key(key, adapter_name)
        )
        return remapped

    def parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Parameter counts of one adapter: inference part, training-only part, and the frozen backbone."""
        adapter = self.resolve_adapter(adapter_name)
        counts = {container: 0 for container in ADAPTER_CONTAINERS}
        for container in ADAPTER_CONTAINERS:
            modules: nn.ModuleDict = getattr(self, container)
            if adapter in modules:
                counts[container] = sum(p.numel() for p in modules[adapter].parameters())
        inference = sum(counts[c] for c in INFERENCE_CONTAINERS)
        return {
            "prompts": counts["vpdml_prompts"],
            "head": counts["vpdml_head"],
            "bitfit": counts["vpdml_bitfit"],
            "inference_adapter": inference,
            "training_only": counts[TRAINING_CONTAINER],
            "trainable_total": inference + counts[TRAINING_CONTAINER],
            "backbone": sum(p.numel() for p in self.model.parameters()),
        }


def _no_bias_offsets(canonical_name: str) -> None:
    return None


def _expand(prompts: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    return None if prompts is None else prompts.unsqueeze(0).expand(batch_size, -1, -1)


def _layer_prompts_provider(prompts: VisualPrompts) -> PromptProvider:
    def provider(layer_index: int, batch_size: int) -> torch.Tensor | None:
        return _expand(prompts.for_layer(layer_index), batch_size)

    return provider
