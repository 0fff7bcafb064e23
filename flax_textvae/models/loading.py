"""Checkpoint folder (or hub id) -> Flax module + params + config + tokenizer.

A checkpoint folder holds
  * config.json (a transformers config; `model_type` picks the family in `families.FAMILIES`),
  * weights: model.safetensors, or sharded model-0000x-of-0000y.safetensors + model.safetensors.index.json
    (PyTorch names, mapped by the family's explicit `params_from_torch` table), or flax_model.msgpack
    (the HF Flax layout that transformers 4.x saved; used as is, shapes verified),
  * tokenizer files (tokenizer.json / tokenizer_config.json, or vocab.json + merges.txt, or spiece.model).

Public API:
  * `load_pretrained(name_or_path, *, dtype=jnp.float32) -> Pretrained(module, params, config, tokenizer, path)`
  * `build_module(config, dtype=jnp.float32) -> nn.Module`
  * `init_params(module, rng, config=None) -> params` (random init, for from-scratch models)
  * `param_shapes(module) -> pytree of jax.ShapeDtypeStruct` (no computation)
  * `load_params(folder, config, module) -> params`
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from flax_textvae.models import families
from flax_textvae.models.common import mismatch_report

Dtype = Any

__all__ = [
    "CheckpointError",
    "folder_problems",
    "weights_problems",
    "names_a_local_path",
    "Pretrained",
    "load_pretrained",
    "build_module",
    "init_params",
    "param_shapes",
    "load_params",
    "FOLDER_CONTENTS",
]

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_SHARD_PATTERN = "model-*-of-*.safetensors"  # the shard names `save_pretrained` writes
MSGPACK_NAME = "flax_model.msgpack"
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "generation_config.json",
]
# A checkpoint folder holds at least one of these (a byte-level tokenizer such as ByT5's has only its
# tokenizer_config.json); which ones a tokenizer needs is for AutoTokenizer to say.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
)
_MODEL_TYPES = " or ".join(repr(t) for t in families.FAMILIES)
FOLDER_CONTENTS = (
    f"a local checkpoint folder must contain: config.json (model_type {_MODEL_TYPES}); weights as "
    "model.safetensors (or model.safetensors.index.json + its shards) or flax_model.msgpack; and the "
    "tokenizer files (tokenizer.json + tokenizer_config.json, or vocab.json + merges.txt, or spiece.model). "
    "Such a folder is what `save_pretrained` of a transformers model and its tokenizer writes."
)


class CheckpointError(OSError, ValueError):
    """A checkpoint folder that cannot make a model: weights that do not fit its own config.json (names or
    shapes), a weights file that cannot be read, a config.json of a model this library does not build.

    An OSError, like every other unusable model folder or hub id (the command-line tools report it as a user
    error), and a ValueError, like the name-table mismatch it carries.
    """


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint.

    Attributes:
      module: the linen seq2seq LM (BartForConditionalGeneration / T5ForConditionalGeneration).
      params: float32 parameter pytree in the HF Flax layout.
      config: the transformers config.
      tokenizer: the transformers tokenizer of the checkpoint.
      path: the local folder it was read from.
    """

    module: nn.Module
    params: Any
    config: Any
    tokenizer: Any
    path: str = ""


def build_module(config, dtype: Dtype = jnp.float32, **options) -> nn.Module:
    """The family module for `config.model_type`, computing in `dtype` (params stay float32); `options`: the
    module's `attention` implementation ('dot_product' or 'explicit') and `remat` (recompute each layer)."""
    return families.get(getattr(config, "model_type", None)).build_module(config, dtype, **options)


def _dummy_inputs():
    ids = jnp.ones((1, 4), jnp.int32)
    return ids, jnp.ones((1, 4), jnp.int32), ids


def init_params(module: nn.Module, rng: jax.Array, config: Any = None) -> Any:
    """Random float32 parameters for `module` (every sub-layer, incl. cross-attention / untied heads).

    Args:
      module: a family module.
      rng: PRNG key.
      config: unused (kept for the interface contract; the module carries its config).
    """
    del config
    return jax.jit(functools.partial(random_params, module))(rng)


