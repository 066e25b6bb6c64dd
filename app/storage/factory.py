"""The artifact store the settings describe: local files, or shared storage with a local cache."""

from __future__ import annotations

from app.settings import Settings
from app.storage.artifacts import ArtifactStore
from app.storage.remote import RemoteArtifacts


def open_store(settings: Settings) -> ArtifactStore:
    remote = RemoteArtifacts(settings.storage_url, settings.storage_options) if settings.storage_url else None
    return ArtifactStore(settings.data_dir, remote)
