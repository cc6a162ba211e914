"""Config loading: strict keys and types, layout checks before any rank starts, shipped shapes."""

from pathlib import Path

import pytest

from megatron_longact.config import ConfigError, parse_overrides
from megatron_longact.run_config import load_run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO = CONFIGS / "demo_cpu.yaml"


def test_demo_config_loads_and_overrides_apply():
    cfg = load_run_config(DEMO, ["train.steps=3", "train.lr=1e-4", "parallel.tensor_model_parallel_size=2"])
    assert cfg.train.steps == 3 and cfg.train.lr == 1e-4
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.model.num_layers == 4  # from the included model file


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"unknown config key train\.stepz"):
        load_run_config(DEMO, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key bogus"):
        load_run_config(DEMO, ["bogus.x=1"])


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"train\.steps: got str 'ten', expected an integer"):
        load_run_config(DEMO, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"model\.qk_layernorm: .*expected true or false"):
        load_run_config(DEMO, ["model.qk_layernorm=3"])
    with pytest.raises(ConfigError, match=r"model\.family: got 'gpt2'"):
        load_run_config(DEMO, ["model.family=gpt2"])


def test_value_checks():
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        load_run_config(DEMO, ["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match=r"model\.num_query_groups"):
        load_run_config(DEMO, ["model.num_query_groups=3"])
    # Responses that never stop at EOS are all overlong: DAPO's overlong shaping would treat
    # every one of them alike, so the combination is refused.
    for shaping in ("rl.overlong_filter=true", "rl.overlong_buffer=2"):
        with pytest.raises(ConfigError, match=r"rl\.ignore_eos: .*rl\.overlong_"):
            load_run_config(DEMO, ["rl.ignore_eos=true", shaping])
        load_run_config(DEMO, [shaping])


def test_layout_product_must_match_world_size():
    cfg = load_run_config(DEMO, ["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        cfg.check_layout(3)
    cfg = load_run_config(DEMO, ["parallel.data_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"parallel\.data_parallel_size: got 4.*gives 2"):
        cfg.check_layout(2)


def test_heads_and_layers_must_divide():
    cfg = load_run_config(DEMO, ["parallel.tensor_model_parallel_size=8",
                                 "model.make_vocab_size_divisible_by=128"])
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size: 8 does not divide model\.num_attention_heads=4"):
        cfg.check_layout(8)
    cfg = load_run_config(DEMO, ["parallel.pipeline_model_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"pipeline_model_parallel_size: 3 does not divide model\.num_layers=4"):
        cfg.check_layout(3)
    cfg = load_run_config(DEMO, ["train.mode=lm", "train.global_batch_size=6", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: 6 is not a multiple"):
        cfg.check_layout(4)
    cfg = load_run_config(DEMO, ["rl.prompts_per_step=6"])
    with pytest.raises(ConfigError, match=r"rl\.prompts_per_step: 6 is not a multiple of the data-parallel size 4"):
        cfg.check_layout(4)


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=true", "d=x", "e=1e-5"]) == {
        "a": {"b": 1, "c": True}, "d": "x", "e": "1e-5"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


def test_float_fields_accept_yaml_exponent_strings():
    cfg = load_run_config(DEMO, ["train.lr=1e-5"])
    assert cfg.train.lr == 1e-5


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_run_config("does-not-exist.yaml")


@pytest.mark.parametrize("name,params_b", [
    ("qwen3_4b", 4.02), ("qwen3_8b", 8.19), ("llama3_70b", 70.55), ("qwen2_5_7b", 7.62)])
def test_shipped_model_shapes(name, params_b):
    """Parameter counts of the shipped shapes match the published sizes (to 0.01 B; our count
    uses the vocabulary padded to a multiple of 128)."""
    cfg = load_run_config(CONFIGS / "model" / f"{name}.yaml")
    assert abs(cfg.model.num_parameters() / 1e9 - params_b) < 0.01, cfg.model.num_parameters()
