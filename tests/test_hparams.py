"""PruningHParams: TF defaults, tf.HParams.parse, dict round trip and every validation.

Run: pytest tests/test_hparams.py
"""

import contextlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lit_prune import HParamsError, PruningHParams, get_pruning_hparams


def test_defaults_are_tf_r115():
    hp = get_pruning_hparams()
    assert hp.name == "model_pruning"
    assert (hp.begin_pruning_step, hp.end_pruning_step) == (0, -1)
    assert hp.weight_sparsity_map == [] and hp.block_dims_map == []
    assert hp.threshold_decay == 0.0 and hp.pruning_frequency == 10 and hp.nbins == 256
    assert (hp.block_height, hp.block_width, hp.block_pooling_function) == (1, 1, "AVG")
    assert (hp.initial_sparsity, hp.target_sparsity) == (0.0, 0.5)
    assert (hp.sparsity_function_begin_step, hp.sparsity_function_end_step) == (0, 100)
    assert hp.sparsity_function_exponent == 3.0 and hp.use_tpu is False
    assert hp.prune_option == "weight" and hp.gradient_decay_rate == 0.99


def test_parse_like_tf_hparams():
    hp = get_pruning_hparams()
    out = hp.parse("target_sparsity=0.9,weight_sparsity_map=[conv1:0.8,fc.*:0.95],name=cifar10_pruning")
    assert out.target_sparsity == 0.9 and out.name == "cifar10_pruning"
    assert out.weight_sparsity_map == ["conv1:0.8", "fc.*:0.95"]
    assert out is not hp and hp == get_pruning_hparams()  # a new object: whoever holds `hp` never sees it change


def test_parse_examples_cli_string():
    hp = get_pruning_hparams().parse(
        "name=cifar10_pruning,begin_pruning_step=10000,end_pruning_step=100000,target_sparsity=0.9,"
        "sparsity_function_begin_step=10000,sparsity_function_end_step=100000"
    )
    assert (hp.begin_pruning_step, hp.end_pruning_step, hp.sparsity_function_end_step) == (10000, 100000, 100000)


def test_ints_accepted_for_float_fields_and_bools_parse():
    hp = PruningHParams().parse("initial_sparsity=0,sparsity_function_exponent=2,use_tpu=true,block_dims_map=[a:4x4]")
    assert hp.initial_sparsity == 0.0 and isinstance(hp.initial_sparsity, float)
    assert hp.sparsity_function_exponent == 2.0 and hp.use_tpu is True
    assert PruningHParams(initial_sparsity=0.1).initial_sparsity == 0.1  # TF r1.11 rejected this


def test_maps_as_lists_or_mappings():
    a = PruningHParams(weight_sparsity_map={"conv1": 0.8, "fc.*": 0.95}, block_dims_map={"fc1": "4x4", "fc2": [1, 16]})
    assert a.weight_sparsity_map == ["conv1:0.8", "fc.*:0.95"]
    assert a.block_dims_map == ["fc1:4x4", "fc2:1x16"]
    b = PruningHParams(weight_sparsity_map=["conv1:0.8", "fc.*:0.95"])
    assert a.weight_sparsity_map == b.weight_sparsity_map
    assert PruningHParams(weight_sparsity_map=[""]).weight_sparsity_map == [""]  # TF's default ['']


def test_regex_with_colon_is_split_on_last_colon():
    assert PruningHParams(weight_sparsity_map=["a(?:b):0.5"]).weight_sparsity_map == ["a(?:b):0.5"]