def random_params(module: nn.Module, rng: jax.Array) -> Any:
    """The computation of :func:`init_params`, not jitted: for use inside a larger jitted program."""
    return module.init(rng, *_dummy_inputs())["params"]


def param_shapes(module: nn.Module) -> Any:
    """Parameter shapes/dtypes of `module` as jax.ShapeDtypeStruct (no computation).

    The shapes follow from the module's fields alone (its transformers config by its full JSON text), so the
    whole-model trace is made once per distinct set of fields and reused, also for the same module bound
    inside a VAE; each call returns its own copy of the tree.
    """
    key = (type(module),) + tuple(
        (f.name, _hashable(getattr(module, f.name)))
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name")
    )
    if key not in _SHAPES:
        if len(_SHAPES) >= 16:
            _SHAPES.pop(next(iter(_SHAPES)))
        _SHAPES[key] = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *_dummy_inputs()))["params"]
    return jax.tree.map(lambda x: x, _SHAPES[key])


_SHAPES: dict = {}  # param_shapes' traces, oldest first


def _hashable(value: Any) -> Any:
    """`value` itself where it hashes, else its type and repr (a transformers config's repr is its JSON)."""
    try:
        hash(value)
        return value
    except TypeError:
        return (type(value), repr(value))


def verify_params(params: Any, expected: Any, source: str = "params") -> None:
    """Raises ValueError listing every missing, unexpected and shape-mismatched path of `params` against the
    `expected` shapes (nothing is copied or converted)."""
    got = flatten_dict(params, sep="/")
    want = flatten_dict(expected, sep="/")
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    mismatched = [
        f"{k}: got {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}"
        for k in sorted(set(got) & set(want))
        if tuple(np.shape(got[k])) != tuple(want[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(mismatch_report(f"{source} does not match the model", missing, unexpected, mismatched))


def check_params(params: Any, expected: Any, source: str = "params") -> Any:
    """Verifies `params` against `expected` shapes (:func:`verify_params`); returns float32 jax arrays.

    Raises:
      ValueError listing every missing, unexpected and shape-mismatched parameter path.
    """
    verify_params(params, expected, source)
    got = flatten_dict(params, sep="/")
    return unflatten_dict({k: jnp.asarray(np.asarray(v, np.float32)) for k, v in got.items()}, sep="/")


_MISMATCH_FIX = (
    "Pass a checkpoint folder as `save_pretrained` writes it, beside the config.json its weights were saved "
    "with: the weights of the seq2seq LM, or, where the head is tied to the input embedding, of the bare "
    "encoder-decoder. Nothing else loads here: no task heads (classification, question answering), no "
    "separate encoder and decoder input embeddings, no untied model without its LM head."
)


def _unreadable(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read the weights file {path} ({type(err).__name__}: {err}); it is damaged or not in the format "
        "its name says: write or download it again"
    )


def _weights_files(folder: str) -> tuple[str, list[str]]:
    """The weights in `folder`: ``('safetensors', [files])`` (one file, or the shards its index names) or
    ``('msgpack', [file])``.

    Raises:
      FileNotFoundError: no weights file, or shards the index names are not in the folder.
      CheckpointError: an index that is not JSON or has no ``weight_map``.
    """
    index = os.path.join(folder, SAFETENSORS_INDEX_NAME)
    single = os.path.join(folder, SAFETENSORS_NAME)
    if os.path.isfile(single):
        return "safetensors", [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise _unreadable(index, err) from err
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        return "safetensors", [os.path.join(folder, s) for s in shards]
    if os.path.isfile(os.path.join(folder, MSGPACK_NAME)):
        return "msgpack", [os.path.join(folder, MSGPACK_NAME)]
    raise FileNotFoundError(
        f"no weights in {folder}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} "
        f"or {MSGPACK_NAME}; {FOLDER_CONTENTS}"
    )


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        try:
            return load_file(path)
        except (TypeError, ValueError):  # e.g. bfloat16 tensors, which numpy cannot hold
            out = {}
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    out[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
            return out
    except SafetensorError as err:
        raise _unreadable(path, err) from err


def _read_msgpack(path: str) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    try:
        params = serialization.msgpack_restore(data)
    except Exception as err:  # msgpack's and flax's decoding errors: the file's content, not this code
        raise _unreadable(path, err) from err
    return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


def load_params(folder: str, config, module: nn.Module) -> Any:
    """Reads the weights in `folder` (safetensors preferred, else flax_model.msgpack) as float32 params.

    Raises:
      CheckpointError: the weights do not fit `config` (the message lists what is missing, unexpected or of
        the wrong shape, and what the folder should hold), or a weights file cannot be read.
      FileNotFoundError: `folder` has no weights, or lacks shards its index names.
    """
    family = families.get(getattr(config, "model_type", None))
    expected = param_shapes(module)
    kind, files = _weights_files(folder)
    try:
        if kind == "safetensors":
            state = {}
            for path in files:
                state.update(_read_safetensors(path))
            return check_params(family.params_from_torch(state, config), expected, f"{folder} (safetensors)")
        params = family.params_from_flax(_read_msgpack(files[0]), config)
        return check_params(params, expected, files[0])
    except CheckpointError:
        raise
    except ValueError as err:  # the name table's or the shape check's report
        raise _mismatch(folder, config, err) from err


def _mismatch(folder: str, config, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"the weights in {folder} do not fit its config.json (model_type {config.model_type!r}). {err}\n{_MISMATCH_FIX}"
    )


def weights_problems(folder: str) -> list[str]:
    """Whether the safetensors weights in `folder` fit its config.json, from the files' headers alone (names
    and shapes; no tensor is read), through the family's name table.

    Args:
      folder: a local folder whose config.json has a supported model_type.

    Returns:
      ``[]``, or one problem: the mismatch report (msgpack weights are checked when they are loaded).
    """
    try:
        kind, files = _weights_files(folder)
        if kind != "safetensors":
            return []
        shapes = {}
        for path in files:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, SafetensorError) as err:
        return [f"its weights cannot be read ({type(err).__name__}: {err})"]
    zero = np.zeros((), np.float32)
    stand_ins = {name: np.broadcast_to(zero, shape) for name, shape in shapes.items()}  # shapes, no memory
    try:
        families.get(config.model_type).params_from_torch(stand_ins, config, check_only=True)
    except ValueError as err:  # the report: a title line, then the names by kind
        listing = "\n".join(f"    {line}" for line in str(err).splitlines()[1:])
        return [f"its weights do not fit its config.json ({config.model_type}):\n{listing}"]
    return []


def folder_problems(folder: str) -> list[str]:
    """What keeps a local checkpoint folder from loading, found without reading a tensor: config.json
    missing, unreadable or of an unsupported model_type; no weights, or shards missing; safetensors weights
    whose names or shapes do not fit the config (:func:`weights_problems`); no tokenizer files.

    Args:
      folder: an existing local folder.

    Returns:
      One problem per item (empty when the folder looks loadable), e.g. ``"has no config.json"``.
    """
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return [f"has no {CONFIG_NAME}"]
    problems = []
    supported = False
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        problems.append(f"its {CONFIG_NAME} is not a JSON object ({type(err).__name__}: {err})")
    else:
        supported = model_type in families.FAMILIES
        if not supported:
            problems.append(f"its {CONFIG_NAME} has model_type {model_type!r}; supported: {_MODEL_TYPES}")
    names = set(os.listdir(folder))
    if not names & {SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, MSGPACK_NAME}:
        problems.append(f"has no weights ({SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {MSGPACK_NAME})")
    elif supported:
        problems += weights_problems(folder)
    if not names & set(TOKENIZER_FILES):
        problems.append(f"has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    return problems


def names_a_local_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a hub id: it exists, or starts with '.', '/' or '~'."""
    path = os.path.expanduser(str(name))
    return os.path.exists(path) or path.startswith((".", "/", "~"))


def _offline() -> bool:
    """Whether hub access is switched off.

    Offline when HF_HUB_OFFLINE (or, where that is unset or empty, TRANSFORMERS_OFFLINE) is true now, or when
    huggingface_hub read it as true at import time (it then refuses every request anyway).
    """
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    return bool(hub_constants.HF_HUB_OFFLINE)


def _short_cause(err: BaseException) -> str:
    """`TypeName: message` of a hub error, on one line, cut at a word to about 200 characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if len(text) > 200:
        text = text[:200].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _missing_shards(folder: str) -> list[str]:
    """Shards named by the safetensors index in `folder` that are not in `folder` (none without an index)."""
    index = os.path.join(folder, SAFETENSORS_INDEX_NAME)
    if not os.path.isfile(index):
        return []
    try:
        with open(index) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (ValueError, KeyError, AttributeError):  # a malformed index is reported by `load_params`
        return []
    return sorted(s for s in shards if not os.path.isfile(os.path.join(folder, s)))


def resolve_folder(name_or_path: str) -> str:
    """Local folder for `name_or_path`: the folder itself, or a hub snapshot (downloaded if reachable).

    A hub id ("org/name", or a legacy "name") is fetched with `huggingface_hub.snapshot_download` into the
    normal hub cache (HF_HUB_CACHE, by default HF_HOME/hub), limited to config.json, the tokenizer files
    and the weights: model.safetensors, or model.safetensors.index.json and the shards it names; only
    where neither exists, flax_model.msgpack. Files already in the cache are not downloaded again. With
    HF_HUB_OFFLINE=1 nothing is requested and the cached snapshot is used.

    Args:
      name_or_path: a local checkpoint folder or a hub model id.

    Returns:
      The local folder holding the checkpoint files.

    Raises:
      FileNotFoundError: `name_or_path` looks like a path but is not a folder.
      OSError: the id could not be fetched (hub unreachable or offline and not cached, unknown or gated
        id); the message names the id, the short cause, and says to pass a local folder and what it
        must contain.
    """
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return path
    if names_a_local_path(path) or path.count("/") > 1:
        raise FileNotFoundError(f"{name_or_path!r} is not a checkpoint folder; {FOLDER_CONTENTS}")
    offline = _offline()
    patterns = [CONFIG_NAME, SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, SAFETENSORS_SHARD_PATTERN] + TOKENIZER_PATTERNS
    try:
        folder = snapshot_download(path, allow_patterns=patterns, local_files_only=offline)
        missing = _missing_shards(folder)
        if missing:  # an index naming shards other than model-0000x-of-0000y.safetensors
            folder = snapshot_download(path, allow_patterns=patterns + missing, local_files_only=offline)
        elif not (
            os.path.isfile(os.path.join(folder, SAFETENSORS_NAME))
            or os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX_NAME))
        ):
            folder = snapshot_download(path, allow_patterns=patterns + [MSGPACK_NAME], local_files_only=offline)
    except Exception as err:  # offline, unreachable, unknown repo, gated, ...
        why = (
            f"HF_HUB_OFFLINE is set and it is not (completely) in the local hub cache ({_short_cause(err)})"
            if offline
            else f"the hub could not be reached or has no such model ({_short_cause(err)})"
        )
        # `from None`: the message carries the cause; the chained httpx / huggingface_hub tracebacks
        # would only bury it.
        raise OSError(
            f"cannot load hub id {name_or_path!r}: {why}. Pass a local folder instead; {FOLDER_CONTENTS}"
        ) from None
    return folder


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: Dtype = jnp.float32, **options) -> Pretrained:
    """Loads a pretrained BART / T5 checkpoint.

    Args:
      name_or_path: local checkpoint folder, or a hub id (only where the hub is reachable or the model is
        already in the local hub cache).
      dtype: compute dtype of the module (parameters are float32).
      **options: the module's `attention` and `remat` (see `build_module`).

    Returns:
      Pretrained(module, params, config, tokenizer, path).
    """
    folder = resolve_folder(str(name_or_path))
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}; {FOLDER_CONTENTS}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except ValueError as err:  # a model_type transformers does not know, or none
        raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)}: {err}; {FOLDER_CONTENTS}") from err
    if getattr(config, "model_type", None) not in families.FAMILIES:
        raise CheckpointError(
            f"{os.path.join(folder, CONFIG_NAME)}: model_type {config.model_type!r} is not supported; {FOLDER_CONTENTS}"
        )
    module = build_module(config, dtype, **options)
    params = load_params(folder, config, module)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise OSError(f"cannot load the tokenizer from {folder} ({err}); {FOLDER_CONTENTS}") from err
    return Pretrained(module=module, params=params, config=config, tokenizer=tokenizer, path=folder)
