"""The catalog file (``dictionaries/catalog.json``): which dictionaries to load, and their figures.

Owns: ``CatalogEntry`` (one listed dictionary, paths resolved against the catalog's folder),
reading and checking the file, and loading its entries into a ``DictionaryRegistry`` (an
entry whose files disagree with what the catalog declares is refused). The dictionaries
tooling (``featuresteer_dicts.build.write_catalog``) writes this file.

Must not: import gRPC or touch a live model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .base import Dictionary
from .errors import DictionaryLoadError, DictionaryNotFound
from .files import load_dictionary
from .registry import DictionaryRegistry

METRIC_KEYS = ("l0", "fvu", "dead_fraction", "ce_loss_delta", "n_eval_tokens")


@dataclass(frozen=True)
class CatalogEntry:
    """One dictionary listed in ``dictionaries/catalog.json`` (paths resolved)."""

    id: str
    path: Path
    model: str = ""
    architecture: str | None = None
    hook_name: str | None = None
    hook_name_out: str | None = None
    d_in: int | None = None
    d_sae: int | None = None
    version: str | None = None
    description: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    metadata: Path | None = None
    default: bool = False


def load_catalog(catalog_json_path: str | Path) -> list[CatalogEntry]:
    """Read a catalog file; entry paths are relative to the catalog's directory.

    Raises:
        DictionaryLoadError: unreadable JSON, a missing id/path, or a duplicate id.
    """
    catalog_path = Path(catalog_json_path)
    try:
        data = json.loads(catalog_path.read_text())
    except (OSError, ValueError) as exc:
        raise DictionaryLoadError(f"catalog {catalog_path}: cannot read: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("dictionaries"), list):
        raise DictionaryLoadError(f"catalog {catalog_path}: needs a 'dictionaries' list")
    root = catalog_path.parent
    entries: list[CatalogEntry] = []
    seen: set[str] = set()
    for position, item in enumerate(data["dictionaries"]):
        where = f"catalog {catalog_path}, entry {position}"
        if not isinstance(item, dict) or not item.get("id") or not item.get("path"):
            raise DictionaryLoadError(f"{where}: every entry needs 'id' and 'path'")
        entry_id = str(item["id"])
        if entry_id in seen:
            raise DictionaryLoadError(f"{where}: duplicate id {entry_id!r}")
        seen.add(entry_id)
        metrics_raw = item.get("metrics") or {}
        try:
            metrics = {
                k: None if metrics_raw.get(k) is None else float(metrics_raw[k])
                for k in METRIC_KEYS
                if k in metrics_raw
            }
        except (TypeError, ValueError) as exc:
            raise DictionaryLoadError(f"{where} ({entry_id}): bad metrics: {exc}") from exc
        entries.append(
            CatalogEntry(
                id=entry_id,
                path=(root / item["path"]).resolve(),
                model=str(data.get("model") or ""),
                architecture=item.get("architecture"),
                hook_name=item.get("hook_name"),
                hook_name_out=item.get("hook_name_out"),
                d_in=item.get("d_in"),
                d_sae=item.get("d_sae"),
                version=item.get("version"),
                description=str(item.get("description") or ""),
                metrics=metrics,
                metadata=(root / item["metadata"]).resolve() if item.get("metadata") else None,
                default=bool(item.get("default", False)),
            )
        )
    return entries


def load_catalog_entry(
    entry: CatalogEntry,
    *,
    expected_hooks: Iterable[str] | None = None,
    d_model: int | None = None,
    hook_dims: Mapping[str, int] | None = None,
) -> Dictionary:
    """Load an entry's dictionary and refuse it if the files disagree with the catalog."""
    dictionary = load_dictionary(
        entry.path,
        dictionary_id=entry.id,
        version=entry.version,
        expected_hooks=expected_hooks,
        d_model=d_model,
        hook_dims=hook_dims,
        metrics=entry.metrics,
        description=entry.description or None,
    )
    declared = {
        "architecture": entry.architecture,
        "hook_name": entry.hook_name,
        "hook_name_out": entry.hook_name_out,
        "d_in": entry.d_in,
        "d_sae": entry.d_sae,
    }
    for key, value in declared.items():
        actual = getattr(dictionary, key)
        if value is not None and value != "" and value != actual:
            raise DictionaryLoadError(
                f"{entry.id}: the catalog says {key}={value!r} but {entry.path} has {actual!r}"
            )
    return dictionary


def load_catalog_dictionaries(
    catalog_json_path: str | Path,
    *,
    ids: Iterable[str] | None = None,
    expected_hooks: Iterable[str] | None = None,
    d_model: int | None = None,
    hook_dims: Mapping[str, int] | None = None,
    registry: DictionaryRegistry | None = None,
) -> DictionaryRegistry:
    """Load the catalog's dictionaries (all, or those in ``ids``) into a registry."""
    entries = load_catalog(catalog_json_path)
    by_id = {e.id: e for e in entries}
    wanted = list(by_id) if ids is None else list(ids)
    for wanted_id in wanted:
        if wanted_id not in by_id:
            raise DictionaryNotFound(wanted_id, list(by_id))
    registry = registry if registry is not None else DictionaryRegistry()
    for wanted_id in wanted:
        entry = by_id[wanted_id]
        dictionary = load_catalog_entry(
            entry, expected_hooks=expected_hooks, d_model=d_model, hook_dims=hook_dims
        )
        registry.add(dictionary, default=entry.default)
    return registry