def test_dict_round_trip():
    hp = PruningHParams(target_sparsity=0.9, weight_sparsity_map={"fc": 0.5}, block_height=4)
    d = hp.to_dict()
    assert isinstance(d, dict) and d["weight_sparsity_map"] == ["fc:0.5"]
    assert PruningHParams.from_dict(d) == hp
    assert PruningHParams(**d) == hp


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_sparsity": 1.0}, r"`target_sparsity` must be a float in \[0, 1\), got 1.0"),
        ({"target_sparsity": -0.1}, r"`target_sparsity` must be a float in \[0, 1\)"),
        ({"initial_sparsity": 1.5}, r"`initial_sparsity` must be a float in \[0, 1\)"),
        ({"threshold_decay": 1.0}, r"`threshold_decay` must be a float in \[0, 1\)"),
        ({"gradient_decay_rate": 1.0}, r"`gradient_decay_rate` must be a float in \[0, 1\)"),
        ({"target_sparsity": math.nan}, r"`target_sparsity` must be a float \(not NaN\)"),
        ({"target_sparsity": "abc"}, r"`target_sparsity` must be a float, got 'abc'"),
        ({"begin_pruning_step": -1}, r"`begin_pruning_step` must be an int >= 0"),
        ({"begin_pruning_step": 10, "end_pruning_step": 5}, r"pruning must begin before it can end"),
        ({"begin_pruning_step": 10, "end_pruning_step": 10}, r"pruning must begin before it can end"),
        ({"end_pruning_step": -5}, r"pruning must begin before it can end"),
        ({"sparsity_function_begin_step": -1}, r"`sparsity_function_begin_step` must be an int >= 0"),
        ({"sparsity_function_begin_step": 100}, r"`sparsity_function_begin_step`=100 must be < "),
        ({"sparsity_function_exponent": 0}, r"`sparsity_function_exponent` must be a finite float > 0"),
        ({"pruning_frequency": 0}, r"`pruning_frequency` must be an int > 0, got 0"),
        ({"pruning_frequency": 2.5}, r"`pruning_frequency` must be an int, got 2.5"),
        ({"nbins": 0}, r"`nbins` must be an int > 0, got 0"),
        ({"nbins": -3}, r"`nbins` must be an int > 0"),
        ({"block_height": 0}, r"`block_height` must be an int >= 1, or -1"),
        ({"block_width": -2}, r"`block_width` must be an int >= 1, or -1"),
        ({"block_pooling_function": "MEAN"}, r"`block_pooling_function` must be one of \['AVG', 'MAX'\], got 'MEAN'"),
        ({"block_pooling_function": "avg"}, r"`block_pooling_function` must be one of"),
        ({"threshold_method": "topk"}, r"`threshold_method` must be one of \['histogram', 'exact'\]"),
        ({"prune_option": "compression"}, r"`prune_option` must be one of \['weight'"),
        ({"use_tpu": "yes"}, r"`use_tpu` must be a bool"),
        ({"begin_pruning_step": True}, r"`begin_pruning_step` must be an int"),
        ({"name": ""}, r"`name` must be a non-empty string"),
        ({"weight_sparsity_map": ["conv1"]}, r"`weight_sparsity_map` entry 'conv1' is malformed; expected 'regex:"),
        ({"weight_sparsity_map": ["conv1:"]}, r"`weight_sparsity_map` entry 'conv1:' is malformed"),
        ({"weight_sparsity_map": [":0.5"]}, r"`weight_sparsity_map` entry ':0.5' is malformed"),
        ({"weight_sparsity_map": ["conv1:abc"]}, r"sparsity must be a float in \[0, 1\), got 'abc'"),
        ({"weight_sparsity_map": ["conv1:1.0"]}, r"sparsity must be a float in \[0, 1\), got 1.0"),
        ({"weight_sparsity_map": ["conv1:-0.5"]}, r"sparsity must be a float in \[0, 1\), got -0.5"),
        ({"weight_sparsity_map": ["conv1:nan"]}, r"sparsity must be a float in \[0, 1\), got nan"),
        ({"weight_sparsity_map": ["conv[1:0.5"]}, r"'conv\[1' is not a valid regular expression"),
        ({"weight_sparsity_map": ["a:0.5", "a:0.6"]}, r"`weight_sparsity_map` names the regex 'a' twice"),
        ({"weight_sparsity_map": 0.5}, r"`weight_sparsity_map` must be a list of 'regex:value' strings"),
        ({"block_dims_map": ["fc:4"]}, r"`block_dims_map` entry 'fc:4': block dims must be 'HxW'"),
        ({"block_dims_map": ["fc:4X4"]}, r"block dims must be 'HxW'"),
        ({"block_dims_map": ["fc:0x4"]}, r"block dims must be 'HxW' with H and W ints >= 1 or -1"),
        ({"block_dims_map": ["fc:4x4x4"]}, r"block dims must be 'HxW'"),
        ({"prune_patterns": ["(unclosed"]}, r"`prune_patterns`: '\(unclosed' is not a valid regular expression"),
        ({"exclude_patterns": "fc"}, None),  # a single string is accepted as a one-item list
    ],
)
def test_bad_values_are_named(kwargs, match):
    if match is None:
        assert PruningHParams(**kwargs).exclude_patterns == ["fc"]
        return
    with pytest.raises(HParamsError, match=match):
        PruningHParams(**kwargs)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("target_sparsty=0.9", r"unknown pruning hparam 'target_sparsty'; accepted: \['name'"),
        ("target_sparsity=0.9,target_sparsity=0.8", r"'target_sparsity' is given twice"),
        ("target_sparsity", r"malformed hparams string"),
        ("weight_sparsity_map=[a:0.5", r"unterminated '\['"),
        ("target_sparsity=2", r"`target_sparsity` must be a float in \[0, 1\)"),
        ("=0.5", r"malformed hparams string"),
    ],
)
def test_parse_errors(text, match):
    hp = PruningHParams()
    with pytest.raises(HParamsError, match=match):
        hp.parse(text)
    assert hp == PruningHParams()  # unchanged on error


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(HParamsError, match=r"unknown pruning hparam\(s\) \['foo'\]"):
        PruningHParams.from_dict({"foo": 1})


