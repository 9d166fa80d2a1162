"""Zero-shot cross-style retrieval of the offline backbone, layer by layer.

The offline DINOv2 ViT-S/14 comes from a saliency model whose training may have changed the last
blocks. This embeds the emoji test classes with the CLS token of every layer's output (raw, and after
the backbone's final LayerNorm) and with mean-pooled patch tokens, and reports cosine Recall@1
(leave-one-out: the other styles of the same emoji are the relevant items) and MAP@R.

    python bench/zero_shot_layers.py --image-size 112 --output bench/results/zero_shot_112.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vpdml.offline.backbone import IMAGENET_MEAN, IMAGENET_STD, load_offline_backbone
from vpdml.offline.emoji import emoji_splits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=112, help="input side in pixels (multiple of 14)")
    parser.add_argument(
        "--seed", type=int, default=0, help="class split seed (as vpdml.offline.emoji_splits)"
    )
    parser.add_argument("--num-test-classes", type=int, default=None, help="subset of the test half")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", type=Path, default=None, help="write the table as JSON here")
    return parser.parse_args()


def to_pixels(images: list[Image.Image], image_size: int) -> torch.Tensor:
    """Bicubic resize to a square, scale to [0, 1], ImageNet-normalise: the checkpoint's preprocessing."""
    arrays = [
        np.asarray(image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def embed_all_layers(
    model: torch.nn.Module, images: list[Image.Image], image_size: int, batch_size: int
) -> dict:
    """Per layer: CLS raw, CLS after the final LayerNorm, and LayerNormed patch mean; L2-normalised."""
    features: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="Embedding", unit="batch"):
        pixels = to_pixels(images[start : start + batch_size], image_size)
        hidden_states = model(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        for layer, hidden in enumerate(hidden_states[1:], start=1):  # [0] is the patch embedding
            normed = model.layernorm(hidden)
            views = {
                "cls_raw": hidden[:, 0],
                "cls_ln": normed[:, 0],
                "patch_mean_ln": normed[:, 1:].mean(dim=1),
            }
            for view, tensor in views.items():
                # clone: a CLS slice is a view that would keep the whole (B, T, D) hidden state alive
                features.setdefault(f"{layer}/{view}", []).append(tensor.clone())
    return {key: torch.nn.functional.normalize(torch.cat(parts), dim=1) for key, parts in features.items()}


def recall_at_1_and_map_at_r(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Cosine leave-one-out Recall@1 and MAP@R (Musgrave et al. 2020) over one set of embeddings."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    relevant_counts = same.sum(dim=1)
    max_r = int(relevant_counts.max())
    order = similarity.topk(max_r, dim=1).indices
    hits = torch.gather(same, 1, order).float()
    recall_at_1 = hits[:, 0].mean().item()
    ranks = torch.arange(1, max_r + 1, dtype=torch.float32)
    within_r = ranks[None, :] <= relevant_counts[:, None]
    precision_at_i = hits.cumsum(dim=1) / ranks
    map_at_r = ((precision_at_i * hits * within_r).sum(dim=1) / relevant_counts.clamp(min=1)).mean().item()
    return recall_at_1, map_at_r


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    splits = emoji_splits(seed=args.seed, num_test_classes=args.num_test_classes)
    test = splits.test
    images = list(test["image"])
    labels = torch.tensor(test["label"])
    model = load_offline_backbone().eval()

    started = time.perf_counter()
    features = embed_all_layers(model, images, args.image_size, args.batch_size)
    embed_seconds = time.perf_counter() - started

    rows = []
    for key, embeddings in features.items():
        layer, view = key.split("/")
        recall, map_r = recall_at_1_and_map_at_r(embeddings, labels)
        rows.append({"layer": int(layer), "view": view, "recall_at_1": recall, "map_at_r": map_r})

    num_classes = labels.unique().numel()
    print(
        f"{len(images)} test images, {num_classes} classes, {args.image_size}px, embed {embed_seconds:.0f}s"
    )
    print(
        f"{'layer':>5} {'cls_raw R@1':>12} {'cls_ln R@1':>11} {'patch_mean_ln R@1':>18} {'cls_ln MAP@R':>13}"
    )
    by_layer: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], {})[row["view"]] = row
    for layer, views in sorted(by_layer.items()):
        print(
            f"{layer:>5} {views['cls_raw']['recall_at_1']:>12.3f} {views['cls_ln']['recall_at_1']:>11.3f} "
            f"{views['patch_mean_ln']['recall_at_1']:>18.3f} {views['cls_ln']['map_at_r']:>13.3f}"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "image_size": args.image_size,
            "seed": args.seed,
            "num_images": len(images),
            "num_classes": int(labels.unique().numel()),
            "embed_seconds": embed_seconds,
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        }
        args.output.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
