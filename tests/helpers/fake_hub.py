"""A stand-in for ``huggingface_hub.HfApi`` that records calls and talks to nothing."""

from __future__ import annotations

from typing import Any, ClassVar


class RecordingHfApi:
    """Stands in for HfApi: records every call, talks to nothing."""

    instances: ClassVar[list[RecordingHfApi]] = []

    def __init__(self, token: str | None = None, **kwargs: Any) -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        RecordingHfApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> None:
        self.calls.append(("upload_folder", kwargs))
