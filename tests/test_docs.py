"""The manual and the README: the generated CLI reference matches the code, the manual builds in strict
mode, relative links resolve, and the README keeps its two set-up commands where CI reads them."""
from __future__ import annotations

import importlib.util
import re
import subprocess
from collections import Counter
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# [text](target) and ![alt](target), not inside code spans or fenced blocks
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", REPO / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative_links(markdown: str) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_cli_reference_is_what_the_code_prints():
    gen = _gen_cli()
    committed = gen.CLI_MD.read_text(encoding="utf-8")
    rendered = gen.render()
    assert rendered == committed, (f"docs/cli.md is out of date with the commands' --help: regenerate it with "
                                   f"`{gen.REGENERATE}` and commit the result")


def test_the_cli_reference_covers_every_command():
    gen = _gen_cli()
    names = {" ".join(p) for p in gen.command_paths()}
    assert {"train", "search", "export", "verify", "predict", "explain", "serve", "evaluate", "genotype show",
            "data inspect", "data shapes"} <= names
    text = gen.CLI_MD.read_text(encoding="utf-8")
    assert "\x1b[" not in text                                  # plain text, no ANSI
    assert all(f"## `nasx {name}`" in text for name in names if name)


# an option name wherever the help prints one: in its panel row, or in a sentence of help text
OPTION_NAME = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _help(path: tuple[str, ...]) -> str:
    """``nasx PATH... --help`` as a user sees it, rendered by whatever Typer and rich are installed."""
    from typer.testing import CliRunner

    from nasxserve.cli import app
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="nasx", color=False,
                                env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "FORCE_COLOR": None})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.stdout)


def _sections(page: str) -> dict[str, str]:
    """The page's part for each command: ``nasx data shapes`` -> its heading up to the next heading."""
    parts = re.split(r"^## `([^`]+)`$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_option_and_argument_the_help_prints_is_in_the_reference():
    """The page says what --help says: the same usage line (so the same arguments, in order), and each option
    name as often as the help prints it (once in its row, then wherever a help text mentions it): an option
    the page left out, or one the command no longer has, changes a count."""
    gen = _gen_cli()
    sections = _sections(gen.CLI_MD.read_text(encoding="utf-8"))
    for path in gen.command_paths():
        name = " ".join(("nasx", *path))
        section, text = sections[name], _help(path)
        usage = next(line for line in text.splitlines() if "Usage:" in line).split("Usage:", 1)[1].strip()
        assert usage.startswith(name) and f"```text\n{usage}\n```" in section, (name, usage)
        printed, listed = Counter(OPTION_NAME.findall(text)), Counter(OPTION_NAME.findall(section))
        assert printed == listed, (f"{name}: options --help prints (+) and docs/cli.md has (-) differ: "
                                   f"+{dict(printed - listed)} -{dict(listed - printed)}")


def test_the_manual_builds_in_strict_mode(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "cli" / "index.html").is_file()


def test_readme_links_point_at_files_that_exist():
    links = _relative_links(README.read_text(encoding="utf-8"))
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (REPO / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_manual_links_only_inside_the_manual():
    # mkdocs checks links between pages; a link out of docs/ (to the README or the source tree) would
    # point at nothing once the manual is published
    for page in sorted((REPO / "docs").glob("*.md")):
        for link in _relative_links(page.read_text(encoding="utf-8")):
            target = (page.parent / link.split("#", 1)[0]).resolve()
            assert target.is_relative_to(REPO / "docs"), f"{page.name} links out of docs/: {link}"


def test_readme_stays_short_and_opens_with_the_two_set_up_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    # the title paragraph, then the set-up block
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    lang, body = blocks[0]
    before = text[:text.index("```")]
    assert lang == "bash" and "\n## " not in before
    lines = body.splitlines()
    assert lines[0].startswith("# 1. install and run the main job")
    assert lines[2].startswith("# 2. install and run the tests")
    # .ci/run runs the README's second command, nothing weaker
    assert lines[3] in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_user_facing_text_names_no_development_paths():
    # ../shared/ holds the development machine's data subsets: only the developer pages may name it
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        if page.name in ("results.md", "development.md"):
            continue
        assert "shared/data" not in page.read_text(encoding="utf-8"), page.name
        assert "../shared" not in page.read_text(encoding="utf-8"), page.name
