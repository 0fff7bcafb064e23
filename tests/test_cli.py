"""run_eval.py in a subprocess on a real (tiny) trained run: metrics, generation modes and plots.

Each subprocess pays a JAX start-up and compile (a few seconds each on 2 cores).
"""

import json
import os
import re
import struct
import subprocess
import sys

import helpers_hf
import pytest
from _trained_run import REPO, trained_run

from flax_textvae import evaluate
from flax_textvae.data import synthetic_sentences

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def run_eval(workdir, *flags, timeout=300):
    """Runs run_eval.py; returns (stdout, stderr); fails the test on a non-zero exit."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_eval.py"), f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout, p.stderr


def test_metrics_prints_the_table_and_writes_the_json(tiny_run):
    config, workdir = tiny_run
    out, _ = run_eval(workdir, "--iw_samples=4", "--batch_size=32")
    path = os.path.join(workdir, "eval", "synthetic.json")  # default name of the default split synthetic:64:1
    with open(path) as f:
        result = json.load(f)
    assert set(result) == set(evaluate.RESULT_KEYS)
    assert result["iw_samples"] == 4 and result["num_examples"] == 64
    # synthetic:64:1 through the BART-layout word tokenizer: n words -> n + 2 tokens
    assert result["max_length"] == config.data.max_length
    assert result["num_truncated"] == sum(
        len(t.split()) + 2 > config.data.max_length for t in synthetic_sentences(64, seed=1)
    )
    for key in evaluate.RESULT_KEYS:
        assert any(line.split()[:1] == [key] for line in out.splitlines()), (key, out)
    assert f"{result['rec']:.4f}" in out


def test_reconstruct_writes_the_output_file(tiny_run, tmp_path):
    _, workdir = tiny_run
    texts = ["the old man saw a dog", "mary laughed"]
    output = tmp_path / "rec.txt"
    out, _ = run_eval(workdir, "--mode=reconstruct", *(f"--text={t}" for t in texts), f"--output={output}")
    lines = output.read_text().splitlines()
    assert len(lines) == len(texts)
    for t in texts:
        assert f"in : {t}" in out
    assert out.count("out: ") == len(texts)


def test_sample_prints_num_sentences(tiny_run, tmp_path):
    _, workdir = tiny_run
    output = tmp_path / "samples.txt"
    out, _ = run_eval(workdir, "--mode=sample", "--num=3", "--seed=1", f"--output={output}")
    assert len(output.read_text().splitlines()) == 3
    assert len(out.splitlines()) == 3


def test_interpolate_between_two_texts(tiny_run):
    _, workdir = tiny_run
    out, _ = run_eval(workdir, "--mode=interpolate", "--text=a dog barks", "--text=the old man slept", "--steps=4")
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("0.00") and lines[-1].startswith("1.00")


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_training_and_kl_pngs(tiny_run, tmp_path):
    config, workdir = tiny_run
    out_dir = tmp_path / "plots"
    run_eval(workdir, "--mode=plot", "--step=30", f"--output={out_dir}")  # an older checkpoint
    for name in ("training.png", "kl_per_dim.png"):
        width, height = _png_size(out_dir / name)
        assert width >= 200 and height >= 100, (name, width, height)
    with open(out_dir / "kl_per_dim.json") as f:
        kl = json.load(f)
    assert len(kl) == config.vae.latent_size and min(kl) >= 0.0


# ------------------------------------------------------------------------------------------ user errors
# Each of these fails before any backbone loads or any training starts: a JAX start-up, about 2 s each.

from flax_textvae import cli  # noqa: E402


def run_cli(script, *flags, timeout=120, env=None):
    """Runs run_train.py / run_eval.py (or ``-c CODE``) from the repository root, with ``env`` added to the
    environment; returns the process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    args = ["-c", script] if "\n" in script else [script]
    return subprocess.run(
        [sys.executable, *args, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(p, *needles):
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: "), p.stderr
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr)


@pytest.mark.parametrize("script", ["run_train.py", "run_eval.py"])
def test_help_exits_0(script):
    p = run_cli(script, "--help")
    assert p.returncode == 0, p.stderr
    assert "--[no]verbose" in p.stdout and "Traceback" not in p.stderr


def test_eval_help_describes_the_metrics():
    p = run_cli("run_eval.py", "--helpshort")
    assert p.returncode == 0 and "DESIGN" not in p.stdout
    for word in ("neg_elbo", "nll", "ppl", "mi", "au", "bleu"):
        assert word in p.stdout, word


def test_print_config_shows_fields_with_their_comments():
    p = run_cli("run_train.py", "--config=configs/tiny.py", "--config.vae.latent_size=12", "--print_config")
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("vae.latent_size = "))
    assert line.split("#")[0].strip() == "vae.latent_size = 12" and line.endswith("# size of z")
    assert "(workdir: runs/tiny)" in p.stdout.splitlines()[0]
    assert "# model.scratch: used only when name_or_path == 'scratch'" in p.stdout


