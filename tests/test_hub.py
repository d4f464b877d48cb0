"""Publishing to the hub, with huggingface_hub.HfApi replaced at its boundary (no network)."""

from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import HTTPError

from anglekit import AnglE, fit
from anglekit.card import CARD_DATA_NAME, CardData
from anglekit.cli import main
from anglekit.hub import HubError, push_to_hub

from .conftest import write_jsonl


class FakeHfApi:
    """Records what would be sent; ``fail`` makes the upload raise it."""

    calls: list[tuple[str, dict]] = []
    fail: Exception | None = None

    def __init__(self, token=None, **kwargs):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        from pathlib import Path

        folder = Path(kwargs["folder_path"])
        files = sorted(p.name for p in folder.iterdir())
        readme = (folder / "README.md").read_text()
        self.calls.append(("upload_folder", {**kwargs, "files": files, "readme": readme}))
        if self.fail is not None:
            raise self.fail
        return "https://huggingface.co/commit/abc"


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi faked, online mode, and a logged-in token."""
    FakeHfApi.calls = []
    FakeHfApi.fail = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_logged_in")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return FakeHfApi


@pytest.fixture
def saved_model(tiny_bert, tmp_path):
    """A tiny model folder written by save_pretrained."""
    folder = tmp_path / "model"
    AnglE.from_pretrained(str(tiny_bert), device="cpu").save_pretrained(folder)
    return folder


def call(fake, name):
    """The arguments of the one call named ``name``."""
    [found] = [kwargs for n, kwargs in fake.calls if n == name]
    return found


def test_push_uploads_the_whole_folder_with_a_hub_card(fake_hub, saved_model):
    """push creates the repo (exist_ok, private) and uploads weights, tokenizer, config, card."""
    url = push_to_hub(saved_model, "me/tiny", private=True)
    assert url == "https://huggingface.co/me/tiny"
    assert call(fake_hub, "init") == {"token": "hf_logged_in"}
    repo = call(fake_hub, "create_repo")
    assert repo["repo_id"] == "me/tiny" and repo["exist_ok"] is True and repo["private"] is True
    upload = call(fake_hub, "upload_folder")
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(saved_model)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "anglekit_config.json"):
        assert name in upload["files"]
    assert CARD_DATA_NAME in upload["files"] and "README.md" in upload["files"]
    assert 'AnglE.from_pretrained("me/tiny")' in upload["readme"]
    assert CardData.load(saved_model).repo_id == "me/tiny"


def test_push_without_token_fails_before_any_call(fake_hub, monkeypatch, saved_model):
    """No token given or logged in: a readable error and no hub call."""
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match=r"me/tiny: no Hugging Face token.*hf auth login"):
        push_to_hub(saved_model, "me/tiny")
    assert fake_hub.calls == []
    push_to_hub(saved_model, "me/tiny", token="hf_given")  # an explicit token is enough
    assert call(fake_hub, "init") == {"token": "hf_given"}


def test_network_failure_is_one_message_naming_the_repo(fake_hub, saved_model):
    """A connection error during upload becomes a HubError naming repo and cause."""
    fake_hub.fail = HTTPError("connection refused")
    with pytest.raises(HubError, match=r"to me/tiny: HTTPError: connection refused"):
        push_to_hub(saved_model, "me/tiny")


def test_push_refuses_offline_mode_and_foreign_folders(
    fake_hub, monkeypatch, tiny_bert, saved_model
):
    """HF_HUB_OFFLINE and a folder without anglekit_config.json are refused up front."""
    with pytest.raises(HubError, match="anglekit_config.json"):
        push_to_hub(tiny_bert, "me/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(saved_model, "me/tiny")
    assert fake_hub.calls == []


def test_push_command(fake_hub, saved_model, capsys):
    """anglekit push passes --private and --token; a failure is a one-line error, exit 1."""
    assert main(["-q", "push", str(saved_model), "me/tiny", "--private", "--token", "t"]) == 0
    assert "https://huggingface.co/me/tiny" in capsys.readouterr().out
    assert call(fake_hub, "init") == {"token": "t"}
    assert call(fake_hub, "create_repo")["private"] is True

    fake_hub.calls = []
    fake_hub.fail = HTTPError("503 Service Unavailable")
    assert main(["-q", "push", str(saved_model), "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert "me/tiny" in err and "503" in err and "Traceback" not in err
    assert call(fake_hub, "create_repo")["private"] is None  # the hub's default visibility


def test_fit_push_to_hub(fake_hub, monkeypatch, tiny_bert, tmp_path, sts_rows):
    """fit(push_to_hub=...) uploads the final model; without a token it fails before training."""
    data = write_jsonl(tmp_path / "train.jsonl", sts_rows)
    common = dict(dev_data=None, max_steps=1, batch_size=4, progress=False, plots=False)
    result = fit(
        str(tiny_bert), str(data), output_dir=str(tmp_path / "run"), push_to_hub="me/r", **common
    )
    upload = call(fake_hub, "upload_folder")
    assert upload["folder_path"] == str(result.model_dir) and upload["repo_id"] == "me/r"
    assert 'AnglE.from_pretrained("me/r")' in upload["readme"] and "## Training" in upload["readme"]

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match="no Hugging Face token"):
        fit(
            str(tiny_bert), str(data), output_dir=str(tmp_path / "no"), push_to_hub="me/r", **common
        )
    assert not (tmp_path / "no").exists()
