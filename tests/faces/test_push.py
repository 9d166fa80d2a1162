"""`vpdml push`: a finished run's release files to the Hub (a recording fake HfApi), with training's token rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from huggingface_hub.utils import filter_repo_objects

from helpers.fake_hub import RecordingHfApi
from helpers.runs import write_backbone, write_run
from vpdml import hub
from vpdml.cli import main
from vpdml.training import push_run_folder

TOKEN = "hf_PushTokenValue0123456789abcdefghij"
RELEASE_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    "metrics.json",
    "preprocessor_config.json",
    "training_curves.png",
    "retrieval_grid.png",
}

pytestmark = pytest.mark.filterwarnings("ignore:.*requires torchvision:UserWarning")


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> type[RecordingHfApi]:
    """The fake HfApi, and no token from the environment or a saved login unless a test sets one."""
    RecordingHfApi.instances = []
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    return RecordingHfApi


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished adapter run (card without a repo id), plus what must stay local: checkpoints and training state."""
    root = tmp_path_factory.mktemp("push")
    run = root / "run"
    write_run(run, write_backbone(root / "backbone"))
    (run / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3}))
    (run / "training_state.safetensors").write_bytes(b"proxies")
    checkpoint = run / "checkpoints" / "step-3"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_curves.png"):
        shutil.copy(run / name, checkpoint / name)
    (checkpoint / "optimizer.safetensors").write_bytes(b"adam")
    return run


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (a push fills the card's repo id in)."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def uploaded_files(folder: Path, upload: dict[str, Any]) -> set[str]:
    """The files huggingface_hub's upload_folder would send with the recorded patterns."""
    files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    return set(
        filter_repo_objects(
            files, allow_patterns=upload["allow_patterns"], ignore_patterns=upload["ignore_patterns"]
        )
    )


def test_push_uploads_the_release_files_with_the_given_token(run, fake_api, capsys):
    assert "<user>/<adapter-repo>" in (run / "README.md").read_text()

    code = main(["push", str(run), "--repo", "me/tiny-vptsp", "--hub-token", TOKEN, "--private"])

    assert code == 0
    (api,) = fake_api.instances
    assert api.token == TOKEN
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/tiny-vptsp", "private": True, "exist_ok": True}
    upload = api.calls[1][1]
    assert upload["repo_id"] == "me/tiny-vptsp" and Path(upload["folder_path"]) == run
    assert upload["commit_message"] == "Upload vpdml run run"
    assert uploaded_files(run, upload) == RELEASE_FILES  # no checkpoints, optimizer or training state
    # the card's usage snippet now names the repo
    assert 'PeftModel.from_pretrained(base, "me/tiny-vptsp")' in (run / "README.md").read_text()
    captured = capsys.readouterr()
    assert captured.out.strip() == f"Uploaded {run} to https://huggingface.co/me/tiny-vptsp"
    assert TOKEN not in captured.out + captured.err + repr(api.calls)


def test_push_without_a_token_flag_leaves_the_token_to_huggingface_hub(run, fake_api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = push_run_folder(run, "me/tiny-vptsp", revision="v1")
    assert url == "https://huggingface.co/me/tiny-vptsp"
    (api,) = fake_api.instances
    assert api.token is None  # HfApi reads HF_TOKEN / the saved login itself
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1]["private"] is False
    assert api.calls[2][1]["revision"] == "v1"


@pytest.mark.parametrize("source", ["flag", "HF_TOKEN", "saved login"])
def test_push_refuses_a_file_that_holds_the_token(run, fake_api, monkeypatch, tmp_path, capsys, source):
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "note": f"token {TOKEN}"}))
    argv = ["push", str(run), "--repo", "me/tiny-vptsp"]
    if source == "flag":
        argv += ["--hub-token", TOKEN]
    elif source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        (tmp_path / "token").write_text(TOKEN)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))

    assert main(argv) == 1

    err = capsys.readouterr().err
    assert "metrics.json contains the Hub token; refusing to upload it" in err
    assert TOKEN not in err
    assert fake_api.instances == []  # stopped before talking to the Hub


def test_push_refuses_a_full_fine_tuning_run(tmp_path, fake_api, capsys):
    write_run(tmp_path / "full", write_backbone(tmp_path / "backbone"), "full-finetune")

    assert main(["push", str(tmp_path / "full"), "--repo", "me/full"]) == 1

    err = capsys.readouterr().err
    assert "is a full fine-tuning run: it saves the whole backbone, not an adapter" in err
    assert fake_api.instances == []


def test_push_names_what_an_unfinished_run_lacks(run, tmp_path, fake_api, capsys):
    for name in ("README.md", "metrics.json", "adapter_model.safetensors"):
        (run / name).unlink()
    assert main(["push", str(run), "--repo", "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert "is not a finished vpdml run: it lacks adapter_model.safetensors, README.md, metrics.json." in err
    assert "It holds checkpoints: finish the run" in err

    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"lacks adapter_config\.json, adapter_model\.safetensors, README"
    ):
        push_run_folder(tmp_path / "empty", "me/tiny")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        push_run_folder(tmp_path / "missing", "me/tiny")
    assert fake_api.instances == []


def test_push_is_a_listed_command(capsys):
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("RUN_DIR", "--repo", "--hub-token", "--private", "--revision"):
        assert flag in help_text
