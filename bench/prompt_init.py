"""How much freshly initialised prompts disturb the frozen backbone's features, before any training.

On the offline default (DINOv2 ViT-S/14, first 11 blocks; emoji benchmark, class split 0, 80 test classes, 84 px)
it scores the backbone's final CLS feature by leave-one-out R@1 without prompts and with ``--num-prompts`` prompts
per layer: VPT's xavier-normal initialisation (one row per ``--seeds`` draw), ``prompt_init="token_mean"`` (the
draw centred on the mean patch token each block receives, over 256 training images) and plain normal draws of a
few standard deviations. A prompt-tuning run starts from these features (the head warm-up is fitted on them), so a drop here
is what training has to repair before it can gain (docs/benchmarks.md, the sweep).

    python bench/prompt_init.py          # ~40 s on 2 CPU cores
    python bench/prompt_init.py --num-prompts 1 --split-seed 1 --seeds 0 1 2 --stds 0
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--stds", type=float, nargs="+", default=[0.0, 0.02, 0.3, 1.0, 3.0])
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="prompt initialisation seeds")
    parser.add_argument("--split-seed", type=int, default=0, help="emoji class split")
    args = parser.parse_args(argv)

    from peft import get_peft_model

    import vpdml
    from vpdml.data import transforms_from_processor
    from vpdml.modules.prompts import xavier_normal_prompts
    from vpdml.offline import emoji_splits, load_offline_backbone
    from vpdml.retrieval.metrics import retrieval_metrics
    from vpdml.training import load_image_processor

    backbone = load_offline_backbone(num_layers=11)
    transform = transforms_from_processor(load_image_processor(backbone.name_or_path), args.image_size)[1]
    splits = emoji_splits(
        seed=args.split_seed, num_train_classes=80, num_test_classes=80, show_progress=False
    )
    pixels = torch.stack([transform(image) for image in splits.test["image"]])
    labels = torch.tensor(splits.test["label"])
    train_pixels = torch.stack([transform(image) for image in splits.train["image"][:256]])
    config = vpdml.VisualPromptDMLConfig(num_prompts=args.num_prompts, semantic_proxies="none")
    model = get_peft_model(backbone, config).eval()
    tuner = model.base_model
    prompts = list(tuner.vpdml_prompts["default"].prompts.values())
    token_means = tuner.mean_block_tokens(train_pixels).mean(dim=0)

    def recall_at_1() -> float:
        # last_hidden_state is the final norm's output; its CLS token is what the embedding head receives
        with torch.no_grad():
            features = torch.cat(
                [
                    model(pixel_values=chunk, interpolate_pos_encoding=True).last_hidden_state[:, 0]
                    for chunk in pixels.split(64)
                ]
            )
        return retrieval_metrics(features, labels, recall_at=(1,))["recall@1"]

    rows = []
    with model.disable_adapter():
        rows.append(("no prompts (the frozen backbone)", recall_at_1()))
    for seed in args.seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            for prompt in prompts:
                prompt.copy_(xavier_normal_prompts(*prompt.shape))
        rows.append((f"{args.num_prompts} prompts per layer, xavier-normal, seed {seed}", recall_at_1()))
        tuner.center_prompts(token_means)
        rows.append((f"{args.num_prompts} prompts per layer, token_mean, seed {seed}", recall_at_1()))
    for std in args.stds:
        with torch.no_grad():
            for prompt in prompts:
                prompt.normal_(std=std) if std > 0 else prompt.zero_()
        rows.append((f"{args.num_prompts} prompts per layer, normal std {std:g}", recall_at_1()))
    print(
        f"class split {args.split_seed}: {len(labels)} test images, {labels.unique().numel()} classes, "
        f"{args.image_size} px\n"
    )
    print("| prompts at initialisation | R@1 |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
