"""validation.validate(config): every bad field refused with its name, value and fix; all problems at once."""

import copy
import glob
import importlib
import math
import os

import ml_collections
import pytest

from configs import tiny
from flax_textvae import configuration, step, train, validation
from flax_textvae.validation import ConfigError


def tiny_dict():
    """configs/tiny.py as a plain nested dict, so any value (of any type) can be put in."""
    return copy.deepcopy(tiny.get_config().to_dict())


def put(tree, field, value):
    *path, last = field.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[last] = value
    return tree


def problems_of(config):
    with pytest.raises(ConfigError) as info:
        validation.validate(config)
    return info.value.problems, str(info.value)


CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "*.py")))


@pytest.mark.parametrize("name", [os.path.splitext(os.path.basename(f))[0] for f in CONFIG_FILES])
def test_the_shipped_configs_are_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    validation.validate(config, check_data=False)
    # With the data checked, a tfds: spec is refused only where its data set is not built (as here, where
    # nothing is downloaded), and then with the command that builds it.
    for problem in validation.config_problems(config):
        assert problem.startswith(("data.train='tfds:", "data.eval='tfds:")) and "is not built" in problem, problem
        assert "python -m flax_textvae.data.textvae_corpora" in problem


def test_base_config_is_valid_and_config_error_is_a_value_error():
    validation.validate(configuration.base_config())
    assert issubclass(ConfigError, ValueError)


BAD = [
    ("vae.latent_size", 0),
    ("vae.pooling", "avg"),
    ("vae.injection", "memroy"),
    ("vae.injection", ""),
    ("vae.injection", "memory,foo"),
    ("vae.num_memory_slots", 0),
    ("loss.kind", "kl"),
    ("loss.free_bits", -0.5),
    ("loss.free_bits_mode", "global"),
    ("loss.beta", -1.0),
    ("loss.kl_schedule.kind", "exp"),
    ("loss.kl_schedule.ratio_increase", 0.0),
    ("loss.kl_schedule.steepness", 0.0),
    ("loss.target_ramp_steps", -1),
    ("optimizer.decay", "step"),
    ("optimizer.learning_rate", 0.0),
    ("optimizer.learning_rate", math.nan),
    ("optimizer.grad_accum_steps", 0),
    ("optimizer.b1", 1.0),
    ("optimizer.warmup_steps", -1),
    ("model.dtype", "float16"),
    ("model.name_or_path", ""),
    ("model.scratch.family", "gpt2"),
    ("model.scratch.num_layers", 0),
    ("model.scratch.dropout", 1.0),
    ("model.scratch.vocab_size", 3),
    ("parallel.mode", "dp"),
    ("parallel.fsdp", 0),
    ("checkpoint_every", 0),
    ("log_every", 0),
    ("eval_every", -1),
    ("keep_checkpoints", 0),
    ("seed", -1),
    ("batch_size", 0),
    ("batch_size", "16"),
    ("batch_size", 16.0),
    ("batch_size", True),
    ("train_steps", 0),
    ("phase1.steps", -1),
    ("phase1.frozen", ("([unclosed",)),
    ("data.max_length", 1),
    ("data.num_buckets", 0),
    ("data.column", -2),
    ("data.eval_max_examples", -1),
    ("data.train", ""),
    ("denoise.delete_rate", 1.0),
    ("denoise.mask_rate", -0.1),
    ("denoise.word_dropout", 1.5),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_a_bad_value_is_refused_naming_the_field_value_and_fix(field, value):
    config = tiny_dict()
    put(config, field, value)
    problems, message = problems_of(config)
    assert len(problems) == 1, problems
    shown = repr(value[0]) if field == "phase1.frozen" else repr(value)
    assert problems[0].startswith(f"{field}={shown}: "), problems[0]
    assert "; " in problems[0] and ("--config." in problems[0] or "pattern" in problems[0]), problems[0]
    assert field in message


def test_enum_fix_suggests_the_closest_name():
    config = tiny_dict()
    put(config, "vae.pooling", "maxx")
    problems, _ = problems_of(config)
    assert "did you mean --config.vae.pooling=max?" in problems[0]
    assert "'mean', 'max', 'first'" in problems[0]


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"train_steps": 10, "phase1.steps": 10}, "phase1.steps=10 with train_steps=10"),
        ({"train_steps": 5, "phase1.steps": 10}, "phase1.steps=10 with train_steps=5"),
        ({"model.scratch.d_model": 30, "model.scratch.num_heads": 4}, "divisible by num_heads"),
        ({"optimizer.grad_accum_steps": 3}, "batch_size=16 with optimizer.grad_accum_steps=3"),
        ({"phase1.steps": 0, "loss.kind": "constraint", "parallel.mode": "pmap"}, "whole batch"),
        ({"loss.kind": "free_bits", "loss.free_bits_mode": "batch", "optimizer.grad_accum_steps": 2}, "whole batch"),
        ({"loss.kl_schedule.kind": "cyclical", "loss.kl_schedule.steps": 0}, "cycle length"),
    ],
)
def test_combinations_of_fields_are_checked(overrides, named):
    config = tiny_dict()
    for field, value in overrides.items():
        put(config, field, value)
    problems, _ = problems_of(config)
    assert len(problems) == 1 and named in problems[0], problems
    assert "--config." in problems[0]