def test_errors_are_value_errors():
    with pytest.raises(ValueError, match="target_sparsity"):
        PruningHParams(target_sparsity=2)


@given(st.text(max_size=60))
def test_parse_never_crashes_with_anything_but_hparams_error(text):
    with contextlib.suppress(HParamsError):
        PruningHParams().parse(text)


@given(st.lists(st.text(max_size=20), max_size=5))
def test_map_entries_never_crash_with_anything_but_hparams_error(entries):
    with contextlib.suppress(HParamsError):
        PruningHParams(weight_sparsity_map=entries)
    with contextlib.suppress(HParamsError):
        PruningHParams(block_dims_map=entries)


def test_parse_keeps_commas_and_brackets_inside_list_entries():
    hp = PruningHParams().parse("prune_patterns=[fc{1,2},conv[0-9]],weight_sparsity_map=[layer[0-9]:0.5,(a,b|c):0.7]")
    assert hp.prune_patterns == ["fc{1,2}", "conv[0-9]"]
    assert hp.weight_sparsity_map == ["layer[0-9]:0.5", "(a,b|c):0.7"]


@pytest.mark.parametrize(
    ("text", "field", "what"),
    [
        ("prune_patterns=[conv[0-9]", "prune_patterns", r"unterminated '\['"),
        ("prune_patterns=[a(b]", "prune_patterns", r"'\]' closes '\('"),
        ("exclude_patterns=[a{1,2]", "exclude_patterns", r"'\]' closes '\{'"),
        ("weight_sparsity_map=[layer[0-9:0.5]", "weight_sparsity_map", r"unterminated '\['"),
        ("name=a(b,target_sparsity=0.9", "name", r"unbalanced '\(' \(never closed\)"),
        ("name=a)b", "name", r"unbalanced '\)'"),
    ],
)
def test_unbalanced_brackets_name_the_field_and_how_to_write_the_entry(text, field, what):
    with pytest.raises(HParamsError, match=rf"^`{field}`: {what}.*escape a literal one with a backslash"):
        PruningHParams().parse(text)


def test_escaped_brackets_and_commas_stay_in_the_entry_verbatim():
    hp = PruningHParams().parse(r"prune_patterns=[conv\[,a\,b,(x\)y)],weight_sparsity_map=[fc\{:0.5]")
    assert hp.prune_patterns == [r"conv\[", r"a\,b", r"(x\)y)"]
    assert hp.weight_sparsity_map == [r"fc\{:0.5"]


def test_list_fields_given_as_one_string_split_like_the_grammar():
    assert PruningHParams(prune_patterns="fc{1,2},conv").prune_patterns == ["fc{1,2}", "conv"]
    assert PruningHParams(prune_patterns="[fc{1,2}, conv]").prune_patterns == ["fc{1,2}", "conv"]
    assert PruningHParams(exclude_patterns="[ab]c").exclude_patterns == ["[ab]c"]  # not an outer list
    assert PruningHParams(weight_sparsity_map="layer[0-9]:0.5,fc:0.7").weight_sparsity_map == [
        "layer[0-9]:0.5",
        "fc:0.7",
    ]
    with pytest.raises(HParamsError, match=r"`prune_patterns`: .*backslash"):
        PruningHParams(prune_patterns="fc{1,2")


