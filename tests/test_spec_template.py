"""Command templates: substitution, shell quoting and the refusal of unsafe placements."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobfleet.errors import SpecError
from jobfleet.spec.template import compile_template, fields, render


def sh(command: str) -> str:
    out = subprocess.run(["sh", "-c", command], capture_output=True, check=True).stdout
    return out.decode("utf-8", "surrogateescape")


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]),
               max_size=40))
def test_any_value_reaches_the_command_as_one_literal_argument(value: str) -> None:
    command = render("printf %s {x}", {"x": value})
    assert sh(command) == value


@pytest.mark.parametrize("value", [
    "a b", "it's", 'say "hi"', "x; touch pwned", "$(touch pwned)", "`touch pwned`",
    "a\nb", "", "*", "~", "-n", "$HOME", "a\\b",
])
def test_hostile_values_stay_data(value: str, tmp_path: Path) -> None:
    command = render("cd {d} && printf %s {x}", {"d": str(tmp_path), "x": value})
    assert sh(command) == value
    assert not (tmp_path / "pwned").exists()


def test_double_braces_are_literal_and_empty_name_is_key_empty() -> None:
    assert render("awk '{{print $1}}' {}", {"": "f g"}) == "awk '{print $1}' 'f g'"
    assert render("a }}{{ b", {}) == "a }{ b"
    assert render("{x}{x}", {"x": "1"}) == "11"


def test_fields_lists_names_used() -> None:
    assert fields("gzip {a} > {b}.gz {a} {{c}} {}") == {"a", "b", ""}
    assert fields("plain") == set()


def test_unknown_field_names_place_field_and_available_names() -> None:
    with pytest.raises(SpecError) as e:
        render("echo {smaple}", {"sample": "1", "cpus": "2"}, source="jobs.csv", line=4)
    text = str(e.value)
    assert text.startswith("jobs.csv:4: column 'command': unknown field {smaple}")
    assert "did you mean {sample}" in text
    assert "{cpus}" in text and "{sample}" in text
    assert (e.value.source, e.value.line, e.value.column) == ("jobs.csv", 4, "command")


@pytest.mark.parametrize("template, words", [
    ("echo {x", "unclosed '{'"),
    ("echo x}", "single '}'"),
    ("echo {a{b}", "unclosed '{'"),
])
def test_syntax_errors(template: str, words: str) -> None:
    with pytest.raises(SpecError, match=words) as e:
        compile_template(template, source="j.yaml", line=3)
    assert str(e.value).startswith("j.yaml:3: column 'command'")
    assert "double it" in (e.value.hint or "")


@pytest.mark.parametrize("template, where", [
    ("echo '{x}'", "inside '...'"),
    ('echo "{x}"', 'inside "..."'),
    ("echo \"a $(b) {x}\"", 'inside "..."'),
    ("echo $'{x}'", "inside '...'"),
    ("echo \\{x}", "after a backslash"),
    ("cat <<EOF\nhello {x}\nEOF", "here-document"),
    ("echo ${x}", "variable"),
])
def test_fields_where_quoting_cannot_protect_are_refused(template: str, where: str) -> None:
    with pytest.raises(SpecError, match=where):
        compile_template(template)


@pytest.mark.parametrize("template", [
    'out="$(basename {x})"',
    "echo `cat {x}`",
    "cat <<EOF\nhi\nEOF\necho {x}",
    "echo it\\'s {x}",
    "echo {x} # it's fine",
    "echo ${{HOME}} {x} \"$HOME\"",
    "( cd {x} && ls )",
])
def test_safe_placements_are_accepted(template: str) -> None:
    assert compile_template(template).names == ("x",)


def test_plain_templates_do_not_quote() -> None:
    assert render("out/{s}.txt", {"s": "a b"}, shell=False) == "out/a b.txt"
    assert render("'{s}'", {"s": "a"}, shell=False) == "'a'"


def test_compiled_template_is_reused_and_cheap() -> None:
    t = compile_template("gzip -k {f}")
    assert compile_template("gzip -k {f}") is t
    assert t({"f": "a b"}) == "gzip -k 'a b'"
    with pytest.raises(SpecError, match="unknown field"):
        t({}, source="x.csv", line=9)


def test_non_text_template_is_an_error() -> None:
    with pytest.raises(SpecError, match="must be text"):
        compile_template(5, source="j.json", line=2)  # type: ignore[arg-type]


def test_percent_signs_braces_and_repeated_fields_render_as_written() -> None:
    t = compile_template("printf '100%%s %d\\n' {a} {b} {a} {{x}}")
    assert t({"a": "x y", "b": "%s"}) == "printf '100%%s %d\\n' 'x y' %s 'x y' {x}"
    assert compile_template("50% {{}}")({}) == "50% {}"
    assert compile_template("n={n}", shell=False)({"n": 3}) == "n=3"  # type: ignore[dict-item]