def test_several_bad_values_are_reported_together():
    config = tiny_dict()
    bad = {
        "vae.latent_size": 0,
        "vae.pooling": "avg",
        "loss.kind": "kl",
        "batch_size": -4,
        "denoise.delete_rate": 2.0,
        "parallel.mode": "dp",
    }
    for field, value in bad.items():
        put(config, field, value)
    problems, message = problems_of(config)
    assert len(problems) == len(bad)
    assert message.startswith(f"the config has {len(bad)} problems:")
    for field, value in bad.items():
        assert f"{field}={value!r}" in message


def test_a_missing_field_is_reported():
    config = tiny_dict()
    del config["vae"]["latent_size"]
    problems, _ = problems_of(config)
    assert len(problems) == 1 and problems[0].startswith("vae.latent_size: missing"), problems


def test_scratch_fields_are_ignored_for_pretrained_models():
    config = tiny_dict()
    put(config, "model.name_or_path", "facebook/bart-base")
    put(config, "model.scratch.d_model", 30)
    put(config, "model.scratch.family", "gpt2")
    validation.validate(config)


def test_a_local_model_path_that_is_no_folder_is_refused(tmp_path):
    config = tiny_dict()
    put(config, "model.name_or_path", str(tmp_path / "missing_model"))
    problems, _ = problems_of(config)
    assert problems[0].startswith("model.name_or_path=") and "config.json" in problems[0]


def test_unknown_extra_fields_are_tolerated_and_memory_style_checked():
    config = tiny_dict()
    put(config, "vae.memory_style", "head_kv")
    put(config, "vae.posterior_bias", False)
    put(config, "extra.something_new", 3)
    validation.validate(config)
    put(config, "vae.memory_style", "kv")
    put(config, "vae.posterior_bias", "no")
    problems, _ = problems_of(config)
    assert len(problems) == 2
    assert problems[0].startswith("vae.memory_style='kv': must be one of 'head_kv', 'hidden'")
    assert problems[1].startswith("vae.posterior_bias='no': must be true or false")


def test_the_listed_names_are_the_ones_the_consumers_accept():
    opt = ml_collections.ConfigDict({"learning_rate": 1e-3, "warmup_steps": 1})
    for decay in validation.LR_DECAYS:
        opt.decay = decay
        step.learning_rate_fn(opt, 10)
    opt.decay = "not_a_decay"
    with pytest.raises(ValueError):
        step.learning_rate_fn(opt, 10)
    sched = ml_collections.ConfigDict(configuration.base_config().loss.kl_schedule.to_dict())
    for kind in validation.KL_SCHEDULES:
        sched.kind = kind
        step.kl_weight_schedule(sched)
    sched.kind = "not_a_schedule"
    with pytest.raises(ValueError):
        step.kl_weight_schedule(sched)


