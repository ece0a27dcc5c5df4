"""Config: presets, overrides, types, and validation before any model is loaded."""

import pytest

import ddpo_lite.trainer as trainer
from ddpo_lite.config import ConfigError, list_presets, load_config, parse_override, to_toml
from ddpo_lite.evaluate import read_prompt_file
from ddpo_lite.shapes import all_captions


def test_tiny_preset_and_overrides():
    config = load_config(
        "tiny", ["train.learning_rate=1e-4", "sample.num_steps=7", "prompts.prompts=['x']"]
    )
    assert config.preset == "tiny"
    assert config.train.learning_rate == 1e-4 and config.sample.num_steps == 7
    assert config.prompts.prompts == ["x"]
    assert "tiny" in list_presets()


def test_resolved_toml_round_trips(tmp_path):
    config = load_config("tiny", ["train.clip_range=0.05"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(config))
    again = load_config(str(path))
    assert again == config


def test_override_parsing():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=hello world") == {"a": "hello world"}  # bare string fallback
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("novalue")


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.timestep_fraction=0", "train.timestep_fraction"),
        ("train.timestep_fraction=1.5", "train.timestep_fraction"),
        ("train.first_steps=-1", "train.first_steps"),
        ("sample.group_size=3", "sample.group_size"),
        ("sample.group_size=0", "sample.group_size"),
        ("sample.num_steps=0", "sample.num_steps"),
        ("sample.eta=-0.1", "sample.eta"),
        ("sample.guidance_scale=-1", "sample.guidance_scale"),
        ("sample.batch_size=0", "sample.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.gradient_accumulation=0", "train.gradient_accumulation"),
        ("train.algorithm='ppo'", "train.algorithm"),
        ("memory.attention='flash'", "memory.attention"),
        ("sample.eta=0", "sample.eta"),  # deterministic sampler: no log-prob for ddpo-is
        ("sample.eta=1.5", "sample.eta"),  # above 1: no longer a DDIM step
        ("reward.url='localhost:8123'", "reward.url"),
        ("reward.url='ftp://host:1'", "reward.url"),
        ("reward.url='http://'", "reward.url"),
        ("model.max_sequence_length=-2", "model.max_sequence_length"),  # -1 is the default's
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    message = str(err.value)
    assert field in message
    assert "expected" in message or "needs" in message or "http://HOST:PORT" in message


def test_every_preset_loads_with_no_stale_figures_in_its_description():
    """Every shipped preset (found from the list, so a new one is covered) loads and validates;
    its one-line description carries no memory figure (those come from the estimate)."""
    import re
    import tomllib

    from ddpo_lite.config import preset_path

    names = list_presets()
    assert len(names) >= 9
    for name in names:
        config = load_config(name)
        assert config.preset == name
        description = tomllib.loads(preset_path(name).read_text())["description"]
        assert description and not re.search(r"\d+(\.\d+)?\s*(GiB|MiB|GB predicted)", description)
        assert "predicted" not in description, (name, description)


def test_wandb_without_wandb_installed_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"wandb is not installed.*ddpo-lite\[wandb\]"):
        load_config("tiny", ['log_with=["wandb"]'])
    assert load_config("tiny", ['log_with=["tensorboard"]']).log_with == ["tensorboard"]
    assert load_config("tiny", ["reward.url='https://scorer:8123'"]).reward.url


def test_range_is_in_the_message():
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        load_config("tiny", ["train.timestep_fraction=2"])


def test_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match="train.learning_rat"):
        load_config("tiny", ["train.learning_rat=1"])
    with pytest.raises(ConfigError, match="sample.num_steps.*wrong type"):
        load_config("tiny", ["sample.num_steps='many'"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_invalid_config_fails_before_any_model_loads(monkeypatch, tmp_path):
    config = load_config("tiny")
    config.train.timestep_fraction = 0.0  # made invalid after loading, as an API user might
    config.output_dir = str(tmp_path / "run")

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before validation")

    monkeypatch.setattr(trainer, "load_pipeline", must_not_load)
    with pytest.raises(ConfigError, match="train.timestep_fraction"):
        trainer.train(config)
    assert not (tmp_path / "run").exists()


def test_cli_reports_config_errors_without_traceback(capsys):
    from ddpo_lite.cli import main

    code = main(["train", "--preset", "tiny", "--set", "sample.num_steps=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "sample.num_steps" in err and "Traceback" not in err


def test_shapes_alignment_preset_loads_with_its_files():
    config = load_config("shapes-alignment").validate()
    assert config.model.name == "shapes" and config.sample.group_size == 4
    assert config.sample.batch_size % config.sample.group_size == 0
    train = read_prompt_file(config.prompts.file)
    heldout = read_prompt_file(config.eval.prompts["heldout"])
    assert read_prompt_file(config.eval.prompts["train"]) == train
    assert len(train) == len(heldout) == 24 and not set(train) & set(heldout)
    assert set(train) | set(heldout) <= set(all_captions())  # captions the model was trained on


def test_text_tokens_are_refused_for_a_clip_only_family_before_the_model_loads():
    """model.max_sequence_length sets the flow families' T5 / Qwen3 tokens: with model.family
    'sd1' or 'sdxl' (CLIP's 77, fixed) it is refused at validation; -1 is the default."""
    assert load_config("tiny").model.max_sequence_length == -1
    for family in ("sd1", "sdxl"):
        with pytest.raises(ConfigError, match=f"model.family = '{family}'.*CLIP's 77.*-1"):
            load_config("tiny", [f"model.family='{family}'", "model.max_sequence_length=128"])
    tokens = load_config("tiny", ["model.family='flux'", "model.max_sequence_length=128"])
    assert tokens.model.max_sequence_length == 128
