"""Hugging Face Hub ids and reachability: the namespaced ids of the names people type, and a quick check that the
Hub answers before the libraries spend about 50 s retrying it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import datasets
from huggingface_hub import constants, get_session, resolve_revision, try_to_load_from_cache

from pipeline.settings import RunSettings, is_local
from utils import ToolError, one_line

# Ids people type that now live under a namespace on the Hub. A cache warmed under one id does not serve the other,
# and datasets 5.2 cannot list the files of a dataset whose id has no namespace (it can still read one it cached).
NAMESPACED_IDS = {
    "model": {
        "gpt2": "openai-community/gpt2",
        "gpt2-medium": "openai-community/gpt2-medium",
        "gpt2-large": "openai-community/gpt2-large",
        "gpt2-xl": "openai-community/gpt2-xl",
        "distilgpt2": "distilbert/distilgpt2",
    },
    "dataset": {"wikitext": "Salesforce/wikitext"},
}

LEGACY_IDS = {kind: {namespaced: legacy for legacy, namespaced in ids.items()} for kind, ids in NAMESPACED_IDS.items()}

# Why the Hub did not answer this process's check; None while it answered or was not asked.
unreachable_reason: str | None = None


def canonical_id(name: str) -> str:
    """A Hub id as the Hub names it now: a legacy id (or a cache's legacy copy of one) as its namespaced id."""
    for ids in NAMESPACED_IDS.values():
        name = ids.get(name, name)
    return name


def in_cache(kind: str, name: str) -> bool:
    """Whether the local Hugging Face cache holds this model or dataset (as the libraries look it up offline)."""
    if kind == "model":
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    return (Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir()


def cached_id(kind: str, name: str) -> str:
    """Without the Hub: `name`, or its legacy id when only that one is cached (a cache warmed before the Hub
    moved the id under a namespace serves only the old id)."""
    legacy = LEGACY_IDS[kind].get(name)
    if legacy and not in_cache(kind, name) and in_cache(kind, legacy):
        print(f"note: the local cache holds {kind} {name} under its legacy id {legacy}; using that", file=sys.stderr)
        return legacy
    return name


def hub_id(kind: str, name: str) -> str:
    """The id to load for --model or --dataset `name`: a legacy id as its namespaced one (with a note), a local
    path or any other id as given. A dataset id without a namespace is an error."""
    if is_local(name):
        return name
    namespaced = NAMESPACED_IDS[kind].get(name)
    if namespaced:
        print(f"note: --{kind} {name} is {namespaced} on the Hub; using {namespaced}", file=sys.stderr)
        return namespaced
    if kind == "dataset" and "/" not in name and not in_cache(kind, name):
        raise ToolError(
            f"--dataset {name} is not a Hub dataset id: those have the form namespace/name "
            "(e.g. Salesforce/wikitext); for local files pass --data_dir DIR"
        )
    return name


def split_revision(source: str) -> tuple[str, str | None]:
    """`namespace/name@revision` as (namespace/name, revision); the revision is None when not given."""
    name, _, revision = source.partition("@")
    return name, revision or None


def forgetting_hub_id(settings: RunSettings) -> str | None:
    """The Hub dataset the run measures forgetting on; None when it is off, local or not measured."""
    if settings.from_scratch or settings.forgetting_data_dir or not settings.forgetting_dataset:
        return None
    return split_revision(settings.forgetting_dataset)[0]


def model_revision(name: str) -> str | None:
    """The commit of Hub model `name` that loading it reads now (the Hub's default branch, or without the Hub the
    one the local cache holds); None for a local path, or when neither can say."""
    if is_local(name):
        return None
    try:
        return resolve_revision(name, local_files_only=constants.HF_HUB_OFFLINE).resolved
    except Exception:  # unknown repo, an empty cache, ...: the load itself said what went wrong
        return None


def check_hub() -> str | None:
    """None when the Hub answers one request within the client's own metadata timeout, else why not."""
    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # the HTTP client's transport errors (DNS, refused, timeout, TLS, proxy, ...)
        return f"{type(e).__name__}: {one_line(e)}"
    return None


def read_cache_only() -> None:
    """Offline mode from now on: the libraries read the local Hugging Face cache and make no requests."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from this one
    # The libraries read HF_HUB_OFFLINE once, when imported; these are the flags they consult on every call.
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def resolve_sources(settings: RunSettings) -> None:
    """Map legacy ids in place; when a source is on the Hub and the Hub does not answer, use the local cache only.

    Nothing is checked when HF_HUB_OFFLINE is set or every source is a local path.
    """
    settings.model = hub_id("model", settings.model)
    sources = [settings.model]
    if settings.data_dir is None:
        settings.dataset = hub_id("dataset", settings.dataset)
        sources.append(settings.dataset)
    forgetting = forgetting_hub_id(settings)
    if forgetting:
        sources.append(forgetting)
    if cache_only(sources):
        settings.model = cached_id("model", settings.model)
        if settings.data_dir is None:
            settings.dataset = cached_id("dataset", settings.dataset)


def resolve_model(model: str) -> str:
    """The id or path to load `model` from, as resolve_sources finds it, when the model is all that is needed."""
    model = hub_id("model", model)
    return cached_id("model", model) if cache_only([model]) else model


def cache_only(sources: list[str]) -> bool:
    """Whether `sources` must come from the local cache: some are on the Hub, and it is offline or does not answer
    (said in one note, and the libraries set to read their cache only)."""
    global unreachable_reason
    if all(is_local(s) for s in sources):
        return False
    if not constants.HF_HUB_OFFLINE:
        unreachable_reason = check_hub()
        if not unreachable_reason:
            return False
        note = f"note: the Hugging Face Hub did not answer ({unreachable_reason}); reading the local cache only"
        print(note, file=sys.stderr)
        read_cache_only()
    return True


def load_error(what: str, name: str, error: Exception, hint: str) -> ToolError:
    """The one line for a model, tokenizer or dataset that could not be loaded, saying when the Hub was the cause."""
    if unreachable_reason and not is_local(name):
        return ToolError(
            f"could not load {what} '{name}': the Hugging Face Hub could not be reached ({unreachable_reason}), "
            f"and from the local cache: {one_line(error)}; {hint}"
        )
    return ToolError(f"could not load {what} '{name}' ({one_line(error)}); {hint}")