# ------------------------------------------------------------------------------------------ data files


def _file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_good_text_files_pass_even_with_a_few_undecodable_lines(tmp_path):
    good = _file(tmp_path, "train.txt", b"\xef\xbb\xbfthe cat sat\n\nmary laughed\n")
    assert validation.check_data_spec(good, "data.train") == []
    lines = [b"a line of text"] * 30 + [b"caf\xe9 latin-1"]
    assert validation.check_data_spec(_file(tmp_path, "few_bad.txt", b"\n".join(lines)), "data.train") == []


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: str(p / "nope.txt"), "no such file"),
        (lambda p: str(p), "is a directory"),
        (lambda p: _file(p, "empty.txt", b""), "is empty"),
        (lambda p: _file(p, "blank.txt", b"\n  \n\t\n"), "is empty"),
        (lambda p: _file(p, "nul.bin", b"abc\x00\x01\x02\nmore\n"), "NUL bytes"),
        (lambda p: _file(p, "latin1.txt", b"\n".join([b"caf\xe9 cr\xe8me"] * 20)), "not valid UTF-8"),
    ],
)
def test_bad_data_files_are_refused(tmp_path, make, expected):
    path = make(tmp_path)
    problems = validation.check_data_spec(path, "data.eval")
    assert len(problems) == 1 and problems[0].startswith(f"data.eval={path!r}: ") and expected in problems[0]
    assert "give" in problems[0]  # the fix


def test_a_missing_column_is_refused(tmp_path):
    path = _file(tmp_path, "tsv.txt", b"1\tthe cat sat\n2\tmary laughed\n")
    assert validation.check_data_spec(path, "data.train", column=1) == []
    problems = validation.check_data_spec(path, "data.train", column=2)
    assert "2 tab-separated column(s)" in problems[0] and "data.column=2" in problems[0]


def test_reader_specs_are_parsed_and_their_data_left_to_their_readers(tmp_path):
    for spec in ("tfds:not_there/x:valid", "synthetic:10", "synthetic:10:3"):
        assert validation.check_data_spec(spec, "data.train") == []
    bad = {
        "synthetic:0": "N >= 1",
        "synthetic:ten": "bad synthetic spec",
        "synthetic:5:-1": "SEED >= 0",
        "tfds:": "bad TFDS spec",
        "tfds:a/b/c:train": "bad TFDS spec",
        "prepared:/no/such/dir": "does not exist; prepare it with: python -m flax_textvae.data.prepare",
        f"prepared:{tmp_path}": "is not a (completely) prepared data set",
    }
    for spec, needle in bad.items():
        (problem,) = validation.check_data_spec(spec, "data.eval")
        assert problem.startswith(f"data.eval={spec!r}: ") and needle in problem, problem


def test_data_files_of_the_config_are_checked_and_can_be_skipped(tmp_path):
    config = tiny_dict()
    put(config, "data.train", str(tmp_path / "train.txt"))
    put(config, "data.eval", _file(tmp_path, "valid.bin", b"\x00\x00"))
    problems, _ = problems_of(config)
    assert [p.split("=")[0] for p in problems] == ["data.train", "data.eval"]
    validation.validate(config, check_data=False)


def test_train_and_evaluate_refuses_a_bad_config_before_writing(tmp_path):
    config = configuration.with_overrides(tiny.get_config(), **{"vae.pooling": "avg", "data.max_length": 1})
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match="vae.pooling"):
        train.train_and_evaluate(config, str(workdir))
    assert not os.path.exists(workdir)


def test_every_base_config_field_has_a_comment():
    comments = configuration.field_comments()
    leaves = configuration.describe(configuration.base_config()).splitlines()
    fields = [line.split(" = ")[0] for line in leaves if not line.startswith("#")]
    assert fields and all(f in comments and comments[f] for f in fields), set(fields) - set(comments)
    assert comments["vae.latent_size"] == "size of z"