# Regexes with nested (), [] and {} holding commas, and escaped brackets: what TF's grammar split apart.
_ATOM = st.sampled_from(["a", "b", "x", "0", "9", "_", "-", ".", ".*", r"\[", r"\]", r"\(", r"\)", r"\{", r"\}", r"\,"])
_CLASS = st.text(alphabet="abz09,._", min_size=1, max_size=4).map(lambda s: f"[{s}]")


def _nest(inner):
    return st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: "(" + ",".join(xs) + ")"),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: "(?:" + "|".join(xs) + ")"),
        st.tuples(inner, st.integers(0, 2), st.integers(2, 4)).map(lambda t: f"(?:{t[0]}){{{t[1]},{t[2]}}}"),
        st.lists(inner, min_size=1, max_size=3).map("".join),
    )


REGEXES = st.recursive(st.one_of(_ATOM, _CLASS), _nest, max_leaves=8)


@given(st.lists(REGEXES, max_size=4, unique=True))
def test_regex_lists_with_nested_brackets_round_trip_through_parse(patterns):
    text = "prune_patterns=[{}],weight_sparsity_map=[{}]".format(
        ",".join(patterns), ",".join(f"{p}:0.5" for p in patterns)
    )
    hp = PruningHParams().parse(text)
    assert hp.prune_patterns == patterns
    assert hp.weight_sparsity_map == [f"{p}:0.5" for p in patterns]
    assert PruningHParams().parse(hp.to_string()) == hp


@given(REGEXES, st.sampled_from("([{"), st.integers(0, 40))
def test_an_unclosed_bracket_anywhere_is_an_hparams_error_naming_the_field(pattern, bracket, at):
    at = min(at, len(pattern))
    broken = pattern[:at] + bracket + pattern[at:]
    head = pattern[:at]
    if (len(head) - len(head.rstrip("\\"))) % 2:  # inserted right after a backslash: escaped, so balanced
        return
    with pytest.raises(HParamsError, match=r"`exclude_patterns`: .*backslash"):
        PruningHParams().parse(f"exclude_patterns=[{broken}]")


def test_to_string_round_trips_every_field():
    hp = PruningHParams(
        name="run[1]",
        target_sparsity=0.9,
        weight_sparsity_map={"fc{1,2}": 0.5},
        block_dims_map={"conv": [4, 4]},
        nm_sparsity="2:4",
        use_tpu=True,
        threshold_method="exact",
    )
    assert PruningHParams().parse(hp.to_string()) == hp
    with pytest.raises(HParamsError, match=r"`prune_patterns`: 'a,b' cannot be written"):
        PruningHParams(prune_patterns=["a,b"]).to_string()


def test_coerce_is_the_one_entry_point():
    from omegaconf import OmegaConf

    assert PruningHParams.coerce(None) == PruningHParams()
    hp = PruningHParams(nbins=64)
    assert PruningHParams.coerce(hp) is hp
    assert PruningHParams.coerce(hp, nbins=32).nbins == 32 and hp.nbins == 64
    assert PruningHParams.coerce({"target_sparsity": 0.9}).target_sparsity == 0.9
    assert PruningHParams.coerce("target_sparsity=0.9,prune_patterns=[fc{1,2}]").prune_patterns == ["fc{1,2}"]
    cfg = OmegaConf.create(
        {
            "target_sparsity": 0.8,
            "weight_sparsity_map": {"fc": 0.5},
            "block_dims_map": {"conv": [4, 4]},
            "prune_patterns": ["fc", "conv"],
        }
    )
    spec = PruningHParams.coerce(cfg, exclude_patterns=OmegaConf.create(["bias"]))
    assert spec.weight_sparsity_map == ["fc:0.5"] and spec.block_dims_map == ["conv:4x4"]
    assert type(spec.prune_patterns) is list and spec.prune_patterns == ["fc", "conv"]
    assert type(spec.exclude_patterns) is list and spec.exclude_patterns == ["bias"]
    assert PruningHParams(prune_patterns=OmegaConf.create(["fc"])).prune_patterns == ["fc"]
    with pytest.raises(HParamsError, match=r"`hparams` must be a PruningHParams, a mapping or a 'name=value,...' "):
        PruningHParams.coerce(0.5)
    with pytest.raises(HParamsError, match=r"unknown pruning hparam\(s\) \['foo'\]"):
        PruningHParams.coerce({"foo": 1})
    with pytest.raises(HParamsError, match=r"unknown pruning hparam 'foo'"):
        PruningHParams.coerce("foo=1")
