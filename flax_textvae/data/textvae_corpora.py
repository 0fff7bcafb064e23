"""TFDS builder for the standard text-VAE corpora (PTB, Yelp, Yahoo, SNLI) from local text files.

The corpora are distributed as one-sentence-per-line files (the splits used by Bowman et al. 2016,
Yang et al. 2017, He et al. 2019, Li et al. 2019); TFDS cannot download them, so they are read from a
*manual* directory laid out as::

    {manual_dir}/{config}/train.txt
    {manual_dir}/{config}/valid.txt
    {manual_dir}/{config}/test.txt

for ``config`` in ``ptb``, ``yelp``, ``yahoo``, ``snli``. Each non-empty line (stripped) becomes one
example ``{'text': str}``; file order is kept (``disable_shuffling``), so record ``i`` of a split is
the ``i``-th non-empty line. Lines that are not valid UTF-8 fail the build with the file and line.
Yelp and Yahoo lines are ``LABEL<TAB>sentence`` (He et al. 2019's files): the integer label is removed
from ``text`` and kept as the ``label`` feature (``-1`` for a line without such a prefix); see
:func:`parse_line`.

Build it in the ``array_record`` format (random access; reading needs no TensorFlow). Building needs no
TensorFlow either (tested with tensorflow-datasets 4.9 and no TensorFlow installed)::

    python -m flax_textvae.data.textvae_corpora --config=ptb --manual_dir=/data/textvae --data_dir=/data/tfds

or from Python (``prepare`` below does exactly this)::

    TextVaeCorpora(config='ptb', data_dir=..., file_format='array_record').download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=...))

The ``tfds build`` command line imports TensorFlow, so it works only where TensorFlow is installed::

    tfds build --imports=flax_textvae.data.textvae_corpora text_vae_corpora --config=ptb \\
        --manual_dir=/data/textvae --data_dir=/data/tfds --file_format=array_record

Then read it with ``read_examples('tfds:text_vae_corpora/ptb:valid', data_dir=...)`` (or set
``TFDS_DATA_DIR``), or in a config ``data.train = 'tfds:text_vae_corpora/ptb:train'``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

CONFIG_NAMES = ("ptb", "yelp", "yahoo", "snli")
SPLITS = ("train", "valid", "test")
LABELLED_CONFIGS = ("yelp", "yahoo")  # lines are LABEL<TAB>sentence
NO_LABEL = -1

_DESCRIPTIONS = {
    "ptb": "Penn Treebank, Mikolov et al. (2010) preprocessing (lower-cased, <unk>, numbers as N).",
    "yelp": "Yelp reviews as used by Yang et al. (2017) / He et al. (2019).",
    "yahoo": "Yahoo Answers as used by Yang et al. (2017) / He et al. (2019).",
    "snli": "SNLI premise/hypothesis sentences as used by Li et al. (2019) / Park & Lee (2021).",
}


class TextVaeCorpora(tfds.core.GeneratorBasedBuilder):
    """One-sentence-per-line text-VAE benchmark corpora, read from ``{manual_dir}/{config}/{split}.txt``."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Yelp / Yahoo: the LABEL<TAB> prefix is removed from 'text' and kept as the 'label' feature.",
    }
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=_DESCRIPTIONS[n]) for n in CONFIG_NAMES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the corpus files at {manual_dir}/{config}/{train,valid,test}.txt (one example per line, UTF-8), "
        f"config one of {CONFIG_NAMES}."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo built directly (not dataset_info_from_configs, which wants a metadata folder next
        # to the module, as in the TFDS source tree).
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text-VAE corpus: {_DESCRIPTIONS[self.builder_config.name]}",
            features=tfds.features.FeaturesDict(_features(self.builder_config.name)),
            supervised_keys=None,
            disable_shuffling=True,  # keep file order: record i == i-th non-empty line
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        folder = pathlib.Path(dl_manager.manual_dir) / self.builder_config.name
        missing = [str(folder / f"{s}.txt") for s in SPLITS if not (folder / f"{s}.txt").is_file()]
        if missing:
            raise FileNotFoundError(f"missing corpus file(s) {missing}; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {s: self._generate_examples(folder / f"{s}.txt") for s in SPLITS}

    def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
        labelled = self.builder_config.name in LABELLED_CONFIGS
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err.reason}); fix the file") from err
                example = parse_line(line, labelled=labelled)
                if example is not None:
                    yield lineno, example


def _features(config: str) -> dict[str, Any]:
    """The feature specs of a config: ``text``, plus ``label`` for the labelled corpora."""
    features: dict[str, Any] = {"text": tfds.features.Text()}
    if config in LABELLED_CONFIGS:
        features["label"] = tfds.features.Scalar(dtype=np.int64)
    return features


def parse_line(line: str, *, labelled: bool) -> dict[str, Any] | None:
    """One corpus line -> the example's features, or None for a line that holds no text.

    Args:
      line: the decoded line (a trailing newline and a leading byte-order mark are allowed).
      labelled: the corpus writes ``LABEL<TAB>sentence`` (``LABELLED_CONFIGS``). Then an integer first
        tab-separated field is the label and is cut from the text; a line without such a prefix keeps its
        whole text and gets ``NO_LABEL``.

    Returns:
      ``{'text': str}`` (unlabelled corpora) or ``{'text': str, 'label': int}``, the text stripped;
      None when the text is empty.
    """
    line = line.lstrip("\ufeff")
    if not labelled:
        text = line.strip()
        return {"text": text} if text else None
    label = NO_LABEL
    head, sep, rest = line.partition("\t")
    try:
        if sep:
            label, line = int(head.strip()), rest
    except ValueError:
        pass  # the first field is not a label: the whole line is the text
    text = line.strip()
    return {"text": text, "label": label} if text else None


def prepare(config: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> str:
    """Builds ``text_vae_corpora/{config}`` in the array_record format; returns the prepared folder.

    Args:
      config: one of ``CONFIG_NAMES``.
      manual_dir: folder holding ``{config}/{train,valid,test}.txt``.
      data_dir: TFDS data dir to write to (default ``$TFDS_DATA_DIR`` or TFDS's default).
    """
    if config not in CONFIG_NAMES:
        raise ValueError(f"unknown config {config!r}; choose one of {CONFIG_NAMES}")
    data_dir = os.fspath(data_dir) if data_dir is not None else os.environ.get("TFDS_DATA_DIR") or None
    builder = TextVaeCorpora(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return os.fspath(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m flax_textvae.data.textvae_corpora --config=ptb --manual_dir=D [--data_dir=T]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, choices=CONFIG_NAMES + ("all",))
    parser.add_argument("--manual_dir", required=True)
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    for config in CONFIG_NAMES if args.config == "all" else (args.config,):
        print(f"prepared text_vae_corpora/{config} at {prepare(config, args.manual_dir, args.data_dir)}")


if __name__ == "__main__":
    main()