def test_default_workdir_is_named_after_the_config_file():
    assert cli.default_workdir("configs/tiny.py") == os.path.join("runs", "tiny")
    assert cli.default_workdir(os.path.join(REPO, "configs", "demo.py")) == os.path.join("runs", "demo")
    assert cli.default_workdir("configs/t5_vae.py:arg") == os.path.join("runs", "t5_vae")
    assert cli.default_workdir(None) == os.path.join("runs", "demo")


def test_a_config_typo_is_a_short_error():
    p = run_cli("run_train.py", "--config=configs/tiny.py", "--config.batch_sise=4")
    assert_user_error(p, "--config.batch_sise", "no field 'batch_sise'", "did you mean --config.batch_size?")


def test_a_config_typo_without_a_config_flag_is_a_short_error(tmp_path):
    # The default config is loaded when no --config is given; its overrides are still checked by cli.run.
    p = run_cli("run_train.py", f"--workdir={tmp_path / 'run'}", "--config.vae.latent_sz=3")
    assert_user_error(p, "--config.vae.latent_sz", "no field 'latent_sz'", "did you mean --config.vae.latent_size?")
    assert not (tmp_path / "run").exists()


def test_the_default_config_takes_overrides():
    p = run_cli("run_train.py", "--config.vae.latent_size=3", "--print_config")
    assert p.returncode == 0, p.stderr
    assert re.search(r"^vae\.latent_size = 3\b", p.stdout, re.M), p.stdout


def test_a_bad_config_lists_every_problem_before_writing(tmp_path):
    workdir = tmp_path / "run"
    p = run_cli(
        "run_train.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.vae.pooling=avg",
        "--config.batch_size=0",
        "--config.loss.kind=kl",
        "--config.phase1.steps=50",
    )
    assert_user_error(
        p,
        "4 problems",
        "vae.pooling='avg'",
        "--config.vae.pooling=",
        "batch_size=0",
        "loss.kind='kl'",
        "phase1.steps=50 with train_steps=20",
        "--config.train_steps=",
    )
    assert not workdir.exists()


def test_missing_and_binary_data_files_are_short_errors(tmp_path):
    binary = tmp_path / "valid.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    missing = tmp_path / "train.txt"
    p = run_cli(
        "run_train.py",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.train={missing}",
        f"--config.data.eval={binary}",
    )
    assert_user_error(
        p,
        f"data.train='{missing}': no such file",
        f"data.eval='{binary}'",
        "binary",
        "give the path of a UTF-8 text file",
    )


def test_a_tfds_spec_that_is_not_built_is_a_short_error_before_anything_is_written(tmp_path, tiny_run):
    empty = tmp_path / "tfds"
    empty.mkdir()
    spec, workdir = "tfds:text_vae_corpora/ptb:train", tmp_path / "run"
    env = {"TFDS_DATA_DIR": str(empty)}
    p = run_cli(
        "run_train.py", "--config=configs/tiny.py", f"--workdir={workdir}", f"--config.data.train={spec}", env=env
    )
    assert_user_error(
        p, f"data.train='{spec}': TFDS data set", "is not built", "python -m flax_textvae.data.textvae_corpora"
    )
    assert not workdir.exists()
    p = run_cli("run_eval.py", f"--workdir={tiny_run[1]}", "--data=tfds:text_vae_corpora/ptb:test", env=env)
    assert_user_error(p, "'tfds:text_vae_corpora/ptb:test': TFDS data set", "is not built")


