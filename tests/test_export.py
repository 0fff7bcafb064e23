"""python -m flax_textvae.export: a trained run -> a self-contained folder that transformers and
flax_textvae.load read without the workdir (tiny BART and T5 v1.1 runs trained from local checkpoints)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file
from transformers import AutoModelForSeq2SeqLM

import flax_textvae
from flax_textvae import checkpoints, cli, evaluate, export, exported, inference, models, train
from flax_textvae.data import read_examples, synthetic_vocabulary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_hf  # noqa: E402
from _trained_run import tiny_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_SPEC = "synthetic:16:1"
TEXTS = read_examples(EVAL_SPEC)[0][:3]


def _export_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "flax_textvae.export", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module", params=["bart", "t5"])
def exported_run(request, tmp_path_factory):
    """A tiny run trained, evaluated (BART: run_eval's metrics; T5: only the final training eval) and
    exported (BART through the command line, T5 through ``export.export``); the workdir is deleted after
    everything the tests compare against was read from it."""
    family = request.param
    root = tmp_path_factory.mktemp(f"export_{family}")
    folder = str(root / "pretrained")
    if family == "bart":
        helpers_hf.make_tiny_bart(folder, vocab_words=synthetic_vocabulary())
    else:
        helpers_hf.make_tiny_t5(folder, v1_1=True, vocab_words=synthetic_vocabulary())
    config = tiny_config(
        **{
            "model.name_or_path": folder,
            "train_steps": 4,
            "phase1.steps": 2,
            "eval_every": 0,
            "checkpoint_every": 4,
            "log_every": 2,
            "data.train": "synthetic:64",
            "data.eval": EVAL_SPEC,
            "vae.injection": "memory,cross_attention",
            "data.num_buckets": 1,  # one compiled shape per program (bucketing has tests of its own)
        }
    )
    workdir = str(root / "run")
    train.train_and_evaluate(config, workdir)
    out = {"family": family, "config": config}
    if family == "bart":
        out["eval"] = evaluate.evaluate(config, workdir, iw_samples=2)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        out["final_eval"] = [r for r in map(json.loads, f) if r.get("split") == "eval"][-1]
    out["params"], out["step"] = checkpoints.load_params(workdir)
    vae = flax_textvae.load(workdir)
    out["encoded"] = vae.encode(TEXTS)
    out["reconstructed"] = vae.reconstruct(TEXTS)
    target = str(root / f"tiny-{family}-vae")
    if family == "bart":
        out["cli"] = _export_cli(f"--workdir={workdir}", f"--output={target}")
    else:
        assert export.export(workdir, target) == target
    shutil.rmtree(workdir)
    shutil.rmtree(folder)  # the pretrained checkpoint the run started from is gone too
    out["dir"] = target
    return out


def test_cli_export_exits_0(exported_run):
    if "cli" not in exported_run:
        pytest.skip("this run is exported through export.export")
    proc = exported_run["cli"]
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "Traceback" not in proc.stderr


def test_folder_layout(exported_run):
    d = exported_run["dir"]
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vae.safetensors",
        "vae_config.json",
        "README.md",
    ):
        assert os.path.isfile(os.path.join(d, name)), name
    with open(os.path.join(d, "vae_config.json")) as f:
        record = json.load(f)
    assert record["step"] == exported_run["step"] == exported_run["config"].train_steps
    assert record["config"] == json.loads(exported_run["config"].to_json())
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["model_type"] == exported_run["family"]
    assert not [f for f in os.listdir(os.path.dirname(d)) if ".tmp-" in f]  # the staging folder is gone
    # the weights are as readable as the rest (safetensors alone writes them 0600): the folder is for sharing
    card_mode = os.stat(os.path.join(d, "README.md")).st_mode & 0o777
    for name in ("model.safetensors", "vae.safetensors"):
        assert os.stat(os.path.join(d, name)).st_mode & 0o777 == card_mode, name


def test_transformers_loads_the_backbone_with_equal_logits(exported_run):
    d = exported_run["dir"]
    torch_model, info = AutoModelForSeq2SeqLM.from_pretrained(d, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    pre = models.load_pretrained(d)
    trained = flatten_dict(exported_run["params"]["backbone"], sep="/")
    got = flatten_dict(pre.params, sep="/")
    assert set(got) == set(trained)
    for k in trained:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(trained[k]), err_msg=k)

    rng = np.random.default_rng(0)
    pad = pre.config.pad_token_id
    ids, mask = helpers_hf.padded_batch(rng, [7, 3, 5], pre.config.vocab_size, pad)
    dec, dmask = helpers_hf.padded_batch(rng, [4, 6, 2], pre.config.vocab_size, pad)
    logits = pre.module.apply(
        {"params": pre.params},
        input_ids=jnp.asarray(ids),
        attention_mask=jnp.asarray(mask),
        decoder_input_ids=jnp.asarray(dec),
        decoder_attention_mask=jnp.asarray(dmask),
    )
    with torch.no_grad():
        want = torch_model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
            decoder_attention_mask=torch.from_numpy(dmask).long(),
        ).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=0)


def test_vae_weights_round_trip_exactly(exported_run):
    params, step = exported.load_params(exported_run["dir"])
    assert step == exported_run["step"]
    want = flatten_dict(exported_run["params"], sep="/")
    got = flatten_dict(params, sep="/")
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    with pytest.raises(FileNotFoundError, match="only"):
        exported.load_params(exported_run["dir"], step=step + 1)


def test_load_needs_nothing_of_the_workdir(exported_run):
    vae = flax_textvae.load(exported_run["dir"])
    assert vae.step == exported_run["step"]
    mean, logvar = vae.encode(TEXTS)
    np.testing.assert_array_equal(mean, exported_run["encoded"][0])
    np.testing.assert_array_equal(logvar, exported_run["encoded"][1])
    assert vae.reconstruct(TEXTS) == exported_run["reconstructed"]
    assert isinstance(flax_textvae.TextVAE.load(exported_run["dir"]), inference.TrainedTextVAE)


def test_run_eval_on_the_exported_folder(exported_run):
    if "eval" not in exported_run:
        pytest.skip("run_eval.py is checked on the BART run")
    d = exported_run["dir"]
    cli.check_trained_run(d)
    config = inference.load_config(d)
    assert json.loads(config.to_json()) == json.loads(exported_run["config"].to_json())
    result = evaluate.evaluate(config, d, iw_samples=2)
    assert result == exported_run["eval"]
    assert os.path.isfile(os.path.join(d, "eval", "synthetic.json"))


def test_card_holds_metrics_recipe_and_loading(exported_run):
    with open(os.path.join(exported_run["dir"], "README.md")) as f:
        card = f.read()
    metrics = exported_run.get("eval") or exported_run["final_eval"]
    for key in ("rec", "kl", "neg_elbo", "ppl_elbo", "mi", "bleu"):
        assert f"{metrics[key]:.4f}" in card, key
    assert f"| {metrics['au']} |" in card and f"| {metrics['num_examples']} |" in card
    if "eval" in exported_run:
        assert f"{metrics['nll']:.4f}" in card and f"{metrics['ppl']:.4f}" in card
    else:
        assert "final training eval" in card
    assert EVAL_SPEC in card
    assert "Steps: 4 in all; phase 1 (steps 1-2)" in card
    assert exported_run["config"].model.name_or_path in card
    name = os.path.basename(exported_run["dir"])
    assert f'flax_textvae.load("{name}")' in card and f'AutoModelForSeq2SeqLM.from_pretrained("{name}")' in card


@pytest.mark.parametrize("variant", ["bart", "bart_untied", "t5", "t5_v1_1"])
def test_torch_state_dict_round_trips_every_layout(tmp_path, variant):
    src = str(tmp_path / "src")
    if variant.startswith("bart"):
        torch_model = helpers_hf.make_tiny_bart(src, tie_word_embeddings=variant == "bart")
    else:
        torch_model = helpers_hf.make_tiny_t5(src, v1_1=variant == "t5_v1_1")
    pre = models.load_pretrained(src)
    state = export.torch_state_dict(pre.params, pre.config)
    dst = str(tmp_path / "dst")
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    loaded, info = AutoModelForSeq2SeqLM.from_pretrained(dst, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want = torch_model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=name)


def test_torch_state_dict_names_every_tensor_once(tmp_path):
    src = str(tmp_path / "src")
    helpers_hf.make_tiny_bart(src)
    pre = models.load_pretrained(src)
    extra = dict(pre.params, stray={"kernel": jnp.zeros((2, 2))})
    with pytest.raises(ValueError, match="stray/kernel: in the tree but not in the name table"):
        export.torch_state_dict(extra, pre.config)
    short = jax.tree.map(lambda x: x, pre.params)
    del short["final_logits_bias"]
    with pytest.raises(ValueError, match="final_logits_bias: missing"):
        export.torch_state_dict(short, pre.config)


def test_missing_workdir_exits_2_without_traceback(tmp_path):
    target = tmp_path / "out"
    proc = _export_cli(f"--workdir={tmp_path / 'nope'}", f"--output={target}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --workdir=") and "no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr and not target.exists()


def test_an_output_folder_in_the_way_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "model").mkdir()
    (workdir / "config.json").write_text("{}")
    (workdir / "model" / "config.json").write_text("{}")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export.export(str(workdir), str(busy))
    assert os.listdir(busy) == ["notes.txt"]
    with pytest.raises(FileExistsError, match="workdir"):
        export.export(str(workdir), str(workdir))
