"""Uploading a saved folder to the Hugging Face Hub; the folder is only read, so a failed upload can be retried.

The repo (the branch pushed to) mirrors the folder: files it holds that the folder does not (a report or a plot the
new folder has no more, weight shards of an earlier, larger model) are deleted in the upload's commit, through
``upload_folder``'s ``delete_patterns``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional, Union

from .._version import __version__
from .save import MARKER_FILE

logger = logging.getLogger(__name__)


class HubUploadError(RuntimeError):
    """The upload failed; ``folder`` is the complete local copy (untouched), ``repo_id`` the target repository."""

    def __init__(self, message: str, *, folder: str, repo_id: str):
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id


def push_folder_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
) -> str:
    """Create the model repo if needed and upload a saved folder in one call of ``HfApi.upload_folder``.

    The token goes to ``huggingface_hub`` only (``None`` or ``True``: the HF_TOKEN variable or the cached login); it
    is never written to a file, a log or an error message, and the error raised chains no exception that holds it.
    ``private=True`` refuses to upload into an existing public repo (the Hub ignores ``private`` for a repo that
    already exists). ``revision`` names a branch, created when missing; with ``create_pr`` the upload opens a pull
    request against the default branch.

    The repo mirrors the folder: the files of the branch (for ``create_pr``, of the default branch) that the folder
    does not hold are deleted in the upload's commit (its first one, when huggingface_hub splits a large upload into
    several), ``.gitattributes`` excepted; the repo's history keeps them.

    Returns the URL of the pull request (``create_pr``) or of the commit. Raises ``HubUploadError`` naming the
    reason and the complete local copy, which is only read, never modified. A folder whose config.json or
    prune_report.json still holds calibration texts or local paths (saved by an older version) is refused with
    ``ValueError`` before any request; the package's marker file is never uploaded.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder: nothing to upload (save the model there first)")
    check_publishable(folder)
    if create_pr and revision not in (None, "main"):
        raise ValueError("create_pr=True opens a pull request against the default branch; leave revision unset")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    message = commit_message or f"Upload pruned model (hf-recon-prune {__version__})"
    logger.info("uploading %s to the Hub repo %s", folder, repo_id)
    failure = None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private:
            info = api.repo_info(repo_id, repo_type="model")
            if getattr(info, "private", None) is False:
                raise _Refused("the repo already exists and is public, but private=True was asked; nothing was "
                               "uploaded (make the repo private on the Hub, or push without --private)")
        if revision and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        stale = _stale_files(api, repo_id, folder, None if create_pr else revision)
        if stale:
            logger.info("deleting from %s, in the same commit, %d file(s) that %s does not hold: %s", repo_id,
                        len(stale), folder, ", ".join(stale[:10]) + (" ..." if len(stale) > 10 else ""))
        # "*" rather than the names just listed: huggingface_hub lists the branch again when it builds the commit
        # (a file added meanwhile goes too), keeps .gitattributes, and does not delete what the upload rewrites.
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=message,
                                 revision=revision, create_pr=create_pr or None, ignore_patterns=[MARKER_FILE],
                                 delete_patterns="*" if stale else None)
    except Exception as err:
        failure = _upload_failure_message(folder, repo_id, err, token, private=private, revision=revision,
                                          create_pr=create_pr)
    if failure is not None:
        # Raised outside the except block and from None: the original error, whose text may hold the token, must
        # reach no __cause__ or __context__ (logger.exception prints both).
        raise HubUploadError(failure, folder=folder, repo_id=repo_id) from None
    url = getattr(info, "pr_url", None) if create_pr else None
    url = url or getattr(info, "commit_url", None) or str(info)
    logger.info("uploaded %s to %s", folder, url)
    return url


class _Refused(RuntimeError):
    pass


def _stale_files(api: Any, repo_id: str, folder: str, revision: Optional[str]) -> list[str]:
    """Files of the repo at ``revision`` that the upload of ``folder`` will not hold (``.gitattributes`` aside).

    Listed beforehand to name them in the log, and so that an upload with nothing to delete asks for no deletion
    (and huggingface_hub lists nothing of its own).
    """
    info = api.repo_info(repo_id, revision=revision, repo_type="model")
    remote = {sibling.rfilename for sibling in (getattr(info, "siblings", None) or [])}
    local = {os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
             for root, _, names in os.walk(folder) for name in names}
    return sorted(remote - (local - {MARKER_FILE}) - {".gitattributes"})


def check_publishable(folder: str) -> None:
    """Raise ValueError when config.json's ``pruning_config`` or prune_report.json holds what the sanitiser removes."""
    from ..config import CONFIG_KEY
    from ..sanitise import sanitise_config_dict, sanitise_report_dict, unsanitised_fields
    from .save import REPORT_FILE, _read_json_dict

    found = []
    stored = (_read_json_dict(os.path.join(folder, "config.json")) or {}).get(CONFIG_KEY)
    if isinstance(stored, dict):
        found += [f"config.json: {CONFIG_KEY}.{name}"
                  for name in unsanitised_fields(stored, sanitise_config_dict(stored))]
    report = _read_json_dict(os.path.join(folder, REPORT_FILE))
    if report is not None:
        found += [f"{REPORT_FILE}: {name}" for name in unsanitised_fields(report, sanitise_report_dict(report))]
    if found:
        raise ValueError(
            f"refusing to upload {folder}: it holds calibration texts or local paths that must not be published "
            f"({', '.join(found[:6])}{' ...' if len(found) > 6 else ''}). Save it again with this version of "
            "hf-recon-prune (hf_recon_prune.hub.save_already_pruned, or Pruner.save_pretrained), which removes them."
        )


def _upload_failure_message(folder: str, repo_id: str, err: BaseException, token: Optional[Union[str, bool]], *,
                            private: Optional[bool], revision: Optional[str], create_pr: bool) -> str:
    why = str(err).strip() or type(err).__name__
    if not isinstance(err, _Refused):
        why = f"{type(err).__name__}: {why}"
    # The error is raised without its chain (which may hold the token): what the chain said goes into the message.
    cause, seen = err.__cause__ or err.__context__, {id(err)}
    while cause is not None and id(cause) not in seen and len(seen) < 5:
        seen.add(id(cause))
        why += f"; caused by {type(cause).__name__}: {str(cause).strip()}"
        cause = cause.__cause__ or cause.__context__
    for secret in _tokens_in_use(token):
        why = why.replace(secret, "<token>")
    why = " ".join(why.split())
    if len(why) > 1500:
        why = why[:1500] + " …"
    retry = ["hf-recon-prune", "push", _quote(folder), _quote(repo_id)]
    if private:
        retry.append("--private")
    if revision:
        retry += ["--revision", _quote(revision)]
    if create_pr:
        retry.append("--create-pr")
    return (f"upload of {folder} to the Hugging Face Hub repo {repo_id!r} failed: {why}. Nothing was changed "
            f"locally: the complete local copy is at {folder}. Retry with: {' '.join(retry)}")


def _tokens_in_use(token: Optional[Union[str, bool]]) -> list[str]:
    """The token the upload sent: the one given, or for ``None``/``True`` the saved one huggingface_hub reads."""
    if isinstance(token, str):
        return [token] if token else []
    if token is False:
        return []
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        saved = get_token()
        return [saved] if saved else []
    return []


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
