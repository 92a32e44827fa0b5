"""The pass-spec grammar of onnxshrink.pipeline: parse, print back, errors, order rules, the runner."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional

import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxshrink import registry
from onnxshrink.errors import PassFailedError, ShrinkError, SpecError
from onnxshrink.passes.fold import FoldOptions
from onnxshrink.pipeline import Step, check_order, format_pipeline, format_value, parse, run_pipeline
from onnxshrink.registry import PassContext, ShrinkPass, option

# --------------------------------------------------------------------------------------------------
# Throwaway passes, registered for this module only.


@dataclasses.dataclass(frozen=True)
class RtOptions:
    count: int = option(3, "an int")
    scale: float = option(0.5, "a float")
    flag: bool = option(False, "a bool")
    mode: Literal["fast", "slow", "exact"] = option("fast", "a Literal")
    kind: str = option("a", "a str with declared choices", choices=("a", "b", "c"))
    label: str = option("abc", "a bare word")
    limit: Optional[int] = option(None, "an optional int")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


@dataclasses.dataclass(frozen=True)
class BitsOptions:
    bits: Literal[4, 8] = option(8, "an int Literal")


class _Nop(ShrinkPass):
    def run(self, model: ir.Model) -> bool:
        return False


class _Boom(ShrinkPass):
    def run(self, model: ir.Model) -> bool:
        raise RuntimeError("kaboom inside the pass")


class _Counting(ShrinkPass):
    def run(self, model: ir.Model) -> bool:
        self.count("seen", 2)
        self.decline("not today")
        self.decline("not today")
        return True


TEST_PASSES = {
    "tp_rt": (RtOptions, (), type("RtPass", (_Nop,), {})),
    "tp_none": (NoOptions, (), type("NonePass", (_Nop,), {})),
    "tp_alpha": (NoOptions, ("tp_beta",), type("AlphaPass", (_Nop,), {})),
    "tp_beta": (NoOptions, (), type("BetaPass", (_Nop,), {})),
    "tp_bits": (BitsOptions, (), type("BitsPass", (_Nop,), {})),
    "tp_boom": (NoOptions, (), type("BoomPass", (_Boom,), {})),
    "tp_count": (NoOptions, (), type("CountPass", (_Counting,), {})),
}


@pytest.fixture(scope="module", autouse=True)
def test_passes():
    registry.all_passes()  # make sure the built-ins are registered first
    for name, (opts, precede, cls) in TEST_PASSES.items():
        registry.register(name, opts, summary=f"test pass {name}", must_precede=precede)(cls)
    yield
    for name in TEST_PASSES:
        registry.unregister(name)
    assert not any(p.name.startswith("tp_") for p in registry.all_passes())


# --------------------------------------------------------------------------------------------------
# Round trip (property)

_words = st.from_regex(r"[A-Za-z0-9_.+\-]+", fullmatch=True)
_rt_options = st.builds(
    RtOptions,
    count=st.integers(min_value=-(10**15), max_value=10**15),
    scale=st.floats(allow_nan=False, allow_infinity=False),
    flag=st.booleans(),
    mode=st.sampled_from(["fast", "slow", "exact"]),
    kind=st.sampled_from(["a", "b", "c"]),
    label=_words,
    limit=st.none() | st.integers(min_value=-1000, max_value=1000),
)
_fold_options = st.builds(
    FoldOptions,
    constants=st.booleans(),
    noops=st.booleans(),
    fuse_bn=st.booleans(),
    dedup=st.booleans(),
    max_growth=st.integers(min_value=0, max_value=2**40),
    rounds=st.integers(min_value=1, max_value=100),
)
_step = st.one_of(
    _rt_options.map(lambda o: Step("tp_rt", o)),
    st.just(Step("tp_none", NoOptions())),
    _fold_options.map(lambda o: Step("fold", o)),
)
_steps = st.lists(_step, min_size=1, max_size=5)
_ws = st.sampled_from(["", " ", "  ", "\t", "\n", " \t "])


@settings(max_examples=150, deadline=None, database=None)
@given(_steps)
def test_format_then_parse_round_trips(steps):
    text = format_pipeline(steps)
    assert parse(text) == steps
    # canonical form is a fixed point
    assert format_pipeline(parse(text)) == text


@settings(max_examples=80, deadline=None, database=None)
@given(_steps, st.data())
def test_whitespace_anywhere_between_tokens_is_ignored(steps, data):
    def w() -> str:
        return data.draw(_ws)

    parts = []
    for step in steps:
        fields = dataclasses.fields(step.options)
        # a step with no options may also be written with empty parentheses
        if not fields:
            parts.append(w() + step.name + w() + data.draw(st.sampled_from(["", "()", "( )"])) + w())
            continue
        opts = [
            w() + f.name + w() + "=" + w() + format_value(getattr(step.options, f.name)) + w()
            for f in fields
        ]
        parts.append(w() + step.name + w() + "(" + ",".join(opts) + ")" + w())
    assert parse(",".join(parts)) == steps


def test_format_value_spellings():
    assert format_value(True) == "true"
    assert format_value(False) == "false"
    assert format_value(None) == "none"
    assert format_value(0.1) == "0.1"
    assert format_value(1e-20) == "1e-20"
    assert format_value(7) == "7"
    assert format_value("static") == "static"


# --------------------------------------------------------------------------------------------------
# Defaults, typing


def test_defaults_filled_in_and_printed():
    (step,) = parse("tp_rt(count=5)")
    assert step.options == RtOptions(count=5)
    assert step.format() == "tp_rt(count=5,scale=0.5,flag=false,mode=fast,kind=a,label=abc,limit=none)"
    (fold,) = parse("fold")
    assert fold.options == FoldOptions()
    assert format_pipeline(parse("fold")) == (
        "fold(constants=true,noops=true,fuse_bn=true,dedup=true,max_growth=0,rounds=4)"
    )
    assert parse("tp_none") == [Step("tp_none", NoOptions())]
    assert parse("tp_none()") == [Step("tp_none", NoOptions())]
    assert format_pipeline(parse("tp_none")) == "tp_none"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("tp_rt(count=-7)", {"count": -7}),
        ("tp_rt(scale=2)", {"scale": 2.0}),
        ("tp_rt(scale=-1.5e-3)", {"scale": -1.5e-3}),
        ("tp_rt(flag=true)", {"flag": True}),
        ("tp_rt(flag=FALSE)", {"flag": False}),
        ("tp_rt(flag=yes)", {"flag": True}),
        ("tp_rt(flag=0)", {"flag": False}),
        ("tp_rt(mode=slow)", {"mode": "slow"}),
        ("tp_rt(kind=c)", {"kind": "c"}),
        ("tp_rt(label=hello.world-1)", {"label": "hello.world-1"}),
        ("tp_rt(limit=12)", {"limit": 12}),
        ("tp_rt(limit=none)", {"limit": None}),
    ],
)
def test_values_are_typed(spec, expected):
    (step,) = parse(spec)
    assert step.options == RtOptions(**expected)
    for k, v in expected.items():
        assert type(getattr(step.options, k)) is type(v)


def test_scale_given_as_int_is_a_float():
    (step,) = parse("tp_rt(scale=3)")
    assert step.options.scale == 3.0 and isinstance(step.options.scale, float)


# --------------------------------------------------------------------------------------------------
# Syntax errors: column, message, exit code 2


@pytest.mark.parametrize(
    "spec, column, fragment",
    [
        ("", 1, "empty pass spec"),
        ("   ", 1, "empty pass spec"),
        ("(x=1)", 1, "expected a pass name"),
        ("fold,,fold", 6, "expected a pass name"),
        ("a(b)", 4, "expected '=' after option 'b'"),
        ("a(b=)", 5, "expected a value for option 'b'"),
        ("a(b=1", 6, "expected ',' or ')' in the option list"),
        ("a{b=1}", 2, "use parentheses for options, not '{'"),
        ("a[b=1]", 2, "use parentheses for options, not '['"),
        ("a b", 3, "expected ',' between passes"),
        ("fold,", 6, "expected a pass name"),
        ("fold(constants=true,)", 21, "expected an option name"),
        ("fold(constants=true noops=true)", 21, "expected ',' or ')' in the option list"),
        ("fold;quant", 5, "expected ',' between passes"),
    ],
)
def test_syntax_errors_have_column_and_exit_code_2(spec, column, fragment):
    with pytest.raises(SpecError) as exc:
        parse(spec)
    e = exc.value
    assert e.exit_code == 2
    assert isinstance(e, ShrinkError)
    first, *rest = e.message.splitlines()
    assert first == f"bad pass spec at column {column}: {fragment}"
    # the spec is echoed with a caret under the column
    assert rest[-1] == " " * (column - 1) + "^"
    assert "\n".join(rest[:-1]) == spec


def test_syntax_error_hints():
    with pytest.raises(SpecError) as exc:
        parse("")
    assert exc.value.hint == "e.g. --passes fold,quant"
    with pytest.raises(SpecError) as exc:
        parse("fold{fuse_bn=true}")
    assert exc.value.hint == "e.g. prune(ratio=0.3)"
    with pytest.raises(SpecError) as exc:
        parse("fold(fuse_bn)")
    assert exc.value.hint == "write fuse_bn=VALUE"


def test_syntax_checked_before_names():
    # a later syntax error is reported even though the first name is unknown
    with pytest.raises(SpecError, match="column 11: expected ',' or '\\)'"):
        parse("nosuch(a=1")


# --------------------------------------------------------------------------------------------------
# Unknown names and options


def test_unknown_pass_did_you_mean():
    with pytest.raises(SpecError) as exc:
        parse("fodl")
    assert exc.value.message == "unknown pass 'fodl'"
    assert exc.value.hint == "did you mean 'fold'?"
    assert exc.value.exit_code == 2


def test_unknown_pass_without_close_match_lists_known_passes():
    with pytest.raises(SpecError) as exc:
        parse("fold,zzzzzzzz")
    assert exc.value.message == "unknown pass 'zzzzzzzz'"
    assert exc.value.hint.startswith("known passes: ")
    assert "fold" in exc.value.hint.split(": ", 1)[1].split(", ")


def test_unknown_option_did_you_mean():
    with pytest.raises(SpecError) as exc:
        parse("fold(fuse_bm=true)")
    e = exc.value
    assert e.message == "pass 'fold' has no option 'fuse_bm'"
    assert e.hint == "did you mean 'fuse_bn'?"
    assert e.pass_name == "fold" and e.option == "fuse_bm"
    assert e.exit_code == 2


def test_unknown_option_without_close_match_lists_options():
    with pytest.raises(SpecError) as exc:
        parse("tp_rt(qqqqqqqq=1)")
    assert exc.value.hint == "its options: count, scale, flag, mode, kind, label, limit"


def test_option_on_pass_without_options():
    with pytest.raises(SpecError) as exc:
        parse("tp_none(x=1)")
    assert exc.value.message == "pass 'tp_none' has no option 'x'"
    assert exc.value.hint == "pass 'tp_none' takes no options"


# --------------------------------------------------------------------------------------------------
# Bad values


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tp_rt(count=1.5)", "option 'count' of pass 'tp_rt' must be an integer, not '1.5'"),
        ("tp_rt(count=true)", "option 'count' of pass 'tp_rt' must be an integer, not 'true'"),
        ("tp_rt(limit=abc)", "option 'limit' of pass 'tp_rt' must be an integer, not 'abc'"),
        ("tp_rt(flag=maybe)", "option 'flag' of pass 'tp_rt' must be true or false, not 'maybe'"),
        ("tp_rt(flag=2)", "option 'flag' of pass 'tp_rt' must be true or false, not '2'"),
        ("tp_rt(scale=nan)", "option 'scale' of pass 'tp_rt' must be a finite number, not 'nan'"),
        ("tp_rt(scale=inf)", "option 'scale' of pass 'tp_rt' must be a finite number, not 'inf'"),
        ("tp_rt(scale=-inf)", "option 'scale' of pass 'tp_rt' must be a finite number, not '-inf'"),
        ("tp_rt(scale=1e999)", "option 'scale' of pass 'tp_rt' must be a finite number, not '1e999'"),
        ("tp_rt(scale=abc)", "option 'scale' of pass 'tp_rt' must be a finite number, not 'abc'"),
        ("tp_rt(mode=medium)", "option 'mode' of pass 'tp_rt' must be one of fast, slow, exact, not 'medium'"),
        ("tp_rt(mode=FAST)", "option 'mode' of pass 'tp_rt' must be one of fast, slow, exact, not 'FAST'"),
        ("tp_rt(kind=d)", "option 'kind' of pass 'tp_rt' must be one of a, b, c, not 'd'"),
        ("fold(rounds=many)", "option 'rounds' of pass 'fold' must be an integer, not 'many'"),
    ],
)
def test_bad_values(spec, message):
    with pytest.raises(SpecError) as exc:
        parse(spec)
    e = exc.value
    assert e.message == message
    assert e.exit_code == 2
    assert e.option == re.search(r"option '(\w+)'", message).group(1)


def test_literal_non_choice_did_you_mean():
    with pytest.raises(SpecError) as exc:
        parse("tp_rt(mode=fsat)")
    assert exc.value.hint == "did you mean 'fast'?"


def test_options_post_init_errors_become_spec_errors():
    with pytest.raises(SpecError) as exc:
        parse("fold(rounds=0)")
    assert exc.value.message == "bad options for pass 'fold': rounds must be >= 1"
    assert exc.value.exit_code == 2
    with pytest.raises(SpecError, match="max_growth must be >= 0"):
        parse("fold(max_growth=-1)")


def test_duplicate_option():
    with pytest.raises(SpecError) as exc:
        parse("tp_rt(count=1,count=2)")
    e = exc.value
    assert e.message == "option 'count' of pass 'tp_rt' is given twice"
    assert e.option == "count" and e.pass_name == "tp_rt"
    assert e.exit_code == 2


def test_int_literal_option_round_trips():
    steps = parse("tp_bits")
    assert format_pipeline(steps) == "tp_bits(bits=8)"
    assert parse("tp_bits(bits=8)") == steps
    assert parse("tp_bits(bits=4)")[0].options.bits == 4


# --------------------------------------------------------------------------------------------------
# Order rules: checked, never solved by reordering


def test_order_rule_violation_names_both_passes():
    with pytest.raises(SpecError) as exc:
        parse("tp_beta,tp_alpha")
    e = exc.value
    assert e.message == "pass 'tp_alpha' must come before 'tp_beta', but the spec runs 'tp_beta' first"
    assert "tp_alpha" in e.hint and "tp_beta" in e.hint and "never reorders" in e.hint
    assert e.pass_name == "tp_alpha"
    assert e.exit_code == 2


def test_order_rule_with_passes_in_between_and_repeats():
    with pytest.raises(SpecError, match="'tp_alpha' must come before 'tp_beta'"):
        parse("tp_beta,tp_none,fold,tp_alpha")
    with pytest.raises(SpecError, match="'tp_alpha' must come before 'tp_beta'"):
        parse("tp_alpha,tp_beta,tp_alpha")


def test_order_kept_as_written():
    assert [s.name for s in parse("tp_alpha,tp_beta")] == ["tp_alpha", "tp_beta"]
    assert [s.name for s in parse("tp_none,tp_alpha,fold,tp_beta")] == ["tp_none", "tp_alpha", "fold", "tp_beta"]
    # unrelated passes are never sorted
    assert [s.name for s in parse("tp_none,fold,tp_rt")] == ["tp_none", "fold", "tp_rt"]
    assert [s.name for s in parse("fold,fold")] == ["fold", "fold"]
    # the rule only applies when both are present
    assert [s.name for s in parse("tp_beta")] == ["tp_beta"]
    assert [s.name for s in parse("tp_alpha")] == ["tp_alpha"]


def test_check_order_does_not_mutate():
    steps = [Step("tp_beta", NoOptions()), Step("tp_alpha", NoOptions())]
    before = list(steps)
    with pytest.raises(SpecError):
        check_order(steps)
    assert steps == before


# --------------------------------------------------------------------------------------------------
# The runner


def _tiny_model() -> ir.Model:
    return ir.from_onnx_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) {
            y = Relu(x)
        }
        """
    )


