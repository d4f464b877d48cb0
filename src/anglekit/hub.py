"""Publishing a saved model folder to the Hugging Face Hub.

:func:`push_to_hub` uploads everything ``save_pretrained`` wrote (weights, tokenizer,
``anglekit_config.json``, the card data and its README.md) in one commit, after recording the
repo id in the card so its usage example loads from the hub. ``anglekit push`` and
``fit(..., push_to_hub="user/repo")`` call it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

__all__ = ["HubError", "check_can_push", "push_to_hub"]

logger = logging.getLogger(__name__)

LOGIN_HINT = "run `hf auth login`, set HF_TOKEN, or pass a token (anglekit push --token)"


class HubError(RuntimeError):
    """A push to the hub that cannot start or that failed; the message names the repo."""


def check_can_push(repo_id: str, token: str | None = None) -> str:
    """Check, before any work, that a push to ``repo_id`` can be attempted.

    Args:
        repo_id: ``user/name`` or ``org/name``.
        token: a Hugging Face token; default the logged-in one (``HF_TOKEN`` or ``hf auth
            login``).

    Returns:
        The token to use.

    Raises:
        HubError: no token, offline mode, or a malformed repo id.
    """
    from huggingface_hub import constants, get_token

    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise HubError(f"repo id must look like user/name, got {repo_id!r}")
    token = token or get_token()
    if not token:
        raise HubError(f"cannot push to {repo_id}: no Hugging Face token; {LOGIN_HINT}")
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to publish")
    return token


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a model folder written by ``save_pretrained`` to a hub model repo.

    The repo is created if needed. Before the upload the card records ``repo_id`` and its
    README.md is regenerated, unless it was edited by hand.

    Args:
        model_dir: the folder (it holds ``anglekit_config.json``).
        repo_id: ``user/name`` or ``org/name``.
        private: create the repo private; ``None`` keeps the hub's default (and an existing
            repo's visibility).
        token: a Hugging Face token; default the logged-in one.
        commit_message: default ``"Upload anglekit model"``.

    Returns:
        The URL of the repo.

    Raises:
        HubError: no token, offline, not an anglekit folder, or the hub refused or could not be
            reached (the message names the repo and the cause).
    """
    from anglekit.card import CardData, write_card
    from anglekit.config import CONFIG_NAME, AngleConfig

    folder = Path(model_dir)
    config = AngleConfig.load(folder) if folder.is_dir() else None
    if config is None:
        raise HubError(
            f"cannot push {folder}: not a model folder saved by anglekit (no {CONFIG_NAME})"
        )
    token = check_can_push(repo_id, token)
    card = CardData.load(folder) or CardData(base_model=config.base_model)
    write_card(folder, replace(card, repo_id=repo_id), config, model_id=repo_id)

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message or "Upload anglekit model",
        )
    except (HTTPError, OSError) as e:
        raise HubError(
            f"could not push {folder} to {repo_id}: {type(e).__name__}: {e} (the folder is "
            f"unchanged but for its card; retry with: anglekit push {folder} {repo_id})"
        ) from e
    logger.info("pushed %s to %s", folder, url)
    return str(url)