def test_a_missing_model_folder_is_a_short_error(tmp_path):
    folder = tmp_path / "no_model"
    p = run_cli(
        "run_train.py",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.model.name_or_path={folder}",
    )
    assert_user_error(p, f"model.name_or_path='{folder}'", "config.json", "hub id")

    # A folder without weights or tokenizer: refused by the config check, before the workdir exists.
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bart"}')
    p = run_cli(
        "run_train.py", "--config=configs/bart_vae.py", f"--workdir={tmp_path / 'run'}",
        f"--config.model.name_or_path={folder}", "--config.data.train=synthetic:32", "--config.data.eval=synthetic:8",
    )  # fmt: skip
    assert_user_error(p, f"model.name_or_path='{folder}'", "has no weights", "has no tokenizer files")
    assert not (tmp_path / "run").exists()


def test_weights_that_do_not_fit_their_config_are_a_short_error(tmp_path):
    folder = tmp_path / "ckpt"
    helpers_hf.make_tiny_bart(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, d_model=32)))
    p = run_cli(
        "run_train.py", "--config=configs/bart_vae.py", f"--workdir={tmp_path / 'run'}",
        f"--config.model.name_or_path={folder}", "--config.data.train=synthetic:32", "--config.data.eval=synthetic:8",
    )  # fmt: skip
    # Found from the safetensors header by the config check: nothing is written.
    assert_user_error(p, f"model.name_or_path='{folder}': its weights do not fit its config.json (bart)")
    assert "shape mismatch (87):" in p.stderr and "... and 75 more" in p.stderr and "save_pretrained" in p.stderr
    assert len(p.stderr.splitlines()) < 30 and not (tmp_path / "run").exists()


def test_an_uncached_hub_id_offline_is_a_short_error(tmp_path):
    p = run_cli(
        "run_train.py",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.model.name_or_path=no-such-org/no-such-model",
    )
    assert_user_error(p, "'no-such-org/no-such-model'", "local folder")


def test_verbose_shows_the_traceback():
    p = run_cli("run_train.py", "--config=configs/tiny.py", "--config.vae.pooling=avg", "--print_config", "--verbose")
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError" in p.stderr


@pytest.mark.parametrize("make", [lambda p: p / "absent", lambda p: p])
def test_eval_of_a_workdir_that_is_not_a_run_is_a_short_error(tmp_path, make):
    p = run_cli("run_eval.py", f"--workdir={make(tmp_path)}")
    assert_user_error(p, f"--workdir={make(tmp_path)}", "run_train.py")


def test_eval_of_a_missing_data_file_is_a_short_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    p = run_cli("run_eval.py", f"--workdir={tmp_path}", f"--data={tmp_path / 'test.txt'}")
    assert_user_error(p, "--data=", "test.txt", "no such file")


def test_bad_eval_flags_are_one_short_error_before_any_work(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a run's outline is enough: the flags are refused first
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    workdir = f"--workdir={tmp_path}"
    p = run_cli(
        "run_eval.py", workdir, "--mode=interpolate", "--text=a b", "--text= ", "--steps=1", "--name=../x",
        "--data=synthetic:0",
    )  # fmt: skip
    assert_user_error(p, "the command line has 4 problems", "--steps=1", "--text=' '", "--name='../x'", "N >= 1")
    p = run_cli("run_eval.py", workdir, "--mode=sample", "--num=0")
    assert_user_error(p, "--num=0: sample needs at least one sentence")
    p = run_cli("run_eval.py", workdir, "--batch_size=-4")  # was a traceback (a ValueError from the batcher)
    assert_user_error(p, "--batch_size=-4: must be >= 1")


def test_eval_of_a_step_that_was_never_saved_names_the_steps_there(tiny_run):
    p = run_cli("run_eval.py", f"--workdir={tiny_run[1]}", "--step=999", "--iw_samples=1")
    assert_user_error(p, "no checkpoint of step 999 in", "(its steps: ")
    assert "incomplete" not in p.stderr


BUG_SCRIPT = """
from flax_textvae import cli
def main(argv):
    raise {}
cli.run(main)
"""


@pytest.mark.parametrize(
    "error,code", [("RuntimeError('an unknown bug')", 1), ("FileNotFoundError('x.txt is missing; make it')", 2)]
)
def test_bugs_keep_their_traceback_and_user_errors_do_not(error, code):
    p = run_cli(BUG_SCRIPT.format(error))
    assert p.returncode == code, p.stderr
    assert ("Traceback" in p.stderr) == (code == 1), p.stderr
    if code == 2:
        assert p.stderr == "error: x.txt is missing; make it\n"
