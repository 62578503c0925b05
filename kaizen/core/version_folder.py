"""A version's folder: what it must hold, how it is checked, and how one is written.

A version is a Hugging Face model folder plus a `manifest.json` holding every file's sha256 and
size. This module checks a version's files against its manifest (`check_files`), decides whether
an outside folder may become a version at all (`check_importable`: safetensors only, a tokenizer,
the champion's shape), and writes a new one atomically: files go into
``versions/.staging-*`` (`stage_folder`), are hashed into a manifest and fsynced, and only then
is the folder renamed to ``versions/vN`` (`seal_version`). The registry (kaizen/core/registry.py)
decides which version number and stage it gets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from kaizen.core.atomic_files import fsync_dir
from kaizen.core.disk import InsufficientSpace, require_free
from kaizen.core.registry_schema import MANIFEST, CorruptVersion, FileEntry, Manifest, RegistryError, now

#: Files a servable version must have besides weights.
REQUIRED_FILES = ("config.json",)
#: config.json fields that must equal the serving engine's for weights to load in place.
SHAPE_FIELDS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
#: Weight formats that are Python pickles: loading one can run any code, so an import refuses them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: An imported model must bring its tokenizer: a canary runs in an engine of its own, built from the folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def files_of(folder: Path) -> list[Path]:
    """Every file under `folder` except its manifest, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def model_shape(folder: Path) -> dict[str, Any]:
    """The config.json fields that decide whether weights fit an engine (SHAPE_FIELDS)."""
    config = json.loads((folder / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return {k: config.get(k) for k in SHAPE_FIELDS}


# -- checking a version against its manifest -----------------------------------------------------

def check_files(folder: Path, version: str, m: Manifest) -> None:
    """Check every file of the version in `folder` against its manifest `m`; raise `CorruptVersion`
    on any mismatch."""
    for name in REQUIRED_FILES:
        if name not in m.files or not (folder / name).is_file():
            raise CorruptVersion(version, f"missing {name}")
    if not any(n.endswith(".safetensors") for n in m.files):
        raise CorruptVersion(version, "no .safetensors weights")
    on_disk = {str(p.relative_to(folder)) for p in files_of(folder)}
    missing = sorted(set(m.files) - on_disk)
    if missing:
        raise CorruptVersion(version, f"missing files: {', '.join(missing)}")
    for name, entry in m.files.items():
        p = folder / name
        if p.stat().st_size != entry.size:
            raise CorruptVersion(version, f"{name} is {p.stat().st_size} bytes, manifest says {entry.size}")
        if sha256_file(p) != entry.sha256:
            raise CorruptVersion(version, f"{name} does not match its sha256")


# -- checking an outside folder before `kaizen models import` ------------------------------------

def check_importable(src: Path, champion_dir: Path) -> list[Path]:
    """Why the Hugging Face folder `src` cannot become a version, as a `RegistryError` naming the
    file and the fix; else the files an import copies. Checks: a readable config.json whose shape
    equals the champion's, safetensors weights only (no pickles anywhere), every safetensors file's
    header readable and every shard an index names present, a tokenizer; and, if the folder carries a
    Kaizen manifest.json (an export of another registry's version), every file's sha256 against it."""
    if not src.is_dir():
        raise _refuse(src, "not a folder")
    files = [p for p in files_of(src) if not p.relative_to(src).parts[0].startswith(".")]
    names = {str(p.relative_to(src)) for p in files}
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise _refuse(src, f"{', '.join(pickles)}: pickled weights (PyTorch .bin/.pt) can run code when "
                      "loaded, so Kaizen takes safetensors only; save them with `model.save_pretrained(DIR, "
                      "safe_serialization=True)` and leave the pickles out")
    if "config.json" not in names:
        raise _refuse(src, "no config.json: not a Hugging Face model folder")
    try:
        shape = model_shape(src)
    except ValueError as exc:
        raise _refuse(src, f"config.json is not valid JSON ({exc})") from None
    _check_weights(src, names)
    if not any(t in names for t in TOKENIZER_FILES):
        raise _refuse(src, f"no tokenizer ({' or '.join(TOKENIZER_FILES)}): save it next to the weights "
                      "with `tokenizer.save_pretrained(DIR)`")
    champion = model_shape(champion_dir)
    if shape != champion:
        diff = ", ".join(f"{k} {shape[k]!r} (champion {champion[k]!r})" for k in SHAPE_FIELDS
                         if shape[k] != champion[k])
        raise _refuse(src, f"config.json does not fit the serving engine: {diff}; a canary must have the "
                      "champion's architecture and sizes")
    _check_exported_manifest(src)
    return files


def _refuse(src: Path, reason: str) -> RegistryError:
    return RegistryError(f"cannot import {src}: {reason}", status=400, code="invalid_model")


def _check_weights(src: Path, names: set[str]) -> None:
    """Safetensors weights present, each file's header readable, every shard the index names there."""
    from safetensors import safe_open

    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights:
        raise _refuse(src, "no .safetensors weights")
    for name in weights:
        try:
            with safe_open(str(src / name), framework="pt") as f:
                if not list(f.keys()):
                    raise _refuse(src, f"{name} holds no tensors")
        except RegistryError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise _refuse(src, f"{name} is not a readable safetensors file ({exc})") from None
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _refuse(src, f"model.safetensors.index.json is unreadable ({exc})") from None
        missing = sorted(shards - names)
        if missing:
            raise _refuse(src, f"the index names shards that are not there: {', '.join(missing)}")


def _check_exported_manifest(src: Path) -> None:
    """A folder exported from another registry carries its manifest.json: every file must match it."""
    exported = src / MANIFEST
    if not exported.is_file():
        return
    try:
        listed = Manifest.model_validate_json(exported.read_text()).files
    except ValueError as exc:
        raise _refuse(src, f"its manifest.json is unreadable ({exc})") from None
    for name, entry in listed.items():
        p = src / name
        if not p.is_file():
            raise _refuse(src, f"{name} is listed in its manifest.json but missing")
        if p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
            raise _refuse(src, f"{name} does not match the sha256 in its manifest.json (damaged in transit?)")


# -- writing a new version -----------------------------------------------------------------------

def stage_folder(versions_dir: Path, src: Path, link: bool) -> Path:
    """Copy (or hard-link) `src` into a fresh staging folder under `versions_dir` and fsync every
    file; refused with a `RegistryError` (507) before anything is written when the registry's
    volume cannot hold a copy."""
    if not link:
        needed = sum(p.stat().st_size for p in files_of(src))
        try:
            require_free(versions_dir, needed, what="publish",
                         hint="free space with `kaizen models gc` or grow the registry's volume")
        except InsufficientSpace as exc:
            raise RegistryError(str(exc), status=507, code="insufficient_storage") from None
    staging = versions_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    for p in files_of(src):
        rel = p.relative_to(src)
        if rel.parts[0].startswith("."):
            continue  # e.g. a leftover `.cache` of a tool
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(p, dest)
                continue
            except OSError:
                pass
        shutil.copy2(p, dest)
        with dest.open("rb") as f:
            os.fsync(f.fileno())
    return staging


def seal_version(staging: Path, dest: Path, manifest_fields: dict[str, Any]) -> Manifest:
    """Hash the staged files, write the manifest, rename the folder to `dest` (its name is the
    version's). The caller holds the registry's lock."""
    files = {str(p.relative_to(staging)): FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
             for p in files_of(staging)}
    manifest = Manifest(version=dest.name, created=now(), files=files, **manifest_fields)
    mpath = staging / MANIFEST
    with mpath.open("w") as f:
        f.write(manifest.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(staging)
    os.rename(staging, dest)
    fsync_dir(dest.parent)
    return manifest
