"""Any option set a user can type either converts or is refused in one line with exit 2 (3 for a refused model):
never a traceback, an internal error or exit 1. Hypothesis draws the options of every form from their declared
fields, with values that are right, wrong in type, out of range or malformed."""

from __future__ import annotations

import typing

import lcc_cli
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx_compile.compiler import option_classes
from longctx_compile.forms import FORMS
from longctx_compile.options import fields_of

NOISE = ["", "-1", "0", "1", "2", "3", "0.5", "1.5", "all", "upper", "0,1", "1,0,7", "x", "true", "off", "2x1", "1e9"]


def values(hint) -> st.SearchStrategy[str]:
    """What a user might type for a field of type ``hint``: its own kinds of values, and noise."""
    choices = [str(a) for a in typing.get_args(hint) if isinstance(a, str)]
    if hint is bool:
        choices = ["true", "false", "maybe"]
    elif hint is int or int in typing.get_args(hint):
        return st.one_of(st.integers(-4, 300).map(str), st.sampled_from(NOISE))
    return st.sampled_from(choices + NOISE) if choices else st.sampled_from(NOISE)


def option_sets(form: str) -> st.SearchStrategy[list[str]]:
    # capture and lowering options (max_len, attn, tile sizes) are exercised by their own tests; these are the form's
    fields = fields_of(option_classes(form)[2])
    pair = st.sampled_from(sorted(fields)).flatmap(lambda key: values(fields[key]).map(lambda value: f"{key}={value}"))
    return st.lists(pair, min_size=1, max_size=3)


@pytest.mark.parametrize("form", [f for f in FORMS if f != "dense"])
def test_any_option_set_converts_or_is_one_line_exit_2(form, tmp_path_factory):
    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(option_sets(form))
    def check(options):
        out = tmp_path_factory.mktemp(form) / "m.lcc"
        args = ["convert", "tiny-llama", "--to", form, "-o", str(out)]
        for option in options:
            args += ["--opt", option]
        result = lcc_cli.run(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, (options, result.stderr)
        if result.returncode == 0:
            assert (out / "lcc.json").is_file()
        else:
            assert result.returncode in (2, 3) and len(lines) == 1 and lines[0].startswith("error:"), (options, result.returncode, result.stderr)
            assert not out.exists()

    check()
