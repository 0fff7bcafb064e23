"""Up-front checks of a run's config: every problem at once, before anything is built or written.

``validate(config)`` looks at every field of ``configuration.base_config()`` (type, range, allowed names),
at the combinations of fields the training loop needs, and at the data named by ``data.train`` /
``data.eval`` (a text file's contents; whether a ``tfds:`` data set is built). It raises ONE
:class:`ConfigError` whose message lists each problem on its own line as
``field=value: what is wrong; how to fix it``, so a user fixes a config in one go instead of meeting one
crash at a time. Fields a config adds beyond the base schema are left alone (``vae.memory_style`` and
``vae.posterior_bias`` are checked when present).

The allowed names come from the code that consumes them where it exports them (``vae.POOLINGS``,
``vae.INJECTIONS``, ``vae.MEMORY_STYLES``, ``losses.KINDS``, ``losses.FREE_BITS_MODES``,
``vae.DTYPES``); the others are listed here next to the function that reads them.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import re
from typing import Any, Callable, Sequence

import jax

from flax_textvae.configuration import base_config
from flax_textvae.data import prepared, sources
from flax_textvae.data.sources import SYNTHETIC_PREFIX, TFDS_PREFIX
from flax_textvae.losses import FREE_BITS_MODES, KINDS
from flax_textvae.models import FOLDER_CONTENTS, families
from flax_textvae.models import attention as attn_lib
from flax_textvae.models.attention import ATTENTION_IMPLEMENTATIONS
from flax_textvae.models.loading import folder_problems, names_a_local_path
from flax_textvae.vae import DTYPES, INJECTIONS, MEMORY_STYLES, POOLINGS

LR_DECAYS = ("linear", "cosine", "constant")  # step.learning_rate_fn
KL_SCHEDULES = ("constant", "linear", "cyclical", "sigmoid")  # step.kl_weight_schedule
PARALLEL_MODES = ("mesh", "pmap")  # the training loop's two step wrappers (jit over a mesh, pmap)
SCRATCH_FAMILIES = tuple(families.FAMILIES)  # from-scratch backbone architectures
MIN_SCRATCH_VOCAB = 8  # the word tokenizer's special tokens (up to 5) plus a few words
# Specs read by their own readers (TFDS, the built-in grammar, prepared shards); anything else is a file path.
READER_PREFIXES = (TFDS_PREFIX, SYNTHETIC_PREFIX, "prepared:")

_SAMPLE_BYTES = 1 << 20  # how much of a data file the binary / emptiness check reads
_MISSING = object()


class ConfigError(ValueError):
    """A config (or data spec) that cannot run.

    Attributes:
      problems: one line per problem, ``field=value: what is wrong; how to fix it``.
    """

    def __init__(self, problems: Sequence[str], subject: str = "the config"):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{subject} has 1 problem:" if n == 1 else f"{subject} has {n} problems:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


def validate(config: Any, *, check_data: bool = True, workdir: str | None = None) -> None:
    """Checks every field of ``config`` and raises one error listing all problems.

    Args:
      config: a run's ``ml_collections.ConfigDict`` (or nested mapping) built on ``base_config()``.
      check_data: also check that ``data.train`` and ``data.eval``, when they are file paths, name
        readable, non-empty UTF-8 text files.
      workdir: the run directory. When it already holds a checkpoint the run resumes from its own copy of
        the backbone (``WORKDIR/model``), so a local ``model.name_or_path`` need not exist any more.

    Raises:
      ConfigError: if anything is wrong; its ``problems`` list names each field, its value and the fix.
    """
    resuming = bool(workdir) and _has_checkpoint(workdir)
    problems = config_problems(config, check_data=check_data, check_model_path=not resuming)
    if problems:
        raise ConfigError(problems)


def _has_checkpoint(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def config_problems(config: Any, *, check_data: bool = True, check_model_path: bool = True) -> list[str]:
    """The problems :func:`validate` would report, as a list (empty when the config is fine).

    Args:
      config: as for :func:`validate`.
      check_data: as for :func:`validate`.
      check_model_path: refuse a local ``model.name_or_path`` that is not a folder, or a folder that would
        not load (``models.loading.folder_problems``: config.json, weights' names and shapes, tokenizer).

    Returns:
      One ``field=value: what is wrong; how to fix it`` string per problem.
    """
    c = _Checks(config)
    _check_model(c, check_model_path)
    _check_vae(c)
    _check_data(c, check_data)
    _check_loop(c)
    _check_optimizer(c)
    _check_loss(c)
    for field in ("denoise.delete_rate", "denoise.mask_rate", "denoise.word_dropout"):
        c.number(field, lo=0.0, hi=1.0, hi_open=True)
    _check_parallel(c)
    _check_fast_paths(c)
    return c.problems


def check_data_spec(spec: Any, field: str, *, column: int | None = None) -> list[str]:
    """Checks a data spec that names a text file; ``tfds:``, ``synthetic:`` and ``prepared:`` specs pass.

    The file must exist, be a readable regular file, look like UTF-8 text (no NUL bytes, few undecodable
    lines in its first MiB) and hold at least one non-blank line; with ``column`` >= 0 its first non-blank
    line must have that tab-separated column.

    Args:
      spec: the spec, e.g. ``'data/ptb/train.txt'``.
      field: how the spec was given, for the message (``'data.train'``, ``'--data'``).
      column: the tab-separated column that will be read (None or negative: the whole line).

    Returns:
      [] when the spec is fine (or not a file path), else one problem string naming the field and the fix.
    """
    if not isinstance(spec, str) or not spec.strip():
        return [
            f"{field}={spec!r}: must be a text file path or a 'tfds:NAME[/CONFIG][:SPLIT]', "
            f"'synthetic:N[:SEED]' or 'prepared:DIR' spec; e.g. {field}=synthetic:20000"
        ]
    if spec.startswith(READER_PREFIXES):
        what = _reader_spec_problem(spec)
        return [f"{field}={spec!r}: {what}"] if what else []
    what = _text_file_problem(os.path.expanduser(spec), column)
    return [f"{field}={spec!r}: {what}"] if what else []


def _reader_spec_problem(spec: str) -> str | None:
    """A ``synthetic:`` or ``tfds:`` spec that does not parse, or a ``prepared:`` folder that is not a whole
    prepared data set; None otherwise (whether a ``tfds:`` data set is built is checked separately)."""
    try:
        if spec.startswith(SYNTHETIC_PREFIX):
            sources.parse_synthetic_spec(spec)
        elif spec.startswith(TFDS_PREFIX):
            sources.parse_tfds_spec(spec)
        else:
            prepared.read_index(spec)
    except (OSError, ValueError) as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------------------ field checks


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _lookup(tree: Any, field: str) -> Any:
    node = tree
    for part in field.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError, IndexError):
            return _MISSING
    return node


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "a finite number"


def _show(v: Any) -> str:
    """A value as written after ``--config.FIELD=``."""
    return str(v).lower() if isinstance(v, bool) else str(v)


class _Checks:
    """Collects problems; each check returns the value when it is valid, else None."""

    def __init__(self, config: Any):
        self.config = config
        self.defaults = base_config()
        self.problems: list[str] = []

    def get(self, field: str) -> Any:
        v = _lookup(self.config, field)
        if v is _MISSING:
            self.problems.append(
                f"{field}: missing; every config needs it (build the config on "
                "flax_textvae.configuration.base_config(), which sets all fields)"
            )
        return v

    def has(self, field: str) -> bool:
        return _lookup(self.config, field) is not _MISSING

    def report(self, field: str, value: Any, need: str, fix: str) -> None:
        self.problems.append(f"{field}={value!r}: {need}; {fix}")

    def example(self, field: str, ok: Callable[[Any], bool], fallback: Any) -> str:
        """``e.g. --config.FIELD=X`` with the default value when it passes ``ok``, else ``fallback``."""
        default = _lookup(self.defaults, field)
        value = default if default is not _MISSING and ok(default) else fallback
        return f"e.g. --config.{field}={_show(value)}"

    def number(
        self, field: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False, integer: bool = False
    ):
        v = self.get(field)
        if v is _MISSING:
            return None

        def inside(x) -> bool:
            return (lo is None or (x > lo if lo_open else x >= lo)) and (hi is None or (x < hi if hi_open else x <= hi))

        typed = _is_int if integer else _is_number
        if typed(v) and inside(v):
            return v
        kind = "an integer" if integer else "a number"
        rng = _range_text(lo, hi, lo_open, hi_open)
        need = f"must be {kind}" + ("" if rng == "a finite number" else f" {rng}")
        fallback = lo if lo is not None and not lo_open else (hi if hi is not None and not hi_open else 1)
        self.report(field, v, need, self.example(field, lambda x: typed(x) and inside(x), fallback))
        return None

    def integer(self, field: str, *, lo=None, hi=None):
        return self.number(field, lo=lo, hi=hi, integer=True)

    def text(self, field: str, *, nonempty: bool = False):
        v = self.get(field)
        if v is _MISSING:
            return None
        if isinstance(v, str) and (v.strip() or not nonempty):
            return v
        need = "must be a non-empty string" if nonempty else "must be a string"
        self.report(field, v, need, self.example(field, lambda x: isinstance(x, str) and bool(x), "NAME"))
        return None

    def choice(self, field: str, allowed: Sequence[str]):
        v = self.get(field)
        if v is _MISSING:
            return None
        if isinstance(v, str) and v in allowed:
            return v
        close = difflib.get_close_matches(str(v), allowed, n=1)
        fix = (
            f"did you mean --config.{field}={close[0]}?"
            if close
            else self.example(field, lambda x: x in allowed, allowed[0])
        )
        self.report(field, v, f"must be one of {', '.join(repr(a) for a in allowed)}", fix)
        return None

    def boolean(self, field: str):
        v = self.get(field)
        if v is _MISSING:
            return None
        if isinstance(v, bool):
            return v
        self.report(field, v, "must be true or false", f"e.g. --config.{field}=true")
        return None


def _check_model(c: _Checks, check_path: bool = True) -> None:
    name = c.text("model.name_or_path", nonempty=True)
    c.choice("model.dtype", tuple(DTYPES))
    if name != "scratch":
        if not check_path:
            return
        # A hub id is checked when it is fetched; a local path that is not a folder can be refused now.
        path = os.path.expanduser(name) if name else ""
        fix = "pass such a folder, a hub id (e.g. --config.model.name_or_path=facebook/bart-base) or 'scratch'"
        if path and not os.path.isdir(path) and names_a_local_path(path):
            c.report("model.name_or_path", name, f"is not a checkpoint folder ({FOLDER_CONTENTS})", fix)
        elif path and os.path.isdir(path):
            problems = "; ".join(folder_problems(path))
            if problems:
                sep = "\n    " if "\n" in problems else " "  # after a list of tensor names: on a line of its own
                c.report("model.name_or_path", name, f"{problems}{sep}({FOLDER_CONTENTS})", fix)
        return
    c.choice("model.scratch.family", SCRATCH_FAMILIES)
    d_model = c.integer("model.scratch.d_model", lo=1)
    c.integer("model.scratch.num_layers", lo=1)
    heads = c.integer("model.scratch.num_heads", lo=1)
    c.integer("model.scratch.ffn_dim", lo=1)
    c.number("model.scratch.dropout", lo=0.0, hi=1.0, hi_open=True)
    c.integer("model.scratch.vocab_size", lo=MIN_SCRATCH_VOCAB)
    c.integer("model.scratch.min_freq", lo=1)
    if d_model and heads and d_model % heads:
        near = max(heads, d_model // heads * heads)
        c.problems.append(
            f"model.scratch.d_model={d_model} with model.scratch.num_heads={heads}: d_model must be "
            f"divisible by num_heads (each head gets d_model / num_heads dims); e.g. "
            f"--config.model.scratch.d_model={near}"
        )


def _check_fast_paths(c: _Checks) -> None:
    """The speed / memory switches; each is checked when present (configs saved before they existed lack them)."""
    if c.has("model.attention"):
        if c.choice("model.attention", ATTENTION_IMPLEMENTATIONS) == "cudnn":
            _check_cudnn(c)
    if c.has("model.remat"):
        c.boolean("model.remat")
    if c.has("data.prefetch"):
        c.integer("data.prefetch", lo=0)
    if c.has("loss.vocab_chunk_size"):
        c.integer("loss.vocab_chunk_size", lo=0)


def _check_cudnn(c: _Checks) -> None:
    """cuDNN attention runs in a half-precision compute dtype (the device is checked by `device_problems`)."""
    if c.get("model.dtype") != "bfloat16":
        c.problems.append(
            f"model.attention='cudnn' with model.dtype={_show(c.get('model.dtype'))}: cuDNN attention runs "
            f"in bfloat16, and only on a CUDA GPU; e.g. --config.model.dtype=bfloat16 (parameters stay float32), or "
            f"--config.model.attention=dot_product"
        )


def device_problems(config: Any) -> list[str]:
    """What the config asks of the devices that these lack, as ``field=value: ...`` lines.

    Separate from `config_problems` because it starts jax's backend, which a multi-host run may do only after
    ``jax.distributed.initialize``; training calls it right after that.
    """
    if _lookup(config, "model.attention") != "cudnn" or attn_lib.cudnn_available():
        return []
    device = jax.devices()[0]
    return [
        f"model.attention='cudnn': needs a CUDA GPU of compute capability 8.0 or newer, and this machine's "
        f"device is {device.device_kind!r} ({device.platform}); use --config.model.attention=dot_product "
        "(the default)"
    ]


def check_devices(config: Any) -> None:
    """Raises ConfigError listing `device_problems`, if any."""
    problems = device_problems(config)
    if problems:
        raise ConfigError(problems)


def _check_vae(c: _Checks) -> None:
    c.integer("vae.latent_size", lo=1)
    c.choice("vae.pooling", POOLINGS)
    c.integer("vae.num_memory_slots", lo=1)
    v = c.get("vae.injection")
    if v is not _MISSING:
        names = (
            [s.strip() for s in v.split(",") if s.strip()]
            if isinstance(v, str)
            else list(v)
            if isinstance(v, (list, tuple))
            else None
        )
        bad = None if names is None else [n for n in names if n not in INJECTIONS]
        if not names or bad:
            what = f"unknown name(s) {', '.join(repr(b) for b in bad)}; " if bad else ""
            close = {b: difflib.get_close_matches(str(b), INJECTIONS, n=1) for b in bad or ()}
            fix = (
                "e.g. --config.vae.injection=memory or --config.vae.injection=memory,embedding"
                if not bad or not all(close.values())
                else f"did you mean --config.vae.injection={','.join(close[n][0] if n in bad else n for n in names)}?"
            )
            c.report(
                "vae.injection", v, f"{what}must be a non-empty comma-separated subset of {','.join(INJECTIONS)}", fix
            )
    if c.has("vae.memory_style"):
        c.choice("vae.memory_style", MEMORY_STYLES)
    if c.has("vae.posterior_bias"):
        c.boolean("vae.posterior_bias")


def _check_data(c: _Checks, check_data: bool) -> None:
    column = c.integer("data.column", lo=-1)
    for field in ("data.train", "data.eval"):
        spec = c.text(field, nonempty=True)
        if spec is not None and check_data:
            problems = check_data_spec(spec, field, column=column)
            c.problems.extend(problems)
            if spec.startswith(TFDS_PREFIX) and not problems:  # not built: refused now, before any write
                problem = sources.tfds_problem(spec, data_dir=c.get("data.tfds_data_dir") or None)
                c.problems.extend([f"{field}={problem}"] if problem else [])  # it starts with the spec
    c.text("data.text_field")
    c.text("data.tfds_data_dir")
    c.integer("data.max_length", lo=2)
    c.integer("data.num_buckets", lo=1)
    c.integer("data.eval_max_examples", lo=0)


def _check_loop(c: _Checks) -> None:
    c.integer("batch_size", lo=1)
    total = c.integer("train_steps", lo=1)
    c.integer("log_every", lo=1)
    c.integer("eval_every", lo=0)
    c.integer("checkpoint_every", lo=1)
    c.integer("keep_checkpoints", lo=1)
    c.integer("seed", lo=0)
    p1 = c.integer("phase1.steps", lo=0)
    if total is not None and p1 is not None and p1 >= total:
        c.problems.append(
            f"phase1.steps={p1} with train_steps={total}: train_steps counts the steps of both "
            "phases and must exceed phase1.steps, so phase 2 gets at least one step; e.g. "
            f"--config.train_steps={p1 + max(total, 1)} or --config.phase1.steps={total // 2}"
        )
    frozen = c.get("phase1.frozen")
    if frozen is not _MISSING:
        if not isinstance(frozen, (list, tuple)) or not all(isinstance(p, str) for p in frozen):
            c.report(
                "phase1.frozen",
                frozen,
                "must be a tuple of regular expressions (strings) matched against 'a/b/c' parameter paths",
                "keep the default configuration.FREEZE_DECODER",
            )
        else:
            for p in frozen:
                try:
                    re.compile(p)
                except re.error as err:
                    c.report(
                        "phase1.frozen", p, f"is not a valid regular expression ({err})", "fix or remove that pattern"
                    )


def _check_optimizer(c: _Checks) -> None:
    c.number("optimizer.learning_rate", lo=0.0, lo_open=True)
    c.integer("optimizer.warmup_steps", lo=0)
    c.choice("optimizer.decay", LR_DECAYS)
    c.number("optimizer.weight_decay", lo=0.0)
    c.number("optimizer.grad_clip", lo=0.0)
    c.number("optimizer.b1", lo=0.0, hi=1.0, hi_open=True)
    c.number("optimizer.b2", lo=0.0, hi=1.0, hi_open=True)
    accum = c.integer("optimizer.grad_accum_steps", lo=1)
    batch = _lookup(c.config, "batch_size")
    if accum and _is_int(batch) and batch >= 1 and batch % accum:
        c.problems.append(
            f"batch_size={batch} with optimizer.grad_accum_steps={accum}: the batch is split into "
            f"{accum} equal micro-batches, so batch_size must be a multiple of it; e.g. "
            f"--config.batch_size={max(accum, batch // accum * accum)}"
        )


def _check_loss(c: _Checks) -> None:
    kind = c.choice("loss.kind", KINDS)
    c.number("loss.free_bits", lo=0.0)
    mode = c.choice("loss.free_bits_mode", FREE_BITS_MODES)
    c.number("loss.beta", lo=0.0)
    c.number("loss.target", lo=0.0)
    c.integer("loss.target_ramp_steps", lo=0)
    sched = c.choice("loss.kl_schedule.kind", KL_SCHEDULES)
    c.number("loss.kl_schedule.value", lo=0.0)
    c.number("loss.kl_schedule.start", lo=0.0)
    steps = c.integer("loss.kl_schedule.steps", lo=0)
    c.number("loss.kl_schedule.ratio_increase", lo=0.0, hi=1.0, lo_open=True)
    c.number("loss.kl_schedule.steepness", lo=0.0, lo_open=True)
    if sched == "cyclical" and steps == 0:
        c.report(
            "loss.kl_schedule.steps",
            0,
            "is the cycle length of loss.kl_schedule.kind='cyclical' and must be >= 1",
            "e.g. --config.loss.kl_schedule.steps=1000",
        )
    # The constraint and batch free bits need the KL of the whole batch; pmap and gradient accumulation see
    # only a shard of it per step.
    mode_of_run = _lookup(c.config, "parallel.mode")
    accum = _lookup(c.config, "optimizer.grad_accum_steps")
    whole_batch = kind == "constraint" or (kind == "free_bits" and mode == "batch")
    if whole_batch and (mode_of_run == "pmap" or (_is_int(accum) and accum > 1)):
        c.problems.append(
            f"loss.kind={kind!r} (loss.free_bits_mode={mode!r}) with parallel.mode={mode_of_run!r}, "
            f"optimizer.grad_accum_steps={accum}: this objective needs the KL of the whole batch, which pmap and "
            "gradient accumulation compute per shard; use --config.parallel.mode=mesh "
            "--config.optimizer.grad_accum_steps=1 (the mesh splits the batch over every device and still "
            "computes the global KL)"
        )


def _check_parallel(c: _Checks) -> None:
    c.choice("parallel.mode", PARALLEL_MODES)
    c.integer("parallel.num_devices", lo=0)
    c.integer("parallel.fsdp", lo=1)
    c.text("parallel.coordinator_address")
    c.integer("parallel.num_processes", lo=0)
    c.integer("parallel.process_id", lo=-1)


# ------------------------------------------------------------------------------------------ data files


def _text_file_problem(path: str, column: int | None) -> str | None:
    """What is wrong with ``path`` as a text data file (None when it is fine)."""
    hint = (
        "give the path of a UTF-8 text file with one example per line, or a 'tfds:NAME[/CONFIG][:SPLIT]' "
        "or 'synthetic:N[:SEED]' spec"
    )
    if not os.path.exists(path):
        return f"no such file (resolved: {os.path.abspath(path)}); {hint}"
    if os.path.isdir(path):
        return f"is a directory; {hint} (e.g. a file inside it)"
    try:
        with open(path, "rb") as f:
            sample = f.read(_SAMPLE_BYTES)
            truncated = bool(f.read(1))
    except OSError as err:
        return f"cannot be read ({err.strerror or err}); fix its permissions or copy it somewhere readable"
    lines = sample.split(b"\n")
    if truncated and len(lines) > 1:
        lines = lines[:-1]  # the sample ends mid-line
    decoded, undecodable = [], 0
    for raw in lines:
        try:
            decoded.append(raw.decode("utf-8").lstrip("\ufeff"))
        except UnicodeDecodeError:
            undecodable += 1
    binary_fix = (
        "give the plain-text file (one example per line, UTF-8; decompress or convert it first); "
        "a few bad lines are skipped with a warning, a binary file is refused"
    )
    if b"\x00" in sample:
        return f"looks like a binary file, not text (it contains NUL bytes); {binary_fix}"
    if undecodable > max(1, len(lines) // 10):
        return (
            f"looks like a binary or non-UTF-8 file ({undecodable} of the first {len(lines)} lines are not "
            f"valid UTF-8); {binary_fix}"
        )
    first = next((line for line in decoded if line.strip()), None)
    if first is None and truncated:
        first = _first_nonblank_after(path, len(sample))
    if first is None:
        bad = f" ({undecodable} undecodable line(s) skipped)" if undecodable else ""
        return f"is empty: no non-blank line{bad}; give a file with one example per line"
    if column is not None and column >= 0:
        cols = first.rstrip("\r\n").split("\t")
        if column >= len(cols):
            return (
                f"its first non-blank line has {len(cols)} tab-separated column(s) but data.column={column}; "
                "choose an existing column (0-based) or --config.data.column=-1 for the whole line"
            )
    return None


def _first_nonblank_after(path: str, offset: int) -> str | None:
    """The first non-blank UTF-8 line after byte ``offset`` (a file whose first MiB is blank)."""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if line.strip():
                return line
    return None
