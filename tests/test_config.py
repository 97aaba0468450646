"""Recipes: defaults, YAML files with dotted overrides, and one-line errors that name the key."""

from pathlib import Path

import pytest

from llmforge.align.sft import SFTConfig
from llmforge.config import (
    ConfigError,
    ExportConfig,
    Recipe,
    build,
    load_recipe,
    to_dict,
    validate,
)
from llmforge.model.config import ModelConfig
from llmforge.train.loop import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "src" / "llmforge" / "recipes").glob("*.yaml"))

RECIPE = """\
name: exp
run_dir: somewhere
model:
  dim: 64
  n_heads: 4
  n_kv_heads: 2
  max_seq_len: 256
train:
  seq_len: 64
  lr: 3e-4
  max_steps: 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def config_error(path: Path | None = None, overrides: tuple[str, ...] = ()) -> str:
    """The message of the ConfigError that loading raises; it must be a single line."""
    with pytest.raises(ConfigError) as info:
        load_recipe(path, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# ---- loading ---------------------------------------------------------------------------------


def test_defaults_load_without_a_file():
    recipe = load_recipe(None)
    assert recipe == Recipe()
    assert recipe.train == TrainConfig()
    assert recipe.sft == SFTConfig()
    assert recipe.sft.train.max_steps == 200  # SFT has its own training defaults
    assert recipe.root == Path("runs") / "demo"


def test_empty_file_gives_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "")) == Recipe()
    assert load_recipe(write(tmp_path, "# only a comment\n")) == Recipe()


def test_yaml_file_values(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE))
    assert recipe.name == "exp"
    assert recipe.root == Path("somewhere") / "exp"
    assert recipe.model.dim == 64 and recipe.model.max_seq_len == 256
    assert recipe.model.n_layers == ModelConfig().n_layers  # untouched fields keep defaults
    # YAML 1.1 reads `3e-4` (no dot) as a string; a float field still gets a float.
    assert recipe.train.lr == 3e-4 and type(recipe.train.lr) is float
    assert recipe.train.max_steps == 10
    assert recipe.sft == SFTConfig()


def test_dotted_overrides(tmp_path):
    recipe = load_recipe(
        write(tmp_path, RECIPE),
        [
            "train.lr=5e-4",
            "model.n_layers=6",
            "sft.train.max_steps=5",
            "eval.prompts=[a,b]",
            "stages=[data, tokenizer]",
            "name=other",
        ],
    )
    assert recipe.train.lr == 5e-4 and type(recipe.train.lr) is float
    assert recipe.model.n_layers == 6 and type(recipe.model.n_layers) is int
    assert recipe.model.dim == 64  # siblings from the file survive an override
    assert recipe.train.max_steps == 10
    assert recipe.sft.train.max_steps == 5
    assert recipe.eval.prompts == ["a", "b"]
    assert recipe.stages == ["data", "tokenizer"]
    assert recipe.name == "other"


def test_partial_sft_train_section_keeps_the_sft_defaults():
    recipe = load_recipe(None, ["sft.train.max_steps=5"])
    expected = SFTConfig().train
    assert recipe.sft.train.max_steps == 5
    assert recipe.sft.train.lr == expected.lr == 1e-3
    assert recipe.sft.train.warmup_steps == expected.warmup_steps
    assert recipe.sft.train.eval_every == expected.eval_every
    assert recipe.sft.train.ckpt_every == expected.ckpt_every


def test_overrides_without_a_file():
    recipe = load_recipe(None, ["train.lr=3e-4", "sft.train.max_steps=5"])
    assert recipe.train.lr == 3e-4 and type(recipe.train.lr) is float
    assert recipe.sft.train.max_steps == 5
    assert recipe.model == ModelConfig()


def test_later_override_wins_and_value_may_contain_equals():
    recipe = load_recipe(None, ["train.max_steps=5", "train.max_steps=7", "name=a=b"])
    assert recipe.train.max_steps == 7
    assert recipe.name == "a=b"


def test_int_given_for_float_becomes_float():
    recipe = load_recipe(None, ["train.lr=1"])
    assert recipe.train.lr == 1.0 and type(recipe.train.lr) is float


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert type(recipe.train.lr) is float
    assert recipe.train.seq_len <= recipe.model.max_seq_len
    assert recipe.sft.train.seq_len <= recipe.model.max_seq_len


def test_packaged_recipes_match_the_repository_copies():
    assert len(SHIPPED) >= 4
    for packaged in SHIPPED:
        assert packaged.read_text() == (REPO / "recipes" / packaged.name).read_text()


def test_shipped_recipe_accepts_overrides():
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml", ["train.max_steps=3", "data.max_docs=7"])
    assert recipe.train.max_steps == 3
    assert recipe.data.max_docs == 7
    assert recipe.model.dim == 64  # from the file


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path):
    message = config_error(write(tmp_path, "nmae: typo\n"))
    assert "'nmae'" in message and "name" in message  # lists the valid keys
    assert "'bogus'" in config_error(None, ("bogus=1",))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=1", "train.lrr"),
        ("sft.train.lrr=1", "sft.train.lrr"),
        ("model.dims=4", "model.dims"),
        ("sft.bogus.x=1", "sft.bogus"),
    ],
)
def test_unknown_nested_key_names_the_full_dotted_key(override, key):
    message = config_error(None, (override,))
    assert f"unknown key '{key}'" in message


def test_unknown_nested_key_in_file(tmp_path):
    message = config_error(write(tmp_path, "sft:\n  train:\n    max_stpes: 3\n"))
    assert "'sft.train.max_stpes'" in message
    assert "max_steps" in message


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.max_steps=abc", "train.max_steps", "'abc'"),
        ("train.max_steps=true", "train.max_steps", "True"),  # bool is not an int here
        ("train.max_steps=2.5", "train.max_steps", "2.5"),
        ("train.lr=true", "train.lr", "True"),
        ("train.lr=fast", "train.lr", "'fast'"),
        ("sft.train.batch_size=big", "sft.train.batch_size", "'big'"),
        ("model.tie_embeddings=1", "model.tie_embeddings", "1"),
        ("name=[a]", "name", "['a']"),
        ("eval.prompts=abc", "eval.prompts", "'abc'"),
        ("stages=[data, 3]", "stages[1]", "3"),
    ],
)
def test_wrong_type_names_key_and_value(override, key, value):
    message = config_error(None, (override,))
    assert message.startswith(f"{key}: expected"), message
    assert value in message


def test_section_given_a_scalar():
    message = config_error(None, ("train=5",))
    assert message.startswith("train:") and "mapping" in message


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = config_error(missing)
    assert "not found" in message and str(missing) in message
    assert "not found" in config_error(tmp_path)  # a directory is not a recipe file


def test_malformed_yaml_is_a_config_error(tmp_path):
    path = write(tmp_path, "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_malformed_yaml_message_is_one_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: [1, 2\n")
    message = config_error(path)
    assert str(path) in message and "at line " in message and "\n" not in message


def test_recipe_must_be_a_mapping(tmp_path):
    assert "mapping" in config_error(write(tmp_path, "- data\n- tokenizer\n"))


@pytest.mark.parametrize("override", ["train.lr", "=5", ""])
def test_override_without_key_and_equals(override):
    message = config_error(None, (override,))
    assert repr(override) in message and "section.key=value" in message


def test_override_into_a_scalar_is_rejected(tmp_path):
    message = config_error(write(tmp_path, "name: x\n"), ("name.sub=1",))
    assert "name.sub" in message and "not a section" in message


def test_malformed_override_value_is_a_config_error():
    message = config_error(None, ("eval.prompts=[a, b",))
    assert "eval.prompts" in message


# ---- cross-field validation ------------------------------------------------------------------


@pytest.mark.parametrize("section", ["train", "sft.train", "eval"])
def test_seq_len_longer_than_the_model(section):
    message = config_error(None, (f"{section}.seq_len=513",))
    assert message == f"{section}.seq_len=513 exceeds model.max_seq_len=512"


def test_seq_len_equal_to_max_is_fine():
    recipe = load_recipe(None, ["model.max_seq_len=128", "train.seq_len=128",
                                "sft.train.seq_len=128", "eval.seq_len=128"])
    assert recipe.train.seq_len == recipe.sft.train.seq_len == recipe.eval.seq_len == 128


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (("model.n_heads=5",), "dim=256 must be divisible by n_heads=5"),
        (("model.n_heads=8", "model.n_kv_heads=3"), "n_heads=8 must be divisible by n_kv_heads=3"),
        (("model.dim=0",), "dim must be > 0"),
        (("model.dim=12", "model.n_heads=4", "model.n_kv_heads=2"), "must be even"),
    ],
)
def test_model_shape_errors(overrides, expected):
    message = config_error(None, overrides)
    assert message.startswith("model: ") and expected in message


def test_unknown_stage_name():
    message = config_error(None, ("stages=[data, pretrian]",))
    assert message.startswith("stages: unknown stage 'pretrian'")
    assert "pretrain" in message  # lists the valid ones


@pytest.mark.parametrize("section", ["train", "sft.train"])
def test_bad_training_dtype(section):
    message = config_error(None, (f"{section}.dtype=fp16",))
    assert message.startswith(f"{section}: dtype") and "'fp16'" in message


def test_bad_export_source():
    assert config_error(None, ("export.source=hf",)).startswith("export: source")


def test_data_step_errors_become_config_errors():
    message = config_error(None, ("data.steps=[clean, {length: {min_chars: many}}]",))
    assert message.startswith("data: ") and "steps[1].length.min_chars" in message
    assert "unknown step 'gopherr'" in config_error(None, ("data.steps=[gopherr]",))
    assert "min_chars" in config_error(None, ("data.steps=[{length: {min_chars: -1}}]",))
    assert "executor" in config_error(None, ("data.executor=spark",))


@pytest.mark.parametrize(
    "override",
    [
        "export.dtype=fp17",  # run_export: getattr(torch, 'fp17') AttributeError after training
        "device=gpu",  # torch.device('gpu') RuntimeError in pretrain
        "model.vocab_size=-5",  # skipped by validate(require_vocab=False), fails in pretrain
        "train.log_every=0",  # ZeroDivisionError (done % 0) at the first training step
        "train.ckpt_every=0",
    ],
)
def test_values_that_fail_later_are_rejected_at_load(override):
    config_error(None, (override,))


# ---- build / validate / to_dict --------------------------------------------------------------


def test_build_checks_keys_and_types():
    assert build(ExportConfig, None, "export") == ExportConfig()
    assert build(ExportConfig, {"dtype": "bfloat16"}, "export") == ExportConfig(dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"^export\.dtype: expected str, got 16$"):
        build(ExportConfig, {"dtype": 16}, "export")
    with pytest.raises(ConfigError, match=r"unknown key 'export\.kind'"):
        build(ExportConfig, {"kind": "x"}, "export")
    with pytest.raises(ConfigError, match=r"^recipe: expected a section"):
        build(Recipe, ["a"], "")


def test_validate_returns_the_recipe_or_raises():
    recipe = Recipe()
    assert validate(recipe) is recipe
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        validate(Recipe(stages=["nope"]))


def test_to_dict_gives_plain_data_that_builds_back():
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    plain = to_dict(recipe)
    assert isinstance(plain["train"], dict) and isinstance(plain["sft"]["train"], dict)
    assert plain["sft"]["train"]["max_steps"] == 60
    assert build(Recipe, plain, "") == recipe
    nested = to_dict({"a": TrainConfig(max_steps=3), "b": 1})
    assert nested["a"]["max_steps"] == 3 and nested["b"] == 1
    assert to_dict([1, 2]) == [1, 2]
