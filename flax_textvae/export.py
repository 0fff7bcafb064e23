"""Export a trained run as a self-contained folder: ``python -m flax_textvae.export --workdir=RUN --output=DIR``.

The folder (layout in :mod:`flax_textvae.exported`) holds the backbone in Hugging Face PyTorch format
(``config.json``, ``model.safetensors``, the tokenizer files), so ``transformers.AutoModelForSeq2SeqLM`` and
``flax_textvae.models.load_pretrained`` read it as a plain seq2seq model; the VAE's own parameters in
``vae.safetensors``; the run's config and the exported step in ``vae_config.json``; and a ``README.md`` model
card with the run's held-out metrics, how it was trained and how to load it. ``flax_textvae.load(DIR)`` and
``run_eval.py --workdir=DIR`` take the folder in place of the workdir.

Flax -> PyTorch names come from the family's explicit table read backwards (``export_table`` in
``flax_textvae.models.families``): every tensor of the backbone is written under exactly one table name, plus
the duplicate names transformers expects for an embedding it does not tie; tied embeddings are written once,
as transformers saves them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Sequence

import numpy as np
import transformers
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from flax_textvae import checkpoints, cli, exported, model_card
from flax_textvae import workdir as rundir
from flax_textvae.models import families

__all__ = ["export", "export_backbone", "export_pretrained", "torch_state_dict", "main"]

MODEL_FOLDER = "model"  # WORKDIR/model: the backbone's config.json and tokenizer, saved by training
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# A pretrained backbone's record (model_card.PRETRAIN_INFO_NAME) marks a folder a rerun may replace.
PRETRAIN_INFO_NAME = model_card.PRETRAIN_INFO_NAME
PRETRAIN_FORMAT = "flax_textvae.pretrain/1"


# ------------------------------------------------------------------------------------ Flax -> PyTorch
def torch_state_dict(backbone: Any, hf_config) -> dict[str, np.ndarray]:
    """The backbone's parameters as a PyTorch state dict of the matching transformers model.

    Args:
      backbone: the HF Flax layout params tree of the complete seq2seq model (the ``backbone`` subtree of a
        run's params).
      hf_config: its transformers config (``model_type`` 'bart' or 't5').

    Returns:
      torch name -> contiguous float32 numpy array in PyTorch's shape (Flax kernels ``[in, out]`` transposed
      to Linear weights ``[out, in]``).

    Raises:
      ValueError: the tree and the table disagree: a tensor the table needs is missing, has the wrong shape,
        is named by two rows, or a tensor of the tree is named by none.
    """
    rows, aliases = families.get(getattr(hf_config, "model_type", None)).export_table(hf_config)
    flat = flatten_dict(backbone)
    out, used, problems = {}, {}, []
    for tname, fpath, transpose, shape in rows:
        if fpath in used:
            problems.append(f"{'/'.join(fpath)}: named twice ({used[fpath]}, {tname})")
            continue
        if fpath not in flat:
            problems.append(f"{'/'.join(fpath)}: missing (needed for {tname})")
            continue
        used[fpath] = tname
        arr = np.asarray(flat[fpath], np.float32)
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != tuple(shape):
            problems.append(f"{tname}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
            continue
        out[tname] = np.ascontiguousarray(arr)
    problems += [f"{'/'.join(k)}: in the tree but not in the name table" for k in sorted(set(flat) - set(used))]
    if problems:
        raise ValueError("the backbone does not match its PyTorch name table:\n  " + "\n  ".join(problems))
    for alias, source in aliases:
        out[alias] = out[source]
    return out


# -------------------------------------------------------------------------------------------- export
def _check_output(output: str, workdir: str) -> None:
    """Raises ``FileExistsError`` unless ``output`` is absent, empty, or an earlier export (then replaced)."""
    if os.path.realpath(output) == os.path.realpath(workdir):
        raise FileExistsError(f"--output={output} is the run's workdir; choose another folder")
    if os.path.exists(output) and not (
        os.path.isdir(output) and (not os.listdir(output) or exported.is_exported(output))
    ):
        raise FileExistsError(
            f"--output={output} exists and is not an earlier export; choose a new or empty "
            "folder (an earlier export there is replaced)"
        )


def export(workdir: str, output: str, *, step: int | None = None) -> str:
    """Writes the run in ``workdir`` as a self-contained folder ``output``.

    Nothing is written before the run, its checkpoint and the output folder are found usable; the folder is
    assembled next to ``output`` and moved into place at the end, replacing an earlier export there.

    Args:
      workdir: a trained run's directory (``config.json``, ``model/``, ``checkpoints/STEP/``).
      output: the folder to write (absent, empty, or an earlier export).
      step: the checkpoint to export (default: the newest).

    Returns:
      ``output``.

    Raises:
      FileNotFoundError: ``workdir`` is not a trained run, or has no checkpoint ``step``.
      FileExistsError: ``output`` holds something other than an earlier export.
    """
    cli.check_trained_run(workdir)
    if exported.is_exported(workdir):
        raise FileNotFoundError(f"--workdir={workdir} is already an exported folder; copy it instead")
    model_dir = os.path.join(workdir, MODEL_FOLDER)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json: {workdir} is not a complete trained run")
    _check_output(output, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    print(f"export: reading the checkpoint of {workdir}", flush=True)
    params, used_step = checkpoints.load_params(workdir, step)
    params = dict(params)
    state = torch_state_dict(params.pop("backbone"), hf_config)
    vae = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten_dict(params, sep="/").items()}

    vae_config = {"format": exported.FORMAT, "step": int(used_step), "config": config}
    card = model_card.model_card(
        config,
        int(used_step),
        hf_config,
        model_card.eval_results(workdir),
        name=os.path.basename(os.path.abspath(output)),
    )
    _assemble(
        output,
        model_dir,
        {WEIGHTS_NAME: (state, "pt"), exported.VAE_WEIGHTS_NAME: (vae, "np")},
        {exported.VAE_CONFIG_NAME: _json_text(vae_config), CARD_NAME: card},
    )
    size = sum(a.nbytes for a in state.values()) / 2**20
    print(
        f"export: wrote {output} (step {used_step}; backbone {len(state)} tensors, {size:.1f} MiB; "
        f"VAE {len(vae)} tensors)",
        flush=True,
    )
    return output


def export_backbone(
    backbone: Any, hf_config, model_dir: str, output: str, *, extra_files: dict | None = None, marker: str | None = None
) -> str:
    """Writes a bare seq2seq backbone as a Hugging Face folder (no VAE parts), replacing ``output`` atomically.

    The folder holds ``model.safetensors`` (:func:`torch_state_dict` of ``backbone``), every file of
    ``model_dir`` (the backbone's ``config.json`` and tokenizer files, as training saved them) and
    ``extra_files``; ``transformers.AutoModelForSeq2SeqLM.from_pretrained(output)`` and
    ``flax_textvae.models.load_pretrained(output)`` read it, and it serves as ``model.name_or_path``.
    It is assembled next to ``output`` and moved into place at the end.

    Args:
      backbone: the HF Flax layout params tree of the complete seq2seq model.
      hf_config: its transformers config.
      model_dir: the folder holding ``config.json`` and the tokenizer files.
      output: the folder to write: absent, empty, or (when ``marker`` is given) an earlier folder holding a
        file named ``marker``, which is replaced.
      extra_files: ``{file name: text}`` written next to the weights (a model card, a JSON record).
      marker: the name of a file that marks a folder this kind of export may replace.

    Returns:
      ``output``.

    Raises:
      FileNotFoundError: ``model_dir`` has no ``config.json``.
      FileExistsError: ``output`` holds something else.
      ValueError: ``backbone`` does not match the family's name table.
    """
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json: nothing describes the backbone to export")
    if os.path.exists(output) and not (
        os.path.isdir(output) and (not os.listdir(output) or (marker and os.path.isfile(os.path.join(output, marker))))
    ):
        raise FileExistsError(
            f"{output} exists and is not an earlier export of this kind; choose a new or empty folder"
        )
    return _assemble(
        output, model_dir, {WEIGHTS_NAME: (torch_state_dict(backbone, hf_config), "pt")}, extra_files or {}
    )


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


def _assemble(output: str, model_dir: str, tensors: dict, texts: dict) -> str:
    """Writes the folder ``output``: every file of ``model_dir`` (the backbone's ``config.json`` and tokenizer
    files), ``tensors`` (``{file name: (arrays, safetensors format tag)}``) and ``texts`` (``{file name: text}``).

    The folder is assembled next to ``output`` and moved into place at the end, replacing what was there; an
    error on the way leaves ``output`` as it was. Returns ``output``.
    """
    output = output.rstrip(os.sep) or output
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for fname in sorted(os.listdir(model_dir)):
            if os.path.isfile(os.path.join(model_dir, fname)):
                shutil.copy2(os.path.join(model_dir, fname), os.path.join(tmp, fname))
        umask = os.umask(0)
        os.umask(umask)
        for fname, (arrays, tag) in tensors.items():
            save_file(arrays, os.path.join(tmp, fname), metadata={"format": tag})
            # safetensors writes its files readable by their owner only; the folder is for sharing, so the
            # weights get the permissions of every other file written here (0666 less the umask)
            os.chmod(os.path.join(tmp, fname), 0o666 & ~umask)
        for fname, text in texts.items():
            with open(os.path.join(tmp, fname), "w") as f:
                f.write(text)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


# ------------------------------------------------------------------------------- pretrained backbones
def export_pretrained(
    workdir: str, output: str, params, hf_config, *, step: int, eval_metrics: dict | None, config
) -> str:
    """Writes the pretrained backbone as a Hugging Face folder (``export.export_backbone``) with a card.

    Args:
      workdir: the run directory (its ``model/`` holds ``config.json`` and the tokenizer).
      output: the folder to write (absent, empty, or an earlier pretraining export).
      params: the backbone parameters (HF Flax layout).
      hf_config: the backbone's transformers config.
      step: the step the parameters are from.
      eval_metrics: the held-out metrics of ``flax_textvae.pretrain_objective.make_evaluator`` at that step (or None).
      config: the run's config.

    Returns:
      ``output``.
    """
    record = {"format": PRETRAIN_FORMAT, "step": int(step), "eval": eval_metrics, "config": rundir.config_dict(config)}
    name = os.path.basename(os.path.abspath(output))
    files = {
        PRETRAIN_INFO_NAME: _json_text(record) + "\n",
        CARD_NAME: model_card.pretrained_card(config, hf_config, step, eval_metrics, name),
    }
    export_backbone(
        params, hf_config, os.path.join(workdir, MODEL_FOLDER), output, extra_files=files, marker=PRETRAIN_INFO_NAME
    )
    print(
        f"export: wrote {output} (step {step}; transformers' BartForConditionalGeneration.from_pretrained reads it)",
        flush=True,
    )
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flax_textvae.export --workdir=RUN --output=DIR [--step=N] [--verbose]``; returns the exit code.

    A user error (no such run, no checkpoint, an output folder in the way) prints one ``error: ...`` line on
    stderr and exits 2 (the traceback only with ``--verbose``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m flax_textvae.export",
        description="Export a trained flax_textvae run as a self-contained folder: the backbone in Hugging Face "
        "PyTorch format, the VAE weights and config, and a model card.",
    )
    parser.add_argument("--workdir", required=True, help="the trained run's directory")
    parser.add_argument("--output", required=True, help="the folder to write (new, empty, or an earlier export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--verbose", action="store_true", help=cli.VERBOSE_HELP)
    args = parser.parse_args(argv)
    try:
        export(args.workdir, args.output, step=args.step)
    except cli.USER_ERRORS as e:
        if args.verbose:
            raise
        cli.fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