def test_run_pipeline_names_a_failing_pass():
    with pytest.raises(PassFailedError) as exc:
        run_pipeline(_tiny_model(), parse("tp_none,tp_boom"), PassContext())
    e = exc.value
    assert e.pass_name == "tp_boom"
    assert e.exit_code == 1
    assert e.message == "pass 'tp_boom' failed: RuntimeError: kaboom inside the pass"


def test_run_pipeline_records_counters_declines_and_specs():
    records = run_pipeline(_tiny_model(), parse("tp_count,tp_rt(count=2)"), PassContext())
    assert [r.name for r in records] == ["tp_count", "tp_rt"]
    assert records[0].counters == {"seen": 2}
    assert records[0].declines == {"not today": 2}
    assert records[0].modified is True
    assert records[1].modified is False
    assert records[1].spec == "tp_rt(count=2,scale=0.5,flag=false,mode=fast,kind=a,label=abc,limit=none)"
    assert records[0].before.nodes == 1 and records[0].after.nodes == 1
    d = records[0].to_dict()
    assert d["name"] == "tp_count" and d["counters"] == {"seen": 2} and d["validation"] is None


def test_run_pipeline_after_each_sees_every_step_in_order():
    seen = []
    run_pipeline(_tiny_model(), parse("tp_none,fold,tp_none"), PassContext(),
                 after_each=lambda step, model, rec: seen.append((step.name, rec.name)))
    assert seen == [("tp_none", "tp_none"), ("fold", "fold"), ("tp_none", "tp_none")]


def test_every_registered_pass_default_spec_round_trips():
    from onnxshrink.registry import all_passes

    names = [p.name for p in all_passes()]
    order = sorted(names, key=lambda n: ["fold", "prune", "lowrank", "quant"].index(n)
                   if n in ("fold", "prune", "lowrank", "quant") else -1)
    text = format_pipeline(parse(",".join(order)))
    assert format_pipeline(parse(text)) == text


def test_glob_and_alternation_values_parse():
    steps = parse("quant(exclude=/blocks/*|fc[12]:0)")
    assert steps[0].options.exclude == "/blocks/*|fc[12]:0"


def test_mixed_word_and_bool_choices_print_as_written():
    with pytest.raises(SpecError, match=r"must be one of auto, true, false, not 'treu'") as exc:
        parse("quant(cle=treu)")
    assert exc.value.hint == "did you mean 'true'?"
    assert parse("quant(cle=false)")[0].options.cle is False and parse("quant")[0].options.cle == "auto"
