"""The training objective as a module: ``forward(pixel_values, labels) -> loss``, the same on 1 or N processes.

``accelerate`` wraps what it prepares in ``DistributedDataParallel``, which needs the loss to come out of a
module's ``forward``; a PEFT model's ``forward`` runs the backbone, not the DML loss. :class:`DMLObjective` is that
module.

Several processes (data parallel, each with its share of whole classes of a global batch ``P x m``):

* **Global-batch Proxy Anchor.** Proxy Anchor's negative term is ``log(1 + sum over the batch)`` per proxy: it
  does not split into per-process losses. Every process therefore gathers the batch's embeddings (with their
  graph, through ``torch.distributed.nn.functional.all_gather``) and the proxy rows of its classes (which carry
  this step's semantic-proxy update), and computes the loss of the whole global batch. Gradients flowing back
  through the gather reach the process that owns each sample; after DDP averages, every parameter's gradient is
  the gradient of the one-process loss on the same global batch (up to floating-point summation order).
* **Row-sparse class prompts** (``class_prompt_storage`` ``"sparse"``/``"low_rank"``) have sparse gradients,
  which DDP cannot reduce: :func:`exclude_from_ddp` takes them out of DDP, and after each backward pass that
  ends an accumulation :func:`all_reduce_row_sparse_gradients` gathers every process's ``(rows, values)`` and
  averages them, as DDP does for dense gradients.
* **Semantic-proxy state.** The per-class state ``P`` (a buffer, no gradient) is updated in the forward pass from
  the process's own classes. Right after, every process all-gathers ``(class ids, updated rows)`` and writes
  them, so ``P`` stays identical everywhere. The sampler puts distinct classes on the processes of a global
  batch, so the merged state is exactly what one process computes on the global batch; should two processes
  ever share a class, the row of the highest rank wins (deterministically). DDP's own buffer broadcast is
  switched off by the trainer (it would overwrite every rank's rows with rank 0's).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vpdml.models.protocol import as_dml_model
from vpdml.proxies.loss import proxy_loss
from vpdml.training.distributed import all_gather_rows, last_occurrence, process_count

__all__ = ["DMLObjective"]


class DMLObjective(nn.Module):
    """``forward(pixel_values, labels)`` -> Proxy-Anchor loss of the *global* batch (see the module docstring).

    Holds the model as ``self.model``; ``accelerator.unwrap_model(prepared).model`` gives it back.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._dml = as_dml_model(model)  # a plain object: the module itself is registered once, below
        if self._dml.proxy_bank is None:
            raise ValueError(
                "The model has no proxies: build it with num_classes=<number of training classes>."
            )
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        bank, settings = self._dml.proxy_bank, self._dml.loss_settings
        outputs = self._dml.dml_forward(pixel_values, labels)
        if process_count() == 1:
            return proxy_loss(
                outputs.embeddings, labels, bank.loss_proxies(labels, outputs.semantic_rows), settings
            )
        local_classes = torch.unique(labels)
        self._synchronise_semantic_state(local_classes)
        embeddings = all_gather_rows(outputs.embeddings, differentiable=True)
        all_labels = all_gather_rows(labels)
        # Every process builds the proxies of the global batch (sampled negatives: the same sample everywhere, a
        # function of the global batch's classes and the step). This step's rows of the batch classes live on the
        # process that updated them: gather them (with their graph) and put them in place.
        proxies = bank.loss_proxies(all_labels, outputs.semantic_rows)
        classes = all_gather_rows(local_classes)
        rows = all_gather_rows(proxies.proxies[proxies.rows_of(local_classes)], differentiable=True)
        keep = last_occurrence(classes)
        merged = proxies.proxies.index_put((proxies.rows_of(classes[keep]),), rows[keep])
        return proxy_loss(embeddings, all_labels, dataclasses.replace(proxies, proxies=merged), settings)

    @torch.no_grad()
    def _synchronise_semantic_state(self, local_classes: torch.Tensor) -> None:
        """Give every process the state rows the others just updated (training mode only)."""
        bank = self._dml.proxy_bank
        if bank is None or not bank.uses_semantic_proxies or not self.training:
            return
        classes = all_gather_rows(local_classes)
        rows = all_gather_rows(bank.semantic_state[local_classes])
        keep = last_occurrence(classes)
        bank.semantic_state[classes[keep]] = rows[keep]
        bank.semantic_seen[classes] = True
